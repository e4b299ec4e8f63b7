"""Every Dask call of an EM iteration: the model sent once, one task per chunk, a tree sum.

:func:`run_chunks` is the per-iteration graph of refine3d, class3d and class2d
(:mod:`streamem.em.engine`): the shared model is broadcast to the workers once
(:func:`broadcast`), one task per store chunk runs the job's chunk task, the returned
statistics are tree-summed (:func:`streamem.dist.graph.tree_sum`, with ``split_every``
lowered for big statistics by :func:`~streamem.dist.graph.split_every_for`) and
computed (:func:`compute`: on a ``distributed.Client``, or on Dask's threaded
scheduler without one, optionally with a progress bar). A worker that died repeatedly
(``KilledWorker``) becomes one :class:`~streamem.errors.InputError` line that the
caller words.

Layering (a decision, against ``DESIGN.md``'s order, which lists ``dist`` above
``em``): ``dist/`` holds GENERIC Dask helpers. They take callables and plain values,
and never import ``streamem.em`` or ``streamem.pick``; so ``em/`` may import ``dist/``
and hand it its graphs. The run loop must give its per-chunk work to the Dask layer,
and the layer stays reusable (pick and extract can map chunks the same way) because it
knows nothing of what the tasks compute.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import dask

from streamem.dist.graph import map_chunks, split_every_for, tree_sum
from streamem.errors import InputError


def broadcast(value: Any, client) -> Any:
    """``value`` placed once where every task can read it (a future on every worker, or
    a delayed for the threaded scheduler), so graphs refer to it instead of embedding it."""
    if client is None:
        return dask.delayed(value, pure=False)
    return client.scatter(value, broadcast=True, hash=False)


def compute(graph, client, progress: bool = False) -> Any:
    """The value of a delayed ``graph``: on ``client`` (a ``distributed.Client``) or, if
    None, on Dask's threaded scheduler. ``progress``: a bar over the tasks, only in a
    terminal (text) or notebook (bars would flood a log file)."""
    progress = progress and sys.stdout.isatty()
    if client is None:
        if progress:
            from dask.diagnostics import ProgressBar

            with ProgressBar(minimum=2.0):
                return dask.compute(graph, scheduler="threads")[0]
        return dask.compute(graph, scheduler="threads")[0]
    future = client.compute(graph)
    if progress:
        from distributed import progress as show_progress

        show_progress(future, multi=False)
    return future.result()


def run_chunks(
    task: Callable[..., Any],
    bounds: Sequence[tuple[int, int]],
    *args: Any,
    shared: Any,
    client,
    split_every: int = 8,
    item_bytes: int = 0,
    name: str = "chunk",
    progress: bool = False,
    killed_message: str | None = None,
) -> Any:
    """Σ over chunks of ``task(start, stop, *args, shared)``, computed.

    bounds: (start, stop) per chunk; args: small values (paths, numbers); shared: one
    object every task reads (the model), broadcast once (None: passed as None). item_bytes: the size of one
    task's result, to lower the tree's fan-in (:func:`split_every_for`). killed_message:
    if given, a ``KilledWorker`` (a worker died repeatedly running a task, usually out
    of memory) raises ``InputError(None, killed_message)`` instead; the caller says
    what the user can do.
    """
    shared = broadcast(shared, client) if shared is not None else None
    parts = map_chunks(task, bounds, *args, shared, name=name)
    fan_in = split_every_for(item_bytes, split_every)
    graph = tree_sum(parts, fan_in, name=f"{name}-sum")
    try:
        return compute(graph, client, progress)
    except Exception as exc:
        if killed_message is None or type(exc).__name__ != "KilledWorker":
            raise
        raise InputError(None, killed_message) from None
