"""class3d's random halves and their classes: the signal power each class is regularised
with (:func:`class_tau2`) and the pairing of the two halves' classes when each half is
scored against the other's (:func:`half_class_pairing`, :func:`repair_second_half`).
Pure functions over arrays; the decisions and their measurements are in
:mod:`streamem.em.classify3d`'s docstring.
"""

from __future__ import annotations

import numpy as np

from streamem.em import mstep


def class_tau2(maps: np.ndarray, fractions, mask, source: str) -> list:
    """Each class's signal power τ² for its M-step (``Class3DOptions.tau2_from``).

    maps: (K, B, B, B) the classes' current references on the data's scale; fractions
    (K,) their sizes; mask: (B, B, B) or None, applied before the power is taken.
    Returns K (B//2+1,) float64 spectra (:func:`streamem.em.mstep.tau2_from_map`):
    ``reference`` each class's own map's power (RELION), ``pooled`` one spectrum for
    all, Σ_k π_k of those; or K Nones for ``fsc`` (τ² from each class's half FSC).
    """
    if source == "fsc":
        return [None] * len(maps)
    own = [mstep.tau2_from_map(m * mask if mask is not None else m) for m in maps]
    if source == "reference":
        return own
    pooled = np.tensordot(np.asarray(fractions, np.float64), np.stack(own), axes=1)
    return [pooled] * len(maps)


def half_class_pairing(half_maps: np.ndarray, mask) -> np.ndarray:
    """Which class of half 2 is each class of half 1: (K,) indices, ``pairing[k]`` the
    half-2 class paired with half-1 class k.

    half_maps: (2, K, B, B, B); mask: (B, B, B) or None. Crossed halves keep one
    labelling only while each half's class k holds the same state: a state that
    emerges as class 3 in one half and class 2 in the other (from the random first
    split) would swap labels every iteration, and each joined class would mix two
    states. The classes are compared after removing each half's mean over its
    populated classes (what they share), and paired to maximise the summed correlation
    (Hungarian); empty classes pair with anything.
    """
    from scipy.optimize import linear_sum_assignment

    K = half_maps.shape[1]
    inside = mask if mask is not None else 1.0
    rows = []
    for h in range(2):
        m = (half_maps[h] * inside).reshape(K, -1).astype(np.float64)
        populated = np.any(m != 0, axis=1)  # an empty class's map is zero: not in the mean
        d = m - m[populated].mean(axis=0) if populated.any() else m
        d[~populated] = 0.0
        rows.append(d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-30))
    correlation = rows[0] @ rows[1].T  # (K, K): half-1 class × half-2 class
    _, pairing = linear_sum_assignment(-correlation)
    return pairing


def repair_second_half(stats, pairing: np.ndarray) -> None:
    """Half 2's accumulators and class weights re-ordered so that class k of both halves
    is ``pairing`` (:func:`half_class_pairing`); in place."""
    K = len(pairing)
    order = 2 * np.asarray(pairing) + 1  # accumulator 2k + 1: class k of half 2
    second = 2 * np.arange(K) + 1
    stats.data_acc[second] = stats.data_acc[order]
    stats.weight_acc[second] = stats.weight_acc[order]
    stats.class_weight_halves[1] = stats.class_weight_halves[1][pairing]
    stats.class_weight = stats.class_weight_halves.sum(axis=0)


def half_map_error_power(
    weight_acc, tau2_maps: list, fsc_halves, work_box: int, padding_factor: int,
    tau2_fudge: float, symmetry_matrices, mask, n_shells: int,
) -> np.ndarray:  # fmt: skip
    """The expected error power of each half's class map (2, K, n_shells) float64.

    Per complex component and shell, in full-box DFT units (as τ² and σ²): the mean
    squared error of the regularised estimate F = Σ c X/σ² / (W + a), a = 1/(fudge·τ²),
    (φ·W + a²τ²) / (W + a)², its variance (φ the mask's mean square: masking the
    reference keeps that share of the white reconstruction noise) plus its shrinkage
    towards zero, taking the true power to be τ². W = 1/σ²_rec is the back-projected
    weight of the class's half (a class of few particles has a small W, a noisy and
    shrunk map, a large error). Shells without signal power (τ² = 0) get 0: the map is
    zero there for every class. weight_acc: (2K, *grid) accumulators, index 2k + h;
    tau2_maps: K per-shell τ² (:func:`class_tau2`) or Nones, then τ² from the half
    FSC ``fsc_halves`` (K, ≥ work_box//2+1) as :func:`streamem.em.mstep.reconstruct_halves`
    takes it. Used by :class:`streamem.em.estep.EStepModel` ``reference_error_power``.
    """
    K = len(tau2_maps)
    phi = float(np.mean(np.asarray(mask, np.float64) ** 2)) if mask is not None else 1.0
    out = np.zeros((2, K, n_shells))
    for k in range(K):
        for h in range(2):
            noise = mstep.reconstruction_noise(
                weight_acc[2 * k + h], work_box, padding_factor, symmetry_matrices
            )
            tau2 = tau2_maps[k]
            if tau2 is None:
                tau2 = mstep.tau2_from_fsc(fsc_halves[k], noise)
            n = min(len(noise), len(tau2), n_shells)
            sigma2_rec, t = noise[:n], np.asarray(tau2, np.float64)[:n]
            W = np.where(sigma2_rec > 0, 1.0 / np.where(sigma2_rec > 0, sigma2_rec, 1.0), 0.0)
            ok = t > 0
            a = np.where(ok, 1.0 / (tau2_fudge * np.where(ok, t, 1.0)), 0.0)
            mse = (phi * W + a * a * t) / np.where(ok, (W + a) ** 2, 1.0)
            out[h, k, :n] = np.where(ok, mse, 0.0)
    return out
