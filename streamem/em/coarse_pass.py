"""The coarse pass of the E-step and its significant samples, batched over the images
of a part (pure functions over arrays, no I/O).

Global searches score the whole part against the K classes' HEALPix grids in one GEMM
((images·translations) × 2Mc) @ (2Mc × K·J). Local searches score each image against
the grid points within 3σ of its previous pose: the union of the part's candidates is
projected once (in the order the images first meet them), then groups of neighbouring
images are scored by one dense GEMM each against a run of the union's rows holding the
group's candidates, ((g·T) × 2Mc) @ (2Mc × K·U), read in place, and each image's own
columns are taken from it (padding −inf). The run holds rows an image does not need
(at most :data:`LOCAL_GROUP_WASTE` times its own); an image whose candidates spread
wider is scored alone against its own rows, gathered.

Significance (:func:`significant_pairs`) is RELION's rule of
:func:`streamem.em.significance.significant_class_pairs`, vectorised over the images
of a block (and done class by class): the (translation, orientation) pairs holding
``adaptive_fraction`` of an image's coarse posterior (at most ``max_significant``),
plus its ``min_orientations`` best orientations at their best translations.

``batched=False`` keeps the per-image loop (the reference the batched path is tested
and benchmarked against).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from streamem.core import sampling
from streamem.core.backend import to_numpy
from streamem.core.euler import euler_to_matrix
from streamem.core.fourier import n_points_within
from streamem.core.projector import project_points, slice_power
from streamem.em.kernels import (
    coarse_log_posterior,
    cross_terms,
    log_likelihood,
    namespace,
    ref_power_terms,
    stacked_real,
)
from streamem.em.memory import LOCAL_GATHER_BYTES, LOCAL_GROUP_WASTE, SIGNIFICANCE_BLOCK_BYTES
from streamem.em.phases import PhaseTimer, count_points, gemm_flops
from streamem.em.significance import significant_class_pairs


def coarse_orientations(model):
    """(rotations (J,3,3), angles (J,3)) of the global coarse grid, cached per model."""
    key = ("coarse", model.grid.healpix_order, model.grid.symmetry)
    if key not in model.coarse:
        rotations, angles = sampling.orientation_grid(model.grid.healpix_order, model.grid.symmetry)
        model.coarse[key] = (np.asarray(rotations), np.asarray(angles))
    return model.coarse[key]


def coarse_references(model, projectors, rotations, coords, points: dict[str, float]):
    """(K·J, Mc) slices of the global coarse grid for the K classes (row k·J + j) and
    their |A|² (K·J, Mc) float32, projected once per model and set of projectors (and
    then counted in ``points``, the statistics' phase points).

    Cached in the model (one per worker and iteration, shared by its tasks and
    sub-batches): at box 128 the grid's slices are ~10 MB per class, and re-projecting
    them (or squaring them) per sub-batch would cost as much as a small sub-batch's GEMM.
    """
    key = ("refs", tuple(id(p) for p in projectors), coords.shape[0])
    if key not in model.coarse:
        model.coarse[key] = project_classes(projectors, rotations, coords)
        count_points(points, "projection", len(projectors) * rotations.shape[0], coords.shape[0])
    return model.coarse[key]


def project_classes(projectors, rotations, coords):
    """(K·J, M) slices of K references at J rotations (row k·J + j) and their |A|²."""
    slices = [project_points(p, rotations, coords) for p in projectors]
    slices = slices[0] if len(slices) == 1 else namespace(slices[0]).concat(slices)
    return slices, slice_power(slices)


def coarse_radius_points(coords, model) -> int:
    """Mc: the work points within the coarse radius (a prefix of ``coords``: one of
    :func:`coarse_cuts`, or points sorted by radius)."""
    return n_points_within(coords, model.coarse_radius_px)


def coarse_cuts(model) -> tuple[float, ...]:
    """The radii (pixels) whose points the coarse passes of ``model`` take as prefixes
    of the E-step's points (``half_plane_points(..., cuts=)``): its own coarse radius
    and, with a local pre-pass, the pre-pass's."""
    cuts = [model.coarse_radius_px]
    if has_prepass(model.grid):
        cuts.append(prepass_model(model).coarse_radius_px)
    return tuple(cuts)


def has_prepass(grid) -> bool:
    """Whether a local search on ``grid`` takes its candidates from a pre-pass one order
    coarser (:func:`prepass_candidates`)."""
    return grid.local_prepass and grid.healpix_order > 0


def coarse_pass(images, coords, translations, offset_prior, model, refs, part, local: bool,
                timer: PhaseTimer, stats, batched: bool = True):  # fmt: skip
    """Coarse log-posteriors of a part's images and their significant pairs.

    images: fine_pass.FineImages; translations: fourier_points.Translations (T coarse
    shifts, their phases at ``coords``); offset_prior (n, T) float64; refs:
    the K references; part: estep._Part; ``stats.coarse_flops`` gets the GEMMs' FLOPs.
    Returns (angles (J, 3) of the scored orientations, J, per image (translation
    indices (P,), rows k·J + j (P,))).
    """
    grid, K, n = model.grid, model.n_classes, part.idx.size
    xp = namespace(images.X0)
    Mc = coarse_radius_points(coords, model)
    T = translations.shifts.shape[0]
    with timer("coarse_gemm"):
        Xs = images.X0[:, None, :Mc] * translations.phases[None, :, :Mc]  # (n, T, Mc)
    cw, ctf2w = images.cw[:, :Mc], images.ctf2w[:, :Mc]
    fraction, cap, min_o = model.adaptive_fraction, model.max_significant, model.min_orientations
    if not local:
        with timer("projection"):
            rot_c, ang_c = coarse_orientations(model)
            J = ang_c.shape[0]
            ref_c, power_c = coarse_references(model, refs, rot_c, coords[:Mc], stats.phase_points)
        with timer("coarse_gemm"):
            C = cross_terms(Xs, cw, ref_c)  # (n, T, K·J)
            S = ref_power_terms(ctf2w, power_c)  # (n, K·J)
            row_prior = (
                None if part.log_pi is None else xp.asarray(np.repeat(part.log_pi, J, axis=1))
            )
            lp = coarse_log_posterior(C, S, xp.asarray(offset_prior), model.scale_free, row_prior)
            lp = to_numpy(lp)
        stats.coarse_flops += gemm_flops(n * T, 2 * Mc, K * J) + gemm_flops(n, Mc, K * J)
        with timer("significance"):
            if batched:
                pairs = significant_pairs(lp.reshape(n, T, K, J), fraction, cap, min_o)
            else:
                pairs = [
                    significant_class_pairs(lp_i, np.arange(K * J) // J, K, fraction, cap, min_o)
                    for lp_i in lp
                ]
        return ang_c, J, pairs
    if has_prepass(grid):
        cands = prepass_candidates(images, coords, translations, offset_prior, model, refs,
                                   part, timer, stats, batched)  # fmt: skip
    else:
        cands = [
            np.asarray(
                sampling.local_orientations(prev, grid.healpix_order, 3 * grid.local_sigma_deg)
            )
            for prev in part.previous
        ]
    ang_c, own = candidate_union(cands)
    J = ang_c.shape[0]
    with timer("projection"):
        rot_c = euler_to_matrix(ang_c[:, 0], ang_c[:, 1], ang_c[:, 2])
        ref_c, power_c = project_classes(refs, rot_c, coords[:Mc])  # (K·J, Mc)
        count_points(stats.phase_points, "projection", K * J, Mc)
    with timer("coarse_gemm"):
        S = ref_power_terms(ctf2w, power_c)  # (n, K·J)
        stats.coarse_flops += gemm_flops(n, Mc, K * J)
        scores = _local_scores if batched else _local_scores_loop
        lp = scores(Xs, cw, ref_c, S, own, ang_c, part, model, offset_prior, stats)
    with timer("significance"):
        if batched:
            cols = significant_pairs(lp, fraction, cap, min_o)  # columns k·c + position
            c_max = lp.shape[-1]
            pairs = [(t, (c // c_max) * J + own[i][c % c_max]) for i, (t, c) in enumerate(cols)]
        else:
            pairs = []
            for lp_i, own_i in zip(lp, own, strict=True):
                r = (np.arange(K)[:, None] * J + own_i[None, :]).ravel()
                t_idx, c = significant_class_pairs(lp_i, r // J, K, fraction, cap, min_o)
                pairs.append((t_idx, r[c]))
    return ang_c, J, pairs


def prepass_candidates(images, coords, translations, offset_prior, model, refs, part, timer,
                       stats, batched: bool = True):  # fmt: skip
    """Each image's local candidates at the grid's order from a pass one order coarser.

    The local coarse pass at ``healpix_order − 1`` (within
    ``model.prepass_radius_fraction`` of its own coarse radius, the same translations,
    priors and significance rule, with ``model.prepass_min_orientations`` best
    orientations always kept); the candidates are the HEALPix children (2³ per
    orientation: the directions' 4 and 2 psi) of the orientations of each image's
    significant pairs. With σ = 1.5 steps an image meets ~8x fewer grid points in the
    coarser pass and keeps ~8 orientations there, so the pass at the grid's order scores
    ~64 candidates instead of ~600. (The children's psi sit half a step off the order's
    psi grid; their own children, the fine pass's, are the fine grid's.) Returns per
    image (c_i, 3) angles in degrees.
    """
    lower = prepass_model(model)
    ang_l, J_l, pairs = coarse_pass(images, coords, translations, offset_prior, lower, refs,
                                    part, True, timer, stats, batched)  # fmt: skip
    cands = []
    for _, rows in pairs:
        parents = ang_l[np.unique(rows % J_l)]
        kids = sampling.oversample_orientations(parents, lower.grid.healpix_order, 1)
        cands.append(np.asarray(kids).reshape(-1, 3))
    return cands


def prepass_model(model):
    """The model of a local search's pre-pass (:func:`prepass_candidates`): the grid one
    order coarser without a pre-pass of its own, ``prepass_min_orientations`` always
    kept, scored within ``prepass_radius_fraction`` of that order's coarse radius."""
    lower = replace(model.grid, healpix_order=model.grid.healpix_order - 1, local_prepass=False)
    return replace(model, grid=lower, min_orientations=model.prepass_min_orientations,
                   coarse_radius_fraction=model.prepass_radius_fraction)  # fmt: skip


def candidate_union(cands):
    """The union of the images' candidate orientations, in the order the images first
    meet them, and each image's rows in it.

    cands: per image its candidate angles (c_i, 3) degrees. Returns (angles (J, 3), per
    image (c_i,) int64 rows). Rows in first-met order (not sorted) keep each image's
    slices together, close in orientation, so projecting them reads the half cube from
    cache.
    """
    keys, first, inverse = np.unique(
        np.round(np.concatenate(cands), 6), axis=0, return_index=True, return_inverse=True
    )
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    rows = rank[inverse.ravel()]
    bounds = np.cumsum([0] + [c.shape[0] for c in cands])
    return keys[order], [rows[bounds[i] : bounds[i + 1]] for i in range(len(cands))]


def _local_scores(Xs, cw, ref_c, S, own, ang_c, part, model, offset_prior, stats):
    """Log-posteriors (n, T, K, c_max) float64 on the host of each image's own candidates
    (position a of image i is union row own[i][a]; padding −inf), by one dense GEMM per
    group of neighbouring images against the group's union of candidates
    (:func:`local_score_groups`). ang_c: (J, 3) the union's angles."""
    xp = namespace(Xs)
    n, T, Mc = Xs.shape
    J = ang_c.shape[0]
    K, c_max = model.n_classes, max(o.size for o in own)
    own_pad = np.zeros((n, c_max), np.int64)
    ang_prior = np.full((n, c_max), -np.inf)
    for i, o in enumerate(own):  # the local prior, normalised over the image's candidates
        own_pad[i, : o.size], own_pad[i, o.size :] = o, o[0]
        ang_prior[i, : o.size] = sampling.gaussian_orientation_prior(
            ang_c[o], part.previous[i], model.grid.local_sigma_deg
        )
    classes = np.arange(K)[None, :, None]
    rows = (classes * J + own_pad[:, None, :]).reshape(n, K * c_max)
    lhs = stacked_real(Xs * cw[:, None, :])  # (n, T, 2Mc): Re Σ conj(Xs)·cw·A = lhs · rhs
    rhs = stacked_real(ref_c)  # (K·J, 2Mc) float32 (complex64 slices)
    out = np.empty((n, T, K * c_max))
    for sl, rows_g in local_score_groups(own, J, K, T, Mc):
        m = sl.stop - sl.start
        union_g = np.asarray(rows_g)  # sorted rows of each class's block of J
        U = union_g.size
        if K == 1 and isinstance(rows_g, range):  # a run of the union: read in place
            A = rhs[rows_g.start : rows_g.stop, ...]
        else:
            A = xp.take(rhs, xp.asarray((np.arange(K)[:, None] * J + union_g).ravel()), axis=0)
        cols = (classes * U + np.searchsorted(union_g, own_pad[sl])[:, None, :]).reshape(m, -1)
        # (K·U, 2Mc) @ (2Mc, m·T): the long dimension first runs BLAS fastest (measured)
        C = xp.matmul(A, xp.reshape(lhs[sl, ...], (m * T, 2 * Mc)).mT)
        del A
        C = xp.reshape(C.mT, (m, T, -1))
        idx = xp.asarray(np.broadcast_to(cols[:, None, :], (m, T, cols.shape[1])))
        C = xp.take_along_axis(C, idx, axis=2)  # (m, T, K·c_max): each image's own rows
        S_g = xp.take_along_axis(S[sl, ...], xp.asarray(rows[sl]), axis=1)  # (m, K·c_max)
        out[sl] = to_numpy(log_likelihood(C, S_g[:, None, :], 0.0, model.scale_free))
        stats.coarse_flops += gemm_flops(m * T, 2 * Mc, K * U)
    # same sums, same order as the per-image loop: ((loglik + offset) + angular) + class
    out = out.reshape(n, T, K, c_max)
    out += offset_prior[:, :, None, None]
    out += ang_prior[:, None, None, :]
    if part.log_pi is not None:
        out += part.log_pi[:, None, :, None]
    return out


def local_score_groups(own, J: int, K: int, T: int, Mc: int):
    """Groups of consecutive images that one dense GEMM scores against a run of the
    part's union of candidates.

    The part is in neighbourhood order and its union in first-met order, so an image's
    candidates sit in a short run of union rows, mostly its own. own: per image its
    candidates' rows in the union (J rows per class). Yields (slice of images, rows):
    ``range(lo, hi)``, a run of rows (in each class's block of J) holding the group's
    candidates, at most :data:`LOCAL_GROUP_WASTE` times its largest image's count, its
    scores (m·T × K·U float32) and any gathered operand (K·U × 2Mc) within
    ``LOCAL_GATHER_BYTES``; or, for one image whose candidates spread wider than that,
    its sorted rows (gathered).
    """
    lo_i = [int(o.min()) for o in own]
    hi_i = [int(o.max()) + 1 for o in own]
    start, lo, hi, c = 0, lo_i[0], hi_i[0], own[0].size
    for i in range(1, len(own)):
        new_lo, new_hi, new_c = min(lo, lo_i[i]), max(hi, hi_i[i]), max(c, own[i].size)
        size = K * (new_hi - new_lo) * 4 * max(2 * Mc, (i + 1 - start) * T)
        if new_hi - new_lo <= LOCAL_GROUP_WASTE * new_c and size <= LOCAL_GATHER_BYTES:
            lo, hi, c = new_lo, new_hi, new_c
            continue
        yield _score_group(own, start, i, lo, hi, c)
        start, lo, hi, c = i, lo_i[i], hi_i[i], own[i].size
    yield _score_group(own, start, len(own), lo, hi, c)


def _score_group(own, start: int, stop: int, lo: int, hi: int, c: int):
    if hi - lo <= LOCAL_GROUP_WASTE * c:
        return slice(start, stop), range(lo, hi)
    return slice(start, stop), np.unique(own[start])  # one image (groups grow within the bound)


def _local_scores_loop(Xs, cw, ref_c, S, own, ang_c, part, model, offset_prior, stats):
    """The per-image reference of :func:`_local_scores`: one GEMM per image; returns per
    image its log-posterior (T, K·c_i) over rows k·J + own[i] (class-major)."""
    xp = namespace(Xs)
    K, (n, T, Mc), J = model.n_classes, Xs.shape, ang_c.shape[0]
    logps = []
    for i in range(n):
        r = (np.arange(K)[:, None] * J + own[i][None, :]).ravel()  # (K·c_i,) class-major
        r_x = xp.asarray(r)
        C = cross_terms(Xs[i : i + 1, ...], cw[i : i + 1, ...], xp.take(ref_c, r_x, axis=0))[0, ...]
        stats.coarse_flops += gemm_flops(T, 2 * Mc, r.size)
        lp = to_numpy(log_likelihood(C, xp.take(S[i, ...], r_x)[None, :], 0.0, model.scale_free))
        ang_prior = sampling.gaussian_orientation_prior(
            ang_c[own[i]], part.previous[i], model.grid.local_sigma_deg
        )
        lp = lp + offset_prior[i][:, None] + np.tile(ang_prior, K)[None, :]
        if part.log_pi is not None:
            lp = lp + part.log_pi[i, r // J][None, :]
        logps.append(lp)
    return logps


def significant_pairs(lp, fraction: float, max_count: int, min_orientations: int,
                      block_bytes: int = SIGNIFICANCE_BLOCK_BYTES, log_floor: float = 30.0):  # fmt: skip
    """RELION's significant coarse pairs of many images, class by class.

    lp: (n, T, K, C) log-posteriors on the host (padding and excluded samples −inf).
    Per image and class: the pairs of
    :func:`streamem.em.significance.significant_pair_mask` over that class's columns;
    for K > 1 classes with no finite sample are skipped (as
    :func:`~streamem.em.significance.significant_class_pairs`). Returns per image
    (translation indices (P,), columns k·C + c (P,)), class-major then translation
    then column (the per-image functions' order).

    Only the mass needs every sample (one float32 exp pass, clipped at ``log_floor``
    below the best so that no exp goes subnormal). The ``max_count`` most probable
    pairs all lie in the columns whose best translation reaches the ``max_count``-th
    largest column maximum (that many columns hold a pair at least as probable), so
    only those columns are ranked, in float64 as the per-image rule.
    """
    n, T, K, C = lp.shape
    b = max(1, block_bytes // max(1, 40 * T * K * C))
    out = []
    for b0 in range(0, n, b):
        block = lp[b0 : b0 + b]
        m = block.shape[0]
        i, k, t, c = _block_pairs(block, fraction, max_count, min_orientations, log_floor)
        # sorted and unique: the mass's pairs and the best orientations' can coincide
        i, rest = np.divmod(np.unique(((i * K + k) * T + t) * C + c), K * T * C)
        k, rest = np.divmod(rest, T * C)
        t, c = np.divmod(rest, C)
        ends = np.searchsorted(i, np.arange(1, m + 1))
        starts = np.concatenate([[0], ends[:-1]])
        out.extend((t[s:e], k[s:e] * C + c[s:e]) for s, e in zip(starts, ends, strict=True))
    return out


def _block_pairs(lp, fraction: float, max_count: int, min_orientations: int, log_floor: float):
    """The significant pairs of m images' K classes, as indices: lp (m, T, K, C) →
    (images, classes, translations, columns), each (P,) int64, unordered, repeats allowed."""
    m, T, K, C = lp.shape
    colmax = lp.max(axis=1)  # (m, K, C)
    top = colmax.max(axis=2)  # (m, K)
    finite = np.isfinite(top)
    top0 = np.where(finite, top, 0.0)
    # each (image, class)'s mass within log_floor of its best
    d = np.empty(lp.shape, np.float32)  # the difference cast as it is made (no float64 copy)
    np.subtract(lp, top0[:, None, :, None], out=d, casting="same_kind")
    inside = d >= -log_floor
    np.maximum(d, -log_floor, out=d)
    np.exp(d, out=d)
    d *= inside
    total = d.sum(axis=(1, 3), dtype=np.float64)  # (m, K)
    del d, inside
    # the columns that can hold one of the max_count best pairs
    n_rank = min(max_count, T * C)
    floor = top0 - log_floor
    if n_rank <= C:  # else every column can hold one
        kth = -np.partition(-colmax, n_rank - 1, axis=2)[:, :, n_rank - 1]
        floor = np.maximum(kth, floor)
    floor[~finite] = np.inf
    ci, ck, cc = np.nonzero(colmax >= floor[:, :, None])
    sub = lp[ci, :, ck, cc]  # (columns, T)
    col, tt = np.nonzero(sub >= floor[ci, ck][:, None])
    i, k, t, c = ci[col], ck[col], tt, cc[col]
    p = np.exp(sub[col, tt].astype(np.float64) - top0[i, k])
    group = i * K + k
    order = np.lexsort((-p, group))  # most probable first, ties by index (stable)
    i, k, t, c, p, group = i[order], k[order], t[order], c[order], p[order], group[order]
    rank = np.arange(group.size) - np.searchsorted(group, np.arange(m * K))[group]
    top_n = rank < n_rank
    i, k, t, c, p, group, rank = (a[top_n] for a in (i, k, t, c, p, group, rank))
    P = np.zeros((m * K, n_rank))
    P[group, rank] = p
    before = (np.cumsum(P, axis=1) - P)[group, rank]  # mass of the more probable pairs
    keep = ((before < fraction * total[i, k]) & (p > 0)) | (rank == 0)
    sel = [(i[keep], k[keep], t[keep], c[keep])]
    if K == 1 and not finite.all():  # the per-image rule keeps an empty image's first pair
        empty = np.flatnonzero(~finite[:, 0])
        t0, c0 = np.unravel_index(np.argmax(lp[empty, :, 0, :].reshape(empty.size, -1), 1), (T, C))
        sel.append((empty, np.zeros_like(empty), t0, c0))
    n_best = min(min_orientations, C)
    if n_best > 0:  # the best orientations, each at its best translation
        if n_best < C:
            best_j = np.argpartition(-colmax, n_best - 1, axis=2)[:, :, :n_best]
        else:
            best_j = np.broadcast_to(np.arange(C), (m, K, C))
        bi, bk, bn = np.nonzero(np.isfinite(np.take_along_axis(colmax, best_j, axis=2)))
        bj = best_j[bi, bk, bn]
        sel.append((bi, bk, lp[bi, :, bk, bj].argmax(axis=1), bj))
    return tuple(np.concatenate([s[a] for s in sel]).astype(np.int64) for a in range(4))
