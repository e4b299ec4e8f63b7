"""A micrograph's averaged amplitude spectrum from overlapping tiles (CTFFIND4's step 1).

The micrograph (H, W) is cut into square tiles of ``tile_px`` pixels overlapping by half
a tile; each tile has its mean removed and its edges tapered (a cosine over 1/16 of the
tile, so the tile border does not add a cross to the spectrum); the power spectra are
averaged and the square root taken: the *amplitude* spectrum, as CTFFIND4 fits
(Rohou & Grigorieff 2015). The spectrum stays on the rfft half-plane of a tile,
``(T, T // 2 + 1)`` with frequencies from :func:`streamem.core.ctf.rfft_frequencies`:
the CTF is centrosymmetric, so the other half holds nothing new.

Background: not subtracted here. The fit (:mod:`streamem.ctf.fit`) removes the smooth
part of the spectrum by projecting out a low-order radial polynomial over the fitted
band from the data *and from every model it tries* (the same linear operator on both),
so a background that is smooth in frequency cannot bias the defocus, whatever its
level; this replaces CTFFIND4's box-convolution background, which fails where Thon
rings are wider than the box (low defocus).
"""

from __future__ import annotations

import numpy as np
import scipy.fft

#: Smallest tile the fit accepts (pixels): a few Thon rings must fit in the band.
MIN_TILE_PX = 64


class SpectrumError(ValueError):
    """A micrograph from which no spectrum can be made (the message says why)."""


def tile_starts(length: int, tile_px: int) -> np.ndarray:
    """Start indices of tiles of ``tile_px`` overlapping by half, covering ``[0, length)``.

    The last tile ends at ``length`` exactly, so no border is left out.
    """
    if length < tile_px:
        return np.zeros(0, dtype=np.int64)
    step = max(1, tile_px // 2)
    starts = list(range(0, length - tile_px + 1, step))
    if starts[-1] != length - tile_px:
        starts.append(length - tile_px)
    return np.asarray(starts, dtype=np.int64)


def _taper(tile_px: int) -> np.ndarray:
    """Separable cosine edge taper ``(T, T)`` float64, 1 inside, falling to 0 at the edges."""
    n = max(2, tile_px // 16)
    w = np.ones(tile_px)
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)
    w[:n], w[-n:] = ramp, ramp[::-1]
    return np.outer(w, w)


def check_micrograph(image: np.ndarray, tile_px: int) -> None:
    """Raise :class:`SpectrumError` for an image no spectrum can be fitted on.

    2-D, at least one tile in each direction, finite, not constant (blank or all equal).
    """
    if image.ndim != 2:
        raise SpectrumError(f"a micrograph must be one 2-D image, got shape {image.shape}")
    h, w = image.shape
    if min(h, w) < tile_px:
        raise SpectrumError(f"{h} x {w} px is smaller than one {tile_px} px tile (--tile)")
    finite = np.isfinite(image)
    if not finite.all():
        raise SpectrumError(f"{int((~finite).sum())} pixels are NaN or Inf")
    if not float(np.ptp(image)) > 0:
        raise SpectrumError(f"all pixels are equal ({float(image.flat[0]):g}): blank")


def amplitude_spectrum(image: np.ndarray, tile_px: int = 512) -> np.ndarray:
    """Averaged amplitude spectrum ``(T, T // 2 + 1)`` float64 of overlapping tiles.

    ``image``: (H, W), any real dtype, checked by :func:`check_micrograph`. The DC term
    is set to 0 (tile means are removed; what is left there is the taper's leakage).
    Units: those of the image times pixels (unnormalised FFT); the fit is scale-free.
    """
    check_micrograph(image, tile_px)
    img = np.asarray(image, dtype=np.float32)
    taper = _taper(tile_px).astype(np.float32)
    ys, xs = tile_starts(img.shape[0], tile_px), tile_starts(img.shape[1], tile_px)
    power = np.zeros((tile_px, tile_px // 2 + 1), dtype=np.float64)
    for y0 in ys:
        # one row of tiles at a time: (n_x, T, T) in memory, not the whole set
        row = np.stack([img[y0 : y0 + tile_px, x0 : x0 + tile_px] for x0 in xs])
        row = row - row.mean(axis=(1, 2), keepdims=True)
        # scipy.fft keeps float32 (complex64): half the time of NumPy's complex128
        ft = scipy.fft.rfft2(row * taper, axes=(1, 2), workers=1)
        power += np.sum(ft.real**2 + ft.imag**2, axis=0, dtype=np.float64)
    power /= len(ys) * len(xs)
    power[0, 0] = 0.0
    return np.sqrt(power)


def centred_full_spectrum(half: np.ndarray) -> np.ndarray:
    """The full centred ``(T, T)`` spectrum of an rfft half-plane ``(T, T // 2 + 1)``.

    For display: the frequency origin at ``(T // 2, T // 2)``, x to the right.
    """
    t = half.shape[0]
    full = np.zeros((t, t), dtype=half.dtype)
    full[:, : half.shape[1]] = half
    # Friedel: S(-k) = S(k); column -kx holds row -ky of column kx
    kx = np.arange(1, t - half.shape[1] + 1)
    full[:, t - kx] = half[(-np.arange(t)) % t][:, kx]
    return np.fft.fftshift(full)
