"""How much memory an E-step task may use, and how many images it works on at once.

A store chunk (1,024 images by default) is far too many images to push through the
E-step in one go at a real box: the coarse log-posterior alone is images ×
translations × orientations × 4 bytes, the fine pass's table of projected children
and the back-projection buffers grow with images × significant samples × Fourier
points. So every E-step (refine3d, class3d, class2d) works through its chunk in
sub-batches of images whose peak, at every stage, stays within a budget:

    budget = min(MAX_WORKSPACE_BYTES − images, WORKSPACE_FRACTION · memory per thread − resident)

``memory per thread`` is the Dask worker's memory limit over its threads (inside a
task), ``--memory-per-worker`` over the threads where given, or, on the threaded
no-cluster path, the available memory over the threads. ``resident`` is what the
task holds whatever the sub-batch: its statistics accumulators, the chunk's images
and its share of the scattered model (:func:`resident_bytes`).

The estimate (:func:`estep_stage_bytes`) counts, per stage, the arrays the code
allocates (bytes per element × elements, from box, work radius, orientations,
translations, classes and the significant-sample cap). It is an upper bound: the
number of significant samples is taken at its cap. ``MAX_WORKSPACE_BYTES`` caps the
workspace where memory is plentiful: beyond a few dozen images per sub-batch the
GEMMs run at full speed already (measured, :mod:`streamem.bench.refine_memory`),
and a bounded working set keeps the worker's peak RSS, and what glibc keeps of it,
small. The chunk's images (``images``) count against that cap, so that a task's own
peak does not grow with the chunk size (bigger chunks get smaller sub-batches).
Finished statistics waiting for their tree-sum task are bounded by the scheduler, not
here: the chunk tasks are queued on the scheduler (root-ish, :mod:`streamem.dist.iteration`),
so a cluster holds a few finished chunks per tree level and thread, whatever the
number of chunks (:func:`streamem.dist.graph.tree_sum`), and each of them is small: a
task returns single-precision accumulators packed to the voxels insertion can reach
(:meth:`streamem.em.statistics.SufficientStatistics.compact`, 106 MB at box 128), and
big ones are summed in pairs (:func:`streamem.dist.graph.split_every_for`). Measured
at box 128 (``streamem bench refine-memory --iterations 4``, 5,000 particles, 2
workers): the final join's worker peaks were 1.50/1.61 GiB with chunks of 256, against
2.08/1.57 GiB with whole-cube results.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from streamem.errors import InputError

#: Share of a thread's memory the E-step's temporaries and resident arrays may take
#: (Dask spills at 70% and pauses at 80% of the limit; the rest is the interpreter,
#: libraries, the model and task results waiting for the reduction).
WORKSPACE_FRACTION = 0.5
#: Upper bound of one task's E-step workspace (bytes), whatever the machine.
MAX_WORKSPACE_BYTES = 384 * 2**20
#: Back-projection rows are buffered up to this share of the workspace, then summed
#: per orientation and inserted (the flush needs ~6x the buffer in temporaries).
BACKPROJECTION_SHARE = 1 / 8


@dataclass(frozen=True)
class EStepShape:
    """The sizes that set an E-step's memory (one task).

    box_size: B (pixels); n_points: M, Fourier points within the work radius;
    n_coarse_points: Mc, those of the coarse pass; n_orientations: J, coarse
    orientations scored per image and class (global: the whole grid; local: the
    candidates around one pose); n_orientations_total: the coarse orientations of the
    whole grid (caps the union over images); n_translations: T coarse translations;
    n_classes: K references scored (class3d; 1 for refine3d); n_pairs: cap on the
    significant coarse (translation, orientation) pairs per image and class
    (max_significant + min_orientations); n_kids: orientations per coarse one in the
    fine pass (2**(3·oversampling)); n_subshifts: translations per coarse one
    (4**oversampling); local: local searches (per-image candidates); scale_free: the
    first iteration's scale fit (more coarse temporaries).
    """

    box_size: int
    n_points: int
    n_coarse_points: int
    n_orientations: int
    n_orientations_total: int
    n_translations: int
    n_classes: int = 1
    n_pairs: int = 36
    n_kids: int = 8
    n_subshifts: int = 4
    local: bool = False
    scale_free: bool = False


def estep_stage_bytes(shape: EStepShape, n_images: int) -> dict[str, int]:
    """Peak bytes of each stage of refine3d's/class3d's E-step on ``n_images`` at once.

    Stages: ``prepare`` (FFTs, CTFs, noise weights), ``coarse`` (shifted images, the
    cross-term GEMM, the coarse log-posterior), ``significance`` (the log-posterior
    kept while the significant pairs are ranked), ``fine`` (the table of projected
    children, one padded group of the batched fine pass), ``backprojection`` (the table, the buffered rows
    and their flush). Each includes what is resident through the sub-batch (the
    prepared images). Returns {stage: bytes}.
    """
    n, s = n_images, shape
    B, M, Mc, T, K = s.box_size, s.n_points, s.n_coarse_points, s.n_translations, s.n_classes
    # prepared images and their per-group copies, X0, CTF·/σ² (complex64/float32, (n, M))
    resident = n * 48 * M
    prepare = n * (8 * B * B + 44 * M)
    # coarse orientations: the grid (global), or the union of every image's candidates
    KJ = K * (
        s.n_orientations if not s.local else min(n * s.n_orientations, s.n_orientations_total)
    )
    # slices (complex64), the GEMM's real operand (a view of them on NumPy and CuPy, a
    # copy elsewhere) and |A|² (float32): an upper bound
    refs = KJ * Mc * 24
    per_image_j = K * s.n_orientations  # scored per image
    scores = n * T * per_image_j * 4 * (5 if s.scale_free else 1)
    if s.local:
        scores += n * KJ * 4  # ref power terms (n, U) against the union
    if K > 1:  # class3d's row priors (n, K·J) float64 (and local: the angular prior)
        scores += n * KJ * 24
    # the batched significance ranks blocks of images (~40 B per sample, a bounded block)
    ranking = min(SIGNIFICANCE_BLOCK_BYTES, n * T * per_image_j * 40)
    if s.local:  # host float64 log-posteriors (n, T, K, c) and one group's gathered slices
        scores += n * T * per_image_j * 8
        # one score group: its gathered run of rows (K > 1) and dense scores (each within
        # the bound), or one image's gathered rows and scores
        one_image = per_image_j * (2 * Mc + 2 * T) * 4
        grouped = min(2 * LOCAL_GATHER_BYTES, n * per_image_j * (2 * Mc + T) * 4)
        gather = max(one_image, grouped)
    else:
        gather = 0
    coarse = resident + refs + n * T * Mc * 32 + scores + gather + T * per_image_j * 24
    kept = n * T * per_image_j * (12 if s.local else 4)  # float32 scores, float64 if local
    significance = resident + kept + max(ranking, T * per_image_j * 40)
    # fine table: children of every refined coarse orientation (Re, Im side by side f32, power f32)
    P = K * s.n_pairs
    rows = min(n * P, K * s.n_orientations_total) * s.n_kids
    table = rows * (12 * M + 96)
    # one padded group of the batched fine pass, and every image's noise row
    group = min(n * P, max(P, fine_group_pairs(s))) * fine_pair_bytes(s)
    build = min(rows, 4096) * 8 * M  # a block of complex slices, while they are stacked
    fine = resident + table + max(group, build) + n * 8 * M
    backprojection = resident + table + n * 8 * M + BP_FLUSH_FACTOR * bp_buffer_bytes(shape)
    return {
        "prepare": prepare,
        "coarse": coarse,
        "significance": significance,
        "fine": fine,
        "backprojection": backprojection,
    }


#: Bounds of the batched coarse pass's transients (bytes; :mod:`streamem.em.coarse_pass`
#: uses these): one group's gathered candidate slices (local searches) and one block of
#: the batched significance.
LOCAL_GATHER_BYTES = 32 * 2**20

#: How many times its largest image's count of candidates a local score group's run of
#: union rows may hold (:func:`streamem.em.coarse_pass.local_score_groups`): a dense
#: GEMM against the run scores rows an image does not need but reads the slices in
#: place. At the first local order (7.5° coarse, no pre-pass) an image's ~560 candidates
#: are nearly all its own rows: in ``streamem bench refine-phases`` (5,000 particles, box
#: 128; 466d0f1 against 32a18aa, two runs in either order) the coarse GEMMs of its two
#: 3.75° iterations took 15.5-18.0 CPU-s against 34.3-37.5 with the union-gather groups
#: of up to 8x this replaces, the poses and the final map the same.
LOCAL_GROUP_WASTE = 2
SIGNIFICANCE_BLOCK_BYTES = 32 * 2**20

#: Upper bound of one padded group of the batched fine pass (bytes): a group's
#: batched GEMMs run at full speed from a few images on; a bound keeps the gathered
#: slices (images × pairs × children × M) a fixed share of the workspace.
FINE_GROUP_BYTES = 64 * 2**20


def fine_pair_bytes(shape: EStepShape) -> int:
    """Peak bytes of one padded (image, pair) in the batched fine pass
    (:mod:`streamem.em.fine_pass`): its S shifted images (complex64) and their stacked
    real operand, the gathered children's slices (complex64), power (float32) and
    stacked operand, and the float64 posterior arrays; the weighted sums run over the
    few live pairs only."""
    S, nk, M = shape.n_subshifts, shape.n_kids, shape.n_points
    return M * (24 * S + 20 * nk) + 64 * S * nk


def fine_group_pairs(shape: EStepShape) -> int:
    """Padded pairs (images × the group's largest pair count) per fine-pass group."""
    return max(1, FINE_GROUP_BYTES // fine_pair_bytes(shape))


#: Temporaries of one flush of the back-projection buffer, in buffer sizes
#: (concatenation, float64 copies, sort, cumulative sums).
BP_FLUSH_FACTOR = 6


def bp_buffer_bytes(shape: EStepShape, budget_bytes: int | None = None) -> int:
    """Bytes of buffered back-projection rows before a flush (at least one image's worth).

    One image adds at most n_pairs · n_kids rows of M complex64 values and float64
    weights per class.
    """
    one_image = shape.n_classes * shape.n_pairs * shape.n_kids * shape.n_points * 16
    if budget_bytes is None:
        return one_image
    return max(one_image, int(BACKPROJECTION_SHARE * budget_bytes))


def class2d_stage_bytes(
    n_points: int, n_references: int, n_translations: int, n_images: int
) -> dict[str, int]:
    """Peak bytes of class2d's E-step on ``n_images`` at once (no fine pass).

    n_references: J = classes × in-plane angles; the posterior (n, T, J) is float64 and
    its row-wise significance sort (kernels.significant_weights_rows: order, sorted
    values, cumulative sums, ranks, result) holds ~7 such copies (tracemalloc: ~52 B
    per sample at box 32, J = 1080, T = 113).
    """
    n, M, J, T = n_images, n_points, n_references, n_translations
    resident = n * 40 * M
    return {
        "prepare": n * 44 * M,
        "coarse": resident + n * T * M * 40 + n * T * J * 60,
        "sums": resident + n * T * M * 40 + n * T * J * 12,
    }


def class2d_fixed_bytes(n_points: int, n_references: int) -> int:
    """class2d's per-task arrays independent of the images: rotated references and power
    (J, M), the per-row sums (J, M) complex128 and float64."""
    return n_references * n_points * (8 + 4 + 16 + 8)


def peak_bytes(stage_bytes: dict[str, int]) -> int:
    return max(stage_bytes.values())


def images_per_batch(
    stage_fn, n_images: int, budget_bytes: int, what: str, limit_bytes: int | None = None
) -> int:
    """The largest sub-batch (1 … n_images) whose peak ``stage_fn(n)`` fits the budget.

    stage_fn(n) → {stage: bytes}; its peak grows with n. ``limit_bytes`` is the
    uncapped budget (without ``MAX_WORKSPACE_BYTES``): one image above the cap but within
    it runs alone. Raises InputError when even one image does not fit, naming the
    estimate and what to change.
    """
    one = peak_bytes(stage_fn(1))
    if one > budget_bytes and limit_bytes is not None and one <= limit_bytes:
        return 1
    if one > budget_bytes:
        raise InputError(
            None,
            f"{what}: one image's E-step needs ~{_mib(one)} MiB but the budget per task is "
            f"{_mib(budget_bytes)} MiB; give more memory per worker (--memory-per-worker), "
            "fewer threads per worker, or a smaller box",
        )
    lo, hi = 1, max(1, n_images)
    if peak_bytes(stage_fn(hi)) <= budget_bytes:
        return hi
    while hi - lo > 1:  # the peak is monotone in n: bisection
        mid = (lo + hi) // 2
        if peak_bytes(stage_fn(mid)) <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return lo


def _mib(n_bytes: float) -> int:
    return int(math.ceil(n_bytes / 2**20))


def thread_memory_bytes(memory_per_worker_bytes: int | None = None) -> int:
    """Memory per thread of the process running this task.

    Inside a Dask worker: the worker's memory limit (or ``memory_per_worker_bytes``)
    over its threads. Elsewhere (Dask's threaded scheduler): ``memory_per_worker_bytes``
    or the available memory, over the threads Dask's pool uses (one per core).
    """
    limit, threads = None, None
    try:
        from distributed import get_worker

        worker = get_worker()
        limit = worker.memory_manager.memory_limit
        threads = worker.state.nthreads
    except (ImportError, ValueError, AttributeError):
        pass
    if memory_per_worker_bytes:
        limit = memory_per_worker_bytes
    if not limit:
        import psutil

        limit = psutil.virtual_memory().available
    if not threads:
        threads = local_threads()
    return int(limit // max(1, threads))


def local_threads() -> int:
    """Threads of Dask's threaded scheduler here (``num_workers`` or one per core)."""
    import dask

    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


def workspace_budget_bytes(
    thread_bytes: int, resident: int, capped: bool = True, chunk_images_bytes: int = 0
) -> int:
    """E-step workspace of a task: a share of its thread's memory less what is resident,
    at most ``MAX_WORKSPACE_BYTES`` less the chunk's images (``chunk_images_bytes``, so
    that images + workspace, and with them the task's peak, do not grow with the chunk
    size; never below a quarter of the cap) unless ``capped`` is False (may be ≤ 0:
    then nothing fits)."""
    limit = int(WORKSPACE_FRACTION * thread_bytes - resident)
    if not capped:
        return limit
    cap = max(MAX_WORKSPACE_BYTES - chunk_images_bytes, MAX_WORKSPACE_BYTES // 4)
    return min(cap, limit)


def resident_bytes(
    n_chunk_images: int, box_size: int, accumulator_voxels: int, n_accumulators: int
) -> int:
    """What a task holds whatever its sub-batch: the chunk's images (float32), its
    accumulators (complex64 data + float32 weight per voxel) and their packed copy for
    the result (:meth:`SufficientStatistics.compact`; counted for the whole cube, an
    upper bound: the packed copy holds about half the voxels)."""
    return n_chunk_images * box_size * box_size * 4 + n_accumulators * accumulator_voxels * (
        12 + 12
    )


def parse_bytes(text: str) -> int:
    """``--memory-per-worker`` text (``4GiB``, ``2.5 GB``, ``800MB``, bytes) → bytes."""
    from dask.utils import parse_bytes as dask_parse_bytes

    try:
        value = int(dask_parse_bytes(text))
    except (ValueError, TypeError):
        raise InputError(
            f"--memory-per-worker {text}", "not a size (e.g. 4GiB, 2.5GB, 800MB)"
        ) from None
    if value <= 0:
        raise InputError(f"--memory-per-worker {text}", "must be positive")
    return value
