"""The figure-of-merit scan over templates and in-plane angles (one micrograph).

Conventions: :mod:`streamem.pick.template`'s docstring ("Figure of merit",
"Template scale", "Speed").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamem.core.backend import ifftshift, irfftn, to_numpy, xp_of
from streamem.pick.bank import TemplateBank, rotated_template_ft
from streamem.pick.micrograph import (
    MAX_BACKGROUND_STRUCTURE,
    PreparedMicrograph,
    WorkGrid,
    disc_mask,
    lowpass_filter,
)
from streamem.pick.peaks import find_peaks

Z_SIGNIFICANT = 7.0  # detection score of a sure particle (for the auto template scale)
CLEAR_FRACTION = 0.5  # auto scale: peaks with z >= this x the 90th percentile of z

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
    psi_refined: dict | None = None  # coarse-to-fine: coarse factor, candidate pixels


def psi_angles_deg(psi_step_deg: float) -> np.ndarray:
    """``0, step, ..., 360 − step`` with the step adjusted to divide 360 (as RELION)."""
    n = max(1, int(round(360.0 / psi_step_deg)))
    return np.arange(n) * (360.0 / n)


def _batch_size(n: int, W: int, target_elements: float = 2.5e7) -> int:
    return max(1, min(n, int(target_elements // (W * W))))


def _template_moments(bank: TemplateBank, grid: WorkGrid, filt, particle_radius: int):
    """Per template at psi = 0 (RELION's "first psi"): ⟨A⟩, ⟨A²⟩ in the disc and ‖A‖²
    (Σ over original pixels), NumPy float ``(n,)`` each, and npix of the disc."""
    W = grid.work_px
    npix = float(disc_mask(2 * particle_radius + 3, particle_radius).sum())
    xp = xp_of(filt)
    ft0 = rotated_template_ft(bank, 0.0, grid) * filt
    a0 = irfftn(ft0, s=(W, W), axes=(-2, -1)) * grid.scale**2  # value-preserving
    disc_w = ifftshift(disc_mask(W, particle_radius * grid.scale, xp), axes=(0, 1)) > 0
    n_w = max(int(disc_w.sum()), 1)
    mean_a = to_numpy((a0 * disc_w).sum(axis=(-2, -1)) / n_w).astype(np.float64)
    mean_a2 = to_numpy((a0 * a0 * disc_w).sum(axis=(-2, -1)) / n_w).astype(np.float64)
    energy = to_numpy((a0 * a0).sum(axis=(-2, -1))).astype(np.float64) / grid.scale**2
    if not np.all(mean_a2 > 0):
        raise ValueError("a template is zero inside the particle disc after CTF and low-pass")
    return mean_a, mean_a2, energy, npix


@dataclass
class _Best:
    """Running best over (template, psi) per work pixel (arrays of the scan's namespace)."""

    key: object
    c: object
    p: object
    cls: object
    psi: object
    refined: dict | None = None  # counts of the fine-angle step (coarse-to-fine scans)

    @classmethod
    def empty(cls, W: int, xp) -> _Best:
        return cls(
            xp.full((W, W), -np.inf, dtype=xp.float32),
            xp.zeros((W, W), dtype=xp.float32),
            xp.ones((W, W), dtype=xp.float32),
            xp.zeros((W, W), dtype=xp.int32),
            xp.zeros((W, W), dtype=xp.float32),
        )

    def update(self, key, c, p, cls, psi_deg, xp) -> None:
        """Keep, per pixel, the candidate (all ``(W, W)``) whose key is larger."""
        better = key > self.key
        self.key = xp.where(better, key, self.key)
        self.c = xp.where(better, c, self.c)
        self.p = xp.where(better, p, self.p)
        self.cls = xp.where(better, cls, self.cls)
        self.psi = xp.where(better, xp.asarray(psi_deg, dtype=xp.float32), self.psi)


def _scan_loop(prepared, bank, filt, moments, psi_list, s_fixed) -> _Best:
    """The reference scan: per psi and template batch, rotate, filter, correlate."""
    grid = prepared.grid
    xp = xp_of(prepared.ft)
    W = grid.work_px
    mean_a, mean_a2, energy, npix = moments
    mean_bg, std_bg = prepared.local_mean, prepared.local_std
    cc_scale = grid.scale**2 / npix
    best = _Best.empty(W, xp)
    n = bank.n_templates
    nb = _batch_size(n, W)
    for psi in psi_list:
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
            cmax = xp.take_along_axis(C, j[None], axis=0)[0]
            cls = xp.asarray(which, dtype=xp.int32)[j]
            best.update(kmax, cmax, ma2[:, 0, 0][j], cls, psi, xp)
    return best


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
    batched: bool = True,
    workers: int | None = None,
    coarse_psi: bool = True,
) -> FomResult:
    """RELION's figure-of-merit map of one micrograph (module docstring).

    ``ctf`` (W, W//2+1) or None; ``particle_radius`` px at the original pixel size;
    ``min_distance_px``, ``border_px`` (original pixels) and ``max_background_structure``
    are used only to find the significant peaks that set the automatic template scale.
    ``batched`` (default): all templates and the four quarter turns of each psi in one
    array operation (:mod:`streamem.pick.fastscan`, ``workers`` FFT threads on NumPy,
    default all cores); False: the reference loop (rotate, filter, correlate per psi).
    ``coarse_psi`` (batched only): a coarse pass over psi, then the fine angles at the
    candidate peaks (:mod:`streamem.pick.psi_refine`), where the particle is small
    enough for the requested step to be finer than it needs; False: every angle at
    every pixel.
    """
    from streamem.pick.fastscan import scan_batched
    from streamem.pick.psi_refine import coarse_psi_factor

    grid = prepared.grid
    xp = xp_of(prepared.ft)
    filt = lowpass_filter(grid, xp)
    if ctf is not None:
        filt = filt * xp.asarray(ctf, dtype=xp.float32)
    if invert:
        filt = -filt
    moments = _template_moments(bank, grid, filt, particle_radius)
    npix = moments[3]
    psi_list = psi_angles_deg(psi_step_deg)
    s_fixed = template_scale
    if batched:
        radius_w = particle_radius * grid.scale
        factor = coarse_psi_factor(len(psi_list), radius_w) if coarse_psi else 1
        best = scan_batched(
            prepared, bank, filt, moments, psi_list, s_fixed, workers, factor, 0.5 * radius_w
        )
    else:
        best = _scan_loop(prepared, bank, filt, moments, psi_list, s_fixed)
    if s_fixed is None:
        s = _auto_scale(
            to_numpy(best.key),
            to_numpy(best.c),
            to_numpy(best.p),
            prepared,
            npix,
            min_distance_px,
            border_px,
            z_significant,
            max_background_structure,
        )
        fom = _fom(best.c, best.p, s, xp)
    else:
        s = float(s_fixed)
        fom = best.key
    return FomResult(
        to_numpy(fom).astype(np.float32),
        to_numpy(best.cls),
        to_numpy(best.psi),
        to_numpy(best.key),
        float(s),
        grid,
        None if best.refined is None else {"coarse_factor": factor, **best.refined},
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
