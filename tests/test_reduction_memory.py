"""The tree sum of chunk statistics holds a bounded number of results, whatever the
number of chunks (issue 15): distributed queues the chunk tasks on the scheduler
(root-ish) instead of assigning them all to workers up front, and the sum nodes run
as their inputs finish. This needs the sum nodes in a task group of their own."""

from __future__ import annotations

import time

import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin

from streamem.dist.graph import map_chunks, tree_sum
from streamem.dist.iteration import run_chunks

ITEM_BYTES = 256 * 2**20  # as big as box-128 statistics: a fan-in of 2


class _HeldChunks(SchedulerPlugin):
    """Most chunk results in memory at once, and most chunk tasks ever queued on the
    scheduler (not yet given to a worker)."""

    name = "held-chunks"

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.held = 0
        self.max_held = 0
        self.max_queued = 0

    def start(self, scheduler) -> None:
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if not str(key).startswith(self.prefix):
            return
        if finish == "memory":
            self.held += 1
        elif start == "memory":
            self.held -= 1
        self.max_held = max(self.max_held, self.held)
        self.max_queued = max(self.max_queued, len(self.scheduler.queued))


def _counts(dask_scheduler) -> tuple[int, int]:
    plugin = dask_scheduler.plugins[_HeldChunks.name]
    return plugin.max_held, plugin.max_queued


def _chunk(start: int, stop: int, model: dict) -> np.ndarray:
    time.sleep(0.02)
    return np.full(1000, float(start) * model["scale"])


@pytest.mark.parametrize("n_chunks", [24, 96])
def test_chunk_results_held_do_not_grow_with_the_number_of_chunks(n_chunks):
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(_HeldChunks("refine3d-estep-it001-"))
        total = run_chunks(
            _chunk,
            [(i, i + 1) for i in range(n_chunks)],
            shared={"scale": 2.0},
            client=client,
            item_bytes=ITEM_BYTES,
            name="refine3d-estep-it001",
        )
        # the scheduler's copy (the client sends the plugin, even in-process)
        max_held, max_queued = client.run_on_scheduler(_counts)
    assert total[0] == 2.0 * sum(range(n_chunks))
    assert max_queued > n_chunks // 2, "chunk tasks were handed to workers up front"
    # two threads, fan-in 2: a few leaves waiting for their sibling; not a share of N
    assert 2 <= max_held <= 6, max_held


def test_tree_sum_refuses_a_name_in_the_parts_task_group():
    parts = map_chunks(_chunk, [(0, 1), (1, 2)], {"scale": 1.0}, name="refine3d-estep-it001")
    # the name run_chunks used to give: key_split puts the sums among the chunks
    with pytest.raises(ValueError, match="task group"):
        tree_sum(parts, 2, name="refine3d-estep-it001-sum")
    assert tree_sum(parts, 2, name="statistics-sum-refine3d-estep-it001").compute()[0] == 1.0
