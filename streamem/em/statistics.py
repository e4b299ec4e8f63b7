"""Sufficient statistics of one E-step: a monoid reduced across chunks.

Everything here is an unnormalised sum, so ``a + b`` is associative and the
reduction tree's shape (chunking, number of workers) does not change the result
beyond float rounding. The M-step normalises once at the end.

Precision and size: an E-step task accumulates its back-projections in complex64/float32
(``empty(..., single=True)``; RELION's accelerated back-projector sums in its XFLOAT,
single precision in its default build), then hands back :meth:`compact` statistics:
accumulators holding only the voxels that insertion can reach
(:func:`streamem.core.projector.half_cube_reach`, 53% of the half cube). At box 128
(2x-padded half cube of radius 126, both halves) a task's accumulators are 200 MB (400
MB in double precision) and its result 106 MB, and the reduction holds a few results per
worker (``split_every`` per node, a node per tree level waiting). A voxel's sum gets
tens of insertions per task (thousands at the lowest frequencies, which every slice
crosses); in single precision it agrees with the double-precision sum to ~1e-6 of the
largest voxel (``tests/test_slice_kernel.py``, ``tests/test_estep_batching.py``), far
below the noise of any reconstruction, and single-precision insertion moves half the
bytes: ``streamem bench project --local``, one process alone, 0.85 of the
double-precision time at the default block; in ``streamem bench refine-phases`` (two
workers sharing the caches) the 0.94° back-projection went from 68-72 to 49-53 ns per
point. The reduction adds packed float32 results; the M-step gets the whole cube back
(:meth:`expanded`) and works in double precision on its copy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace

import numpy as np

from streamem.core.backprojector import accumulator_dtypes
from streamem.core.projector import half_cube_reach
from streamem.em.phases import add_seconds


@dataclass
class SufficientStatistics:
    """Sums over the particles of a chunk (or of many chunks).

    data_acc:     (2K, *grid) complex128  back-projected CTF·X/σ², class k half h at 2k + h
    weight_acc:   (2K, *grid) float64     back-projected CTF²/σ², same index
    noise_power:  (G, S) float64  Σ posterior-weighted |X − CTF·A|² per optics group, shell
    noise_count:  (G, S) float64  number of Fourier points that went into ``noise_power``
    offset_sq_A2: float            Σ w |total offset|² (Å²) (for the offset prior)
    weight_sum:   float            Σ w (the number of particles)
    loglik_sum:   float            Σ log-likelihood contributions
    pose_change_deg_sum: float     Σ angular change of the best pose vs the previous one
    offset_change_A_sum: float     Σ change of the best offset (Å)
    n_with_previous: float         particles that had a previous pose
    class_weight: (K,) float64     Σ posterior weight per class (K = 1 in refine3d)
    class_weight_halves: (2, K) float64 or None  the same per random half (3D jobs)
    phase_seconds: {phase: s}      seconds per E-step phase, summed over tasks
                                   (:mod:`streamem.em.phases`; not a statistic of the data)
    coarse_flops: float            FLOPs of the coarse pass's GEMMs
    phase_points: {phase: n}       Fourier points of the slices made in phase "projection"
                                   and inserted in "backprojection", summed over tasks
    grid_shape:   the half cube's shape when the accumulators are packed (:meth:`compact`):
                  then data_acc, weight_acc are (2K, V) over the cube's reachable voxels
                  (:func:`~streamem.core.projector.half_cube_reach`); None: not packed
    """

    data_acc: np.ndarray
    weight_acc: np.ndarray
    noise_power: np.ndarray
    noise_count: np.ndarray
    offset_sq_A2: float = 0.0
    weight_sum: float = 0.0
    loglik_sum: float = 0.0
    pose_change_deg_sum: float = 0.0
    offset_change_A_sum: float = 0.0
    n_with_previous: float = 0.0
    class_weight: np.ndarray | None = None
    class_weight_halves: np.ndarray | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)
    coarse_flops: float = 0.0
    phase_points: dict[str, float] = field(default_factory=dict)
    grid_shape: tuple[int, int, int] | None = None

    @classmethod
    def empty(cls, grid_shape, n_optics_groups: int, n_shells: int, n_classes: int = 1,
              single: bool = False):  # fmt: skip
        """Zero sums with 2K accumulators: class k, half h at index 2k + h;
        complex64/float32 ones with ``single`` (module docstring)."""
        data_dtype, weight_dtype = accumulator_dtypes(single)
        return cls(
            data_acc=np.zeros((2 * n_classes, *grid_shape), data_dtype),
            weight_acc=np.zeros((2 * n_classes, *grid_shape), weight_dtype),
            noise_power=np.zeros((n_optics_groups, n_shells)),
            noise_count=np.zeros((n_optics_groups, n_shells)),
            class_weight=np.zeros(n_classes),
            class_weight_halves=np.zeros((2, n_classes)),
        )

    @property
    def nbytes(self) -> int:
        return int(self.data_acc.nbytes + self.weight_acc.nbytes)

    def compact(self) -> SufficientStatistics:
        """The same sums with complex64/float32 accumulators, and half cubes packed to
        their reachable voxels (module docstring); (K, M) class2d rows stay as they are.
        An accumulator at a time, so the double-precision copy of a packed row is the
        only temporary."""
        if self.grid_shape is not None or self.data_acc.ndim != 4:
            return replace(
                self,
                data_acc=self.data_acc.astype(np.complex64, copy=False),
                weight_acc=self.weight_acc.astype(np.float32, copy=False),
            )
        grid = tuple(int(n) for n in self.data_acc.shape[1:])
        reach = half_cube_reach(grid)
        shape = (self.data_acc.shape[0], int(np.count_nonzero(reach)))
        data, weight = np.empty(shape, np.complex64), np.empty(shape, np.float32)
        for a in range(shape[0]):
            data[a] = self.data_acc[a][reach]
            weight[a] = self.weight_acc[a][reach]
        return replace(self, data_acc=data, weight_acc=weight, grid_shape=grid)

    def expanded(self) -> SufficientStatistics:
        """Packed statistics (:meth:`compact`) with whole half cubes again (zero beyond
        the reachable voxels); unpacked ones as they are."""
        if self.grid_shape is None:
            return self
        reach = half_cube_reach(self.grid_shape)
        data = np.zeros((self.data_acc.shape[0], *self.grid_shape), self.data_acc.dtype)
        weight = np.zeros((self.weight_acc.shape[0], *self.grid_shape), self.weight_acc.dtype)
        data[:, reach] = self.data_acc
        weight[:, reach] = self.weight_acc
        return replace(self, data_acc=data, weight_acc=weight, grid_shape=None)

    def _check_layout(self, other: SufficientStatistics) -> None:
        if self.grid_shape != other.grid_shape:
            raise ValueError(
                f"statistics of different layouts: {self.grid_shape} and {other.grid_shape}"
            )

    def __iadd__(self, other: SufficientStatistics) -> SufficientStatistics:
        """In place: the reduction adds into one total instead of a new one per input.
        Its seconds count as phase "reduction" of the total."""
        self._check_layout(other)
        t0 = time.perf_counter()
        self.data_acc += other.data_acc
        self.weight_acc += other.weight_acc
        self.noise_power += other.noise_power
        self.noise_count += other.noise_count
        self.offset_sq_A2 += other.offset_sq_A2
        self.weight_sum += other.weight_sum
        self.loglik_sum += other.loglik_sum
        self.pose_change_deg_sum += other.pose_change_deg_sum
        self.offset_change_A_sum += other.offset_change_A_sum
        self.n_with_previous += other.n_with_previous
        self.class_weight = self.class_weight + other.class_weight
        self.class_weight_halves = _add_optional(
            self.class_weight_halves, other.class_weight_halves
        )
        self.phase_seconds = add_seconds(self.phase_seconds, other.phase_seconds)
        self.coarse_flops += other.coarse_flops
        self.phase_points = add_seconds(self.phase_points, other.phase_points)
        self.phase_seconds["reduction"] = (
            self.phase_seconds.get("reduction", 0.0) + time.perf_counter() - t0
        )
        return self

    def __add__(self, other: SufficientStatistics) -> SufficientStatistics:
        self._check_layout(other)
        t0 = time.perf_counter()
        total = SufficientStatistics(
            data_acc=self.data_acc + other.data_acc,
            weight_acc=self.weight_acc + other.weight_acc,
            noise_power=self.noise_power + other.noise_power,
            noise_count=self.noise_count + other.noise_count,
            offset_sq_A2=self.offset_sq_A2 + other.offset_sq_A2,
            weight_sum=self.weight_sum + other.weight_sum,
            loglik_sum=self.loglik_sum + other.loglik_sum,
            pose_change_deg_sum=self.pose_change_deg_sum + other.pose_change_deg_sum,
            offset_change_A_sum=self.offset_change_A_sum + other.offset_change_A_sum,
            n_with_previous=self.n_with_previous + other.n_with_previous,
            class_weight=self.class_weight + other.class_weight,
            class_weight_halves=_add_optional(self.class_weight_halves, other.class_weight_halves),
            phase_seconds=add_seconds(self.phase_seconds, other.phase_seconds),
            coarse_flops=self.coarse_flops + other.coarse_flops,
            phase_points=add_seconds(self.phase_points, other.phase_points),
            grid_shape=self.grid_shape,
        )
        total.phase_seconds["reduction"] = (
            total.phase_seconds.get("reduction", 0.0) + time.perf_counter() - t0
        )
        return total


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


def _add_optional(a, b):
    """a + b for sums that only some jobs keep (None where not kept)."""
    return None if a is None or b is None else a + b
