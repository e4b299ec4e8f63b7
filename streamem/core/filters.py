"""Fourier filters on images and maps: raised-cosine low/high-pass, phase
randomisation, Fourier cropping/padding.

All work on the last ``ndim`` axes (default: every axis of a 2-D image or 3-D map;
pass ``ndim=2`` for a stack of images) of square/cubic arrays with the centre at
``B // 2``. Shell k corresponds to ``B * pixel_size_A / k`` Å.

The low-pass edge follows RELION's ``lowPassFilterMap``: a raised cosine from 1 at
shell ``k_c - w/2`` to 0 at ``k_c + w/2``, with ``k_c = B * pixel_size_A / resolution_A``
and ``w = edge_width_shells``; the high-pass is its complement.
"""

from __future__ import annotations

import numpy as np

from streamem.core.backend import (
    asarray_like,
    astype,
    copy,
    fftshift,
    ifftshift,
    irfftn,
    rfftn,
    xp_of,
)
from streamem.core.fourier import rfft_radius


def _axes(x, ndim):
    ndim = x.ndim if ndim is None else ndim
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    return ndim, tuple(range(x.ndim - ndim, x.ndim))


def _to_fourier(x, ndim):
    ndim, axes = _axes(x, ndim)
    B = x.shape[-1]
    if any(x.shape[a] != B for a in axes):
        raise ValueError(f"expected square/cubic last {ndim} axes, got {x.shape}")
    return rfftn(ifftshift(x, axes), axes), axes, ndim, B


def _from_fourier(F, axes, B, dtype):
    xp = xp_of(F)
    x = irfftn(F, s=(B,) * len(axes), axes=axes)
    keep = dtype if dtype in (xp.float32, xp.float64) else xp.float32
    return astype(fftshift(x, axes), keep)


def _lowpass_profile(radius, cutoff_shell, edge_width_shells):
    xp = xp_of(radius)
    lo = max(cutoff_shell - edge_width_shells / 2.0, 0.0)
    hi = cutoff_shell + edge_width_shells / 2.0
    if hi <= lo:
        return astype(radius <= cutoff_shell, xp.float64)
    t = xp.clip((radius - lo) / (hi - lo), 0.0, 1.0)
    return 0.5 * (1.0 + xp.cos(np.pi * t))


def lowpass(x, resolution_A: float, pixel_size_A: float, edge_width_shells: float = 2, ndim=None):
    """Low-pass filter to ``resolution_A`` with a raised-cosine edge (module docstring)."""
    F, axes, ndim, B = _to_fourier(x, ndim)
    r = rfft_radius(B, ndim, xp_of(x))
    prof = _lowpass_profile(r, B * pixel_size_A / resolution_A, edge_width_shells)
    return _from_fourier(F * prof, axes, B, x.dtype)


def highpass(x, resolution_A: float, pixel_size_A: float, edge_width_shells: float = 2, ndim=None):
    """High-pass filter: removes what :func:`lowpass` keeps (1 - its profile)."""
    F, axes, ndim, B = _to_fourier(x, ndim)
    r = rfft_radius(B, ndim, xp_of(x))
    prof = 1.0 - _lowpass_profile(r, B * pixel_size_A / resolution_A, edge_width_shells)
    return _from_fourier(F * prof, axes, B, x.dtype)


def phase_randomise(x, beyond_resolution_A: float, pixel_size_A: float, rng, ndim=None):
    """Randomise Fourier phases at shells beyond ``beyond_resolution_A`` (amplitudes kept).

    As RELION's post-processing does for the noise-substituted FSC: shells with
    ``round(|k|) > B * pixel_size_A / beyond_resolution_A`` get uniformly random
    phases. The random phases are those of a white-noise map drawn from ``rng``
    (a ``numpy.random.Generator``), so they are Hermitian and the result is real.
    """
    xp = xp_of(x)
    F, axes, ndim, B = _to_fourier(x, ndim)
    r = rfft_radius(B, ndim, xp)
    k_cut = B * pixel_size_A / beyond_resolution_A
    noise = asarray_like(rng.standard_normal(x.shape), x)  # host RNG, then to x's device
    N = rfftn(noise, axes)
    phase = N / xp.maximum(xp.abs(N), 1e-30)
    F = xp.where(xp.round(r) > k_cut, F * phase, F)
    return _from_fourier(F, axes, B, x.dtype)


def fourier_crop(x, new_box: int, ndim=None):
    """Downsample by cropping the Fourier transform to a ``new_box`` box.

    Values are scaled so that a constant map stays constant (a band-limited map
    keeps its values at the coarser sampling); the pixel size grows by
    ``B / new_box``. ``new_box <= B``.
    """
    return _fourier_resize(x, new_box, ndim)


def fourier_pad(x, new_box: int, ndim=None):
    """Upsample by zero-padding the Fourier transform to a ``new_box`` box (``>= B``)."""
    return _fourier_resize(x, new_box, ndim)


def _fourier_resize(x, new_box: int, ndim):
    F, axes, ndim, B = _to_fourier(x, ndim)
    if new_box == B:
        return copy(x)
    G = resize_rfft(F, new_box, ndim)
    scale = (new_box / B) ** ndim
    return _from_fourier(G * scale, axes, new_box, x.dtype)


def resize_rfft(F, new_box: int, ndim: int, drop_nyquist: bool = False):
    """Crop or zero-pad the rfft ``batch + (B, [B,] B // 2 + 1)`` of a B box to ``new_box``.

    Keeps the integer frequencies representable in both boxes: |k| < n/2, plus -n/2
    for even n = min(B, new_box) (or not, with ``drop_nyquist``: then every kept
    frequency has |k| < n/2 on every axis, the M-step's work-frame rule). Values are
    not rescaled. Axis by axis a gather (``take``) with a mask: no scatter, so it
    runs in any array-API namespace.
    """
    xp = xp_of(F)
    B = F.shape[-2]
    n = min(B, new_box)
    lim = n // 2 if drop_nyquist else (n + 1) // 2
    # Host-side index tables (tiny): for each output index its source index or -1.
    out_f = np.fft.fftfreq(new_box, d=1.0 / new_box).astype(np.int64)
    ok_full = (out_f >= -(n // 2)) & (out_f < lim) if not drop_nyquist else np.abs(out_f) < lim
    src_full = np.where(ok_full, out_f % B, 0)
    h = np.arange(new_box // 2 + 1)
    ok_half = h < (lim if drop_nyquist else n // 2 + 1)
    src_half = np.where(ok_half, h, 0)
    G = F
    for a in range(F.ndim - ndim, F.ndim):
        last = a == F.ndim - 1
        src, ok = (src_half, ok_half) if last else (src_full, ok_full)
        G = xp.take(G, asarray_like(src, F), axis=a)
        shape = [1] * F.ndim
        shape[a] = ok.size
        G = xp.where(asarray_like(ok.reshape(shape), F), G, xp.zeros((), dtype=G.dtype))
    return G
