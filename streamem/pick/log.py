"""Template-free picking: scale-normalised Laplacian-of-Gaussian blob detection.

In the spirit of RELION's ``--LoG`` picker (``autoPickLoGOneMicrograph``), with the
choices written down here:

- The micrograph is normalised and downscaled exactly as for template picking
  (:func:`streamem.pick.template.prepare_micrograph`), to a work pixel of an eighth
  of the smallest diameter (or ``lowpass_A / 2`` if that is coarser), with its
  contrast inverted when the protein is dark (raw micrographs; ``invert``).
- The scale-space (all diameters) is one batched filter and inverse FFT on that
  small grid; so are the three Hessian components at a scale. At 2048 px, 3.59
  Å/px and 120-180 Å the work grid is 500 px, and the picker's time is mostly the
  full-size FFTs of the preparation (normalisation and background structure).
- For a diameter d the filter is the scale-normalised LoG ``−σ² ∇²G_σ`` with
  ``σ = d / (2√2)`` (the scale at which a uniform disc of diameter d gives its
  largest response), applied in Fourier space as ``4π²σ²|k|² exp(−2π²σ²|k|²)``.
- Diameters: three across ``[d_min, d_max]`` plus, as RELION does, scales outside the
  range (``d_min / 2``, ``d_min / 1.5``, ``1.5 d_max``, ``2 d_max``, ``3 d_max``); a
  position belongs to the diameter with the largest response and only peaks whose
  best diameter lies inside the range are kept, so ice balls and carbon (large
  scales) and noise (small scales) fall out.
- Each scale's response map is standardised over the micrograph (median 0,
  MAD-based standard deviation 1: noise responds more at small scales), the
  score is the largest standardised response, and peaks need ``threshold``.
- Edges (carbon, ice rims) give ridges, not blobs: a peak is kept only if the
  Hessian of the smoothed image at its scale has two negative eigenvalues of
  similar size, ``trace² / det < (r + 1)² / r`` with ``r = max_edge_ratio`` (the
  edge test of SIFT, Lowe 2004), and its background passes the template picker's
  structure test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from streamem.core.backend import irfftn, to_numpy, xp_of
from streamem.pick.peaks import Picks, find_peaks
from streamem.pick.template import (
    MAX_BACKGROUND_STRUCTURE,
    disc_mask,
    filter_peaks,
    grid_frequencies,
    prepare_micrograph,
    work_grid,
)

MAX_EDGE_RATIO = 4.0
DEFAULT_THRESHOLD = 3.0  # robust standard deviations of the LoG response


@dataclass(frozen=True)
class LogPickParams:
    """Options of the LoG picker (RELION's ``--LoG_diam_min/max`` in Å)."""

    diameter_min_A: float
    diameter_max_A: float
    lowpass_A: float | None = 20.0
    threshold: float = DEFAULT_THRESHOLD
    min_distance_A: float | None = None  # default: the smallest diameter
    skip_side_px: float = 0.0
    invert: bool = True
    max_edge_ratio: float = MAX_EDGE_RATIO
    max_background_structure: float | None = MAX_BACKGROUND_STRUCTURE

    def __post_init__(self):
        if not 0 < self.diameter_min_A <= self.diameter_max_A:
            raise ValueError(
                f"LoG diameters must satisfy 0 < min <= max, got "
                f"{self.diameter_min_A}, {self.diameter_max_A}"
            )


LOG_RANGE = (0.8, 1.2)  # default diameter range, in units of the particle diameter


def default_log_diameters_A(particle_diameter_A: float) -> tuple[float, float]:
    """The default LoG range ``(0.8 d, 1.2 d)`` Å around a particle diameter d (Å).

    Wide enough for the spread of projected sizes of a non-spherical particle, narrow
    enough that ice balls (larger) and noise (smaller) peak outside it.
    """
    if not particle_diameter_A > 0:
        raise ValueError(f"particle diameter must be > 0 Å, got {particle_diameter_A}")
    return LOG_RANGE[0] * particle_diameter_A, LOG_RANGE[1] * particle_diameter_A


def log_diameters_A(d_min: float, d_max: float) -> tuple[np.ndarray, np.ndarray]:
    """(diameters Å, in-range flags) searched by the picker (module docstring)."""
    inside = np.linspace(d_min, d_max, 3) if d_max > d_min else np.array([d_min])
    below = np.array([d_min / 2.0, d_min / 1.5])
    above = np.array([1.5, 2.0, 3.0]) * d_max
    d = np.concatenate([below, inside, above])
    flags = np.concatenate([np.zeros(2, bool), np.ones(inside.size, bool), np.zeros(3, bool)])
    return d, flags


def _gaussian(k2, sigma):
    return np.exp(-2.0 * np.pi**2 * sigma**2 * k2)


def log_responses(ft, grid, diameters_A, invert: bool = True):
    """Scale-normalised LoG responses ``(n, W, W)`` of a prepared micrograph FT.

    ``ft`` is the work-grid rfft of :func:`prepare_micrograph`; positive for bright
    blobs (dark ones with ``invert``).
    """
    xp = xp_of(ft)
    W = grid.work_px
    ky, kx = grid_frequencies(grid, xp)
    f = 1.0 / (grid.size_px * grid.pixel_size_A)
    k2 = (ky * ky + kx * kx) * f * f  # (1/Å)²
    sign = -1.0 if invert else 1.0
    sigma = xp.asarray(np.asarray(diameters_A, dtype=np.float64) / (2.0 * math.sqrt(2.0)))
    s2 = (sigma * sigma)[:, None, None]
    # the whole scale-space in one batched transform
    filt = (4.0 * np.pi**2 * s2) * k2 * xp.exp(-2.0 * np.pi**2 * s2 * k2) * sign
    return irfftn(ft * filt.astype(xp.float32), s=(W, W), axes=(-2, -1)) * grid.scale**2


def hessian_at(ft, grid, diameter_A: float, iy, ix, invert: bool = True):
    """(Hyy, Hxx, Hxy) of the Gaussian-smoothed (σ = d / 2√2) image at work pixels."""
    xp = xp_of(ft)
    W = grid.work_px
    ky, kx = grid_frequencies(grid, xp)
    f = 1.0 / (grid.size_px * grid.pixel_size_A)
    ky, kx = ky * f, kx * f
    sigma = diameter_A / (2.0 * math.sqrt(2.0))
    g = _gaussian(ky * ky + kx * kx, sigma) * (-1.0 if invert else 1.0)
    filt = xp.stack([-4.0 * np.pi**2 * a * b * g for a, b in ((ky, ky), (kx, kx), (ky, kx))])
    h = to_numpy(irfftn(ft * filt.astype(xp.float32), s=(W, W), axes=(-2, -1)))
    return [hh[iy, ix] * grid.scale**2 for hh in h]


def blob_like(hyy, hxx, hxy, max_edge_ratio: float) -> np.ndarray:
    """True where a bright blob's Hessian is negative definite and not ridge-like."""
    tr = hyy + hxx
    det = hyy * hxx - hxy * hxy
    r = max_edge_ratio
    return (tr < 0) & (det > 0) & (tr * tr * r < (r + 1) ** 2 * det)


def _standardise(x: np.ndarray, region) -> np.ndarray:
    inside = x[: region[0], : region[1]]
    med = float(np.median(inside))
    mad = float(np.median(np.abs(inside - med))) * 1.4826
    return (x - med) / (mad if mad > 0 else 1.0)


def pick_log(mic, pixel_size_A: float, params: LogPickParams, seed: int = 0):
    """LoG-pick one micrograph; returns (:class:`Picks`, standardised response map, prepared)."""
    xp = xp_of(mic)
    p = params
    # a work pixel of an eighth of the smallest diameter (a low-pass at d_min / 4): the
    # FFTs are small (500 px for 120 Å at 3.6 Å/px) and the responses keep their shape
    # (a quarter, d_min / 2, lost a fifth of the recall on 512-px test micrographs at
    # 3.5 Å/px); a coarser --lowpass wins
    lowpass = p.diameter_min_A / 4.0
    if p.lowpass_A is not None:
        lowpass = max(lowpass, p.lowpass_A)
    grid = work_grid(mic.shape, pixel_size_A, lowpass)
    # background ring for the structure test: a box 1.5 d_max, disc of d_min
    B = int(math.ceil(1.5 * p.diameter_max_A / pixel_size_A))
    B += B % 2
    radius = max(1.0, p.diameter_min_A / (2 * pixel_size_A))
    prepared = prepare_micrograph(mic, grid, 1.0 - disc_mask(B, radius, xp), seed)
    diameters, in_range = log_diameters_A(p.diameter_min_A, p.diameter_max_A)
    region = tuple(int(round(n * grid.scale)) for n in mic.shape)
    resp = to_numpy(log_responses(prepared.ft, grid, diameters, p.invert))
    # each scale in units of its own spread (noise responds more at small scales)
    resp = np.stack([_standardise(r, region) for r in resp])
    best = resp.argmax(axis=0)
    score = resp.max(axis=0)
    # only positions whose best scale is in range compete
    score = np.where(in_range[best], score, -np.inf)
    min_dist_px = (p.min_distance_A or p.diameter_min_A) / pixel_size_A
    border_px = p.diameter_max_A / (2 * pixel_size_A) + p.skip_side_px
    peaks = find_peaks(
        score, p.threshold, min_dist_px * grid.scale, border_px * grid.scale, region_shape=region
    )
    peaks = filter_peaks(peaks, prepared, None, p.max_background_structure)
    d_peak = diameters[best[peaks.iy, peaks.ix]]
    keep = np.ones(len(peaks), dtype=bool)
    if p.max_edge_ratio and len(peaks):
        for d in np.unique(d_peak):
            sel = d_peak == d
            h = hessian_at(prepared.ft, grid, d, peaks.iy[sel], peaks.ix[sel], p.invert)
            keep[sel] = blob_like(*h, p.max_edge_ratio)
    peaks, d_peak = peaks.select(keep), d_peak[keep]
    picks = Picks(
        x=peaks.x / grid.scale,
        y=peaks.y / grid.scale,
        fom=peaks.score,
        class_number=np.zeros(len(peaks), dtype=np.int64),
        psi_deg=np.zeros(len(peaks)),
        diameter_A=d_peak.astype(np.float64),
    )
    finite = np.isfinite(score)
    floor = float(score[finite].min()) if finite.any() else 0.0
    return picks, np.where(finite, score, floor).astype(np.float32), prepared
