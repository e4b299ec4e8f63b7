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

**Speed** (:mod:`streamem.pick.fastscan`, issue 24). The scan over templates and ψ
is a few large array operations per micrograph: the filter is applied to the
micrograph once, templates are interpolated only inside the low-pass disc,
frequency-major (all templates of one frequency in one gather), the quarter turns
of each ψ come from an exact permutation and conjugation of its spectra (a psi step
dividing 90° interpolates a quarter of the angles), each (batch, angle) is one
batched inverse FFT on all the worker's cores (CuPy's FFT on a GPU), and the best
template per pixel is the argmax of ``cc' − μ b`` before any division. It equals the
reference loop (``TemplatePickParams(batched=False)``) to float32 rounding. What is
left is the FFTs themselves (``n_templates x n_psi`` inverse FFTs of the work grid:
3456 of 750² for 48 directions x 5° at 2048 px, 3.59 Å/px, 20 Å), so by default
(``coarse_psi``) the FFT scan runs over a coarse subset of the angles, sized by the
particle, and every angle is scored in real space at the candidate peaks only
(:mod:`streamem.pick.psi_refine`): 8 of the 72 angles in that example.
``streamem bench pick`` measures the default scan, the exhaustive one, the FFT floor
and the LoG picker in one run, and how many picks the two scans share.

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
(:func:`background_structure` > ``max_background_structure`` = 2.0: the ratio of
20 Å-low-passed to full variance under the background mask, relative to its median
over the micrograph).

**Default threshold and structure cut-off: the rule** (issue 24). Both defaults
(FOM 0.5, structure 2.0) were chosen on our simulations
(:func:`streamem.simulate.micrographs.simulate_micrographs`, SNR 0.1, a carbon edge
and two ice blobs per micrograph, ``asym`` phantom, CTF-modulated projections as
templates at RELION's 20 Å) as the lowest threshold and largest cut-off that give
FDR <= 0.1 at recall >= 0.9 on every set, with margin: 2 x 2048 px at 3.59 Å/px
(100 particles each, 48 directions, 5° psi), 3 x 1024 px at 3.59 Å/px (30 each)
and 3 x 512 px at 3.5 Å/px (25 each, 12 directions, 10° psi). Recall and FDR
(one-to-one within a particle radius), by cut-off at threshold 0.5:

    structure cut-off    2048 px          1024 px          512 px
    1.6 (before)         0.890 / 0.000    0.856 / 0.000    0.987 / 0.000
    2.0 (default)        0.950 / 0.000    0.911 / 0.000    0.987 / 0.063
    2.5                  0.985 / 0.000    0.922 / 0.012    0.987 / 0.098
    off                  0.990 / 0.000    0.922 / 0.012    0.987 / 0.253

The threshold barely matters between 0.3 and 0.6 (recall falls above 0.6); the
structure test is what trades recall on carbon and near ice against false picks on
edges. Particles lying on carbon or next to an ice blob score up to ~2.5; edges 2-3.

Arrays follow their namespace (NumPy or CuPy); results are NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamem.core.backend import to_numpy, xp_of
from streamem.pick.bank import (
    TEMPLATE_PADDING,
    TemplateBank,
    estimate_particle_diameter_A,
    prepare_templates,
    projection_templates,
    rotated_template_ft,
    template_box_from_diameter,
)
from streamem.pick.micrograph import (
    MAX_BACKGROUND_STRUCTURE,
    OUTLIER_Z,
    SHRINK_PARTICLE_MASK_PX,
    STRUCTURE_RESOLUTION_A,
    OpticsParams,
    PreparedMicrograph,
    WorkGrid,
    background_structure,
    crop_rfft,
    disc_mask,
    downscaled_image,
    grid_frequencies,
    lowpass_filter,
    micrograph_ctf,
    normalise_micrograph,
    pad_square,
    particle_radius_px,
    prepare_micrograph,
    work_grid,
)
from streamem.pick.peaks import find_peaks
from streamem.pick.scan import (
    CLEAR_FRACTION,
    Z_SIGNIFICANT,
    FomResult,
    psi_angles_deg,
    template_fom,
)

# FOM threshold: 1 is a typical particle with the auto scale (RELION's default is 0.25 with
# templates in noise units); chosen from simulations with carbon and ice (tests/test_pick.py)
DEFAULT_THRESHOLD = 0.5

__all__ = [
    "CLEAR_FRACTION",
    "DEFAULT_THRESHOLD",
    "MAX_BACKGROUND_STRUCTURE",
    "OUTLIER_Z",
    "SHRINK_PARTICLE_MASK_PX",
    "STRUCTURE_RESOLUTION_A",
    "TEMPLATE_PADDING",
    "Z_SIGNIFICANT",
    "FomResult",
    "MicrographCtf",
    "PreparedMicrograph",
    "TemplateBank",
    "TemplatePickParams",
    "WorkGrid",
    "background_structure",
    "crop_rfft",
    "disc_mask",
    "downscaled_image",
    "estimate_particle_diameter_A",
    "filter_peaks",
    "grid_frequencies",
    "lowpass_filter",
    "micrograph_ctf",
    "normalise_micrograph",
    "pad_square",
    "particle_radius_px",
    "pick_templates",
    "prepare_micrograph",
    "prepare_templates",
    "projection_templates",
    "psi_angles_deg",
    "rotated_template_ft",
    "template_box_from_diameter",
    "template_fom",
    "work_grid",
]

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
    full-size grid with the same filter, for tests); ``batched`` (False: the
    reference scan loop, :func:`streamem.pick.scan.template_fom`); ``fft_workers``
    (FFT threads of the batched scan; None: all cores, or STREAMEM_PICK_FFT_WORKERS);
    ``coarse_psi`` (batched scan: a coarse pass over psi, then the fine angles at the
    candidate peaks, :mod:`streamem.pick.psi_refine`; False: every angle everywhere).
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
    batched: bool = True
    fft_workers: int | None = None
    coarse_psi: bool = True

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
        batched=p.batched,
        workers=p.fft_workers,
        coarse_psi=p.coarse_psi,
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
