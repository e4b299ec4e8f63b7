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

from dataclasses import dataclass, field, fields

import numpy as np
from scipy.special import logsumexp

from streamem.core import sampling
from streamem.core.backend import ifftshift, rfftn, to_numpy, xp_of
from streamem.core.backprojector import insert_points
from streamem.core.ctf import OpticsParams, ctf_from_frequencies
from streamem.core.euler import angular_distance_deg, euler_to_matrix
from streamem.core.projector import FourierVolume, half_cube_shape, padded_radius, project_points
from streamem.em import memory
from streamem.em.memory import EStepShape
from streamem.em.statistics import SufficientStatistics
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


def half_plane_points(box_size: int, max_radius_px: float):
    """Independent Fourier points of a real image within a radius, DC excluded.

    Returns (coords (M, 2) float (ky, kx) in Fourier pixels, flat (M,) int index into
    the (B, B//2+1) rfft grid, shell (M,) int radius). Points with kx = 0 and
    ky < 0 are the complex conjugates of ky > 0 and are left out.
    """
    B = box_size
    r = int(np.floor(max_radius_px))
    ky = np.arange(-r, r + 1)
    kx = np.arange(0, r + 1)
    KY, KX = np.meshgrid(ky, kx, indexing="ij")
    rad = np.sqrt(KY**2 + KX**2)
    keep = (rad <= max_radius_px) & ((KX > 0) | (KY > 0)) & (np.abs(KY) < B / 2 + 0.5 * (B % 2))
    keep &= KX <= B // 2
    KY, KX, rad = KY[keep], KX[keep], rad[keep]
    order = np.argsort(rad, kind="stable")
    KY, KX, rad = KY[order], KX[order], rad[order]
    flat = (KY % B) * (B // 2 + 1) + KX
    coords = np.stack([KY, KX], axis=1).astype(np.float64)
    return coords, flat.astype(np.int64), np.rint(rad).astype(np.int64)


@dataclass(frozen=True)
class PreparedImages:
    """Fourier data of a set of images restricted to the current points (all (n, M))."""

    X: np.ndarray  # complex64 image transforms
    ctf: np.ndarray  # float32 CTF
    inv_sigma2: np.ndarray  # float32 1/σ²
    norm: np.ndarray  # (n,) float64 Σ|X|²/2σ²
    prior_offset_px: np.ndarray  # (n, 2) (dy, dx) previous origin in pixels


def fourier_data(images, metadata, coords, flat, pixel_size_A, optics, do_ctf=True, xp=np):
    """Image transforms and CTFs at the given Fourier points.

    images: (n, B, B) float32 centred at B//2; coords/flat from :func:`half_plane_points`;
    optics: one OpticsParams per optics group; xp: the array module of the results
    (NumPy, or CuPy for a GPU E-step: the images go to the device once, the CTFs are
    computed on the host). Returns (X (n, M) complex64, ctf (n, M) float32, groups (n,)
    0-based optics group, on the host).
    """
    n, B = images.shape[0], images.shape[-1]
    images = xp.asarray(images)
    X = rfftn(ifftshift(images, axes=(-2, -1)), axes=(-2, -1)).reshape(n, -1)[:, xp.asarray(flat)]
    X = X.astype(xp.complex64)
    groups = np.asarray(metadata.get("rlnOpticsGroup", np.ones(n)), dtype=np.int64) - 1
    if groups.min() < 0 or groups.max() >= len(optics):
        raise ValueError("rlnOpticsGroup out of range of the optics groups")
    if do_ctf and "rlnDefocusU" in metadata:
        freq = 1.0 / (B * pixel_size_A)
        ctf = np.empty((n, coords.shape[0]), np.float32)
        for g in np.unique(groups):
            sel = groups == g
            ctf[sel] = ctf_from_frequencies(
                coords[:, 0] * freq,
                coords[:, 1] * freq,
                metadata["rlnDefocusU"][sel],
                metadata["rlnDefocusV"][sel],
                metadata["rlnDefocusAngle"][sel],
                optics[g],
                metadata.get("rlnPhaseShift", np.zeros(n))[sel],
                metadata.get("rlnCtfBfactor", np.zeros(n))[sel],
            )
    else:
        ctf = np.ones((n, coords.shape[0]), np.float32)
    return X, xp.asarray(ctf), groups


def origins_px(metadata, pixel_size_A: float, n: int) -> np.ndarray:
    """(n, 2) (dy, dx) stored origins in pixels (zeros where absent)."""
    if "rlnOriginYAngst" not in metadata:
        return np.zeros((n, 2))
    o = np.stack([metadata["rlnOriginYAngst"], metadata["rlnOriginXAngst"]], axis=1)
    return np.nan_to_num(o.astype(np.float64)) / pixel_size_A


def prepare_images(images, metadata, model: EStepModel, coords, flat, shell) -> PreparedImages:
    """Fourier transform, CTF and noise weights of a chunk's images.

    images: (n, B, B) float32, centred at B//2. metadata: RELION labels → (n,) arrays.
    """
    projectors = getattr(model, "projectors", None)  # class2d's model holds images instead
    xp = xp_of(projectors[0].data) if projectors else np  # the E-step runs where they are
    X, ctf, groups = fourier_data(
        images, metadata, coords, flat, model.pixel_size_A, model.optics, model.do_ctf, xp
    )
    inv_s2 = xp.asarray(model.inv_sigma2[groups][:, shell].astype(np.float32))
    norm = 0.5 * xp.sum((X.real**2 + X.imag**2) * inv_s2, axis=1, dtype=xp.float64)
    prior = origins_px(metadata, model.pixel_size_A, images.shape[0])
    return PreparedImages(X, ctf, inv_s2, norm, prior)


def cross_terms(Xs, cw, refs):
    """Re Σ_k conj(Xs) · cw · A as one real GEMM.

    Xs: (n, T, M) complex shifted images; cw: (n, M) CTF/σ²; refs: (J, M) complex.
    Returns (n, T, J) float32.
    """
    xp = xp_of(Xs, refs)
    n, T, M = Xs.shape
    Y = xp.conj(Xs) * cw[:, None, :]  # (n, T, M)
    lhs = xp.concatenate([Y.real, -Y.imag], axis=-1).reshape(n * T, 2 * M)
    rhs = xp.concatenate([refs.real, refs.imag], axis=-1)  # (J, 2M)
    return (lhs.astype(xp.float32) @ rhs.astype(xp.float32).T).reshape(n, T, -1)


def ref_power_terms(ctf2w, refs):
    """Σ_k c² |A_j|² / 2σ²: (n, M) @ (M, J) → (n, J). ``ctf2w`` = c²/σ²."""
    xp = xp_of(ctf2w, refs)
    power = (refs.real**2 + refs.imag**2).astype(xp.float32)
    return 0.5 * (ctf2w.astype(xp.float32) @ power.T)


def log_likelihood(C, S, norm, scale_free: bool = False):
    """−diff2 from the GEMM terms (module docstring): −(norm + S − C).

    With ``scale_free`` the reference's scale a is optimised per sample,
    diff2 = norm + a²S − aC, minimal at a = C/2S: log-likelihood −norm + C²/4S for
    C > 0 (else a = 0). Used for the first iteration, when the starting map is not on
    the data's greyscale (RELION's --firstiter_cc, kept probabilistic).
    """
    if not scale_free:
        return -(norm + S - C)
    xp = xp_of(C, S)
    S = xp.maximum(S, 1e-30)
    return -norm + xp.where(C > 0, C * C / (4.0 * S), 0.0)


def coarse_log_posterior(C, S, offset_prior, scale_free: bool, row_prior=None):
    """The coarse pass's log-posterior (n, T, J) float32, built in C's memory.

    C: (n, T, J) float32 cross terms (overwritten unless ``scale_free``); S: (n, J)
    reference power terms; offset_prior: (n, T) log prior of the translations;
    row_prior: optional (n, J) log prior per image and orientation row (class
    fractions, local-search angular prior; −inf excludes a row). Single precision is
    enough: the coarse pass only ranks samples for the fine pass, and C comes from an
    SGEMM already; the in-place sums avoid three float64 temporaries of n·T·J.
    """
    xp = xp_of(C, S)
    if scale_free:
        logp = log_likelihood(C, S[:, None, :], 0.0, True).astype(xp.float32)
        if row_prior is not None:
            logp += row_prior.astype(xp.float32)[:, None, :]
    else:
        logp = C
        bias = S if row_prior is None else S - row_prior
        logp -= bias.astype(xp.float32)[:, None, :]
    logp += offset_prior.astype(xp.float32)[:, :, None]
    return logp


def offset_log_prior(total_shift_px, sigma_offset_A: float, pixel_size_A: float):
    """log N(total offset; 0, σ²) in 2-D, up to a constant. total_shift_px: (..., 2)."""
    s2 = (sigma_offset_A / pixel_size_A) ** 2
    return -np.sum(total_shift_px**2, axis=-1) / (2 * s2)


def significant_mask(logp, fraction: float, max_count: int, log_floor: float = 30.0):
    """Per row, the samples holding ``fraction`` of the posterior mass (at least one,
    at most ``max_count``, the most probable first).

    logp: (n, S) log-posterior up to a constant. Returns a bool mask (n, S). Samples
    more than ``log_floor`` below a row's best are never candidates: together they
    hold under S·e^-30 of the mass, so the result is unchanged and the ranking only
    sorts the few that matter.
    """
    n, S = logp.shape
    mask = np.zeros((n, S), bool)
    for row in range(n):
        lp = logp[row]
        top = lp.max()
        if not np.isfinite(top):
            mask[row, int(np.argmax(lp))] = True
            continue
        cand = np.flatnonzero(lp >= top - log_floor)
        p = np.exp(lp[cand] - top)
        k = min(max_count, cand.size)
        if k < cand.size:
            part = np.argpartition(-p, k - 1)[:k]
            cand_k, p_k = cand[part], p[part]
        else:
            cand_k, p_k = cand, p
        order = np.argsort(-p_k, kind="stable")
        cand_k, p_k = cand_k[order], p_k[order]
        before = np.cumsum(p_k) - p_k  # mass of the more probable samples
        keep = before < fraction * p.sum()
        keep[0] = True
        mask[row, cand_k[keep]] = True
    return mask


def significant_pair_mask(lp, fraction: float, max_count: int, min_orientations: int):
    """One image's coarse (translation, orientation) pairs to refine: (T, J) bool.

    lp: (T, J) coarse log-posterior. The pairs holding ``fraction`` of the mass (at
    most ``max_count``) plus the ``min_orientations`` best orientations, each at its
    best translation (a guard against a sharp coarse posterior whose best grid point
    is wrong). Orientations whose every pair is −inf (outside a local search) are
    never added.
    """
    mask = significant_mask(lp.reshape(1, -1), fraction, max_count).reshape(lp.shape)
    k = min(min_orientations, lp.shape[1])
    if k > 0:
        best_j = np.argpartition(-lp.max(axis=0), k - 1)[:k]
        best_j = best_j[np.isfinite(lp[:, best_j].max(axis=0))]
        mask[lp[:, best_j].argmax(axis=0), best_j] = True
    return mask


def significant_weights(W, fraction: float):
    """Keep the largest posterior weights that hold ``fraction`` of the mass (renormalised).

    As RELION's ``storeWeightedSums``, only these samples enter the sums. Returns
    (weights of W's shape, number of significant samples).
    """
    flat = W.ravel()
    order = np.argsort(flat)[::-1]
    cum = np.cumsum(flat[order])
    count = int(min(np.searchsorted(cum, fraction * cum[-1]) + 1, flat.size))
    kept = np.zeros_like(flat)
    kept[order[:count]] = flat[order[:count]] / cum[count - 1]
    return kept.reshape(W.shape), count


@dataclass
class ChunkResult:
    """Per-particle results of a chunk (all (n,) arrays, RELION units)."""

    rot: np.ndarray
    tilt: np.ndarray
    psi: np.ndarray
    origin_x_A: np.ndarray
    origin_y_A: np.ndarray
    max_prob: np.ndarray
    n_significant: np.ndarray
    loglik: np.ndarray
    class_number: np.ndarray

    def view(self, sl: slice) -> ChunkResult:
        """The results of particles ``sl`` (views: writing to them fills this one)."""
        return ChunkResult(*(getattr(self, f.name)[sl] for f in fields(self)))

    def as_columns(self) -> dict[str, np.ndarray]:
        return {
            "rlnAngleRot": self.rot,
            "rlnAngleTilt": self.tilt,
            "rlnAnglePsi": self.psi,
            "rlnOriginXAngst": self.origin_x_A,
            "rlnOriginYAngst": self.origin_y_A,
            "rlnMaxValueProbDistribution": self.max_prob,
            "rlnNrOfSignificantSamples": self.n_significant,
            "rlnLogLikeliContribution": self.loglik,
            "rlnClassNumber": self.class_number,
        }


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


def slice_metadata(metadata: dict, sl: slice, n: int) -> dict:
    """The (n,) columns of ``metadata`` cut to ``sl`` (other entries unchanged)."""
    return {
        k: v[sl] if isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == n else v
        for k, v in metadata.items()
    }


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


@dataclass(frozen=True)
class FineTable:
    """The children of every refined coarse orientation of a chunk, projected once.

    angles (R, 3), rotations (R, 3, 3), refs (R, M) complex, power (R, M) |refs|²;
    the children of coarse row j are rows ``position[j]·n_kids + (0 .. n_kids−1)``.
    """

    angles: np.ndarray
    rotations: np.ndarray
    refs: np.ndarray
    power: np.ndarray
    position: np.ndarray
    n_kids: int

    def rows(self, coarse_rows):
        """(P, n_kids) table rows of the children of coarse rows (P,)."""
        return self.position[coarse_rows][:, None] * self.n_kids + np.arange(self.n_kids)


def _fine_table(ang_c, pairs, grid, projector, coords) -> FineTable:
    union = np.unique(np.concatenate([j for _, j in pairs]))
    kids = np.asarray(
        sampling.oversample_orientations(ang_c[union], grid.healpix_order, grid.oversampling)
    )
    angles = kids.reshape(-1, 3)  # kids: (U, K, 3)
    position = np.full(ang_c.shape[0], -1)
    position[union] = np.arange(union.size)
    rotations = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    refs = project_points(projector, rotations, coords)  # (U·K, M), where the reference is
    power = (refs.real**2 + refs.imag**2).astype(refs.real.dtype)
    return FineTable(angles, rotations, refs, power, position, kids.shape[1])


def _fine_log_posterior(Xs, cw, ctf2w, norm, A, power, total_px, model, orientation_prior=None):
    """Log-posterior of the fine samples of one image, a batched GEMM over its pairs.

    Xs (P, S, M) shifted image, A (P, K, M) and power (P, K, M) the children's slices,
    total_px (P, S, 2) total origins. Returns (P, S, K).
    """
    xp = xp_of(Xs, A)
    Y = xp.conj(Xs) * cw
    lhs = xp.concatenate([Y.real, -Y.imag], axis=-1)  # (P, S, 2M)
    rhs = xp.concatenate([A.real, A.imag], axis=-1).transpose(0, 2, 1)  # (P, 2M, K)
    C = lhs @ rhs  # (P, S, K)
    S = 0.5 * (power @ ctf2w)  # (P, K)
    logp = to_numpy(log_likelihood(C, S[:, None, :], norm, model.scale_free))  # small: host
    logp = logp + offset_log_prior(total_px, model.sigma_offset_A, model.pixel_size_A)[:, :, None]
    if orientation_prior is not None:
        logp += orientation_prior[:, None, :]
    return logp


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
    table = _fine_table(ang_c, pairs, grid, projector, coords)
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
        logp_f = _fine_log_posterior(
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


def segment_sums(keys: np.ndarray, *values):
    """Sum the rows of each array in ``values`` that share a key.

    keys: (R,) int on the host; values: (R, ...) arrays (NumPy or CuPy). Returns
    (unique keys (U,), then one (U, ...) array of sums per input). Rows are sorted by
    key and summed segment by segment (a cumulative sum read at the segment ends), so
    the same code runs on the CPU and the GPU.
    """
    order = np.argsort(keys, kind="stable")
    used, starts = np.unique(keys[order], return_index=True)
    ends = np.append(starts[1:], keys.size) - 1
    out = []
    for v in values:
        xp = xp_of(v)
        c = xp.cumsum(v[xp.asarray(order)], axis=0)
        e = c[xp.asarray(ends)]
        out.append(xp.concatenate([e[:1], e[1:] - e[:-1]]))
    return (used, *out)
