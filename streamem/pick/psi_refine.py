"""Coarse-to-fine in-plane angles for the template scan (issue 24).

The scan's cost is one inverse FFT of the work grid per (template, psi)
(:mod:`streamem.pick.fastscan`); at 48 directions x 5° that is 3,456 FFTs of 750² per
2048-px micrograph, more than an 8 s budget on 2 cores allows. But a particle's best
psi is sharp only at its rim: an angle error Δψ moves the rim by ``R Δψ`` work pixels
for a particle of radius R. So:

1. **Coarse pass.** The batched scan at every ``factor``-th angle of the requested
   list: the largest factor whose step moves the rim by at most
   :data:`COARSE_ARC_PX` work pixels and that keeps the quarter-turn shortcut (the
   coarse count divisible by 4 when the fine one is). The coarse pass only has to
   find the particles, not to score them (every angle is scored at the candidates),
   so its step may be far coarser than the fine one: measured with ``streamem bench
   pick`` (2 x 2048 px, 3.59 Å/px, 149 Å particles, 48 templates, 5°), rim shifts of
   4, 6 and 12 work px (30°, 45° and 90° coarse steps) all gave 190 of 190 of the
   exhaustive scan's picks; 6 keeps a margin for weaker data.
2. **Candidates.** Local maxima of the coarse pass's detection score z (the scan key
   with the automatic template scale; ``C npix / ‖A‖`` of the winner with a fixed
   one) at or above :data:`CANDIDATE_Z` (well below any pick, just above the noise's
   best over all templates), at least ``separation`` apart, and every pixel within
   :data:`WINDOW_PX` of one (so the peak finder's sub-pixel neighbours are scored too).
3. **Every other angle there.** At those pixels, every template at every angle the
   coarse pass skipped, scored in real space: the correlation at r is
   ``Σ_s t_ψ(s) y(r + s)``, with y the filtered micrograph (one inverse FFT) and
   ``t_ψ`` the rotated template on a small box that holds it
   (:func:`streamem.pick.bank.template_images`, :func:`template_box_px`), as matrix
   products of patches by templates, with the scan's own key formula. Where a fine
   angle beats the coarse best, it replaces it (key, C, ⟨A²⟩, template, psi). Where
   that would cost more than the FFTs it saves (:data:`REAL_SPACE_BUDGET`: big
   templates, many candidates), the scan runs every angle by FFT instead.

Everywhere else the maps keep the coarse pass's values, which are at most the
exhaustive scan's; so peaks are found where the exhaustive scan finds them and
nowhere new. ``streamem bench pick`` measures the agreement of the picks with the
exhaustive scan (``TemplatePickParams(coarse_psi=False)``) in the same run.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from streamem.core.backend import to_numpy, xp_of
from streamem.pick.bank import TemplateBank, template_images
from streamem.pick.micrograph import even_fast_len

COARSE_ARC_PX = 6.0  # the coarse step moves the particle's rim by at most this (work px)
CANDIDATE_Z = 5.0  # floor of the coarse detection score z at a candidate peak
WINDOW_PX = 2  # pixels scored around each candidate, each way
# the real-space scoring runs if (pixels x box²) <= this x W² log2(W²): measured at
# 2048 px (48 templates, 5°, bench pick) a fine pair cost 0.45 ms in real space at a
# ratio of 1.5, against 18 ms by FFT and reduction, so they break even near 60; 12
# leaves a 5x margin; beyond it the scan falls back to the FFTs of every angle
REAL_SPACE_BUDGET = 12.0
# template energy left outside the real-space scoring box (measured at 2048 px: 3e-4,
# a 20 px box, moved 1 pick in 94 by 2.6 px; 1e-4, 36 px, none)
ENERGY_OUTSIDE = 1e-4
BLOCK_PIXELS = 256  # window pixels per matrix product


def coarse_psi_factor(n_psi: int, radius_work_px: float) -> int:
    """Every how many of the ``n_psi`` equally spaced angles the coarse pass keeps (1:
    all, no refinement), for a particle of ``radius_work_px`` work pixels."""
    step = 2 * math.pi / n_psi
    best = 1
    for m in range(2, n_psi + 1):
        if n_psi % m or radius_work_px * m * step > COARSE_ARC_PX:
            continue
        if n_psi % 4 == 0 and (n_psi // m) % 4:
            continue  # the coarse list would lose the quarter-turn shortcut
        best = m
    return best


def candidate_peaks(z: np.ndarray, floor: float, separation_px: float):
    """Local maxima ``(iy, ix)`` int64 of ``z`` ``(W, W)`` over squares of side
    ``2·separation + 1`` (periodic), at or above ``floor``."""
    size = 2 * max(1, int(round(separation_px))) + 1
    finite = np.where(np.isfinite(z), z, -np.inf)
    peaks = (finite == ndimage.maximum_filter(finite, size=size, mode="wrap")) & (finite >= floor)
    iy, ix = np.nonzero(peaks)
    return iy.astype(np.int64), ix.astype(np.int64)


def template_box_px(bank: TemplateBank, grid) -> int:
    """An even FFT-friendly box (work px) that holds what the templates hold at any psi:
    the disc outside which they keep under :data:`ENERGY_OUTSIDE` of their energy
    (their box's circumscribed square at most)."""
    outer = even_fast_len(int(math.ceil(bank.box_size * grid.scale * math.sqrt(2.0))) + 2)
    images = to_numpy(template_images(bank, 0.0, grid, outer)).astype(np.float64)
    c = np.arange(outer) - outer // 2
    r = np.hypot(c[:, None], c[None, :]).ravel()
    energy = (images**2).sum(axis=0).ravel()
    order = np.argsort(r)
    kept = np.cumsum(energy[order]) / max(energy.sum(), 1e-300)
    radius = r[order][min(np.searchsorted(kept, 1.0 - ENERGY_OUTSIDE), r.size - 1)]
    return min(outer, even_fast_len(2 * int(math.ceil(radius)) + 2))


def refine_psi(best, scan, psi_list: np.ndarray, factor: int, separation_px: float) -> dict:
    """Step 3 of the module docstring on ``best`` (a :class:`streamem.pick.scan._Best`
    of the coarse pass over ``psi_list[::factor]``), in place.

    ``scan`` a :class:`streamem.pick.fastscan._Scan` of the micrograph; ``psi_list``
    the fine angles (degrees, equally spaced from 0). Returns counts for the log and
    the benchmark (candidate peaks, pixels scored, fine angles, box), or None, with
    ``best`` untouched, when scoring the candidates in real space would cost more than
    the FFTs of the fine angles (:data:`REAL_SPACE_BUDGET`).
    """
    from streamem.pick.fastscan import _irfft2_batch

    xp = scan.xp
    grid, bank = scan.grid, scan.bank
    W, n = grid.work_px, bank.n_templates
    z = to_numpy(best.key)
    if scan.s_fixed is not None:  # the key is the FOM: z of the winner, C npix / ‖A‖
        e = scan.npix / np.sqrt(scan.energy)
        z = to_numpy(best.c) * e[to_numpy(best.cls)].astype(np.float32)
    my, mx = candidate_peaks(z, CANDIDATE_Z, separation_px)
    fine = [j for j in range(len(psi_list)) if j % factor]
    b = template_box_px(bank, grid)
    if my.size == 0 or not fine:
        return {"peaks": int(my.size), "pixels": 0, "angles": 0, "box_px": b}
    window = np.zeros((W, W), dtype=bool)
    window[my, mx] = True
    window = ndimage.binary_dilation(window, np.ones((2 * WINDOW_PX + 1,) * 2, bool))
    if int(window.sum()) * b * b > REAL_SPACE_BUDGET * W * W * math.log2(W * W):
        return None
    y = _irfft2_batch(scan.Y.reshape(W, W // 2 + 1, 1), W, xp, scan.fft_threads)[:, :, 0]
    # y_pad[i] = y[(i − c) mod W] with c = b // 2, the templates' centre: the patch of
    # pixel r is y_pad[r : r + b] on both axes
    c = b // 2
    y_pad = xp.pad(y, ((c, b - c), (c, b - c)), mode="wrap")
    scores = _PairScores(scan, bank, psi_list, fine, b)
    wy, wx = (xp.asarray(a) for a in np.nonzero(window))
    for p0 in range(0, int(wy.shape[0]), BLOCK_PIXELS):
        py, px = wy[p0 : p0 + BLOCK_PIXELS], wx[p0 : p0 + BLOCK_PIXELS]
        key, C = scores.keys(_patches(y_pad, py, px, b) @ scores.T, py, px)
        k = xp.argmax(key, axis=1)
        kbest = xp.take_along_axis(key, k[:, None], axis=1)[:, 0]
        better = kbest > best.key[py, px]
        py, px, k = py[better], px[better], k[better]
        best.key[py, px] = kbest[better]
        best.c[py, px] = xp.take_along_axis(C[better], k[:, None], axis=1)[:, 0]
        best.p[py, px] = scores.ma2[k % n]
        best.cls[py, px] = (k % n).astype(xp.int32)
        best.psi[py, px] = scores.psi[k // n]
    return {"peaks": int(my.size), "pixels": int(wy.shape[0]), "angles": len(fine), "box_px": b}


def _patches(y_pad, py, px, b: int):
    """``(m, b²)`` float32: the patches of ``y_pad`` whose corners are ``(py, px)`` ``(m,)``."""
    xp = xp_of(y_pad)
    u = xp.arange(b)
    return y_pad[(py[:, None] + u)[:, :, None], (px[:, None] + u)[:, None, :]].reshape(
        py.shape[0], -1
    )


class _PairScores:
    """The fine (angle, template) pairs as real-space templates, and their scan keys.

    ``T`` ``(b², n_angles · n)`` float32, column ``a · n + t``: template t at fine angle
    ``psi[a]``, scaled as the scan's spectra (cc' = cc · e).
    """

    def __init__(self, scan, bank, psi_list, fine: list[int], b: int):
        from streamem.pick.fastscan import _batch_constants

        xp, n = scan.xp, bank.n_templates
        self.xp, self.s_fixed, self.mu, self.sigma = xp, scan.s_fixed, scan.mu, scan.sigma
        e = scan.npix / np.sqrt(scan.energy) if scan.s_fixed is None else np.ones(n)
        k = _batch_constants(np.arange(n), e, scan.mean_a, scan.mean_a2, xp)
        tile = len(fine)
        self.b_col, self.e_col = xp.tile(k["b"], tile), xp.tile(k["e"], tile)
        self.ma_col, self.ma2_col = xp.tile(k["ma"], tile), xp.tile(k["ma2"], tile)
        self.ma2 = k["ma2"]
        self.psi = xp.asarray(np.asarray(psi_list, dtype=np.float32)[fine])
        scale = xp.asarray(scan.cc_scale * e, dtype=xp.float32)[:, None]
        blocks = [
            (template_images(bank, float(psi_list[j]), scan.grid, b).reshape(n, b * b) * scale)
            for j in fine
        ]
        self.T = xp.ascontiguousarray(xp.concatenate(blocks, axis=0).T)

    def keys(self, cc, py, px):
        """Scan key and C of cc' ``(m, pairs)`` at pixels ``(py, px)`` ``(m,)``."""
        from streamem.pick.scan import _fom

        mu, sigma = self.mu[py, px][:, None], self.sigma[py, px][:, None]
        if self.s_fixed is None:
            key = (cc - mu * self.b_col) / sigma
            return key, key / self.e_col
        C = (cc - mu * self.ma_col) / sigma
        return _fom(C, self.ma2_col, self.s_fixed, self.xp), C
