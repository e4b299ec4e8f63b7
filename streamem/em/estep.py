"""The expectation step of one chunk, for refine3d and class3d: pure functions over
arrays, no I/O, no Dask.

The posterior of image i is over (class k, orientation j, translation t):
log p = −diff2(i, k, j, t) + log π_k + log prior(t) (+ the local-search orientation
prior), with diff2 as GEMMs over Fourier points (:mod:`streamem.em.kernels`). refine3d
is the case K = 1 (π = 1): one engine serves both jobs.

Coarse pass: the K classes' central slices at the coarse HEALPix grid are stacked on
the orientation axis (row k·J + j), so the class axis rides inside the one
(images·translations) × 2M × (K·J) GEMM. It uses only the Fourier points within RELION's
coarse radius (what one coarse angular step can resolve).

Significance: the coarse (translation, row) pairs holding ``adaptive_fraction`` of an
image's posterior (at most ``max_significant``) plus its ``min_orientations`` best
orientations are refined, chosen class by class
(:func:`streamem.em.significance.significant_class_pairs`; for K = 1 RELION's rule).

Fine pass (:mod:`streamem.em.fine_pass`): the children of the significant pairs (2³
orientations, 2² translations per parent for oversampling 1), every image of a
sub-batch scored in a few padded batched GEMMs; only the samples holding
``adaptive_fraction`` of the fine posterior enter the sums (RELION's significant
weights). rlnClassNumber is the class of largest marginal posterior.

Classes and halves: the statistics hold 2K accumulators, index 2k + h (h =
rlnRandomSubset − 1), and ``class_weight`` (K,) sums the class posteriors. With
``references_per_half`` (refine3d) ``projectors[h·K + k]`` is class k's reference of half
h, so the half sets never meet; otherwise (class3d) ``projectors[k]`` serves both halves.
``class_seed`` (the first iteration of a classification from one reference) lets each
particle meet one seeded class only (:func:`seeded_classes`); ``skip_align`` fixes the
poses to the stored ones and the posterior is over classes only.

Local searches (``local_sigma_deg``): the coarse grid points within 3σ of the
particle's previous pose, with a Gaussian prior on the angular distance, then the
same fine pass. Translations are searched around the particle's previous origin; the
offset prior is a Gaussian on the total origin (Å), centred at 0, as RELION's 3D
refine. The stored origin is the shift that centres the particle (CONVENTIONS.md).

The first iteration may fit the reference's grey scale per sample (``scale_free``;
RELION's --firstiter_cc, kept probabilistic). Precision: images, references and the
GEMMs in float32; fine posteriors, accumulators and noise sums in float64.

Memory: :func:`expectation` works through its chunk in sub-batches of images sized so
that every stage (prepare, coarse pass, significance, fine pass, back-projection)
stays within the task's budget (:mod:`streamem.em.memory`); the global grid's coarse
slices are projected once per model and worker, and back-projection rows are flushed
into the accumulators whenever their buffer fills. Sub-batching leaves every image's
posterior unchanged; only the order of the accumulators' sums changes.

Devices: the arrays of the size of the data live where the model's projectors do
(NumPy, CuPy, any array-API namespace); the small per-image bookkeeping is on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
from astropy_healpix import healpy

from streamem.core import sampling
from streamem.core.backend import to_numpy
from streamem.core.ctf import OpticsParams
from streamem.core.euler import angular_distance_deg, euler_to_matrix
from streamem.core.projector import FourierVolume, half_cube_shape, padded_radius
from streamem.em import memory
from streamem.em.coarse_pass import (
    coarse_cuts,
    coarse_orientations,
    coarse_pass,
    coarse_radius_points,
)
from streamem.em.fine_pass import FineImages, fine_pass, fine_table
from streamem.em.fixed_poses import fixed_pose_posterior
from streamem.em.fourier_points import (
    PreparedImages,
    Translations,
    half_plane_points,
    prepare_images,
    slice_metadata,
)
from streamem.em.kernels import namespace, offset_log_prior
from streamem.em.memory import EStepShape
from streamem.em.phases import PhaseTimer, count_points
from streamem.em.statistics import ChunkResult, SufficientStatistics
from streamem.errors import InputError


@dataclass(frozen=True)
class SearchGrid:
    """The pose sampling of one iteration.

    healpix_order: coarse HEALPix order (angular step 60/2**order degrees)
    oversampling: adaptive oversampling order of the fine pass (RELION: 1)
    offset_range_px, offset_step_px: coarse translation grid (pixels of the full box)
    local_sigma_deg: None for global searches, else the σ of local searches
    local_prepass: local searches take their coarse candidates from a pass one order
        coarser (its coarse radius, the same translations and significance rule): the
        children of each image's significant orientations there, instead of every grid
        point within 3σ (:func:`streamem.em.coarse_pass.prepass_candidates`)
    symmetry: point group; global searches cover its asymmetric unit
    """

    healpix_order: int = 1
    oversampling: int = 1
    offset_range_px: float = 6.0
    offset_step_px: float = 2.0
    local_sigma_deg: float | None = None
    symmetry: str = "C1"
    local_prepass: bool = False

    @property
    def fine_angular_step_deg(self) -> float:
        return sampling.angular_step_deg(self.healpix_order + self.oversampling)

    @property
    def fine_offset_step_px(self) -> float:
        return self.offset_step_px / 2**self.oversampling


@dataclass(frozen=True)
class EStepModel:
    """Everything the E-step needs, sent to the workers once per iteration.

    projectors: the references as FourierVolumes, made in the working box ``work_box``
        and scaled to full-box Fourier units: 2K with ``references_per_half``
        (``projectors[h·K + k]``, refine3d: half 1 and 2), else K (``projectors[k]``)
    box_size: B, the particle box (pixels); pixel_size_A: its pixel size
    max_radius_px: current resolution radius (Fourier pixels of B, < work_box/2)
    inv_sigma2: (G, B//2 + 1) float, 1/σ² per optics group and shell
    optics: one OpticsParams per optics group (index = rlnOpticsGroup − 1)
    sigma_offset_A: σ of the Gaussian offset prior
    grid: the pose sampling
    do_ctf: apply the CTF
    adaptive_fraction: posterior mass whose samples get the fine pass
    max_significant: cap on coarse samples refined per image and class (RELION's
        --maxsig; a cap of 32 kept the angular accuracy of 100 at a third of the time)
    min_orientations: coarse orientations always refined per image and class (the
        best ones); guards against a sharp coarse posterior whose best point is wrong
    prepass_min_orientations: the same in a local search's pre-pass
        (``grid.local_prepass``): its coarser grid, at its smaller radius, ranks less
        sharply, so it keeps more (``streamem bench estep-chunk --local
        --prepass-min-orientations 4`` against the default 8 shows what 4 costs)
    prepass_radius_fraction: the pre-pass scores within this fraction of its own order's
        coarse radius (default 0.5: the radius RELION's rule gives the order below it). It
        only ranks orientations for the candidates, which the pass at the grid's order
        scores again at the full coarse radius. On the 5,000-particle run of ``streamem
        bench refine-phases`` (box 128; paired with 1.0 in one ``farm-bench --vs`` run)
        the 1.88° and 0.94° iterations took 0.70-0.80 of the time (the final one 0.97)
        and the whole run 0.86, with the same final FSC (9.52 Å) and median angular
        error (1.32°); ``streamem bench estep-chunk --local --prepass-radius-fraction 1``
        against the default compares the two on one chunk
    coarse_radius_fraction: this pass scores within this fraction of RELION's coarse
        radius (:attr:`coarse_radius_px`); 1 except in a pre-pass's model
        (:func:`streamem.em.coarse_pass.prepass_model`)
    scale_free: optimise the reference's scale per sample (first iteration)
    particle_diameter_A: sets the coarse pass's resolution (default 0.8 of the box)
    memory_per_worker_bytes: the E-step's memory budget comes from this over the
        worker's threads (default: the Dask worker's memory limit; see
        :mod:`streamem.em.memory`)
    n_classes: K; references_per_half: see ``projectors``
    log_class_prior: (K,) log class fractions (−inf allowed); None: uniform
    class_seed: when not None, each particle meets one class only, drawn from its
        index (metadata["particle_index"]) and this seed (RELION's random seeds)
    reference_error_power: (len(projectors), B//2 + 1) float64 or None: the expected
        error power of each reference (per complex component, full-box DFT units, per
        shell; :func:`streamem.em.class_halves.half_map_error_power`). Each image's
        log class prior then gains Σ_k c²/σ² · error(k), the residual a reference's own
        error adds in expectation, so the score estimates the distance to the class's
        true map and a smaller class's noisier map is not held against it
    skip_align: poses fixed to the stored ones; posterior over classes only
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
    prepass_min_orientations: int = 8
    prepass_radius_fraction: float = 0.5
    coarse_radius_fraction: float = 1.0
    scale_free: bool = False
    particle_diameter_A: float | None = None
    memory_per_worker_bytes: int | None = None
    n_classes: int = 1
    references_per_half: bool = True
    log_class_prior: np.ndarray | None = None
    class_seed: int | None = None
    skip_align: bool = False
    reference_error_power: np.ndarray | None = None
    coarse: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        expected = self.n_classes * (2 if self.references_per_half else 1)
        if len(self.projectors) != expected:
            raise ValueError(
                f"{len(self.projectors)} projectors for {self.n_classes} classes "
                f"(references_per_half={self.references_per_half}: {expected} expected)"
            )

    @property
    def n_shells(self) -> int:
        return self.box_size // 2 + 1

    def class_references(self, half: int) -> tuple[FourierVolume, ...]:
        """The K references the particles of half set ``half`` (0 or 1) meet."""
        return tuple(self.projectors[r] for r in self.class_reference_rows(half))

    def class_reference_rows(self, half: int) -> range:
        """Indices into ``projectors`` of the K references half set ``half`` meets."""
        K = self.n_classes
        return range(half * K, (half + 1) * K) if self.references_per_half else range(K)

    @property
    def coarse_radius_px(self) -> float:
        """RELION's ``coarse_size``: the resolution the coarse angular step can resolve.

        A rotation by the coarse step moves the particle's rim by
        step/360 · π · diameter; with RELION's keep-safe factor 1.2 that distance is the
        finest resolution the coarse pass uses. Times ``coarse_radius_fraction``, at
        most ``max_radius_px``.
        """
        diameter = self.particle_diameter_A or 0.8 * self.box_size * self.pixel_size_A
        step = sampling.angular_step_deg(self.grid.healpix_order)
        coarse_resolution_A = step / 360.0 * np.pi * diameter / 1.2
        radius_px = self.box_size * self.pixel_size_A / coarse_resolution_A
        return float(min(self.max_radius_px, self.coarse_radius_fraction * radius_px))


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


def class_log_priors(model: EStepModel, metadata, n: int) -> np.ndarray | None:
    """(n, K) float64 log prior over classes per image (the class fractions, or the
    seeded class), or None where it is 0 everywhere (refine3d)."""
    K = model.n_classes
    log_pi = np.zeros(K) if model.log_class_prior is None else model.log_class_prior
    log_pi = np.broadcast_to(np.asarray(log_pi, np.float64), (n, K))
    if model.class_seed is None:
        return None if np.all(log_pi == 0) else log_pi.copy()
    if "particle_index" not in metadata:
        raise ValueError("seeded classes need each particle's index (metadata['particle_index'])")
    seeded = seeded_classes(metadata["particle_index"], K, model.class_seed)
    out = np.full((n, K), -np.inf)
    out[np.arange(n), seeded] = 0.0
    return out


def neighbourhood_order(previous: np.ndarray, halves: np.ndarray, grid: SearchGrid) -> np.ndarray:
    """(n,) an order of a chunk's images that puts neighbours in orientation together.

    Local searches project the union of a sub-batch's candidate orientations once:
    sub-batches of images whose previous poses are close share most candidates. Images
    are sorted by half set, then by the nested HEALPix pixel of their direction on a
    grid whose pixels are about a neighbourhood (±3σ) wide (nested indices of nearby
    pixels are close), then by a psi bin of the same width. Only the order of the
    accumulators' sums changes. previous: (n, 3) (rot, tilt, psi) degrees.
    """
    width_deg = 6.0 * grid.local_sigma_deg
    level = int(np.clip(np.round(np.log2(60.0 / width_deg)), 0, grid.healpix_order))
    pixel = healpy.ang2pix(
        2**level, np.deg2rad(previous[:, 1]), np.deg2rad(previous[:, 0]), nest=True
    )
    psi_bin = np.floor(np.mod(previous[:, 2], 360.0) / width_deg).astype(np.int64)
    return np.lexsort((psi_bin, pixel, halves))


def particle_halves(store) -> np.ndarray:
    """(N,) half set 0/1 of every particle of ``store``, as the E-step assigns them."""
    n = store.n_particles
    if store.has_fields(("rlnRandomSubset",)):
        return _halves({"rlnRandomSubset": store.read_field("rlnRandomSubset")}, n)
    return _halves({}, n)


def _halves(metadata, n: int) -> np.ndarray:
    """(n,) half set 0/1 of each particle (rlnRandomSubset − 1; alternating if absent)."""
    if "rlnRandomSubset" in metadata:
        return np.clip(np.asarray(metadata["rlnRandomSubset"], np.int64) - 1, 0, 1)
    return np.asarray(metadata.get("particle_index", np.arange(n))) % 2


def expectation(
    images: np.ndarray, metadata: dict[str, np.ndarray], model: EStepModel, batched: bool = True
) -> tuple[SufficientStatistics, ChunkResult]:
    """E-step of one chunk: posterior over (class, orientation, translation), weighted
    back-projection, noise sums.

    images: (n, B, B) float32 centred at B//2. metadata: RELION labels → (n,) arrays
    (rlnRandomSubset picks the half; previous poses and origins set local searches,
    translations and ``skip_align``), plus "particle_index" (n,) int64 for seeded
    classes. The chunk is worked through in sub-batches sized to the task's memory
    budget (:func:`batch_size`), in local searches images of close previous poses
    together (:func:`neighbourhood_order`); every image's posterior is the same
    whatever the sub-batch. Returns the statistics (2K accumulators, index 2k + h), compacted to
    single precision (:meth:`SufficientStatistics.compact`), and the per-particle
    results (rlnClassNumber from 1). The statistics' ``phase_seconds`` hold the seconds
    of each phase (:mod:`streamem.em.phases`). ``batched=False``: the per-image coarse
    pass and significance (the reference of :mod:`streamem.em.coarse_pass`).
    """
    n, B, K = images.shape[0], model.box_size, model.n_classes
    # the coarse passes' points as prefixes, in raster order within the bands between
    # their radii (the slice kernels' order: fourier_points.half_plane_points)
    coords, flat, shell = half_plane_points(B, model.max_radius_px, cuts=coarse_cuts(model))
    grid_shape = half_cube_shape(
        padded_radius(model.max_radius_px, model.projectors[0].padding_factor)
    )
    stats = SufficientStatistics.empty(
        grid_shape, len(model.optics), model.n_shells, K, single=True
    )
    result = ChunkResult(*(np.zeros(n) for _ in range(9)))
    groups = np.asarray(metadata.get("rlnOpticsGroup", np.ones(n)), np.int64) - 1
    halves = _halves(metadata, n)
    previous = _previous_poses(metadata)
    log_pi = class_log_priors(model, metadata, n)
    if model.skip_align and previous is None:
        raise ValueError("skip_align needs rlnAngleRot/Tilt/Psi for every particle")
    shape = estep_shape(model, coords, previous)
    batch, bp_budget = batch_size(model, shape, n, stats.data_acc.size)
    parts = [(h, halves == h) for h in (0, 1)] if model.references_per_half else [(0, None)]
    timer = PhaseTimer(stats.phase_seconds)
    local = model.grid.local_sigma_deg is not None and previous is not None
    order = neighbourhood_order(previous, halves, model.grid) if local else np.arange(n)
    g = model.grid
    translations = Translations.of_grid(g.offset_range_px, g.offset_step_px, g.oversampling,
                                        coords, B, namespace(model.projectors[0].data))  # fmt: skip
    for b0 in range(0, n, batch):
        sel = order[b0 : b0 + batch]  # the sub-batch's images (neighbours in local searches)
        sub = ChunkResult(*(np.zeros(sel.size) for _ in range(9)))
        with timer("read_fft"):
            prep = prepare_images(
                images[sel], slice_metadata(metadata, sel, n), model, coords, flat, shell
            )
        for h, members in parts:
            idx = np.arange(sel.size) if members is None else np.flatnonzero(members[sel])
            if idx.size == 0:
                continue
            batch_part = _Part(
                idx,
                halves[sel][idx],
                None if log_pi is None else log_pi[sel][idx],
                None if previous is None else previous[sel][idx],
                groups[sel][idx],
            )
            _expect_part(batch_part, prep, model, h, coords, translations, shell, stats, sub,
                         bp_budget, timer, batched)  # fmt: skip
        del prep
        for f in fields(ChunkResult):
            getattr(result, f.name)[sel] = getattr(sub, f.name)
    return stats.compact(), result


@dataclass(frozen=True)
class _Part:
    """Images of a sub-batch that meet the same references: positions in the sub-batch
    ``idx`` (n,), and their halves, class log priors (n, K) or None, previous poses
    (n, 3) or None, optics groups."""

    idx: np.ndarray
    halves: np.ndarray
    log_pi: np.ndarray | None
    previous: np.ndarray | None
    groups: np.ndarray


def _expect_part(part: _Part, prep: PreparedImages, model, half, coords,
                 translations: Translations, shell, stats, result, bp_budget_bytes,
                 timer: PhaseTimer, batched: bool = True):  # fmt: skip
    """E-step of the images ``part`` against the K references of half set ``half``:
    fills ``result`` (the sub-batch's view) and adds to ``stats`` (seconds into
    ``timer``); ``translations``: the task's translation grid and its phases."""
    refs = model.class_references(half)
    xp = namespace(refs[0].data)
    grid, p, B = model.grid, model.pixel_size_A, model.box_size
    idx_x = xp.asarray(part.idx)
    X = xp.take(prep.X, idx_x, axis=0)
    ctf = xp.take(prep.ctf, idx_x, axis=0)
    cw = ctf * xp.take(prep.inv_sigma2, idx_x, axis=0)  # (n, M) CTF/σ²
    prior_px = prep.prior_offset_px[part.idx]
    X0 = X * xp.asarray(sampling.shift_phases(coords, prior_px, B))  # on previous origins
    images = FineImages(X0, ctf, cw, ctf * cw, xp.take(prep.norm, idx_x, axis=0), prior_px)
    if model.reference_error_power is not None:
        part = replace(part, log_pi=_unbiased_log_pi(part, images.ctf2w, model, half, shell))
    if model.skip_align:
        with timer("fine"):
            out = fixed_pose_posterior(images, part, model, refs, coords, stats)
    else:
        offset_prior = offset_log_prior(
            prior_px[:, None, :] + translations.shifts[None], model.sigma_offset_A, p
        )
        local = grid.local_sigma_deg is not None and part.previous is not None
        ang_c, J, pairs = coarse_pass(images, coords, translations, offset_prior, model, refs,
                                      part, local, timer, stats, batched)  # fmt: skip
        with timer("projection"):
            table = fine_table(ang_c, J, pairs, grid, refs, coords)
        count_points(stats.phase_points, "projection", table.angles.shape[0], coords.shape[0])
        with timer("fine"):
            out = fine_pass(images, table, pairs, translations, part, model, coords, stats,
                            bp_budget_bytes, timer)  # fmt: skip
    with timer("fine"):
        _store(out, part, model, stats, result)
        _add_noise(stats, out.noise_rows, part.groups, shell)


def _unbiased_log_pi(part: _Part, ctf2w, model, half: int, shell) -> np.ndarray:
    """(n, K) the part's log class priors plus Σ_k c²/σ² · error power of each class's
    reference at the point's shell (``EStepModel.reference_error_power``): diff2 is
    Σ|X − cA|²/2σ² and an error ε of the reference adds c²E|ε|²/2σ² to it, E|ε|² being
    twice the per-component error power."""
    xp = namespace(ctf2w)
    rows = np.asarray(model.class_reference_rows(half))
    error = np.asarray(model.reference_error_power, np.float64)[rows][:, np.asarray(shell)]
    error_x = xp.asarray(error.T.astype(np.float32))  # (M, K)
    correction = np.asarray(to_numpy(xp.matmul(xp.astype(ctf2w, xp.float32), error_x)))
    base = np.zeros(correction.shape) if part.log_pi is None else part.log_pi
    return base + correction.astype(np.float64)


def _store(out, part: _Part, model, stats, result):
    """Per-particle results and scalar sums of ``out`` (a FineOutcome)."""
    p, i = model.pixel_size_A, part.idx
    result.rot[i], result.tilt[i], result.psi[i] = out.angles.T
    result.origin_y_A[i], result.origin_x_A[i] = (out.origin_px * p).T
    result.max_prob[i] = out.max_prob
    result.n_significant[i] = out.n_significant
    result.loglik[i] = out.loglik
    result.class_number[i] = np.argmax(out.class_posterior, axis=1) + 1
    stats.class_weight += out.class_weight.sum(axis=0)
    if stats.class_weight_halves is not None:
        np.add.at(stats.class_weight_halves, part.halves, out.class_weight)
    stats.offset_sq_A2 += float(out.offset_sq_px2.sum()) * p * p
    stats.weight_sum += float(i.size)
    stats.loglik_sum += float(out.loglik.sum())
    if part.previous is not None:
        a, b = out.angles, part.previous
        change = angular_distance_deg(
            euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]), euler_to_matrix(b[:, 0], b[:, 1], b[:, 2])
        )
        stats.pose_change_deg_sum += float(np.sum(change))
        shift = (out.origin_px - out.prior_px) * p
        stats.offset_change_A_sum += float(np.sum(np.hypot(shift[:, 0], shift[:, 1])))
        stats.n_with_previous += i.size


def _add_noise(stats, noise_rows, groups, shell):
    """Add the images' posterior-weighted |X − CTF·A|² rows (n, M) to the shells."""
    n_shells = stats.noise_power.shape[1]
    rows = to_numpy(noise_rows)
    for g in np.unique(groups):
        sel = groups == g
        stats.noise_power[g] += np.bincount(shell, rows[sel].sum(axis=0), minlength=n_shells)[
            :n_shells
        ]
        stats.noise_count[g] += sel.sum() * np.bincount(shell, minlength=n_shells)[:n_shells]


def estep_shape(model: EStepModel, coords, previous) -> EStepShape:
    """The sizes that set this E-step's memory (:class:`streamem.em.memory.EStepShape`).

    coords: (M, 2) the work radius's Fourier points; previous: (n, 3) previous poses or
    None (local searches need them).
    """
    grid = model.grid
    Mc = coarse_radius_points(coords, model)
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
    shape = EStepShape(
        box_size=model.box_size,
        n_points=coords.shape[0],
        n_coarse_points=Mc,
        n_orientations=J,
        n_orientations_total=total,
        n_translations=T,
        n_classes=model.n_classes,
        n_pairs=model.max_significant + model.min_orientations,
        n_kids=2 ** (3 * grid.oversampling),
        n_subshifts=4**grid.oversampling,
        local=local,
        scale_free=model.scale_free,
    )
    if model.skip_align:  # one slice per (particle, class): (K, n, M) and a few (n, M)
        shape = replace(shape, n_orientations=1, n_orientations_total=1, n_translations=1)
    return shape


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
    images_bytes = n_images * shape.box_size**2 * 4
    budget = memory.workspace_budget_bytes(thread_bytes, resident, chunk_images_bytes=images_bytes)
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
    keys = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    if not all(k in metadata for k in keys):
        return None
    ang = np.stack([np.asarray(metadata[k], np.float64) for k in keys], axis=1)
    return None if np.isnan(ang).any() else ang
