"""Peaks of a figure-of-merit map and one-to-one matching of coordinates.

:func:`find_peaks` follows RELION's ``AutoPicker::peakSearch`` + pruning, with two
deliberate differences (both documented in :mod:`streamem.pick`):

- a peak is a pixel at least as large as its 8 neighbours and at or above the
  threshold, at least ``border_px`` from the edges of the valid region;
- peaks closer than ``min_distance_px`` are resolved greedily, best score first
  (non-maximum suppression). RELION's ``removeTooCloselyNeighbouringPeaks`` drops
  *both* members of a close pair; greedy suppression keeps the better one, so two
  true particles that sit exactly one diameter apart are not both lost.

Peak positions are refined to sub-pixel precision by a parabola through the peak
and its two neighbours along each axis (half a pixel at most), which matters on
downscaled maps where one pixel is ~10 Å.

Coordinates are (y, x) in pixels of the map (0-based, x = column).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import maximum_filter
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class Peaks:
    """Peaks sorted by decreasing score: ``y``, ``x`` float (map pixels), ``score``."""

    y: np.ndarray
    x: np.ndarray
    score: np.ndarray
    iy: np.ndarray  # integer pixel of each peak (for looking up class, psi, ...)
    ix: np.ndarray

    def __len__(self) -> int:
        return int(self.score.size)

    def select(self, keep) -> Peaks:
        """The peaks where the boolean (or index) array ``keep`` says so."""
        return Peaks(self.y[keep], self.x[keep], self.score[keep], self.iy[keep], self.ix[keep])


@dataclass(frozen=True)
class Picks:
    """Picked particles of one micrograph, in original micrograph pixels (0-based).

    ``x``, ``y``: box centres (float); ``fom``: figure of merit; ``class_number``:
    1-based template (0 for template-free pickers); ``psi_deg``: in-plane angle;
    ``diameter_A``: detected diameter (LoG) or NaN.
    """

    x: np.ndarray
    y: np.ndarray
    fom: np.ndarray
    class_number: np.ndarray
    psi_deg: np.ndarray
    diameter_A: np.ndarray

    def __len__(self) -> int:
        return int(self.x.size)


def local_maxima(score: np.ndarray, threshold: float, valid: np.ndarray | None = None):
    """Integer (iy, ix) of pixels >= threshold and >= their 8 neighbours, inside ``valid``."""
    score = np.asarray(score)
    neighbourhood_max = maximum_filter(score, size=3, mode="nearest")
    is_peak = (score >= neighbourhood_max) & (score >= threshold) & np.isfinite(score)
    if valid is not None:
        is_peak &= valid
    return np.nonzero(is_peak)


def border_mask(shape, border_px: float, region_shape=None) -> np.ndarray:
    """Boolean map: True at least ``border_px`` inside ``region_shape`` (default: shape)."""
    ny, nx = shape
    ry, rx = region_shape or shape
    y = np.arange(ny)[:, None]
    x = np.arange(nx)[None, :]
    return (
        (y >= border_px) & (y <= ry - 1 - border_px) & (x >= border_px) & (x <= rx - 1 - border_px)
    )


def non_maximum_suppression(yx: np.ndarray, scores: np.ndarray, min_distance: float) -> np.ndarray:
    """Indices kept by greedy suppression (best first) of points closer than ``min_distance``.

    ``yx`` (n, 2); returns indices into it, sorted by decreasing score.
    """
    order = np.argsort(-np.asarray(scores), kind="stable")
    if min_distance <= 0 or len(order) < 2:
        return order
    tree = cKDTree(yx)
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        # strictly closer than min_distance: particles exactly one diameter apart survive
        for j in tree.query_ball_point(yx[i], r=min_distance * (1 - 1e-9)):
            suppressed[j] = True
    return np.array(keep, dtype=np.int64)


def _parabola_offset(minus: np.ndarray, centre: np.ndarray, plus: np.ndarray) -> np.ndarray:
    denom = minus - 2.0 * centre + plus
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where(denom < 0, 0.5 * (minus - plus) / denom, 0.0)
    return np.clip(np.nan_to_num(off), -0.5, 0.5)


def subpixel(score: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parabolic sub-pixel refinement of integer peaks (clamped to +-0.5 pixel)."""
    s = np.asarray(score, dtype=np.float64)
    ny, nx = s.shape
    ym, yp = np.clip(iy - 1, 0, ny - 1), np.clip(iy + 1, 0, ny - 1)
    xm, xp = np.clip(ix - 1, 0, nx - 1), np.clip(ix + 1, 0, nx - 1)
    c = s[iy, ix]
    dy = _parabola_offset(s[ym, ix], c, s[yp, ix])
    dx = _parabola_offset(s[iy, xm], c, s[iy, xp])
    return iy + dy, ix + dx


def find_peaks(
    score: np.ndarray,
    threshold: float,
    min_distance_px: float,
    border_px: float = 0.0,
    region_shape: tuple[int, int] | None = None,
    valid: np.ndarray | None = None,
) -> Peaks:
    """Peaks of a 2-D score map (module docstring): threshold, border, suppression.

    ``region_shape`` limits the search to ``score[:ry, :rx]`` (a micrograph padded to
    a square); ``valid`` is an optional extra boolean mask.
    """
    score = np.asarray(score)
    inside = border_mask(score.shape, border_px, region_shape)
    if valid is not None:
        inside &= valid
    iy, ix = local_maxima(score, threshold, inside)
    values = score[iy, ix]
    y, x = subpixel(score, iy, ix)
    keep = non_maximum_suppression(np.stack([y, x], axis=1), values, min_distance_px)
    return Peaks(y[keep], x[keep], values[keep].astype(np.float64), iy[keep], ix[keep])


@dataclass(frozen=True)
class MatchResult:
    """One-to-one matching of picks to true coordinates."""

    pairs: np.ndarray  # (m, 2) indices (pick, truth)
    n_picks: int
    n_truth: int

    @property
    def n_matched(self) -> int:
        return int(self.pairs.shape[0])

    @property
    def recall(self) -> float:
        return self.n_matched / self.n_truth if self.n_truth else 1.0

    @property
    def fdr(self) -> float:
        """False discovery rate: picks without a partner / picks."""
        return 1.0 - self.n_matched / self.n_picks if self.n_picks else 0.0


def match_coordinates(picks_yx, truth_yx, max_distance: float) -> MatchResult:
    """Optimal one-to-one matching (Hungarian) of picks to truth within ``max_distance``.

    Both are (n, 2) arrays in the same units; a pair further than ``max_distance``
    never matches. Minimises the total distance among maximum matchings.
    """
    p = np.asarray(picks_yx, dtype=np.float64).reshape(-1, 2)
    t = np.asarray(truth_yx, dtype=np.float64).reshape(-1, 2)
    if len(p) == 0 or len(t) == 0:
        return MatchResult(np.zeros((0, 2), dtype=np.int64), len(p), len(t))
    d = np.sqrt(((p[:, None, :] - t[None, :, :]) ** 2).sum(-1))
    too_far = d > max_distance
    # pairs beyond the limit cost more than any matching of allowed pairs
    cost = np.where(too_far, 1e6 + d, d)
    rows, cols = linear_sum_assignment(cost)
    ok = ~too_far[rows, cols]
    return MatchResult(np.stack([rows[ok], cols[ok]], axis=1), len(p), len(t))
