"""class3d's class maps: the starting references and each class's reconstruction from
its random-half accumulators. Pure functions over arrays (no I/O, no Dask); the
decisions and their measurements are in :mod:`streamem.em.classify3d`'s docstring.
"""

from __future__ import annotations

import numpy as np

from streamem.core.filters import lowpass
from streamem.em import mstep


def initial_references(
    reference: np.ndarray,
    n_classes: int,
    ini_high_A: float,
    pixel_size_A: float,
    mask,
    amplitude: float,
    seed: int,
) -> np.ndarray:
    """K low-passed copies of a map, each with its own seeded low-pass noise (K, B, B, B)."""
    ref = lowpass(reference.astype(np.float32), ini_high_A, pixel_size_A)
    inside = mask if mask is not None else np.ones_like(ref)
    rms = float(np.sqrt(np.sum(ref**2 * inside) / max(np.sum(inside), 1)))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 3]))
    out = []
    for _ in range(n_classes):
        noise = (
            lowpass(rng.standard_normal(ref.shape).astype(np.float32), ini_high_A, pixel_size_A)
            * inside
        )
        noise *= (
            amplitude * rms / max(float(np.sqrt(np.sum(noise**2) / max(np.sum(inside), 1))), 1e-30)
        )
        out.append(ref + noise)
    return np.stack(out).astype(np.float32)


def reconstruct_class(
    data_acc, weight_acc, work_box, padding_factor, tau2_fudge, sym_mats, tau2_prior=None,
    with_halves=False,
):  # fmt: skip
    """One class's map from its two random-half accumulators (2, *grid).

    tau2_prior: (≥ b//2+1,) signal power of the class (RELION's data-vs-prior:
    :func:`streamem.em.mstep.tau2_from_map` of the class's current reference) or None
    for τ² from the half FSC corrected to the full set. Returns (map (b, b, b), FSC of
    the unregularised halves (b//2+1,), which gives the class's resolution estimate,
    and with ``with_halves`` the two half maps (2, b, b, b), each from its own
    accumulator with the same τ² (the FSC's, uncorrected, without ``tau2_prior``);
    else None).
    """
    if not np.any(weight_acc):
        empty = np.zeros((work_box,) * 3, np.float32)
        return (
            empty,
            np.zeros(work_box // 2 + 1),
            (np.stack([empty, empty]) if with_halves else None),
        )
    fsc_halves = mstep.unregularised_half_fsc(
        data_acc, weight_acc, work_box, padding_factor, sym_mats
    )
    joined = mstep.reconstruct_joined(
        data_acc, weight_acc, fsc_halves, work_box, padding_factor, tau2_fudge, sym_mats,
        tau2=tau2_prior,
    )  # fmt: skip
    halves = None
    if with_halves:
        halves = mstep.reconstruct_halves(
            data_acc, weight_acc, work_box, padding_factor, tau2_fudge, sym_mats, tau2=tau2_prior,
            fsc_halves=fsc_halves,
        )[0]  # fmt: skip
    return joined, fsc_halves, halves
