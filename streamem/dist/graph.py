"""Graph helpers: one task per store chunk, statistics tree-reduced.

Per-chunk statistics are monoids (``a + b`` is associative and there is an
empty value), so a tree reduction with ``split_every`` inputs per node gives the
same result (up to float rounding) whatever the chunking or worker count.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import dask
from dask.delayed import Delayed
from dask.utils import key_split


def _sum_many(*parts):
    """parts[0] + parts[1] + ... in order, adding in place into the first sum (a new
    object: the inputs are Dask's stored results and stay untouched) where the type
    allows it, so a node holds its inputs and one total, not a new total per input."""
    total = operator.add(parts[0], parts[1])
    for p in parts[2:]:
        total = operator.iadd(total, p)
    return total


def tree_sum(parts: Sequence[Delayed], split_every: int = 8, name: str = "reduce") -> Delayed:
    """Sum delayed values in a tree whose nodes take ``split_every`` inputs.

    Order is preserved (left to right), so the result does not depend on timing.

    ``name`` must put the nodes in a Dask task group (``dask.utils.key_split``) other
    than the parts': a group that depends on itself is never root-ish to distributed,
    which then hands every part's task to a worker up front instead of queuing them on
    the scheduler, and finished parts pile up on the workers (measured at box 128:
    131-141 chunk statistics held by one worker, RSS 1.2 -> 2.9 GiB, in
    ``streamem bench out-of-core``). With the groups apart, a cluster holds a few
    parts per tree level whatever their number (tests/test_reduction_memory.py).
    """
    if split_every < 2:
        raise ValueError(f"split_every must be at least 2 (got {split_every})")
    if not parts:
        raise ValueError("nothing to reduce")
    level = list(parts)
    if key_split(f"{name}-0-0-{'0' * 12}") in {key_split(p.key) for p in level}:
        raise ValueError(f"tree_sum name {name!r} falls in the parts' Dask task group")
    token = dask.base.tokenize(*[p.key for p in level])[:12]
    depth = 0
    while len(level) > 1:
        level = [
            dask.delayed(_sum_many, pure=True)(
                *level[i : i + split_every], dask_key_name=f"{name}-{depth}-{i}-{token}"
            )
            if len(level[i : i + split_every]) > 1
            else level[i]
            for i in range(0, len(level), split_every)
        ]
        depth += 1
    return level[0]


def split_every_for(item_bytes: int, split_every: int = 8, node_bytes: int = 256 * 2**20) -> int:
    """Inputs per reduction node for items of ``item_bytes``: ``split_every``, lowered
    (to at least 2) so that a node's inputs fit ``node_bytes``. 256 MiB: at box 128 a
    refine3d statistics object is 106 MB, so nodes sum pairs. For big items fan-in 2
    is the least memory: while parts arrive in order, a tree of n parts holds up to
    (f - 1) parts waiting per level, (f - 1) log_f(n) in all, smallest at f = 2 (the
    number of additions, n - 1, is the same for any f)."""
    return int(max(2, min(split_every, node_bytes // max(1, item_bytes))))


def map_chunks(
    fn: Callable[..., Any],
    bounds: Sequence[tuple[int, int]],
    *args: Any,
    name: str = "chunk",
    **kwargs: Any,
) -> list[Delayed]:
    """One delayed ``fn(start, stop, *args, **kwargs)`` per chunk.

    ``args`` should be small (paths, parameters) or delayed/futures of the shared
    model, so the model is sent once, not embedded in every task.
    """
    token = dask.base.tokenize(fn, bounds, args, kwargs)[:12]
    return [
        dask.delayed(fn, pure=True)(
            start, stop, *args, dask_key_name=f"{name}-{start}-{token}", **kwargs
        )
        for start, stop in bounds
    ]
