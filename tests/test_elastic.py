"""Elastic runs on real ``dask scheduler``/``dask worker`` processes (TLS, loopback).

- The per-iteration model survives the death of the ONLY worker holding it: a
  one-worker cluster, the worker SIGKILLed mid-iteration and a new one started; the
  iteration's sum is exact. (Scattered data would be lost for good here: the reason
  the model is a recomputable task, :mod:`streamem.dist.iteration`.)
- refine3d (box 24, 100 particles, 2 iterations) while workers are added 1 -> 3, one
  is retired gracefully and one SIGKILLed at seeded moments (counted in finished
  E-step tasks) ends with the map of a fixed one-worker cluster, bit for bit (the
  design makes it so: pure tasks, a fixed tree-sum order, one BLAS thread per worker).
- ``--adapt MIN:MAX``: an adaptive local cluster gives the threaded map; bad values
  are one line, exit 2.
"""

from __future__ import annotations

import numpy as np
import pytest

from streamem.bench.chaos import (
    ChaosDriver,
    Event,
    LoopbackCluster,
    compare,
    make_data,
    run_refine,
    seeded_events,
    toy_chunk,
)
from streamem.cli import main
from streamem.dist.cluster import connect_scheduler
from streamem.io.mrc import read_map


def test_the_model_survives_the_death_of_its_only_holder(tmp_path):
    from streamem.dist.iteration import run_chunks

    cluster = LoopbackCluster(tmp_path / "cluster")
    try:
        cluster.add_worker()
        client = connect_scheduler(cluster.address, 60, cluster.security())
        try:
            client.wait_for_workers(1, timeout=60)
            bounds = [(i, i + 10) for i in range(0, 200, 10)]  # 20 tasks of 0.3 s
            model = {"scale": 2.0, "seconds": 0.3, "payload": np.ones(50_000)}  # held by w1 only
            driver = ChaosDriver(cluster, [Event(4, "kill"), Event(4, "add")], seed=0)
            driver.start()
            try:
                total = run_chunks(
                    toy_chunk, bounds, shared=model, client=client, name="toy-estep-it001"
                )
            finally:
                driver.stop()
            assert driver.error is None, driver.error
            assert [action for _, action, _ in driver.log] == ["kill", "add"], driver.log
            assert driver.log[0][2] == "w1"  # the model's only holder died
            assert total == 2.0 * np.arange(200).sum()
        finally:
            client.close()
    finally:
        cluster.close()


def test_refine3d_while_workers_join_retire_and_die_gives_the_fixed_cluster_map(tmp_path):
    iterations = 2
    data = make_data(tmp_path, n_particles=100, box=24, chunk_size=10, iterations=iterations)
    cluster = LoopbackCluster(tmp_path / "cluster")
    try:
        cluster.add_worker()
        client = connect_scheduler(cluster.address, 60, cluster.security())
        try:
            client.wait_for_workers(1, timeout=60)
            want = run_refine(data, tmp_path / "fixed", client, iterations)
            # seeded moments in [1, 18] finished E-step tasks (20 in all)
            events = seeded_events(5, data.n_tasks, ("add", "add", "retire", "kill"))
            driver = ChaosDriver(cluster, events, seed=5)
            driver.start()
            try:
                got = run_refine(data, tmp_path / "chaos", client, iterations)
            finally:
                driver.stop()
        finally:
            client.close()
    finally:
        cluster.close()
    assert driver.error is None, driver.error
    assert [a for _, a, _ in driver.log] == ["add", "add", "retire", "kill"], driver.log
    result = compare(got, want)
    assert result["min_fsc"] > 0.999, result
    assert result["identical"], result  # bit-identical by design (module docstring)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapt") / "s.zarr"
    argv = ["simulate", str(path), "--n-particles", "40", "--box", "16", "--chunk-size", "10"]
    assert main([*argv, "--seed", "1"]) == 0
    return path


def test_an_adaptive_local_cluster_gives_the_threaded_map(capsys, store, tmp_path):
    want, got = tmp_path / "threads.mrc", tmp_path / "adapt.mrc"
    assert main(["reconstruct", str(store), "--truth", "--out", str(want), "--no-cluster"]) == 0
    rc = main(["reconstruct", str(store), "--truth", "--out", str(got), "--adapt", "1:2"])
    assert rc == 0, capsys.readouterr().err
    a, _ = read_map(got)
    b, _ = read_map(want)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--adapt", "0:2"], "1 <= MIN <= MAX"),
        (["--adapt", "3:2"], "1 <= MIN <= MAX"),
        (["--adapt", "two"], "expected MIN:MAX"),
        (["--adapt", "1:2", "--n-workers", "2"], "give --adapt or --n-workers"),
        (["--adapt", "1:2", "--no-cluster"], "give --adapt or --no-cluster"),
    ],
)
def test_bad_adapt_is_one_line(capsys, store, tmp_path, extra, words):
    out = tmp_path / "m.mrc"
    assert main(["reconstruct", str(store), "--truth", "--out", str(out), *extra]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and words in lines[0], lines
    assert not out.exists()
