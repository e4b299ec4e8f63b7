"""RELION-2's template picker: CTF-modulated templates, low-pass + downscaling, the
probability-ratio figure of merit (Scheres 2015, JSB 189:114; Kimanius et al. 2016,
eLife 5:e18722; RELION's ``src/autopicker.cpp``).

**Grids.** A micrograph (H x W px, pixel p) is normalised (mean 0, std 1; pixels
further than 8 std from the mean set to the mean, RELION's
``--outlier_removal_zscore``) and padded with unit Gaussian noise to a square of
S = max(H, W) pixels (RELION pads the same way so that the local standard deviation
never vanishes). With a low-pass filter of ``lowpass_A`` Å every product is computed
on the *work grid*: the S-box Fourier transform cropped to W_w = 2·ceil(S·p /
lowpass_A) (rounded up to an even FFT-friendly size) pixels, i.e. the micrograph is
downscaled to the filter's Nyquist (work pixel p·S/W_w ≈ lowpass_A / 2). That
cropping is RELION-2's speed-up: every per-template FFT is (S/W_w)² times smaller.
Frequencies beyond the cut-off shell ``S·p / lowpass_A`` are zeroed (a hard
circular edge, as RELION's projector radius), so the filter is the same whether or
not the grid is downscaled (``downscale=False`` keeps W_w = S, for tests).

**Templates.** Templates (n, B, B), white protein, centre at B//2, are stored as
Fourier transforms padded 4x with a gridding pre-correction (divided by the FT of
the bilinear kernel), RELION's ``Projector`` in 2-D. The template of in-plane angle
ψ is ``T_ψ(x) = T(Aᵀx)`` with A = RELION's ``Euler_angles2matrix(0, 0, ψ)``, so
``T̂_ψ(k) = T̂(Aᵀk)`` is read from the padded transform by bilinear interpolation at
the work grid's frequencies (its frequency k is the S-box's k). The projection of
a map at (rot, tilt, 0) rotated this way is the projection at (rot, tilt, ψ), so ψ
is RELION's ``rlnAnglePsi``. Each template is multiplied by the micrograph's CTF
(RELION's formula on the work grid; ``ctf_intact_first_peak`` sets it to 1 where
``|γ| < π/2``) and the low-pass, and its sign flipped when the micrograph has dark
protein (``invert``, RELION's ``--invert``): raw micrographs are dark, templates
from class averages or projections are white.

**Figure of merit** (RELION's ``autoPickOneMicrograph``). With X the normalised
micrograph, A a CTF-modulated template scaled by s (``template_scale``), and μ, σ the
mean and standard deviation of X under the *background* mask (the template box
minus the particle disc, RELION's ``calculateStddevAndMeanUnderMask``) around each
position r, all averages ⟨·⟩ over the npix pixels of the particle disc (radius
``round(d / 2p) - 2`` px, RELION's ``--shrink_particle_mask 2``):

    C(r)        = (⟨A X(r + ·)⟩ − μ(r) ⟨A⟩) / σ(r)
    log P(ref)/P(zero) = s C(r) − s² ⟨A²⟩ / 2                 (white noise, σ = 1)
    FOM(r)      = (P(ref)/P(zero) − 1) / (E[P(ref)/P(zero) | particle] − 1)
                = expm1(s C − s² ⟨A²⟩/2) / expm1(s² ⟨A²⟩/2)

maximised over templates and ψ. FOM ≈ 1 where the micrograph holds s·A, ≈ −1 on
empty ice, and RELION's default threshold is 0.25. ⟨A X⟩ is a cross-correlation over
the whole (CTF-spread) template divided by npix, ⟨A⟩ and ⟨A²⟩ are taken inside the
disc at ψ = 0 (all as RELION does). μ and σ come from the *full-resolution*
micrograph (RELION crops the FTs of X ⋆ mask and X² ⋆ mask), so FOM values with
and without downscaling agree. RELION adds a random term to E[P ratio]; we use its
expectation (zero).

**Template scale.** RELION uses the templates' grey values as they are (s = 1):
class averages of normalised particles are in units of the micrograph's noise.
Projections of a map have arbitrary units, so by default (``template_scale=None``,
"auto") s is estimated per micrograph: the scan keeps, per position, the template
with the largest scale-free detection score z = C·npix / ‖A‖ (the noise standard
deviation of C is ‖A‖ / npix for unit white noise); at the significant peaks of z
(z ≥ ``z_significant``, suppressed to one per particle diameter, on a background
without structure) that are clear detections (z at least half the 90th percentile of
those peaks: weak detections on carbon or in noise can outnumber the particles) the
least-squares amplitude â = C / ⟨A²⟩ is the particle's grey scale; s = median(â). The FOM is
then RELION's formula for the selected template. With an explicit scale the scan
maximises the FOM itself, exactly as RELION.

**Peaks** (:mod:`streamem.pick.peaks`): local maxima of the FOM map at or above the
threshold (default 0.5: three quarters of a typical particle's amplitude with the
auto scale; RELION's 0.25 assumes templates in noise units), at least half the
template box (+ ``skip_side_px``) from the edges, greedy suppression within
``min_distance_A`` (default: the particle diameter), sub-pixel refinement; the
coordinates are mapped back to original pixels (work pixel / (W/S)).

**Carbon edges and ice rims.** The FOM's noise model (flat background of std σ)
fails where the background mask straddles a step; such positions get FOMs of
0.3-0.8 along every edge. RELION offers ``--max_stddev_noise`` (kept here as
``max_stddev_noise``); by default we reject peaks whose background holds much more
low-resolution contrast than is usual on the micrograph
(:func:`background_structure` > ``max_background_structure`` = 1.6: the ratio of
20 Å-low-passed to full variance under the background mask, relative to its median
over the micrograph). In our simulations particles score <= 1.4 and edge positions
>= 1.8.

Arrays follow their namespace (NumPy or CuPy); results are NumPy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft

from streamem.core.backend import fftshift, ifftshift, irfftn, rfftn, to_numpy, xp_of
from streamem.core.ctf import (
    OpticsParams,
    ctf_from_frequencies,
    ctf_phase_from_frequencies,
)
from streamem.pick.peaks import find_peaks

OUTLIER_Z = 8.0  # RELION's --outlier_removal_zscore
SHRINK_PARTICLE_MASK_PX = 2  # RELION's --shrink_particle_mask
TEMPLATE_PADDING = 4
Z_SIGNIFICANT = 7.0  # detection score of a sure particle (for the auto template scale)
CLEAR_FRACTION = 0.5  # auto scale: peaks with z >= this x the 90th percentile of z
STRUCTURE_RESOLUTION_A = 20.0  # resolution of the background-structure test
MAX_BACKGROUND_STRUCTURE = 1.6  # default rejection level of that test
# FOM threshold: 1 is a typical particle with the auto scale (RELION's default is 0.25 with
# templates in noise units); chosen from simulations with carbon and ice (tests/test_pick.py)
DEFAULT_THRESHOLD = 0.5


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


def _even_fast_len(n: int) -> int:
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
    W = min(S, _even_fast_len(2 * math.ceil(cutoff))) if downscale else S
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


# -- templates -------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateBank:
    """Padded, gridding-corrected, centred Fourier transforms of templates.

    ``ft`` complex64 ``(n, P, P)`` with frequency 0 at ``P // 2`` (P = padding · B).
    """

    ft: object
    box_size: int
    padding: int

    @property
    def n_templates(self) -> int:
        return int(self.ft.shape[0])


def prepare_templates(templates, padding: int = TEMPLATE_PADDING) -> TemplateBank:
    """Templates ``(n, B, B)`` (white protein, centre ``B//2``) -> :class:`TemplateBank`."""
    xp = xp_of(templates)
    t = xp.asarray(templates, dtype=xp.float32)
    if t.ndim == 2:
        t = t[None]
    n, B, B2 = t.shape
    if B != B2:
        raise ValueError(f"templates must be square, got {t.shape}")
    P = padding * B
    # bilinear interpolation of the padded FT multiplies the image by sinc²(x/P) sinc²(y/P)
    c = xp.arange(B, dtype=xp.float64) - B // 2
    s = xp.sinc(c / P) ** 2
    corr = (s[:, None] * s[None, :]).astype(xp.float32)
    padded = xp.zeros((n, P, P), dtype=xp.float32)
    o = P // 2 - B // 2
    padded[:, o : o + B, o : o + B] = t / corr
    F = xp.fft.fft2(ifftshift(padded, axes=(1, 2)), axes=(1, 2))
    return TemplateBank(fftshift(F, axes=(1, 2)).astype(xp.complex64), B, padding)


def _bilinear_plan(psi_deg: float, grid: WorkGrid, P: int, xp):
    """Flat indices (4, M) into a P x P centred grid and weights (4, M) of bilinear
    interpolation at ``Aᵀk`` for every work-grid frequency k (module docstring)."""
    ky, kx = grid_frequencies(grid, xp)
    a = math.radians(psi_deg)
    c, s = math.cos(a), math.sin(a)
    f = P / grid.size_px
    # A = [[c, s], [-s, c]] (x, y order); Aᵀk = (c kx − s ky, s kx + c ky)
    y = ((s * kx + c * ky) * f + P // 2).ravel()
    x = ((c * kx - s * ky) * f + P // 2).ravel()
    y0, x0 = xp.floor(y), xp.floor(x)
    fy, fx = (y - y0).astype(xp.float32), (x - x0).astype(xp.float32)
    y0, x0 = y0.astype(xp.int64), x0.astype(xp.int64)
    # beyond the padded grid (corners of a full-size work grid): zero
    ok = ((y0 >= 0) & (y0 < P - 1) & (x0 >= 0) & (x0 < P - 1)).astype(xp.float32)
    y0, x0 = xp.clip(y0, 0, P - 2), xp.clip(x0, 0, P - 2)
    base = y0 * P + x0
    index = xp.stack([base, base + 1, base + P, base + P + 1])
    weight = xp.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx]) * ok
    return index, weight


def rotated_template_ft(bank: TemplateBank, psi_deg: float, grid: WorkGrid, which=None):
    """``T̂(Aᵀk)`` on the work grid for in-plane angle ψ: ``(n, W, W//2+1)`` complex64.

    Bilinear interpolation of the padded transforms; ``which``: optional template
    indices (default all).
    """
    xp = xp_of(bank.ft)
    P = bank.ft.shape[-1]
    index, weight = _bilinear_plan(psi_deg, grid, P, xp)
    flat = bank.ft.reshape(bank.n_templates, P * P)
    if which is not None:
        flat = flat[xp.asarray(which)]
    out = xp.zeros((flat.shape[0], index.shape[1]), dtype=xp.complex64)
    for corner in range(4):
        out += xp.take(flat, index[corner], axis=1) * weight[corner]
    W = grid.work_px
    return out.reshape(flat.shape[0], W, W // 2 + 1)


def template_box_from_diameter(diameter_A: float, pixel_size_A: float) -> int:
    """An even box 1.5x the diameter (RELION's box for Gaussian-blob references)."""
    b = int(math.ceil(1.5 * diameter_A / pixel_size_A))
    return b + b % 2


def estimate_particle_diameter_A(templates, pixel_size_A: float, rel: float = 0.05) -> float:
    """Twice the largest radius where ``|template| > rel · max|template|``, median over templates."""
    t = np.abs(to_numpy(templates)).reshape(-1, *np.shape(templates)[-2:])
    B = t.shape[-1]
    c = np.arange(B) - B // 2
    r = np.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    radii = []
    for img in t:
        m = img > rel * img.max() if img.max() > 0 else np.zeros_like(img, dtype=bool)
        radii.append(r[m].max() if m.any() else B / 4)
    return float(2.0 * np.median(radii) * pixel_size_A)


# -- figure of merit -------------------------------------------------------------------


@dataclass(frozen=True)
class FomResult:
    """Best figure of merit per work pixel and what achieved it (NumPy, ``(W, W)``).

    ``class_index`` int32 (0-based template), ``psi_deg`` float32, ``score`` the scan's
    key (z or FOM), ``template_scale`` the s used.
    """

    fom: np.ndarray
    class_index: np.ndarray
    psi_deg: np.ndarray
    score: np.ndarray
    template_scale: float
    grid: WorkGrid


def psi_angles_deg(psi_step_deg: float) -> np.ndarray:
    """``0, step, ..., 360 − step`` with the step adjusted to divide 360 (as RELION)."""
    n = max(1, int(round(360.0 / psi_step_deg)))
    return np.arange(n) * (360.0 / n)


def _batch_size(n: int, W: int, target_elements: float = 2.5e7) -> int:
    return max(1, min(n, int(target_elements // (W * W))))


def template_fom(
    prepared: PreparedMicrograph,
    bank: TemplateBank,
    ctf,
    particle_radius: int,
    psi_step_deg: float = 10.0,
    invert: bool = True,
    template_scale: float | None = None,
    min_distance_px: float | None = None,
    border_px: float = 0.0,
    z_significant: float = Z_SIGNIFICANT,
    max_background_structure: float | None = MAX_BACKGROUND_STRUCTURE,
) -> FomResult:
    """RELION's figure-of-merit map of one micrograph (module docstring).

    ``ctf`` (W, W//2+1) or None; ``particle_radius`` px at the original pixel size;
    ``min_distance_px``, ``border_px`` (original pixels) and ``max_background_structure``
    are used only to find the significant peaks that set the automatic template scale.
    """
    grid = prepared.grid
    xp = xp_of(prepared.ft)
    W = grid.work_px
    filt = lowpass_filter(grid, xp)
    if ctf is not None:
        filt = filt * xp.asarray(ctf, dtype=xp.float32)
    if invert:
        filt = -filt
    npix = float(disc_mask(2 * particle_radius + 3, particle_radius).sum())
    # per template, at psi = 0 (RELION's "first psi"): ⟨A⟩, ⟨A²⟩ in the disc, ‖A‖²
    ft0 = rotated_template_ft(bank, 0.0, grid) * filt
    a0 = irfftn(ft0, s=(W, W), axes=(-2, -1)) * grid.scale**2  # value-preserving
    r_w = particle_radius * grid.scale
    disc_w = ifftshift(disc_mask(W, r_w, xp), axes=(0, 1)) > 0
    n_w = max(int(disc_w.sum()), 1)
    mean_a = to_numpy((a0 * disc_w).sum(axis=(-2, -1)) / n_w)
    mean_a2 = to_numpy((a0 * a0 * disc_w).sum(axis=(-2, -1)) / n_w)
    energy = to_numpy((a0 * a0).sum(axis=(-2, -1))) / grid.scale**2  # Σ over original pixels
    del ft0, a0
    if not np.all(mean_a2 > 0):
        raise ValueError("a template is zero inside the particle disc after CTF and low-pass")
    mean_bg, std_bg = prepared.local_mean, prepared.local_std
    cc_scale = grid.scale**2 / npix
    s_fixed = template_scale
    best = xp.full((W, W), -np.inf, dtype=xp.float32)
    best_c = xp.zeros((W, W), dtype=xp.float32)
    best_p = xp.ones((W, W), dtype=xp.float32)
    best_cls = xp.zeros((W, W), dtype=xp.int32)
    best_psi = xp.zeros((W, W), dtype=xp.float32)
    n = bank.n_templates
    nb = _batch_size(n, W)
    for psi in psi_angles_deg(psi_step_deg):
        for start in range(0, n, nb):
            which = list(range(start, min(n, start + nb)))
            ft = rotated_template_ft(bank, psi, grid, which) * filt  # (b, W, W//2+1)
            cc = irfftn(xp.conj(ft) * prepared.ft, s=(W, W), axes=(-2, -1)) * cc_scale
            ma = xp.asarray(mean_a[which], dtype=xp.float32)[:, None, None]
            ma2 = xp.asarray(mean_a2[which], dtype=xp.float32)[:, None, None]
            C = (cc - mean_bg * ma) / std_bg  # (b, W, W)
            if s_fixed is None:
                en = xp.asarray(energy[which], dtype=xp.float32)[:, None, None]
                key = C * (npix / xp.sqrt(en))
            else:
                key = _fom(C, ma2, s_fixed, xp)
            j = xp.argmax(key, axis=0)
            kmax = xp.take_along_axis(key, j[None], axis=0)[0]
            better = kmax > best
            best = xp.where(better, kmax, best)
            best_c = xp.where(better, xp.take_along_axis(C, j[None], axis=0)[0], best_c)
            best_p = xp.where(better, ma2[:, 0, 0][j], best_p)
            best_cls = xp.where(better, xp.asarray(which, dtype=xp.int32)[j], best_cls)
            best_psi = xp.where(better, xp.float32(psi), best_psi)
    if s_fixed is None:
        s = _auto_scale(
            to_numpy(best),
            to_numpy(best_c),
            to_numpy(best_p),
            prepared,
            npix,
            min_distance_px,
            border_px,
            z_significant,
            max_background_structure,
        )
        fom = _fom(best_c, best_p, s, xp)
    else:
        s = float(s_fixed)
        fom = best
    return FomResult(
        to_numpy(fom).astype(np.float32),
        to_numpy(best_cls),
        to_numpy(best_psi),
        to_numpy(best),
        float(s),
        grid,
    )


def _fom(C, mean_a2, s: float, xp):
    """RELION's FOM: expm1(s C − s² ⟨A²⟩/2) / expm1(s² ⟨A²⟩/2) (exponent clipped)."""
    half = 0.5 * s * s * mean_a2
    num = xp.expm1(xp.minimum(s * C - half, 80.0))
    return (num / xp.expm1(xp.minimum(half, 80.0))).astype(xp.float32)


def _auto_scale(
    z, C, P, prepared, npix, min_distance_px, border_px, z_significant, max_structure
) -> float:
    """Median least-squares amplitude ``C / ⟨A²⟩`` at the significant peaks of z."""
    g = prepared.grid
    region = tuple(int(round(n * g.scale)) for n in prepared.shape_px)
    dist_w = (min_distance_px or 0.0) * g.scale
    peaks = find_peaks(z, z_significant, dist_w, border_px * g.scale, region_shape=region)
    if max_structure and len(peaks):
        ok = prepared.structure_at(peaks.y / g.scale, peaks.x / g.scale) <= max_structure
        peaks = peaks.select(ok)
    if len(peaks):
        # the clearly detected ones: weak detections on carbon or in noise can outnumber
        # the particles, and their amplitudes are lower
        clear = peaks.score >= CLEAR_FRACTION * np.percentile(peaks.score, 90)
        peaks = peaks.select(clear)
        return float(np.median(C[peaks.iy, peaks.ix] / P[peaks.iy, peaks.ix]))
    # nothing significant: the amplitude of a just-significant detection, so that
    # empty micrographs give (almost) no picks
    return float(z_significant / np.sqrt(npix * np.median(P)))


def projection_templates(volume, healpix_order: int = 1, symmetry: str = "C1"):
    """Projections of a map at HEALPix directions (psi 0) in the asymmetric unit.

    Returns (templates ``(n, B, B)`` float32, angles ``(n, 3)`` (rot, tilt, psi) deg).
    The picker's in-plane rotations supply psi.
    """
    from streamem.core.euler import euler_to_matrix
    from streamem.core.projector import make_projector, project_images
    from streamem.core.sampling import healpix_directions
    from streamem.core.symmetry import asymmetric_unit_mask

    rot, tilt = healpix_directions(healpix_order)
    keep = asymmetric_unit_mask(rot, tilt, symmetry)
    rot, tilt = rot[keep], tilt[keep]
    xp = xp_of(volume)
    fvol = make_projector(xp.asarray(volume, dtype=xp.float32), 2)
    A = xp.asarray(euler_to_matrix(rot, tilt, np.zeros_like(rot)))
    images = project_images(fvol, A)
    return images, np.stack([rot, tilt, np.zeros_like(rot)], axis=1)


# -- one micrograph --------------------------------------------------------------------


@dataclass(frozen=True)
class MicrographCtf:
    """A micrograph's CTF (RELION's ``rlnDefocusU/V``, ``rlnDefocusAngle``, optics)."""

    defocus_u_A: float
    defocus_v_A: float
    defocus_angle_deg: float
    optics: OpticsParams = OpticsParams()
    phase_shift_deg: float = 0.0


@dataclass(frozen=True)
class TemplatePickParams:
    """Options of the template picker (RELION's autopick names in brackets).

    ``particle_diameter_A`` [--particle_diameter]; ``lowpass_A`` [--lowpass], None for
    none; ``psi_step_deg`` [--ang]; ``threshold`` [--threshold]; ``min_distance_A``
    [--min_distance] (default: the diameter); ``skip_side_px`` [--skip_side] (added
    to half the template box); ``invert`` [--invert]; ``template_scale`` (None: auto,
    module docstring); ``ctf_intact_first_peak`` [--ctf_intact_first_peak];
    ``max_stddev_noise`` [--max_stddev_noise]; ``max_background_structure`` (None
    or 0: off; see :func:`background_structure`); ``downscale`` (False keeps the
    full-size grid with the same filter, for tests).
    """

    particle_diameter_A: float
    lowpass_A: float | None = 20.0
    psi_step_deg: float = 10.0
    threshold: float = DEFAULT_THRESHOLD
    min_distance_A: float | None = None
    skip_side_px: float = 0.0
    invert: bool = True
    template_scale: float | None = None
    ctf_intact_first_peak: bool = False
    max_stddev_noise: float | None = None
    max_background_structure: float | None = MAX_BACKGROUND_STRUCTURE
    downscale: bool = True

    def __post_init__(self):
        if not self.particle_diameter_A > 0:
            raise ValueError(f"particle diameter must be > 0 Å, got {self.particle_diameter_A}")
        if not 0 < self.psi_step_deg <= 360:
            raise ValueError(f"psi step must be in (0, 360] degrees, got {self.psi_step_deg}")
        if self.template_scale is not None and not self.template_scale > 0:
            raise ValueError(f"template scale must be > 0, got {self.template_scale}")


def filter_peaks(peaks, prepared: PreparedMicrograph, max_stddev_noise, max_structure):
    """Drop peaks whose background is too noisy or too structured (carbon edges, ice)."""
    g = prepared.grid
    keep = np.ones(len(peaks), dtype=bool)
    if max_stddev_noise and prepared.local_std is not None:
        keep &= to_numpy(prepared.local_std)[peaks.iy, peaks.ix] <= max_stddev_noise
    if max_structure:
        keep &= prepared.structure_at(peaks.y / g.scale, peaks.x / g.scale) <= max_structure
    return peaks.select(keep)


def pick_templates(
    mic,
    pixel_size_A: float,
    bank: TemplateBank,
    params: TemplatePickParams,
    ctf: MicrographCtf | None = None,
    seed: int = 0,
):
    """Template-pick one micrograph ``(H, W)`` (dark protein unless ``params.invert`` is off).

    ``bank`` must be at the micrograph's pixel size. Returns (:class:`Picks`,
    :class:`FomResult`, :class:`PreparedMicrograph`).
    """
    from streamem.pick.peaks import Picks

    xp = xp_of(mic)
    p = params
    grid = work_grid(mic.shape, pixel_size_A, p.lowpass_A, p.downscale)
    radius = particle_radius_px(p.particle_diameter_A, pixel_size_A)
    B = bank.box_size
    if 2 * radius >= B:
        raise ValueError(
            f"particle diameter {p.particle_diameter_A} Å does not fit in the template box "
            f"({B} px of {pixel_size_A} Å)"
        )
    prepared = prepare_micrograph(mic, grid, 1.0 - disc_mask(B, radius, xp), seed)
    ctf_w = None
    if ctf is not None:
        ctf_w = micrograph_ctf(
            grid,
            ctf.defocus_u_A,
            ctf.defocus_v_A,
            ctf.defocus_angle_deg,
            ctf.optics,
            ctf.phase_shift_deg,
            p.ctf_intact_first_peak,
            xp,
        )
    min_dist_px = (p.min_distance_A or p.particle_diameter_A) / pixel_size_A
    border_px = B / 2 + p.skip_side_px
    res = template_fom(
        prepared,
        bank,
        ctf_w,
        radius,
        p.psi_step_deg,
        p.invert,
        p.template_scale,
        min_dist_px,
        border_px,
        max_background_structure=p.max_background_structure,
    )
    region = tuple(int(round(n * grid.scale)) for n in mic.shape)
    peaks = find_peaks(
        res.fom, p.threshold, min_dist_px * grid.scale, border_px * grid.scale, region_shape=region
    )
    peaks = filter_peaks(peaks, prepared, p.max_stddev_noise, p.max_background_structure)
    picks = Picks(
        x=peaks.x / grid.scale,
        y=peaks.y / grid.scale,
        fom=peaks.score,
        class_number=res.class_index[peaks.iy, peaks.ix].astype(np.int64) + 1,
        psi_deg=res.psi_deg[peaks.iy, peaks.ix].astype(np.float64),
        diameter_A=np.full(len(peaks), np.nan),
    )
    return picks, res, prepared
