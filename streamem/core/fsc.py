"""Fourier shell correlation and resolution.

Shells are ``round(|k|)`` on the rfft grid (:func:`streamem.core.fourier.shell_index`),
``0 .. B // 2``; sums over the half grid are weighted by
:func:`streamem.core.fourier.rfft_multiplicity`, so the curve equals the one over
the full FFT grid. Shell k is the resolution ``B * pixel_size_A / k`` Å.

Thresholds (``CONVENTIONS.md``): 0.143 between independent half maps, 0.5 against
a noise-free truth.
"""

from __future__ import annotations

import numpy as np

from streamem.core.backend import conj, ifftshift, real, rfftn, to_numpy, xp_of
from streamem.core.fourier import radial_sum, rfft_multiplicity, shell_index


def fsc(map1, map2) -> np.ndarray:
    """FSC per shell between two real maps or images of the same square/cubic shape.

    Returns float64 NumPy ``(B // 2 + 1,)``; shell 0 is 1 by definition (RELION),
    and a shell where either map has no power gives 0.
    """
    if map1.shape != map2.shape:
        raise ValueError(f"shapes differ: {map1.shape} vs {map2.shape}")
    ndim = map1.ndim
    if ndim not in (2, 3) or len(set(map1.shape)) != 1:
        raise ValueError(f"fsc needs a square image or cubic map, got shape {map1.shape}")
    xp = xp_of(map1, map2)
    B = map1.shape[0]
    axes = tuple(range(ndim))
    f1 = rfftn(ifftshift(xp.asarray(map1, dtype=xp.float64), axes), axes)
    f2 = rfftn(ifftshift(xp.asarray(map2, dtype=xp.float64), axes), axes)
    return fsc_fourier(f1, f2, B)


def fsc_fourier(f1, f2, box_size: int) -> np.ndarray:
    """FSC from two rfft-grid transforms ``(B, [B,] B // 2 + 1)`` (see :func:`fsc`)."""
    xp = xp_of(f1, f2)
    ndim = f1.ndim
    shells = shell_index(box_size, ndim, xp)
    mult = rfft_multiplicity(box_size, ndim, xp)
    n = box_size // 2 + 1
    num = radial_sum(real(f1 * conj(f2)), shells, n, mult)
    d1 = radial_sum(xp.abs(f1) ** 2, shells, n, mult)
    d2 = radial_sum(xp.abs(f2) ** 2, shells, n, mult)
    den = xp.sqrt(d1 * d2)
    out = xp.where(den > 0, num / xp.where(den > 0, den, 1.0), 0.0)
    out = to_numpy(out).astype(np.float64)  # a short per-shell curve: back to the host
    out[0] = 1.0
    return out


def shell_resolution_A(box_size: int, pixel_size_A: float) -> np.ndarray:
    """Resolution (Å) of shells ``0 .. B // 2``; shell 0 is ``inf``."""
    k = np.arange(box_size // 2 + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(k > 0, box_size * pixel_size_A / np.where(k > 0, k, 1), np.inf)


def resolution_at(fsc_curve, threshold: float, box_size: int, pixel_size_A: float) -> float:
    """Resolution (Å) where the FSC first falls below ``threshold``.

    The crossing between shells ``k - 1`` (>= threshold) and ``k`` (< threshold) is
    linearly interpolated in shell number; the result is ``B * pixel_size_A / k*``.
    A curve that never falls below gives Nyquist (``2 * pixel_size_A`` for even B,
    the last shell's resolution otherwise); one that falls below at shell 1 gives
    the resolution of shell 1 interpolated from shell 0 (the box size, at worst).
    """
    c = np.asarray(to_numpy(fsc_curve), dtype=np.float64)
    below = np.flatnonzero(c[1:] < threshold)
    if below.size == 0:
        k_star = float(len(c) - 1)
    else:
        k = int(below[0]) + 1
        hi, lo = c[k - 1], c[k]
        t = (hi - threshold) / (hi - lo) if hi != lo else 0.0
        k_star = (k - 1) + float(np.clip(t, 0.0, 1.0))
    k_star = max(k_star, 1.0)
    return box_size * pixel_size_A / k_star
