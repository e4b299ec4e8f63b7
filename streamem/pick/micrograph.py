"""Grids and micrograph preparation of the template and LoG pickers.

The square S-pixel box, the work grid downscaled to the low-pass filter's Nyquist,
the filter and the CTF on that grid, and the normalised, padded, transformed
micrograph with its local background statistics (μ, σ, background structure).
Conventions: :mod:`streamem.pick.template`'s docstring ("Grids", "Carbon edges").
Arrays follow their namespace (NumPy or CuPy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft

from streamem.core.backend import irfftn, rfftn, to_numpy, xp_of
from streamem.core.ctf import (
    OpticsParams,
    ctf_from_frequencies,
    ctf_phase_from_frequencies,
)

OUTLIER_Z = 8.0  # RELION's --outlier_removal_zscore
SHRINK_PARTICLE_MASK_PX = 2  # RELION's --shrink_particle_mask
STRUCTURE_RESOLUTION_A = 20.0  # resolution of the background-structure test
MAX_BACKGROUND_STRUCTURE = 2.0  # default rejection level (pick.template: the rule)

# -- grids ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkGrid:
    """The square S-pixel micrograph box and its (downscaled) work grid of W pixels."""

    size_px: int
    work_px: int
    pixel_size_A: float
    cutoff_shell: float | None  # low-pass radius in S-box Fourier pixels (None: no filter)

    @property
    def scale(self) -> float:
        """Work pixels per original pixel (W / S)."""
        return self.work_px / self.size_px

    @property
    def work_pixel_A(self) -> float:
        return self.pixel_size_A * self.size_px / self.work_px


def even_fast_len(n: int) -> int:
    """The smallest even length >= n with small prime factors (a fast real FFT size)."""
    n = max(2, int(n))
    while True:
        m = scipy.fft.next_fast_len(n, real=True)
        if m % 2 == 0:
            return m
        n = m + 1


def work_grid(
    shape_px: tuple[int, int], pixel_size_A: float, lowpass_A: float | None, downscale: bool = True
) -> WorkGrid:
    """The work grid for a micrograph of ``shape_px`` (module docstring).

    ``lowpass_A`` None or at/below Nyquist (2 p): no filter, no downscaling.
    """
    S = int(max(shape_px))
    S += S % 2  # even boxes keep the centre conventions simple
    if lowpass_A is None or lowpass_A <= 2.0 * pixel_size_A:
        return WorkGrid(S, S, float(pixel_size_A), None)
    cutoff = S * pixel_size_A / lowpass_A
    W = min(S, even_fast_len(2 * math.ceil(cutoff))) if downscale else S
    return WorkGrid(S, W, float(pixel_size_A), float(cutoff))


def crop_rfft(F, work_px: int):
    """Crop a ``(..., S, S//2+1)`` rfft grid to ``(..., W, W//2+1)`` (Nyquist row/column zeroed)."""
    S = F.shape[-2]
    if work_px == S:
        return F
    xp = xp_of(F)
    h = work_px // 2
    G = xp.zeros(F.shape[:-2] + (work_px, h + 1), dtype=F.dtype)
    G[..., :h, :h] = F[..., :h, :h]
    G[..., work_px - h + 1 :, :h] = F[..., S - h + 1 :, :h]
    return G


def grid_frequencies(grid: WorkGrid, xp=np):
    """(ky, kx) float64 ``(W, W//2+1)``: integer S-box frequencies of the work rfft grid."""
    W = grid.work_px
    ky = xp.fft.fftfreq(W, d=1.0 / W)
    kx = xp.arange(W // 2 + 1, dtype=xp.float64)
    return xp.meshgrid(ky, kx, indexing="ij")


def lowpass_filter(grid: WorkGrid, xp=np):
    """1 within the cut-off shell, 0 beyond ``(W, W//2+1)`` float32 (all ones without a filter)."""
    ky, kx = grid_frequencies(grid, xp)
    if grid.cutoff_shell is None:
        return xp.ones(ky.shape, dtype=xp.float32)
    return (ky * ky + kx * kx <= grid.cutoff_shell**2).astype(xp.float32)


def micrograph_ctf(
    grid: WorkGrid,
    defocus_u_A: float,
    defocus_v_A: float,
    defocus_angle_deg: float,
    optics: OpticsParams,
    phase_shift_deg: float = 0.0,
    intact_first_peak: bool = False,
    xp=np,
):
    """RELION's CTF on the work grid ``(W, W//2+1)`` float32 (frequency k ↔ S-box k)."""
    ky, kx = grid_frequencies(grid, xp)
    f = 1.0 / (grid.size_px * grid.pixel_size_A)  # 1/Å per S-box Fourier pixel
    args = (ky * f, kx * f, defocus_u_A, defocus_v_A, defocus_angle_deg, optics)
    ctf = ctf_from_frequencies(*args, phase_shift_deg=phase_shift_deg)
    if intact_first_peak:
        gamma = ctf_phase_from_frequencies(*args, phase_shift_deg=phase_shift_deg)
        ctf = xp.where(xp.abs(gamma) < np.pi / 2, 1.0, ctf)
    return ctf.astype(xp.float32)


# -- micrograph ------------------------------------------------------------------------


def normalise_micrograph(mic, outlier_z: float = OUTLIER_Z):
    """Mean 0, std 1, outliers (``|x − mean| > outlier_z · std``) set to the mean; float32."""
    xp = xp_of(mic)
    m = mic.astype(xp.float32)
    mean, std = float(m.mean()), float(m.std())
    if not std > 0:
        return xp.zeros_like(m)
    m = xp.where(xp.abs(m - mean) > outlier_z * std, mean, m)
    return ((m - mean) / std).astype(xp.float32)


def pad_square(mic, size_px: int, seed: int = 0):
    """Place ``mic`` at the top-left of a ``size_px`` square filled with unit Gaussian noise."""
    xp = xp_of(mic)
    h, w = mic.shape
    if (h, w) == (size_px, size_px):
        return mic
    rng = np.random.default_rng(seed)
    out = xp.asarray(rng.standard_normal((size_px, size_px)).astype(np.float32))
    out[:h, :w] = mic
    return out


def disc_mask(box_px: int, radius_px: float, xp=np):
    """RELION's particle-area mask: 1 where ``i² + j² < r²`` (centre ``B//2``), float32."""
    c = xp.arange(box_px, dtype=xp.float64) - box_px // 2
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    return (r2 < radius_px**2).astype(xp.float32)


def particle_radius_px(particle_diameter_A: float, pixel_size_A: float) -> int:
    """RELION's mask radius: ``round(d / 2p) − 2`` pixels (at least 1)."""
    return max(1, int(round(particle_diameter_A / (2 * pixel_size_A))) - SHRINK_PARTICLE_MASK_PX)


def _embed_at_origin(img, size_px: int):
    """A B x B image (centre B//2) placed in an S x S box with its centre at pixel 0."""
    xp = xp_of(img)
    B = img.shape[-1]
    out = xp.zeros((size_px, size_px), dtype=xp.float32)
    out[:B, :B] = img
    return xp.roll(out, (-(B // 2), -(B // 2)), axis=(0, 1))


@dataclass(frozen=True)
class PreparedMicrograph:
    """A normalised micrograph on the work grid, with the local background statistics.

    ``ft``: cropped S-box rfft (W, W//2+1) of the normalised, padded micrograph times
    the low-pass; ``local_mean``, ``local_std`` (W, W): μ and σ under the background
    mask around each work pixel (from the full-resolution micrograph);
    ``structure`` (on its own grid of ``structure_scale`` pixels per original pixel):
    the background's low-resolution contrast relative to the micrograph's median
    (:func:`background_structure`).
    """

    grid: WorkGrid
    shape_px: tuple[int, int]
    ft: object
    local_mean: object
    local_std: object
    structure: np.ndarray | None = None
    structure_scale: float = 1.0

    def structure_at(self, y_px, x_px) -> np.ndarray:
        """``structure`` at original-pixel coordinates (nearest grid pixel)."""
        if self.structure is None:
            return np.zeros(np.shape(y_px))
        n = self.structure.shape[0]
        iy = np.clip(np.rint(np.asarray(y_px) * self.structure_scale).astype(int), 0, n - 1)
        ix = np.clip(np.rint(np.asarray(x_px) * self.structure_scale).astype(int), 0, n - 1)
        return self.structure[iy, ix]


def _local_moments(F, F2, Fmask, W: int, S: int, n_bg: float):
    """Mean and variance of X under the mask at the pixels of a W grid (S-box FTs in)."""
    scale = (W / S) ** 2 / n_bg
    mean = irfftn(crop_rfft(F * Fmask, W), s=(W, W), axes=(0, 1)) * scale
    mean2 = irfftn(crop_rfft(F2 * Fmask, W), s=(W, W), axes=(0, 1)) * scale
    return mean, mean2 - mean * mean


def background_structure(
    F,
    F2,
    Fmask,
    n_bg: float,
    shape_px,
    pixel_size_A: float,
    resolution_A: float = STRUCTURE_RESOLUTION_A,
):
    """How much low-resolution contrast the background mask holds, per position.

    r = var(X low-passed to ``resolution_A``) / var(X) under the background mask: for
    noise it is the fraction of the noise power below that resolution (≈ π (2p/res)²/4
    for white noise), near a carbon edge or an ice rim the step adds the same
    low-resolution variance to both and r jumps (~3x in our simulations). Returned as
    r / median(r) over the micrograph (so that coloured noise calibrates itself), on a
    grid downscaled to ``resolution_A``; with its scale (grid pixels per original pixel).
    """
    xp = xp_of(F)
    g = work_grid(shape_px, pixel_size_A, resolution_A)
    S, W = g.size_px, g.work_px
    lp = lowpass_filter(g, xp)
    x_lp = irfftn(crop_rfft(F, W) * lp, s=(W, W), axes=(0, 1)) * g.scale**2
    _, var_full = _local_moments(F, F2, Fmask, W, S, n_bg)
    # moments of the low-passed X on the W grid itself, with the mask downsampled the
    # same way (Σ_W over a value-preserving mask of weight (W/S)² n_bg per pixel sum)
    Fm_w = crop_rfft(Fmask, W)
    scale = 1.0 / n_bg
    m1 = irfftn(rfftn(x_lp, axes=(0, 1)) * Fm_w, s=(W, W), axes=(0, 1)) * scale
    m2 = irfftn(rfftn(x_lp * x_lp, axes=(0, 1)) * Fm_w, s=(W, W), axes=(0, 1)) * scale
    r = to_numpy((m2 - m1 * m1) / xp.maximum(var_full, 1e-10))
    h, w = (max(1, int(round(n * g.scale))) for n in shape_px)
    med = float(np.median(r[:h, :w]))
    return (r / med if med > 0 else r).astype(np.float32), g.scale


def prepare_micrograph(
    mic, grid: WorkGrid, background_mask, seed: int = 0, with_stats: bool = True
) -> PreparedMicrograph:
    """Normalise, pad, transform and crop a micrograph; μ and σ under ``background_mask``.

    ``background_mask`` (B, B) float, centre ``B//2`` (1 on the background, 0 on the
    particle disc). ``with_stats=False`` skips μ, σ and the background structure.
    """
    xp = xp_of(mic)
    S, W = grid.size_px, grid.work_px
    x = pad_square(normalise_micrograph(mic), S, seed)
    F = rfftn(x, axes=(0, 1))
    ft = crop_rfft(F, W) * lowpass_filter(grid, xp)
    if not with_stats:
        return PreparedMicrograph(grid, tuple(mic.shape), ft, None, None)
    n_bg = float(background_mask.sum())
    Fmask = xp.conj(rfftn(_embed_at_origin(xp.asarray(background_mask), S), axes=(0, 1)))
    F2 = rfftn(x * x, axes=(0, 1))
    mean, var = _local_moments(F, F2, Fmask, W, S, n_bg)
    std = xp.where(var > 1e-10, xp.sqrt(xp.maximum(var, 1e-10)), 1.0).astype(xp.float32)
    structure, s_scale = background_structure(F, F2, Fmask, n_bg, mic.shape, grid.pixel_size_A)
    return PreparedMicrograph(
        grid, tuple(mic.shape), ft, mean.astype(xp.float32), std, structure, s_scale
    )


def downscaled_image(prepared: PreparedMicrograph) -> np.ndarray:
    """The low-passed normalised micrograph on the work grid, cropped to its region (NumPy)."""
    g = prepared.grid
    W = g.work_px
    img = irfftn(prepared.ft, s=(W, W), axes=(0, 1)) * g.scale**2
    h, w = (int(round(n * g.scale)) for n in prepared.shape_px)
    return to_numpy(img[:h, :w])
