"""3D auto-refine on small simulated data: accuracy against the truth, RELION outputs,
resume, invariance to chunking and workers, and a worker lost mid-iteration."""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import starfile

from streamem.api import angular_errors_deg, oracle
from streamem.core.filters import lowpass
from streamem.core.fsc import fsc
from streamem.em.refine import RefineOptions, refine3d
from streamem.io.mrc import read_map
from streamem.simulate.particles import simulate_particles, truth_volume_paths

BOX, PIXEL, N = 32, 4.0, 400
FAST = RefineOptions(max_iterations=3, healpix_order=1, offset_range_px=3.0, offset_step_px=1.5)


def _simulate(path, chunk_size):
    return simulate_particles(
        path,
        N,
        box_size=BOX,
        pixel_size_A=PIXEL,
        snr=0.2,
        seed=7,
        chunk_size=chunk_size,
        max_shift_A=4.0,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine")
    store = _simulate(root / "p.zarr", 100)
    truth, _ = read_map(truth_volume_paths(store.path)[0])
    return root, store, lowpass(truth, 30.0, PIXEL)


@pytest.fixture(scope="module")
def reference_run(data):
    root, store, ref = data
    return refine3d(store, ref, root / "run", FAST)


def test_refinement_approaches_the_oracle(data, reference_run):
    root, store, _ = data
    result = reference_run
    _, _, oracle_res = oracle(store)
    assert result.resolution_A <= 1.25 * oracle_res, (result.resolution_A, oracle_res)
    errors = angular_errors_deg(store, result.poses)
    assert np.median(errors) < 15.0  # the fine step of order 1 + 1 is 15°


def test_relion_outputs(data, reference_run):
    out = reference_run.out_dir
    for name in (
        "run_class001.mrc",
        "run_half1_class001_unfil.mrc",
        "run_half2_class001_unfil.mrc",
        "run_data.star",
        "run_model.star",
        "run_fsc.png",
        "run_it001_data.star",
    ):
        assert (out / name).exists(), name
    vol, voxel = read_map(out / "run_class001.mrc")
    assert vol.shape == (BOX,) * 3 and voxel == pytest.approx(PIXEL)
    star = starfile.read(out / "run_data.star", always_dict=True)
    particles = star["particles"]
    assert len(particles) == N
    for col in (
        "rlnAngleRot",
        "rlnAngleTilt",
        "rlnAnglePsi",
        "rlnOriginXAngst",
        "rlnOriginYAngst",
        "rlnRandomSubset",
    ):
        assert col in particles.columns
    model = starfile.read(out / "run_model.star", always_dict=True)
    assert "rlnGoldStandardFsc" in model["model_class_1"].columns
    assert float(model["model_general"]["rlnCurrentResolution"].iloc[0]) == pytest.approx(
        reference_run.resolution_A
    )


def test_continue_ends_at_the_same_result(data, reference_run, tmp_path):
    root, store, ref = data
    out = tmp_path / "run"
    refine3d(store, ref, out, FAST, stop_after_iteration=2)
    assert not (out / "run_class001.mrc").exists()
    resumed = refine3d(store, ref, out, FAST, continue_run=True)
    np.testing.assert_allclose(
        resumed.map, reference_run.map, atol=1e-5 * np.abs(reference_run.map).max()
    )


def test_chunk_size_does_not_change_the_result(data, reference_run, tmp_path):
    root, store, ref = data
    other = _simulate(tmp_path / "p64.zarr", 64)
    np.testing.assert_array_equal(other.read_chunk(0, N).images, store.read_chunk(0, N).images)
    result = refine3d(other, ref, tmp_path / "run", FAST)
    assert fsc(result.map, reference_run.map)[1:].min() > 0.999


def test_workers_and_a_lost_worker_do_not_change_the_result(data, reference_run, tmp_path):
    from distributed import Client, LocalCluster

    root, store, ref = data
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        killed = []
        pids = client.run(os.getpid)  # worker address -> process id

        def kill_one_worker_during_estep():
            deadline = time.time() + 120
            while time.time() < deadline and not killed:
                processing = client.processing()
                for addr, keys in processing.items():
                    if any("estep" in str(k) for k in keys):
                        os.kill(pids[addr], signal.SIGKILL)
                        killed.append(addr)
                        return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_one_worker_during_estep, daemon=True)
        killer.start()
        result = refine3d(store, ref, tmp_path / "run", FAST, client=client)
        killer.join()
    assert killed, "no E-step task was seen running"
    assert fsc(result.map, reference_run.map)[1:].min() > 0.999
    state = json.loads(sorted((tmp_path / "run").glob("run_it*_optimiser.json"))[-1].read_text())
    assert state["iteration"] == reference_run.iterations


def test_tasks_cut_from_chunks_do_not_change_the_result(data, reference_run, tmp_path, monkeypatch):
    """A store of few chunks runs each E-step as equal parts of its chunks (here 8 tasks
    of 50 from 4 chunks of 100): every particle gets its result, and the map is the
    reference run's."""
    import zarr

    from streamem.em import engine

    root, store, ref = data
    monkeypatch.setattr(engine, "MIN_TASK_PARTICLES", 16)
    assert engine.estep_task_size(store) == 50
    seen = []
    run_chunks = engine.run_chunks

    def spy(fn, bounds, *args, **kwargs):
        seen.append(list(bounds))
        return run_chunks(fn, bounds, *args, **kwargs)

    monkeypatch.setattr(engine, "run_chunks", spy)
    result = refine3d(store, ref, tmp_path / "run", FAST)
    assert seen and all(b == [(s, s + 50) for s in range(0, N, 50)] for b in seen)
    assert fsc(result.map, reference_run.map)[1:].min() > 0.999
    results = zarr.open_group(str(tmp_path / "run" / "particles.zarr"), mode="r")
    last = results[f"it{result.iterations:03d}"]
    assert last["rlnAngleRot"].chunks == (50,)
    assert np.isfinite(last["rlnAngleRot"][:]).all()
