"""Per-phase seconds of an iteration: a tiny exclusive timer and the SGEMM rate.

Every E-step task times its phases into its statistics
(:attr:`streamem.em.statistics.SufficientStatistics.phase_seconds`, a dict summed by
the tree reduction like any other sum), so an iteration's table is the seconds spent in
each phase summed over all workers' threads. Timing is exclusive: a phase opened
inside another (back-projection inside the fine pass) is not counted twice, so the
phases of a task add up to its E-step time. The run loop adds its own phases
(reduction, M-step, writing) with the same timer.

On a GPU the kernels run asynchronously: pass ``sync`` (the device's synchronise) for
device time per phase, else a phase counts the host time that launched it.

The coarse pass's rate (its GEMMs' FLOPs over their seconds, both summed over threads)
is reported as a fraction of one thread's SGEMM rate, measured once per process
(:func:`sgemm_rate_flops`, ~1 s of square float32 GEMMs) where the E-step runs: a Dask
worker's BLAS runs one thread per task thread (the nanny sets OMP/OPENBLAS/MKL threads
to 1), so measure it on a worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

#: The phases of one iteration, in the order of the table. The first six are timed
#: inside the E-step tasks (summed over workers), the last three in the run loop.
PHASES = (
    "read_fft",
    "projection",
    "coarse_gemm",
    "significance",
    "fine",
    "backprojection",
    "reduction",
    "mstep",
    "writing",
)


class PhaseTimer:
    """Exclusive seconds per phase, accumulated into ``seconds`` (a dict, e.g. the
    statistics' ``phase_seconds``).

    ``with timer("fine"): ...`` adds the block's wall time to ``seconds["fine"]``, less
    the time of phases opened inside it (which count for themselves).
    """

    def __init__(self, seconds: dict[str, float] | None = None, sync: Callable | None = None):
        self.seconds = {} if seconds is None else seconds
        self.sync = sync
        self._stack: list[list[float]] = []  # per open phase: [start, nested seconds]

    @contextmanager
    def __call__(self, phase: str):
        if self.sync is not None:
            self.sync()
        start = time.perf_counter()
        self._stack.append([start, 0.0])
        try:
            yield self
        finally:
            if self.sync is not None:
                self.sync()
            _, nested = self._stack.pop()
            total = time.perf_counter() - start
            self.seconds[phase] = self.seconds.get(phase, 0.0) + total - nested
            if self._stack:
                self._stack[-1][1] += total


def add_seconds(total: dict[str, float], other: dict[str, float]) -> dict[str, float]:
    """``total`` + ``other`` phase by phase (a new dict; seconds or any other sums)."""
    out = dict(total)
    for phase, seconds in other.items():
        out[phase] = out.get(phase, 0.0) + seconds
    return out


def count_points(points: dict[str, float], phase: str, n_slices: int, n_points: int) -> None:
    """Add a phase's ``n_slices`` slices of ``n_points`` Fourier points to ``points``
    (:attr:`~streamem.em.statistics.SufficientStatistics.phase_points`)."""
    points[phase] = points.get(phase, 0.0) + float(n_slices) * float(n_points)


def ns_per_point(seconds: dict[str, float], points: dict[str, float], phase: str) -> float:
    """A phase's seconds per Fourier point it made or inserted, in ns (NaN: none counted)."""
    n = points.get(phase, 0.0)
    return seconds.get(phase, 0.0) / n * 1e9 if n > 0 else float("nan")


def gemm_flops(n_rows: int, n_inner: int, n_columns: int) -> float:
    """FLOPs of a real GEMM (n_rows × n_inner) @ (n_inner × n_columns): 2 per multiply-add."""
    return 2.0 * n_rows * n_inner * n_columns


@lru_cache(maxsize=1)
def sgemm_rate_flops(seconds: float = 1.0, size: int = 1024) -> float:
    """This process's float32 GEMM rate (FLOP/s) on ``size``² matrices, the best of as
    many repeats as fit in ``seconds`` (cached: measured once per process)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b  # warm-up (thread pool, pages)
    best, end = np.inf, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > end:
            break
    return 2.0 * size**3 / best


def phase_table(seconds: dict[str, float], coarse_flops: float = 0.0,
                sgemm_flops: float | None = None, points: dict[str, float] | None = None) -> str:  # fmt: skip
    """One line: seconds per phase (those in :data:`PHASES`, then any other), for the
    phases in ``points`` also their Fourier points (10⁹) and the phase's nanoseconds per
    point, and the coarse GEMMs' rate (GFLOP/s and the fraction of ``sgemm_flops``
    where given)."""
    names = [p for p in PHASES if p in seconds] + sorted(set(seconds) - set(PHASES))
    parts = []
    points = points or {}
    for p in names:
        n = points.get(p, 0.0)
        per_point = f" ({n / 1e9:.2f} Gpt, {ns_per_point(seconds, points, p):.1f} ns/pt)"
        parts.append(f"{p} {seconds[p]:.1f}{per_point if n > 0 else ''}")
    gemm_s = seconds.get("coarse_gemm", 0.0)
    if coarse_flops > 0 and gemm_s > 0:
        rate = coarse_flops / gemm_s
        text = f"coarse {coarse_flops / 1e9:.0f} GFLOP at {rate / 1e9:.1f} GFLOP/s"
        if sgemm_flops:
            text += f" ({rate / sgemm_flops:.2f} of SGEMM)"
        parts.append(text)
    return "  ".join(parts)
