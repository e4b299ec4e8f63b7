"""Independent Dask tasks of the I/O-bound jobs (import, export, simulate, pick, extract, ctf): a bounded thread pool here, or an existing cluster.

Reading MRCS stacks and writing Zarr chunks release the GIL (file I/O, zstd), so
dask's threaded scheduler with a few workers is enough, and memory stays at about
``workers`` x one chunk. With ``--scheduler`` the same tasks run on that cluster
(:func:`run_tasks`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import dask


def default_workers() -> int:
    """Threads for I/O-bound jobs: a few, so memory stays at ~workers x chunk."""
    return max(1, min(4, os.cpu_count() or 1))


def run_threaded(tasks: Sequence, workers: int | None = None, callbacks: Sequence = ()) -> list:
    """Compute delayed ``tasks`` on dask's threaded scheduler with a bounded pool.

    ``callbacks`` are dask callbacks (e.g. a progress bar) active during the run. On
    failure, tasks still running are waited for before the exception propagates, so
    the caller's cleanup does not race with writes into an output being removed.
    """
    workers = int(workers or default_workers())
    pool = ThreadPoolExecutor(workers, thread_name_prefix="streamem-io")
    try:
        with contextlib.ExitStack() as stack:
            for cb in callbacks:
                stack.enter_context(cb)
            return list(dask.compute(*tasks, scheduler="threads", pool=pool, num_workers=workers))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_tasks(tasks: Sequence, client=None, workers: int | None = None, callbacks=()) -> list:
    """The results of delayed ``tasks``: on ``client``'s cluster (a ``distributed.Client``,
    whose workers must see the files the tasks name: give them absolute paths), or else
    on ``workers`` threads here (:func:`run_threaded`, with its dask ``callbacks``)."""
    if client is None:
        return run_threaded(tasks, workers, callbacks=callbacks)
    return client.gather(client.compute(list(tasks)))
