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


def _sum_many(*parts):
    """parts[0] + parts[1] + ... in order, adding in place into the first sum (a new
    object: the inputs are Dask's stored results and stay untouched) where the type
    allows it, so a node holds its inputs and one total, not a new total per input."""
    total = operator.add(parts[0], parts[1])
    for p in parts[2:]:
        total = operator.iadd(total, p)
    return total


def tree_sum(
    parts: Sequence[Delayed], split_every: int = 8, name: str = "reduce", chained: bool = False
) -> Delayed:
    """Sum delayed values in a tree whose nodes take ``split_every`` inputs.

    Order is preserved (left to right), so the result does not depend on timing.
    ``chained``: each node is a left fold of two-input sums (``((a + b) + c) + ...``)
    instead of one task over all its inputs: the same additions in the same order (the
    same bits), but a sum task needs only two inputs on one worker and each input is
    freed as soon as it is added, so a worker never gathers a node's ``split_every``
    inputs at once. For big items (refine3d's statistics at a full box are ~200 MB)
    that bounds the memory of the reduction whatever the number of chunks; the folds
    add ``split_every − 1`` cheap sequential steps per level.
    """
    if split_every < 2:
        raise ValueError(f"split_every must be at least 2 (got {split_every})")
    if not parts:
        raise ValueError("nothing to reduce")
    level = list(parts)
    token = dask.base.tokenize(*[p.key for p in level], chained)[:12]
    depth = 0
    while len(level) > 1:
        nodes = []
        for i in range(0, len(level), split_every):
            group = level[i : i + split_every]
            key = f"{name}-{depth}-{i}-{token}"
            if len(group) == 1:
                nodes.append(group[0])
            elif not chained:
                nodes.append(dask.delayed(_sum_many, pure=True)(*group, dask_key_name=key))
            else:
                total = group[0]
                for j, part in enumerate(group[1:], start=1):
                    total = dask.delayed(_sum_many, pure=True)(
                        total, part, dask_key_name=f"{key}-{j}"
                    )
                nodes.append(total)
        level = nodes
        depth += 1
    return level[0]


#: Results at least this big are reduced with chained nodes (:func:`tree_sum`).
CHAIN_BYTES = 32 * 2**20


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
