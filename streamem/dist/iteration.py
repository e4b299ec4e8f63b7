"""Every Dask call of an EM iteration: the model sent once, one task per range, a tree sum.

:func:`run_chunks` is the per-iteration graph of refine3d, class3d and class2d
(:mod:`streamem.em.engine`): the shared model is broadcast to the workers once
(:func:`broadcast`), one task per range the caller gives (store chunks, or parts of
them) runs the job's chunk task, the returned statistics are tree-summed
(:func:`streamem.dist.graph.tree_sum`, with ``split_every`` lowered for big statistics
by :func:`~streamem.dist.graph.split_every_for`) and computed (:func:`compute`: on a
``distributed.Client``, or on Dask's threaded scheduler without one, optionally with a
progress bar). A worker that died repeatedly (``KilledWorker``) becomes one
:class:`~streamem.errors.InputError` line that the caller words.

Elastic runs: the model survives the loss of any worker because it is a RECOMPUTABLE
TASK RESULT, not scattered data. :func:`broadcast` submits one task,
``_unwrap(_Held(model))``, whose spec holds the model: the scheduler keeps that spec,
one worker computes it (a copy), and every chunk task depends on its key; other
workers fetch it from a peer when their first task needs it, workers that join
mid-iteration included. If every worker holding it dies (the only worker of a
cluster that is just growing from one, SIGKILLed), the scheduler recomputes the
task from its spec on a live worker, and the chunk tasks go on. Scattered data
(``client.scatter(..., broadcast=True)``, what this module did before) is lost for
good when its last holder dies abruptly: the scheduler "forgets" the key, every task
that needs it fails, and re-scattering cannot revive a graph already submitted;
``replicate`` does not help either, since the Active Memory Manager
(``ReduceReplicas``, on by default) drops replicas that no queued task needs, and a
worker that joins later has none. The cost: the scheduler holds one copy of the
model per iteration (the spec, released with the iteration's futures), and the model
crosses the network client -> scheduler -> one worker (and is re-sent only after a
loss). The chunk tasks and tree sum are pure (``map_chunks``/``tree_sum``: a result
depends only on the chunk, the arguments and the model; random choices are seeded
from them), so a task Dask reruns after a loss returns the same statistics and writes
the same per-particle values into the same store region; the tree sum adds in a
fixed order, so the iteration's statistics are bit-identical whichever workers ran
what (given the same worker environment: one BLAS thread per worker).

Layering (a decision, against ``DESIGN.md``'s order, which lists ``dist`` above
``em``): ``dist/`` holds GENERIC Dask helpers. They take callables and plain values,
and never import ``streamem.em`` or ``streamem.pick``; so ``em/`` may import ``dist/``
and hand it its graphs. The run loop must give its per-chunk work to the Dask layer,
and the layer stays reusable (pick and extract can map chunks the same way) because it
knows nothing of what the tasks compute.
"""

from __future__ import annotations

import sys
import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import dask

from streamem.dist.graph import map_chunks, split_every_for, tree_sum
from streamem.errors import InputError


class _Held:
    """An opaque box, so Dask neither traverses the model (dataclasses, dicts, tuples
    are graph syntax to it) nor hashes its arrays."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce__(self):
        return (_Held, (self.value,))


def _unwrap(held: _Held) -> Any:
    return held.value


def broadcast(value: Any, client) -> Any:
    """``value`` placed once where every task can read it, so graphs refer to it instead
    of embedding it: a future of a task that returns it (recomputed by the scheduler if
    the workers holding it die; module docstring), or a delayed for the threaded
    scheduler."""
    if client is None:
        return dask.delayed(value, pure=False)
    key = f"model-{uuid.uuid4().hex}"
    model = dask.delayed(_unwrap, pure=False)(_Held(value), dask_key_name=key)
    # the model is this graph's only large part, sent once: distributed's warning about
    # large graphs (meant for data repeated in many tasks) does not apply
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
        return client.compute(model)


def on_a_worker(fn: Callable[[], Any], client) -> Any:
    """``fn()`` run once on one of ``client``'s workers (here if ``client`` is None):
    for measurements that must see a worker's environment (its BLAS threads)."""
    if client is None:
        return fn()
    return client.submit(fn, pure=False).result()


def compute(graph, client, progress: bool = False) -> Any:
    """The value of a delayed ``graph``: on ``client`` (a ``distributed.Client``) or, if
    None, on Dask's threaded scheduler. ``progress``: a bar over the tasks, only in a
    terminal (text) or notebook (a widget), none in a log or CI
    (:func:`streamem.dist.progress.progress_mode`)."""
    from streamem.dist.progress import progress_mode

    mode = progress_mode(sys.stdout) if progress else None
    if client is None:
        if mode is not None:
            from dask.diagnostics import ProgressBar

            with ProgressBar(minimum=2.0):
                return dask.compute(graph, scheduler="threads")[0]
        return dask.compute(graph, scheduler="threads")[0]
    future = client.compute(graph)
    if mode is not None:
        from distributed import progress as show_progress

        show_progress(future, multi=False, notebook=mode == "widget")
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
    # a task group apart from the chunks' ("statistics-sum"), so that distributed
    # queues the chunk tasks and the results held stay bounded (tree_sum's docstring)
    graph = tree_sum(parts, fan_in, name=f"statistics-sum-{name}")
    try:
        return compute(graph, client, progress)
    except Exception as exc:
        if killed_message is None or type(exc).__name__ != "KilledWorker":
            raise
        raise InputError(None, killed_message) from None
