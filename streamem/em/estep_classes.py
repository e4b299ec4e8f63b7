"""The E-step over classes × poses: refine3d's kernels with a class axis (no I/O, no Dask).

RELION's classification posterior for image i is over (class k, orientation j,
translation t): log p = −diff2(i, k, j, t) + log π_k + log prior(t) (+ the local-search
orientation prior). The coarse pass stacks the K classes' central slices along the
orientation axis, so the class axis rides inside the same GEMM as refine3d's
(:func:`streamem.em.estep.cross_terms`, :func:`ref_power_terms`): a table row is
(class, orientation) with row = k·J + j. The significant coarse (translation, row)
pairs are chosen class by class (:func:`_significant_pairs_per_class`), so every class
meets every particle at the fine resolution, and refined into their children (2³
orientations × 2² translations for oversampling 1) as in :mod:`streamem.em.estep`,
each child keeping its parent's class. rlnClassNumber is the class of largest
marginal posterior (summed over the poses).

Statistics: the K classes' accumulators are stored on the leading axis of
:class:`SufficientStatistics` as 2K half-cubes, index 2k + (rlnRandomSubset − 1), so
the M-step can estimate each class's signal power from the FSC between random halves
of its own particles (see :mod:`streamem.em.classify3d`). ``class_weight`` (K,) sums
the class posteriors.

With ``skip_align`` the poses are fixed to the particles' stored ones and the posterior
is over classes only: one projection per (particle, class). With ``seed`` (the first
iteration from one reference) each particle meets only its seeded class.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse
from scipy.special import logsumexp

from streamem.core import sampling
from streamem.core.backprojector import insert_points
from streamem.core.euler import angular_distance_deg, euler_to_matrix
from streamem.core.projector import half_cube_shape, padded_radius, project_points
from streamem.em.estep import (
    EStepModel,
    batch_size,
    coarse_orientations,
    coarse_references,
    estep_shape,
)
from streamem.em.fourier_points import half_plane_points, prepare_images, slice_metadata
from streamem.em.kernels import (
    coarse_log_posterior,
    cross_terms,
    log_likelihood,
    offset_log_prior,
    ref_power_terms,
)
from streamem.em.significance import significant_pair_mask, significant_weights
from streamem.em.statistics import ChunkResult, SufficientStatistics


@dataclass(frozen=True)
class ClassEStepModel:
    """A refine3d :class:`EStepModel` whose projectors are the K class references.

    log_class_prior: (K,) log class fractions (−inf for an empty class is allowed).
    skip_align: poses fixed to the stored ones; posterior over classes only.
    seed: when not None, each particle is scored against one class only, drawn from
        its index and this seed (RELION's ``do_generate_seeds`` for the first iteration
        of a classification from one reference: the K reconstructions then come from
        disjoint random subsets and the classes start to differ by the data).
    """

    base: EStepModel
    log_class_prior: np.ndarray
    skip_align: bool = False
    seed: int | None = None

    @property
    def n_classes(self) -> int:
        return len(self.base.projectors)


def empty_class_statistics(grid_shape, n_optics_groups: int, n_shells: int, n_classes: int):
    """Statistics with 2K accumulators (class k, half h at index 2k + h)."""
    return SufficientStatistics(
        data_acc=np.zeros((2 * n_classes, *grid_shape), np.complex128),
        weight_acc=np.zeros((2 * n_classes, *grid_shape), np.float64),
        noise_power=np.zeros((n_optics_groups, n_shells)),
        noise_count=np.zeros((n_optics_groups, n_shells)),
        class_weight=np.zeros(n_classes),
    )


def seeded_classes(particle_index: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
    """A pseudo-random class (0 … K−1) per particle from its index (n,) int64.

    A SplitMix64 hash of (seed, index): the same for any chunking of the store.
    """
    with np.errstate(over="ignore"):
        z = np.asarray(particle_index, np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(n_classes)).astype(np.int64)


def _log_class_priors(model: ClassEStepModel, metadata, n: int) -> np.ndarray:
    """(n, K) log prior over classes per image: the class fractions, or the seeded class."""
    log_pi = np.broadcast_to(np.asarray(model.log_class_prior, np.float64), (n, model.n_classes))
    if model.seed is None:
        return log_pi.copy()
    if "particle_index" not in metadata:
        raise ValueError("seeded classes need each particle's index (metadata['particle_index'])")
    seeded = seeded_classes(metadata["particle_index"], model.n_classes, model.seed)
    out = np.full((n, model.n_classes), -np.inf)
    out[np.arange(n), seeded] = 0.0
    return out


def _halves(metadata, n):
    if "rlnRandomSubset" in metadata:
        return np.clip(np.asarray(metadata["rlnRandomSubset"], np.int64) - 1, 0, 1)
    return np.arange(n) % 2


def _poses(metadata):
    keys = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    if not all(k in metadata for k in keys):
        return None
    ang = np.stack([np.asarray(metadata[k], np.float64) for k in keys], axis=1)
    return None if np.isnan(ang).any() else ang


def expectation_classes(
    images: np.ndarray, metadata: dict[str, np.ndarray], model: ClassEStepModel
) -> tuple[SufficientStatistics, ChunkResult]:
    """E-step of one chunk over (class, orientation, translation).

    images: (n, B, B) float32 centred at B//2; metadata: RELION labels → (n,) arrays
    (rlnRandomSubset picks the half accumulator; previous poses and origins are used
    for local searches, translations and ``skip_align``). Returns the chunk's
    statistics (2K accumulators) and per-particle results (rlnClassNumber from 1).
    """
    base = model.base
    n, B = images.shape[0], base.box_size
    coords, flat, shell = half_plane_points(B, base.max_radius_px)
    K = model.n_classes
    grid_shape = half_cube_shape(
        padded_radius(base.max_radius_px, base.projectors[0].padding_factor)
    )
    stats = empty_class_statistics(grid_shape, len(base.optics), base.n_shells, K)
    result = ChunkResult(*(np.zeros(n) for _ in range(9)))
    groups = np.asarray(metadata.get("rlnOpticsGroup", np.ones(n)), np.int64) - 1
    halves = _halves(metadata, n)
    previous = _poses(metadata)
    log_pi = _log_class_priors(model, metadata, n)
    if model.skip_align and previous is None:
        raise ValueError("skip_align needs rlnAngleRot/Tilt/Psi for every particle")
    shape = estep_shape(base, coords, previous, K)
    if model.skip_align:  # one slice per (particle, class): (K, n, M) and a few (n, M)
        shape = replace(shape, n_orientations=1, n_orientations_total=1, n_translations=1)
    batch, bp_budget = batch_size(base, shape, n, stats.data_acc.size)
    n_shells = stats.noise_power.shape[1]
    for b0 in range(0, n, batch):
        sl = slice(b0, min(n, b0 + batch))
        prep = prepare_images(
            images[sl], slice_metadata(metadata, sl, n), base, coords, flat, shell
        )
        prev = None if previous is None else previous[sl]
        args = (prep, model, coords, prev, halves[sl], log_pi[sl], stats, result.view(sl))
        if model.skip_align:
            noise_rows = _fixed_poses(*args)
        else:
            noise_rows = _search(*args, bp_budget)
        for g in np.unique(groups[sl]):
            rows = groups[sl] == g
            stats.noise_power[g] += np.bincount(
                shell, noise_rows[rows].sum(axis=0), minlength=n_shells
            )[:n_shells]
            stats.noise_count[g] += rows.sum() * np.bincount(shell, minlength=n_shells)[:n_shells]
        del prep, noise_rows
    return stats.compact(), result


def _fixed_poses(prep, model, coords, poses, halves, log_pi, stats, result):
    """Posterior over classes at the stored poses; returns per-image noise rows (n, M)."""
    base = model.base
    B, p = base.box_size, base.pixel_size_A
    n, M = prep.X.shape
    X0 = prep.X * np.asarray(
        sampling.shift_phases(coords, prep.prior_offset_px, B)
    )  # (n, M) centred
    cw = prep.ctf * prep.inv_sigma2
    ctf2w = prep.ctf * cw
    rot = euler_to_matrix(poses[:, 0], poses[:, 1], poses[:, 2])  # (n, 3, 3)
    A = np.stack([project_points(f, rot, coords) for f in base.projectors])  # (K, n, M)
    C = np.einsum("nm,knm->nk", np.conj(X0) * cw, A).real  # (n, K)
    S = 0.5 * np.einsum("knm,nm->nk", A.real**2 + A.imag**2, ctf2w)  # (n, K)
    logp = log_likelihood(C, S, prep.norm[:, None], base.scale_free) + log_pi
    lse = logsumexp(logp, axis=1)
    W = np.exp(logp - lse[:, None])  # (n, K)
    best = W.argmax(axis=1)
    result.rot[:], result.tilt[:], result.psi[:] = poses.T
    result.origin_y_A[:], result.origin_x_A[:] = (prep.prior_offset_px * p).T
    result.max_prob[:] = W.max(axis=1)
    result.n_significant[:] = (W > 1e-3).sum(axis=1)
    result.loglik[:] = lse
    result.class_number[:] = best + 1
    power_X = prep.X.real**2 + prep.X.imag**2
    noise_rows = np.zeros((n, M))
    for k in range(model.n_classes):
        wk = W[:, k]
        noise_rows += wk[:, None] * (
            power_X
            - 2 * prep.ctf * (np.conj(X0) * A[k]).real
            + prep.ctf**2 * (A[k].real ** 2 + A[k].imag ** 2)
        )
        for h in (0, 1):
            sel = (halves == h) & (wk > 0)
            if sel.any():
                insert_points(
                    stats.data_acc[2 * k + h],
                    stats.weight_acc[2 * k + h],
                    rot[sel],
                    coords,
                    (wk[sel, None] * X0[sel] * cw[sel]).astype(np.complex128),
                    wk[sel, None] * ctf2w[sel],
                    base.projectors[k].padding_factor,
                )
    stats.class_weight += W.sum(axis=0)
    stats.weight_sum += n
    stats.loglik_sum += float(lse.sum())
    return noise_rows


def _coarse_candidates(model, previous, n):
    """Coarse orientations (angles (U, 3)) and each image's rows into them (local or global)."""
    grid = model.base.grid
    if grid.local_sigma_deg is None or previous is None:
        rot_c, ang_c = coarse_orientations(model.base)
        return rot_c, ang_c, None
    cands = [
        np.asarray(
            sampling.local_orientations(previous[i], grid.healpix_order, 3 * grid.local_sigma_deg)
        )
        for i in range(n)
    ]
    ang_c, inverse = np.unique(np.round(np.concatenate(cands), 6), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    bounds = np.cumsum([0] + [c.shape[0] for c in cands])
    member = [inverse[bounds[i] : bounds[i + 1]] for i in range(n)]
    return euler_to_matrix(ang_c[:, 0], ang_c[:, 1], ang_c[:, 2]), ang_c, member


def _significant_pairs_per_class(lp, n_classes: int, n_orientations: int, base):
    """One image's coarse (translation, row) pairs to refine, chosen class by class.

    lp: (T, K·J) coarse log-posterior. Within each class (rows k·J … k·J + J − 1) the
    pairs holding ``adaptive_fraction`` of that class's own mass (at most
    ``max_significant``) and its ``min_orientations`` best orientations are kept, so
    every class with a finite prior is compared at the fine resolution. RELION picks
    the significant samples over all classes together; at the coarse pass's low
    resolution the classes differ little, and a joint cap filled by one class decides
    the class at the coarse resolution and locks particles into the first random split.
    Returns (translation indices, rows), both (P,).
    """
    t_all, rows_all = [], []
    for k in range(n_classes):
        lp_k = lp[:, k * n_orientations : (k + 1) * n_orientations]
        if not np.isfinite(lp_k).any():
            continue
        mask = significant_pair_mask(
            lp_k, base.adaptive_fraction, base.max_significant, base.min_orientations
        )
        t_idx, rows = np.nonzero(mask)
        t_all.append(t_idx)
        rows_all.append(rows + k * n_orientations)
    return np.concatenate(t_all), np.concatenate(rows_all)


def _search(prep, model, coords, previous, halves, log_pi, stats, result, bp_budget_bytes=None):
    """Coarse pass over classes × orientations × translations, then the fine pass.

    Back-projection rows are buffered and flushed into the accumulators whenever they
    exceed ``bp_budget_bytes`` (None: once at the end)."""
    base = model.base
    grid = base.grid
    p, B = base.pixel_size_A, base.box_size
    K = model.n_classes
    X, ctf = prep.X, prep.ctf
    cw = ctf * prep.inv_sigma2
    ctf2w = ctf * cw
    n, M = X.shape
    prior_px = prep.prior_offset_px

    # -- coarse pass: one GEMM, the classes stacked along the orientation axis --------
    shifts = np.asarray(
        sampling.translation_grid(grid.offset_range_px, grid.offset_step_px)
    )  # (T, 2)
    phases = np.asarray(sampling.shift_phases(coords, shifts, B))  # (T, M)
    X0 = X * np.asarray(sampling.shift_phases(coords, prior_px, B))  # (n, M) on previous origin
    Mc = int(
        np.searchsorted(np.hypot(coords[:, 0], coords[:, 1]), base.coarse_radius_px, side="right")
    )
    Xs = X0[:, None, :Mc] * phases[None, :, :Mc]  # (n, T, Mc)
    offset_prior = offset_log_prior(
        prior_px[:, None, :] + shifts[None], base.sigma_offset_A, p
    )  # (n, T)
    rot_c, ang_c, member = _coarse_candidates(model, previous, n)
    J = ang_c.shape[0]
    if member is None:  # the global grid's slices: projected once per model (cached)
        refs = np.concatenate(
            [coarse_references(base, f, rot_c, coords[:Mc]) for f in base.projectors]
        )
    else:
        refs = np.concatenate([project_points(f, rot_c, coords[:Mc]) for f in base.projectors])
    # refs: (K·J, Mc)
    C = cross_terms(Xs, cw[:, :Mc], refs)  # (n, T, K·J)
    S = ref_power_terms(ctf2w[:, :Mc], refs)  # (n, K·J)
    row_prior = np.repeat(log_pi, J, axis=1)  # (n, K·J): class fractions or seeded class
    if member is not None:  # local searches: only each image's own candidates, Gaussian prior
        ang_prior = np.full((n, J), -np.inf)
        for i in range(n):
            ang_prior[i, member[i]] = sampling.gaussian_orientation_prior(
                ang_c[member[i]], previous[i], grid.local_sigma_deg
            )
        row_prior += np.tile(ang_prior, (1, K))
    logp = coarse_log_posterior(C, S, offset_prior, base.scale_free, row_prior)
    pairs = []  # per image: (translation index, coarse row k·J + j)
    for i in range(n):
        t_idx, rows = _significant_pairs_per_class(logp[i], K, J, base)
        pairs.append((t_idx, rows))
    del C, logp, Xs

    # -- the fine table: children of every (class, orientation) some image refines -------
    union = np.unique(np.concatenate([r for _, r in pairs]))
    kids = np.asarray(
        sampling.oversample_orientations(ang_c[union % J], grid.healpix_order, grid.oversampling)
    )
    n_kids = kids.shape[1]  # kids: (U, n_kids, 3)
    ang_table = kids.reshape(-1, 3)
    class_table = np.repeat(union // J, n_kids)  # class of each table row
    pos = np.full(K * J, -1)
    pos[union] = np.arange(union.size)
    rot_table = euler_to_matrix(ang_table[:, 0], ang_table[:, 1], ang_table[:, 2])
    refs_table = np.zeros((ang_table.shape[0], M), np.complex64)
    for c in np.unique(class_table):
        sel = class_table == c
        refs_table[sel] = project_points(base.projectors[c], rot_table[sel], coords)
    power_table = (refs_table.real**2 + refs_table.imag**2).astype(np.float32)
    sub = np.asarray(
        sampling.oversample_translations(np.zeros((1, 2)), grid.offset_step_px, grid.oversampling)
    )
    sub = sub.reshape(-1, 2)
    noise_rows = np.zeros((n, M))
    bp_keys, bp_vals, bp_wgts = [], [], []
    bp_bytes = 0

    def flush():
        """Sum the buffered rows per (table row, half) and insert per (class, half)."""
        if not bp_keys:
            return
        keys = np.concatenate(bp_keys)
        used, inverse = np.unique(keys, return_inverse=True)
        onehot = scipy.sparse.csr_matrix(
            (np.ones(keys.size), (inverse.ravel(), np.arange(keys.size))),
            shape=(used.size, keys.size),
        )
        vals = onehot @ np.concatenate(bp_vals).astype(np.complex128)
        wgts = onehot @ np.concatenate(bp_wgts).astype(np.float64)
        bp_keys.clear(), bp_vals.clear(), bp_wgts.clear()
        table_rows, half_of = used // 2, used % 2
        for c in range(K):
            for h in (0, 1):
                sel = (class_table[table_rows] == c) & (half_of == h)
                if sel.any():
                    insert_points(
                        stats.data_acc[2 * c + h],
                        stats.weight_acc[2 * c + h],
                        rot_table[table_rows[sel]],
                        coords,
                        vals[sel],
                        wgts[sel],
                        base.projectors[c].padding_factor,
                    )

    # -- fine pass, image by image (as refine3d), each child row carrying its class ------
    for i in range(n):
        t_idx, rows = pairs[i]
        P = t_idx.size
        shifts_f = shifts[t_idx][:, None, :] + sub[None]  # (P, S, 2)
        krows = pos[rows][:, None] * n_kids + np.arange(n_kids)  # (P, nk)
        ph = np.asarray(sampling.shift_phases(coords, shifts_f.reshape(-1, 2), B)).reshape(P, -1, M)
        Xf = X0[i] * ph  # (P, S, M)
        A = refs_table[krows]  # (P, nk, M)
        Y = np.conj(Xf) * cw[i]
        lhs = np.concatenate([Y.real, -Y.imag], axis=-1)  # (P, S, 2M)
        rhs = np.concatenate([A.real, A.imag], axis=-1).transpose(0, 2, 1)  # (P, 2M, nk)
        Cf = lhs @ rhs  # (P, S, nk)
        Sf = 0.5 * (power_table[krows] @ ctf2w[i])  # (P, nk)
        total = prior_px[i] + shifts_f  # (P, S, 2)
        lpf = log_likelihood(Cf, Sf[:, None, :], prep.norm[i], base.scale_free)
        lpf += offset_log_prior(total, base.sigma_offset_A, p)[:, :, None]
        lpf += log_pi[i, class_table[krows]][:, None, :]
        if member is not None:
            ang_f = ang_table[krows.ravel()]
            lpf += sampling.gaussian_orientation_prior(
                ang_f, previous[i], grid.local_sigma_deg
            ).reshape(P, 1, -1)
        lse = logsumexp(lpf)
        W = np.exp(lpf - lse)  # (P, S, nk)
        pb, sb, kb = np.unravel_index(np.argmax(W), W.shape)
        best_row = krows[pb, kb]
        result.rot[i], result.tilt[i], result.psi[i] = ang_table[best_row]
        best_origin_px = total[pb, sb]
        result.origin_y_A[i], result.origin_x_A[i] = best_origin_px * p
        result.max_prob[i] = W[pb, sb, kb]
        class_post = np.bincount(
            class_table[krows].ravel(), weights=W.sum(axis=1).ravel(), minlength=K
        )
        result.class_number[i] = int(np.argmax(class_post)) + 1
        W, result.n_significant[i] = significant_weights(W, base.adaptive_fraction)
        result.loglik[i] = lse

        live = W.reshape(P, -1).any(axis=1)
        Wl, Xl, rows_l = W[live], Xf[live], krows[live]
        D = (Wl.transpose(0, 2, 1).astype(np.complex64) @ Xl).reshape(-1, M)  # (P'·nk, M)
        w_j = Wl.sum(axis=1).ravel()
        rows_l = rows_l.ravel()
        on = w_j > 0
        D, w_j, rows_l = D[on], w_j[on], rows_l[on]
        bp_keys.append(2 * rows_l + halves[i])
        bp_vals.append(D * cw[i])
        bp_wgts.append(w_j[:, None] * ctf2w[i])
        bp_bytes += rows_l.size * M * 16
        if bp_budget_bytes is not None and bp_bytes > bp_budget_bytes:
            flush()
            bp_bytes = 0
        A_l = refs_table[rows_l]
        noise_rows[i] = (
            (X[i].real ** 2 + X[i].imag ** 2)
            - 2 * ctf[i] * np.sum((np.conj(D) * A_l).real, axis=0)
            + ctf[i] ** 2 * (w_j @ power_table[rows_l])
        )
        stats.class_weight += np.bincount(class_table[rows_l], weights=w_j, minlength=K)
        stats.offset_sq_A2 += float(np.sum(W * np.sum((total * p) ** 2, axis=-1)[:, :, None]))
        stats.weight_sum += 1.0
        stats.loglik_sum += float(lse)
        if previous is not None:
            A_new = euler_to_matrix(*ang_table[best_row])
            A_old = euler_to_matrix(*previous[i])
            stats.pose_change_deg_sum += float(angular_distance_deg(A_new, A_old))
            stats.offset_change_A_sum += float(np.hypot(*((best_origin_px - prior_px[i]) * p)))
            stats.n_with_previous += 1

    flush()
    return noise_rows
