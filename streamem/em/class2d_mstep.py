"""class2d's M-step, initial classes and centring (pure functions over arrays).

M-step: the class average is Σ CTF·X/σ² / (Σ CTF²/σ² + 1/(fudge·τ²)) (RELION's Wiener
form). τ² per class and shell is estimated from the class's own data (no half sets in
class2d): the unregularised average D/W has noise power 2/W per coefficient, so
τ²(s) = max(0, ⟨|D/W|²⟩_s/2 − ⟨1/W⟩_s) (per complex component, as σ²). RELION instead
reuses the previous iteration's reference power; this estimate needs no history. The
class's data-vs-prior fudge·τ²·⟨W⟩ gives its resolution (rlnEstimatedResolution: the
last shell before it drops below 1). ``center_classes`` moves each average's centre of
mass (of its positive part) to the box centre (:func:`center_of_mass_shift`).

Initial classes: K averages of a seeded random partition of the first chunks' images
(at most ``max(20·K, one chunk)`` images, :func:`first_images`), phase-flipped, masked.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from streamem.core.backend import fftshift, ifftshift, irfftn, rfftn
from streamem.core.ctf import OpticsParams, ctf_rfft, phase_flip
from streamem.io.store import ParticleStore


def maximisation_2d(
    data_acc: np.ndarray,
    weight_acc: np.ndarray,
    shell: np.ndarray,
    n_shells: int,
    tau2_fudge: float,
):
    """Regularised class averages from the summed statistics (module docstring).

    data_acc (K, M) complex, weight_acc (K, M), shell (M,) int. Returns (averages (K, M)
    complex128, τ² (K, n_shells), data-vs-prior (K, n_shells)).
    """
    K = data_acc.shape[0]
    count = np.bincount(shell, minlength=n_shells)[:n_shells].astype(np.float64)
    tau2 = np.zeros((K, n_shells))
    dvp = np.zeros((K, n_shells))
    out = np.zeros_like(data_acc, dtype=np.complex128)
    for k in range(K):
        w = weight_acc[k]
        ok = w > 0
        if not ok.any():
            continue
        raw = np.where(ok, data_acc[k] / np.where(ok, w, 1.0), 0.0)
        n_ok = np.bincount(shell[ok], minlength=n_shells)[:n_shells]
        with np.errstate(divide="ignore", invalid="ignore"):
            p_raw = np.bincount(shell[ok], np.abs(raw[ok]) ** 2, n_shells)[:n_shells] / n_ok
            noise = np.bincount(shell[ok], 1.0 / w[ok], n_shells)[:n_shells] / n_ok
            mean_w = np.bincount(shell, w, n_shells)[:n_shells] / count
        t2 = np.nan_to_num(np.maximum(0.5 * p_raw - noise, 0.0))
        tau2[k] = t2
        dvp[k] = np.nan_to_num(tau2_fudge * t2 * mean_w)
        prior = np.where(t2[shell] > 0, 1.0 / (tau2_fudge * np.maximum(t2[shell], 1e-300)), np.inf)
        with np.errstate(invalid="ignore"):
            out[k] = np.where(np.isfinite(prior), data_acc[k] / (w + prior), 0.0)
    return out, tau2, dvp


def resolution_shell(data_vs_prior: np.ndarray) -> int:
    """Last shell s ≥ 1 such that shells 1..s all have data-vs-prior ≥ 1 (0 if none)."""
    low = np.flatnonzero(data_vs_prior[1:] < 1.0)
    return int(low[0]) if low.size else len(data_vs_prior) - 1


def center_of_mass_shift(image: np.ndarray) -> np.ndarray:
    """(dy, dx) pixels that move the centre of mass of the image's positive part to B//2."""
    pos = np.clip(image, 0, None)
    total = pos.sum()
    if total <= 0:
        return np.zeros(2)
    com = np.asarray(ndimage.center_of_mass(pos))
    return image.shape[-1] // 2 - com


def shift_image(image: np.ndarray, shift_px) -> np.ndarray:
    """Image moved by (dy, dx) pixels (Fourier phase shift, periodic)."""
    B = image.shape[-1]
    ky = np.fft.fftfreq(B)[:, None]
    kx = np.fft.rfftfreq(B)[None, :]
    F = np.fft.rfft2(image) * np.exp(-2j * np.pi * (ky * shift_px[0] + kx * shift_px[1]))
    return np.fft.irfft2(F, s=(B, B)).astype(np.float32)


def initial_class_images(
    images: np.ndarray,
    metadata: dict[str, np.ndarray],
    n_classes: int,
    pixel_size_A: float,
    optics: tuple[OpticsParams, ...],
    mask: np.ndarray,
    seed: int,
    do_ctf: bool = True,
) -> np.ndarray:
    """K averages of a seeded random partition of ``images`` (phase-flipped), masked.

    images: (n, B, B) with n ≥ K. Returns (K, B, B) float32.
    """
    n, B = images.shape[0], images.shape[-1]
    data = np.asarray(images, np.float64)
    if do_ctf and "rlnDefocusU" in metadata:
        groups = np.asarray(metadata.get("rlnOpticsGroup", np.ones(n)), np.int64) - 1
        F = rfftn(ifftshift(data, axes=(-2, -1)), axes=(-2, -1))
        for g in np.unique(groups):
            sel = groups == g
            ctf = ctf_rfft(
                B,
                pixel_size_A,
                metadata["rlnDefocusU"][sel],
                metadata["rlnDefocusV"][sel],
                metadata["rlnDefocusAngle"][sel],
                optics[g],
                metadata.get("rlnPhaseShift", np.zeros(n))[sel],
            )
            F[sel] *= phase_flip(ctf)
        data = fftshift(irfftn(F, s=(B, B), axes=(-2, -1)), axes=(-2, -1))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2]))
    labels = rng.permutation(np.arange(n) % n_classes)  # every class gets ⌊n/K⌋ or more
    out = np.stack([data[labels == k].mean(axis=0) for k in range(n_classes)])
    return (out * mask).astype(np.float32)


def first_images(store: ParticleStore, n_classes: int):
    """The first chunks' images and metadata, at least max(20·K, one chunk) images if held."""
    want = max(20 * n_classes, store.chunk_size)
    imgs, metas = [], []
    for start, stop in store.chunk_bounds():
        chunk = store.read_chunk(start, stop)
        imgs.append(chunk.images)
        metas.append(chunk.metadata)
        if sum(i.shape[0] for i in imgs) >= want:
            break
    meta = {k: np.concatenate([m[k] for m in metas]) for k in metas[0]}
    return np.concatenate(imgs), meta
