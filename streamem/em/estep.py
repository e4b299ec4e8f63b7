"""The expectation step of one chunk: pure functions over arrays, no I/O, no Dask.

For image i, orientation j, translation t and noise spectrum σ²(k) (per Fourier
point, from the particle's optics group), with X the image's Fourier transform,
c its CTF and A_j the reference's central slice:

    diff2[i,t,j] = Σ_k |X_i,t|²/2σ² + Σ_k c_i² |A_j|²/2σ² − Re Σ_k conj(X_i,t) c_i A_j/σ²

The first term does not depend on t (a shift is a phase), the second is a GEMM
(images × orientations) and the third a real GEMM of stacked real and imaginary
parts ((images·translations) × 2M) @ (2M × orientations), so the coarse pass runs
at BLAS speed. As in RELION, the Fourier points are those of the half-plane
within the current resolution radius (each independent complex value once, DC
excluded), and the likelihood is exp(−diff2).

Adaptive oversampling (RELION's ``adaptive_fraction``): the coarse pass scores
the HEALPix grid at ``healpix_order`` × a translation grid; the coarse samples
holding ``adaptive_fraction`` of each image's posterior mass are refined into
their children (2³ orientations, 2² translations per parent for oversampling 1)
and the posterior is computed on those. The coarse pass uses only the Fourier
points within RELION's coarse radius (what one coarse angular step can resolve).
The fine pass scores the children of each significant (translation, orientation)
pair, as RELION does, as one batched GEMM per image ((pairs × 4 translations × 2M)
@ (pairs × 2M × 8 orientations)). Only the samples holding ``adaptive_fraction`` of
the fine posterior enter the sums (RELION's significant weights).

Local searches (``local_sigma_deg``): the coarse grid points within 3σ of the
particle's previous pose, with a Gaussian prior on the angular distance, then the
same fine pass.

The first iteration may fit the reference's grey scale per sample
(``scale_free``; RELION's --firstiter_cc, kept probabilistic). Precision: images,
references and the GEMMs in float32; accumulators and noise sums in float64.

Memory: :func:`expectation` works through its chunk in sub-batches of images sized so
that every stage (prepare, coarse pass, significance, fine pass, back-projection)
stays within the task's budget (:mod:`streamem.em.memory`: the worker's memory over
its threads, at most ``MAX_WORKSPACE_BYTES``); the global grid's coarse slices are
projected once per model and worker, and back-projection rows are flushed into the
accumulators whenever their buffer fills. Sub-batching leaves every image's
posterior unchanged; only the order of the accumulators' sums changes.

Translations are searched around the particle's previous origin; the offset
prior is a Gaussian on the total origin (Å), centred at 0, as RELION's 3D refine.
The stored origin is the shift that centres the particle (CONVENTIONS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import logsumexp

from streamem.core import sampling
from streamem.core.backend import to_numpy, xp_of
from streamem.core.backprojector import insert_points
from streamem.core.ctf import OpticsParams
from streamem.core.euler import angular_distance_deg, euler_to_matrix
from streamem.core.projector import FourierVolume, half_cube_shape, padded_radius, project_points
from streamem.em import memory
from streamem.em.fine_pass import fine_log_posterior, fine_table
from streamem.em.fourier_points import (
    PreparedImages,
    half_plane_points,
    prepare_images,
    slice_metadata,
)
from streamem.em.kernels import (
    coarse_log_posterior,
    cross_terms,
    log_likelihood,
    offset_log_prior,
    ref_power_terms,
    segment_sums,
)
from streamem.em.memory import EStepShape
from streamem.em.significance import significant_pair_mask, significant_weights
from streamem.em.statistics import ChunkResult, SufficientStatistics
from streamem.errors import InputError


@dataclass(frozen=True)
class SearchGrid:
    """The pose sampling of one iteration.

    healpix_order: coarse HEALPix order (angular step 60/2**order degrees)
    oversampling: adaptive oversampling order of the fine pass (RELION: 1)
    offset_range_px, offset_step_px: coarse translation grid (pixels of the full box)
    local_sigma_deg: None for global searches, else the σ of local searches
    symmetry: point group; global searches cover its asymmetric unit
    """

    healpix_order: int = 1
    oversampling: int = 1
    offset_range_px: float = 6.0
    offset_step_px: float = 2.0
    local_sigma_deg: float | None = None
    symmetry: str = "C1"

    @property
    def fine_angular_step_deg(self) -> float:
        return sampling.angular_step_deg(self.healpix_order + self.oversampling)

    @property
    def fine_offset_step_px(self) -> float:
        return self.offset_step_px / 2**self.oversampling


@dataclass(frozen=True)
class EStepModel:
    """Everything the E-step needs, sent to the workers once per iteration.

    projectors: one FourierVolume per reconstruction (refine3d: half 1 and 2),
        made in the working box ``work_box`` and scaled to full-box Fourier units
    box_size: B, the particle box (pixels); pixel_size_A: its pixel size
    max_radius_px: current resolution radius (Fourier pixels of B, < work_box/2)
    inv_sigma2: (G, B//2 + 1) float, 1/σ² per optics group and shell
    optics: one OpticsParams per optics group (index = rlnOpticsGroup − 1)
    sigma_offset_A: σ of the Gaussian offset prior
    grid: the pose sampling
    do_ctf: apply the CTF
    adaptive_fraction: posterior mass whose samples get the fine pass
    max_significant: cap on coarse samples refined per image (RELION's --maxsig; a
        cap of 32 kept the angular accuracy of 100 at a third of the time in our tests)
    scale_free: optimise the reference's scale per sample (first iteration)
    min_orientations: coarse orientations always refined per image (the best ones);
        guards against a sharp coarse posterior whose best grid point is wrong
    particle_diameter_A: sets the coarse pass's resolution (default 0.8 of the box)
    memory_per_worker_bytes: the E-step's memory budget comes from this over the
        worker's threads (default: the Dask worker's memory limit; see
        :mod:`streamem.em.memory`)
    """

    projectors: tuple[FourierVolume, ...]
    box_size: int
    work_box: int
    pixel_size_A: float
    max_radius_px: float
    inv_sigma2: np.ndarray
    optics: tuple[OpticsParams, ...]
    sigma_offset_A: float
    grid: SearchGrid
    do_ctf: bool = True
    adaptive_fraction: float = 0.999
    max_significant: int = 32
    min_orientations: int = 4
    scale_free: bool = False
    particle_diameter_A: float | None = None
    memory_per_worker_bytes: int | None = None
    coarse: dict = field(default_factory=dict, compare=False)

    @property
    def n_shells(self) -> int:
        return self.box_size // 2 + 1

    @property
    def coarse_radius_px(self) -> float:
        """RELION's ``coarse_size``: the resolution the coarse angular step can resolve.

        A rotation by the coarse step moves the particle's rim by
        step/360 · π · diameter; with RELION's keep-safe factor 1.2 that distance is the
        finest resolution the coarse pass uses.
        """
        diameter = self.particle_diameter_A or 0.8 * self.box_size * self.pixel_size_A
        step = sampling.angular_step_deg(self.grid.healpix_order)
        coarse_resolution_A = step / 360.0 * np.pi * diameter / 1.2
        return float(
            min(self.max_radius_px, self.box_size * self.pixel_size_A / coarse_resolution_A)
        )


def coarse_orientations(model: EStepModel):
    """(rotations (J,3,3), angles (J,3)) of the global coarse grid, cached per model."""
    key = ("coarse", model.grid.healpix_order, model.grid.symmetry)
    if key not in model.coarse:
        rotations, angles = sampling.orientation_grid(model.grid.healpix_order, model.grid.symmetry)
        model.coarse[key] = (np.asarray(rotations), np.asarray(angles))
    return model.coarse[key]


def coarse_references(model, projector, rotations, coords):
    """(J, Mc) slices of the global coarse grid, projected once per model and projector.

    Cached in the model (one per worker and iteration, shared by its tasks and
    sub-batches): at box 128 the grid's slices are ~10 MB, and re-projecting them per
    sub-batch would cost as much as a small sub-batch's GEMM.
    """
    key = ("refs", id(projector), coords.shape[0])
    if key not in model.coarse:
        model.coarse[key] = project_points(projector, rotations, coords)
    return model.coarse[key]


def expectation(
    images: np.ndarray,
    metadata: dict[str, np.ndarray],
    model: EStepModel,
    reconstruction_index: np.ndarray | None = None,
) -> tuple[SufficientStatistics, ChunkResult]:
    """E-step of one chunk: posterior over poses, weighted back-projection, noise sums.

    images: (n, B, B) float32. metadata: RELION labels → (n,). ``reconstruction_index``
    (n,) picks the projector/accumulator of each particle (refine3d: half − 1); by
    default rlnRandomSubset − 1. The chunk is worked through in sub-batches of images
    sized to the task's memory budget (:func:`batch_size`); every image's posterior is
    the same whatever the sub-batch, only the accumulators' summation order changes.
    The statistics are returned compacted to single precision
    (:meth:`SufficientStatistics.compact`).
    """
    n, B = images.shape[0], model.box_size
    coords, flat, shell = half_plane_points(B, model.max_radius_px)
    if reconstruction_index is None:
        reconstruction_index = np.asarray(metadata["rlnRandomSubset"], dtype=np.int64) - 1
    R = len(model.projectors)
    grid_shape = half_cube_shape(
        padded_radius(model.max_radius_px, model.projectors[0].padding_factor)
    )
    stats = SufficientStatistics.empty(grid_shape, len(model.optics), model.n_shells, 1)
    result = ChunkResult(*(np.zeros(n) for _ in range(9)))
    groups = np.asarray(metadata.get("rlnOpticsGroup", np.ones(n)), np.int64) - 1
    previous = _previous_poses(metadata)
    shape = estep_shape(model, coords, previous)
    batch, bp_budget = batch_size(model, shape, n, stats.data_acc.size)
    for b0 in range(0, n, batch):
        sl = slice(b0, min(n, b0 + batch))
        prepared = prepare_images(
            images[sl], slice_metadata(metadata, sl, n), model, coords, flat, shell
        )
        part = result.view(sl)
        for r in range(R):
            idx = np.flatnonzero(reconstruction_index[sl] == r)
            if idx.size == 0:
                continue
            _expect_group(
                idx,
                prepared,
                model,
                model.projectors[r],
                coords,
                shell,
                groups[sl],
                None if previous is None else previous[sl],
                stats,
                r,
                part,
                bp_budget,
            )
        del prepared
    return stats.compact(), result


def estep_shape(model: EStepModel, coords, previous, n_classes: int = 1) -> EStepShape:
    """The sizes that set this E-step's memory (:class:`streamem.em.memory.EStepShape`).

    coords: (M, 2) the work radius's Fourier points; previous: (n, 3) previous poses or
    None (local searches need them).
    """
    grid = model.grid
    radius = np.hypot(coords[:, 0], coords[:, 1])
    Mc = int(np.searchsorted(radius, model.coarse_radius_px, side="right"))
    n_psi = sampling.psi_angles(grid.healpix_order).size
    total = 12 * 4**grid.healpix_order * n_psi  # C1 grid: bounds any union of candidates
    local = grid.local_sigma_deg is not None and previous is not None
    if local:
        # HEALPix pixels have equal areas: one pose's candidates stand for all (+ margin)
        count = sampling.local_orientations(
            previous[0], grid.healpix_order, 3 * grid.local_sigma_deg
        ).shape[0]
        J = min(total, int(1.25 * count) + 8)
    else:
        J = coarse_orientations(model)[1].shape[0]
        total = J
    T = sampling.translation_grid(grid.offset_range_px, grid.offset_step_px).shape[0]
    return EStepShape(
        box_size=model.box_size,
        n_points=coords.shape[0],
        n_coarse_points=Mc,
        n_orientations=J,
        n_orientations_total=total,
        n_translations=T,
        n_classes=n_classes,
        n_pairs=model.max_significant + model.min_orientations,
        n_kids=2 ** (3 * grid.oversampling),
        n_subshifts=4**grid.oversampling,
        local=local,
        scale_free=model.scale_free,
    )


def batch_size(
    model: EStepModel, shape: EStepShape, n_images: int, accumulator_voxels: int
) -> tuple[int, int]:
    """(images per sub-batch, back-projection buffer bytes) for this task's budget.

    accumulator_voxels: voxels of all the task's accumulators together. Raises
    InputError when one image does not fit.
    """
    thread_bytes = memory.thread_memory_bytes(model.memory_per_worker_bytes)
    resident = memory.resident_bytes(n_images, shape.box_size, accumulator_voxels, 1)
    resident += _model_bytes(model)
    budget = memory.workspace_budget_bytes(thread_bytes, resident)
    what = f"box {shape.box_size}, {shape.n_points} Fourier points, {shape.n_orientations} orientations"
    if budget <= 0:
        raise InputError(
            None,
            f"{what}: the model, accumulators and images of one task need "
            f"~{resident / 2**20:.0f} MiB but a thread has {thread_bytes / 2**20:.0f} MiB "
            f"(half of it may be used); give more memory per worker (--memory-per-worker), "
            "fewer threads per worker, or a smaller box",
        )
    bp = memory.bp_buffer_bytes(shape, budget)
    limit = memory.workspace_budget_bytes(thread_bytes, resident, capped=False)
    n = memory.images_per_batch(
        lambda k: memory.estep_stage_bytes(shape, k), n_images, budget, what, limit
    )
    return n, bp


def _model_bytes(model) -> int:
    """Bytes of the scattered model's projectors (shared by the worker's threads)."""
    return int(sum(getattr(p.data, "nbytes", 0) for p in getattr(model, "projectors", ())))


def _previous_poses(metadata):
    if not all(k in metadata for k in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        return None
    ang = np.stack(
        [metadata["rlnAngleRot"], metadata["rlnAngleTilt"], metadata["rlnAnglePsi"]], axis=1
    )
    ang = ang.astype(np.float64)
    return None if np.isnan(ang).any() else ang


def _coarse_pass(X0, cw, ctf2w, coords, phases, offset_prior, model, projector, previous_poses):
    """Log-posteriors of the coarse samples of each image.

    X0 (n, M) images re-centred on their previous origins; phases (T, M) of the coarse
    translations; offset_prior (n, T). Global searches score the whole chunk against the
    HEALPix grid in one GEMM; local searches score each image against the grid points
    near its previous pose (``previous_poses`` (n, 3)). Returns (angles (U, 3) of the
    scored orientations, per image the rows into them it scored (K_i,), per image its
    log-posterior (T, K_i)).
    """
    grid, n = model.grid, X0.shape[0]
    # the coarse pass uses the points within the coarse radius (a prefix: sorted by radius)
    radius = np.hypot(coords[:, 0], coords[:, 1])
    Mc = int(np.searchsorted(radius, model.coarse_radius_px, side="right"))
    Xs = X0[:, None, :Mc] * phases[None, :, :Mc]  # (n, T, Mc)
    if previous_poses is None:
        rot_c, ang_c = coarse_orientations(model)
        refs = coarse_references(model, projector, rot_c, coords[:Mc])  # (J, Mc)
        C = cross_terms(Xs, cw[:, :Mc], refs)  # (n, T, J)
        S = ref_power_terms(ctf2w[:, :Mc], refs)  # (n, J)
        logp = to_numpy(coarse_log_posterior(C, S, offset_prior, model.scale_free))
        return ang_c, [np.arange(ang_c.shape[0])] * n, list(logp)
    cands = [
        np.asarray(sampling.local_orientations(prev, grid.healpix_order, 3 * grid.local_sigma_deg))
        for prev in previous_poses
    ]
    ang_c, inverse = np.unique(np.round(np.concatenate(cands), 6), axis=0, return_inverse=True)
    bounds = np.cumsum([0] + [c.shape[0] for c in cands])
    candidates = [inverse.ravel()[bounds[i] : bounds[i + 1]] for i in range(n)]
    rot_c = euler_to_matrix(ang_c[:, 0], ang_c[:, 1], ang_c[:, 2])
    refs = project_points(projector, rot_c, coords[:Mc])  # (U, Mc)
    S = ref_power_terms(ctf2w[:, :Mc], refs)  # (n, U)
    logps = []
    xp = xp_of(refs)
    for i, rows in enumerate(candidates):
        rows_x = xp.asarray(rows)
        C = cross_terms(Xs[i : i + 1], cw[i : i + 1, :Mc], refs[rows_x])[0]  # (T, K)
        lp = to_numpy(log_likelihood(C, S[i, rows_x][None, :], 0.0, model.scale_free))
        lp = lp + to_numpy(offset_prior[i])[:, None]
        prior = sampling.gaussian_orientation_prior(
            ang_c[rows], previous_poses[i], grid.local_sigma_deg
        )
        logps.append(lp + prior[None, :])
    return ang_c, candidates, logps


def _significant_pairs(logp, candidates, model):
    """The coarse (translation, orientation row) pairs refined in the fine pass, per image.

    Those holding ``adaptive_fraction`` of the posterior (at most ``max_significant``),
    plus the ``min_orientations`` best orientations with their best translations.
    """
    pairs = []
    for lp, rows in zip(logp, candidates, strict=True):  # lp: (T, K)
        mask = significant_pair_mask(
            lp, model.adaptive_fraction, model.max_significant, model.min_orientations
        )
        t_idx, j_idx = np.nonzero(mask)
        pairs.append((t_idx, rows[j_idx]))
    return pairs


def _expect_group(
    idx,
    prep: PreparedImages,
    model,
    projector,
    coords,
    shell,
    groups,
    previous,
    stats,
    r,
    result,
    bp_budget_bytes: int | None = None,
):
    """E-step of the particles ``idx`` of a sub-batch that share one reference
    (``projector``); fills ``result`` and adds to ``stats`` (reconstruction ``r``).

    The arrays of the size of the data (images, slices, GEMMs, back-projection) live
    where the reference does (NumPy or CuPy); the small per-image posteriors and the
    bookkeeping of samples are on the host. Back-projection rows are buffered and
    flushed into the accumulators whenever they exceed ``bp_budget_bytes`` (None: once
    at the end).
    """
    xp = xp_of(projector.data)
    grid, p, B, M = model.grid, model.pixel_size_A, model.box_size, coords.shape[0]
    idx_x = xp.asarray(idx)
    X, ctf, inv_s2 = prep.X[idx_x], prep.ctf[idx_x], prep.inv_sigma2[idx_x]
    cw = ctf * inv_s2  # (n, M)
    ctf2w = ctf * cw
    norm = prep.norm[idx_x]
    prior_px = prep.prior_offset_px[idx]
    n = idx.size
    local = grid.local_sigma_deg is not None and previous is not None
    previous_poses = previous[idx] if local else None

    shifts = np.asarray(
        sampling.translation_grid(grid.offset_range_px, grid.offset_step_px)
    )  # (T, 2)
    phases = xp.asarray(sampling.shift_phases(coords, shifts, B))  # (T, M)
    X0 = X * xp.asarray(
        sampling.shift_phases(coords, prior_px, B)
    )  # re-centred on previous origins
    offset_prior = offset_log_prior(prior_px[:, None, :] + shifts[None], model.sigma_offset_A, p)
    ang_c, candidates, logp = _coarse_pass(
        X0, cw, ctf2w, coords, phases, xp.asarray(offset_prior), model, projector, previous_poses
    )
    pairs = _significant_pairs(logp, candidates, model)
    del logp, candidates  # (n, T, J): the largest array of the coarse pass
    table = fine_table(ang_c, pairs, grid, projector, coords)
    sub = np.asarray(
        sampling.oversample_translations(np.zeros((1, 2)), grid.offset_step_px, grid.oversampling)
    )
    sub = sub.reshape(-1, 2)  # (S, 2) fine offsets around a coarse translation
    sub_phases = xp.asarray(sampling.shift_phases(coords, sub, B))  # (S, M)
    noise_rows = xp.zeros((n, M))
    bp_rows, bp_vals, bp_wgts = [], [], []  # per image: table rows and their sums
    bp_bytes = 0
    # accumulate on the reference's device; the statistics leave the task on the host
    data_acc, weight_acc = xp.asarray(stats.data_acc[r]), xp.asarray(stats.weight_acc[r])

    def flush():
        """Sum the buffered rows per table orientation, then back-project once each."""
        if not bp_rows:
            return
        used, vals, wgts = segment_sums(
            np.concatenate(bp_rows),
            xp.concatenate(bp_vals).astype(xp.complex128),
            xp.concatenate(bp_wgts).astype(xp.float64),
        )
        bp_rows.clear(), bp_vals.clear(), bp_wgts.clear()
        insert_points(
            data_acc,
            weight_acc,
            table.rotations[used],
            coords,
            vals,
            wgts,
            projector.padding_factor,
        )

    for i in range(n):  # fine pass, image by image
        gi = idx[i]
        t_idx, j_rows = pairs[i]
        krows = table.rows(j_rows)  # (P, K)
        krows_x = xp.asarray(krows)
        total = prior_px[i] + shifts[t_idx][:, None, :] + sub[None]  # (P, S, 2)
        Xs = (X0[i] * phases[xp.asarray(t_idx)])[
            :, None, :
        ] * sub_phases  # (P, S, M): phase(t+s) = phase(t)·phase(s)
        orientation_prior = None
        if local:
            orientation_prior = sampling.gaussian_orientation_prior(
                table.angles[krows.ravel()], previous[gi], grid.local_sigma_deg
            ).reshape(krows.shape)
        logp_f = fine_log_posterior(
            Xs,
            cw[i],
            ctf2w[i],
            norm[i],
            table.refs[krows_x],
            table.power[krows_x],
            total,
            model,
            orientation_prior,
        )
        lse = logsumexp(logp_f)
        W = np.exp(logp_f - lse)  # (P, S, K) posterior
        pb, sb, kb = np.unravel_index(np.argmax(W), W.shape)
        best_angles, best_origin_px = table.angles[krows[pb, kb]], total[pb, sb]  # origin (dy, dx)
        result.rot[gi], result.tilt[gi], result.psi[gi] = best_angles
        result.origin_y_A[gi], result.origin_x_A[gi] = best_origin_px * p
        result.max_prob[gi] = W[pb, sb, kb]
        W, result.n_significant[gi] = significant_weights(W, model.adaptive_fraction)
        result.loglik[gi] = lse
        result.class_number[gi] = 1

        # statistics over the significant samples only: Σ_t W X_t per fine orientation
        live = W.reshape(W.shape[0], -1).any(axis=1)
        Wl, rows_l = W[live], krows[live].ravel()
        w_j = Wl.sum(axis=1).ravel()  # (P'·K,)
        on = w_j > 0
        live_x = xp.asarray(np.flatnonzero(live))
        D = (xp.asarray(Wl.transpose(0, 2, 1).astype(np.complex64)) @ Xs[live_x]).reshape(-1, M)
        D, w_j, rows_l = D[xp.asarray(np.flatnonzero(on))], w_j[on], rows_l[on]  # (P'·K, M)
        rows_x = xp.asarray(rows_l)
        w_x = xp.asarray(w_j)
        bp_rows.append(rows_l)
        bp_vals.append(D * cw[i])
        bp_wgts.append(w_x[:, None] * ctf2w[i])
        bp_bytes += rows_l.size * M * 16
        if bp_budget_bytes is not None and bp_bytes > bp_budget_bytes:
            flush()
            bp_bytes = 0
        noise_rows[i] = (
            (X[i].real ** 2 + X[i].imag ** 2)
            - 2 * ctf[i] * xp.sum((xp.conj(D) * table.refs[rows_x]).real, axis=0)
            + ctf[i] ** 2 * (w_x @ table.power[rows_x])
        )
        stats.offset_sq_A2 += float(np.sum(W * np.sum((total * p) ** 2, axis=-1)[:, :, None]))
        stats.weight_sum += 1.0
        stats.loglik_sum += float(lse)
        if previous is not None:
            stats.pose_change_deg_sum += float(
                angular_distance_deg(euler_to_matrix(*best_angles), euler_to_matrix(*previous[gi]))
            )
            stats.offset_change_A_sum += float(np.hypot(*((best_origin_px - prior_px[i]) * p)))
            stats.n_with_previous += 1
    stats.class_weight[0] += n
    n_shells = stats.noise_power.shape[1]
    noise_rows = to_numpy(noise_rows)
    for g in np.unique(groups[idx]):
        rows = groups[idx] == g
        stats.noise_power[g] += np.bincount(
            shell, noise_rows[rows].sum(axis=0), minlength=n_shells
        )[:n_shells]
        stats.noise_count[g] += rows.sum() * np.bincount(shell, minlength=n_shells)[:n_shells]
    flush()
    if xp is not np:
        stats.data_acc[r] = to_numpy(data_acc)
        stats.weight_acc[r] = to_numpy(weight_acc)
