"""The E-steps work through a chunk in sub-batches sized to a memory budget.

Sub-batching must not change the result: every image's posterior is computed from
the same numbers whatever the sub-batch, so the per-particle results are identical,
and the statistics differ only by the order of the sums inside a task (the
accumulators are float32, the other sums float64). The tolerance is therefore a few
float32 units in the last place of the largest value (1e-6 relative to the array's
largest magnitude); the same bound holds between single- and double-precision
accumulators. class2d's statistics stay float64,
but its cross terms are one float32 GEMM over the sub-batch's rows, whose rounding
depends on how BLAS blocks the rows: its posteriors and sums agree to float32
rounding (1e-5 relative) and its poses and classes exactly.
"""

from dataclasses import replace

import numpy as np
import pytest
from _estep_data import POSES as POSE_LABELS
from _estep_data import refine_model, simulated_chunk, two_class_model

from streamem.cli import main
from streamem.em import memory, mstep
from streamem.em.classify2d import Class2DModel, class2d_batch_size, expectation_2d
from streamem.em.estep import batch_size, estep_shape, expectation
from streamem.em.fourier_points import half_plane_points
from streamem.errors import InputError
from streamem.io.mrc import write_map
from streamem.io.store import optics_params
from streamem.simulate.particles import simulate_particles

BOX, PIXEL, N = 24, 4.5, 48
POSE_FIELDS = ("rot", "tilt", "psi", "origin_x_A", "origin_y_A", "n_significant", "class_number")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    store, chunk, metadata, truth = simulated_chunk(  # previous poses: the true ones
        tmp_path_factory.mktemp("batching"), N, box=BOX, pixel_size_A=PIXEL, snr=1.0, seed=5
    )
    return store, chunk.images, metadata, truth


def _model(store, images, truth, local_sigma_deg=None):
    return refine_model(
        store,
        images,
        truth,
        box=BOX,
        pixel_size_A=PIXEL,
        healpix_order=1 if local_sigma_deg is None else 2,
        local_sigma_deg=local_sigma_deg,
        flipped_half2=False,
    )


def _memory_for(shape, n_batch: int, resident: int) -> int:
    """--memory-per-worker that gives sub-batches of ``n_batch`` images here."""
    peak = memory.peak_bytes(memory.estep_stage_bytes(shape, n_batch))
    return int(memory.local_threads() * (resident + peak + 1) / memory.WORKSPACE_FRACTION)


def _assert_same(one, sub, stats_rtol=1e-6, score_rtol=1e-7):
    """The same poses; posteriors within ``score_rtol`` (log-likelihoods) and
    ``stats_rtol`` (max_prob, at least 1e-6, and the statistics, of the largest)."""
    (s1, r1), (s2, r2) = one, sub
    for f in POSE_FIELDS:
        np.testing.assert_array_equal(getattr(r1, f), getattr(r2, f), err_msg=f)
    np.testing.assert_allclose(r2.max_prob, r1.max_prob, rtol=max(stats_rtol, 1e-6))
    np.testing.assert_allclose(r2.loglik, r1.loglik, rtol=score_rtol)
    for name in ("data_acc", "weight_acc", "noise_power", "noise_count", "class_weight"):
        a, b = getattr(s1, name), getattr(s2, name)
        np.testing.assert_allclose(b, a, rtol=0, atol=stats_rtol * np.abs(a).max(), err_msg=name)
    for name in ("offset_sq_A2", "weight_sum", "loglik_sum"):
        assert getattr(s2, name) == pytest.approx(getattr(s1, name), rel=max(1e-12, stats_rtol))


def _sub_batched(model, shape, images, metadata, accumulators, n_batch=N // 4):
    resident = memory.resident_bytes(N, BOX, accumulators, 1)
    resident += sum(p.data.nbytes for p in model.projectors)
    sub = replace(model, memory_per_worker_bytes=_memory_for(shape, n_batch, resident))
    batch, _ = batch_size(sub, shape, N, accumulators)
    if not 1 < batch < N:  # a setup check, not the test: the chunk must really be split
        pytest.fail(
            f"the budget gives sub-batches of {batch} of {N} images; the test needs a split"
        )
    return sub


@pytest.mark.parametrize("local_sigma_deg", [None, 11.25])
def test_refine3d_sub_batches_give_the_statistics_of_one_batch(data, local_sigma_deg):
    store, images, metadata, truth = data
    model = _model(store, images, truth, local_sigma_deg)
    one = expectation(images, metadata, model)
    coords, _, _ = half_plane_points(BOX, model.max_radius_px)
    previous = np.stack([metadata[k] for k in POSE_LABELS[:3]], axis=1)
    shape = estep_shape(model, coords, previous)
    assert batch_size(model, shape, N, one[0].data_acc.size)[0] == N  # plenty: one batch
    sub = _sub_batched(model, shape, images, metadata, one[0].data_acc.size)
    _assert_same(one, expectation(images, metadata, sub))


def test_single_precision_accumulators_give_the_double_precision_statistics(data, monkeypatch):
    """The E-step's float32 accumulators: the poses are the same (they do not depend
    on the sums) and the statistics those of float64 accumulators to 2e-6 of the
    largest voxel."""
    from streamem.em import estep
    from streamem.em.statistics import SufficientStatistics

    store, images, metadata, truth = data
    model = _model(store, images, truth, 11.25)
    single = expectation(images, metadata, model)
    assert single[0].data_acc.dtype == np.complex64
    empty = SufficientStatistics.empty
    monkeypatch.setattr(
        estep.SufficientStatistics,
        "empty",
        lambda *a, single=False: empty(*a, single=False),
    )
    double = expectation(images, metadata, model)
    _assert_same(double, single, stats_rtol=2e-6)


def test_class3d_sub_batches_give_the_statistics_of_one_batch(data):
    store, images, metadata, truth = data
    model = two_class_model(_model(store, images, truth), truth, log_class_prior=np.log([0.5, 0.5]))
    one = expectation(images, metadata, model)
    coords, _, _ = half_plane_points(BOX, model.max_radius_px)
    shape = estep_shape(model, coords, None)
    sub = _sub_batched(model, shape, images, metadata, one[0].data_acc.size)
    _assert_same(one, expectation(images, metadata, sub))


def test_class2d_sub_batches_give_the_statistics_of_one_batch(data):
    store, images, metadata, truth = data
    power = mstep.image_power(images, np.zeros(N, int), 1)
    classes = np.stack([images[:8].mean(axis=0), images[8:16].mean(axis=0)]).astype(np.float32)
    model = Class2DModel(
        class_images=classes,
        log_class_prior=np.log([0.5, 0.5]),
        psi_deg=np.arange(0, 360, 30.0),
        box_size=BOX,
        pixel_size_A=PIXEL,
        max_radius_px=BOX // 2 - 1,
        inv_sigma2=mstep.initial_inv_sigma2(power[0], power[1]),
        optics=(optics_params(store.optics_groups[0]),),
        sigma_offset_A=PIXEL,
        offset_range_px=2,
        offset_step_px=1,
        scale_free=True,
    )
    one = expectation_2d(images, metadata, model)
    M = half_plane_points(BOX, model.max_radius_px)[0].shape[0]
    J, T = 2 * 12, 13
    resident = N * BOX * BOX * 4 + memory.class2d_fixed_bytes(M, J) + classes.nbytes
    peak = memory.peak_bytes(memory.class2d_stage_bytes(M, J, T, N // 4))
    mem = int(memory.local_threads() * (resident + peak + 1) / memory.WORKSPACE_FRACTION)
    sub = replace(model, memory_per_worker_bytes=mem)
    batch = class2d_batch_size(sub, N, M, J, T)
    if not 1 < batch < N:  # a setup check, not the test: the chunk must really be split
        pytest.fail(
            f"the budget gives sub-batches of {batch} of {N} images; the test needs a split"
        )
    _assert_same(one, expectation_2d(images, metadata, sub), stats_rtol=1e-5)


def test_estimate_grows_with_images_and_bounds_the_measured_peak(data):
    """The estimate is linear in images per stage and an upper bound of what the E-step
    allocates (traced by tracemalloc: NumPy reports its buffers), within a factor 4."""
    import tracemalloc

    store, images, metadata, truth = data
    model = _model(store, images, truth)
    coords, _, _ = half_plane_points(BOX, model.max_radius_px)
    shape = estep_shape(model, coords, None)
    a, b = memory.estep_stage_bytes(shape, 10), memory.estep_stage_bytes(shape, 20)
    assert all(b[k] > a[k] for k in ("prepare", "coarse", "significance"))
    n = 12
    part = {k: v[:n] for k, v in metadata.items()}
    stats, _ = expectation(images[:n], part, model)  # warm the caches (coarse slices)
    tracemalloc.start()
    try:
        expectation(images[:n], part, model)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    estimate = memory.peak_bytes(memory.estep_stage_bytes(shape, n))
    estimate += memory.resident_bytes(n, BOX, stats.data_acc.size, 1)
    assert peak <= estimate <= 4 * peak


def test_a_box_too_big_for_the_budget_is_refused_with_the_estimate(data):
    store, images, metadata, truth = data
    model = replace(_model(store, images, truth), memory_per_worker_bytes=2**20)
    with pytest.raises(InputError, match=r"MiB.*--memory-per-worker"):
        expectation(images, metadata, model)


def test_cli_refuses_before_iteration_1(data, tmp_path, capsys):
    store, images, metadata, truth = data
    ref = tmp_path / "ref.mrc"
    write_map(ref, truth, PIXEL)
    out = tmp_path / "run"
    args = ["refine3d", str(store.path), "--ref", str(ref), "--out", str(out), "--no-cluster"]
    assert main([*args, "--memory-per-worker", "3MB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "final iteration needs" in err[0] and "MiB" in err[0]
    assert not list(out.glob("run_it001*"))  # nothing of iteration 1 written
    assert main([*args, "--memory-per-worker", "lots"]) == 2
    assert "not a size" in capsys.readouterr().err


def test_split_every_is_lowered_for_big_statistics():
    from streamem.dist.graph import split_every_for

    assert split_every_for(10 * 2**20) == 8
    assert split_every_for(106 * 10**6) == 2  # refine3d at box 128 (packed statistics)
    assert split_every_for(2 * 2**30) == 2


def test_a_worker_killed_mid_iteration_stops_the_run_with_one_line(tmp_path):
    """A task that kills its worker process (as the kernel's OOM killer would) gives
    distributed's KilledWorker; run_estep turns it into one line naming the iteration."""
    import os

    import dask

    from streamem.dist.cluster import client_for
    from streamem.em.engine import run_estep
    from streamem.io.results import create_results_arrays

    store = simulate_particles(tmp_path / "p.zarr", 8, box_size=16, pixel_size_A=4.0, seed=1)
    create_results_arrays(tmp_path / "particles.zarr", 3, 8, store.chunk_size)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with client_for(n_workers=1) as client:
            with pytest.raises(InputError) as err:
                run_estep(
                    store,
                    tmp_path / "particles.zarr",
                    3,
                    4,
                    {"small": "model"},
                    client,
                    lambda images, metadata, model: os._exit(1),
                )
    line = err.value.one_line()
    assert "iteration 4" in line and "--continue" in line and "after iteration 3" in line
    assert "\n" not in line


def test_the_chunks_images_count_against_the_workspace_cap():
    """A task's images + workspace stay within the cap whatever the chunk size (so
    its peak does not grow with it), down to a floor of a quarter of the cap."""
    from streamem.em import memory

    cap, plenty = memory.MAX_WORKSPACE_BYTES, 64 * 2**30
    image = 128 * 128 * 4
    for n in (256, 1024, 4096):
        budget = memory.workspace_budget_bytes(plenty, 0, chunk_images_bytes=n * image)
        assert budget + n * image == cap
    huge = memory.workspace_budget_bytes(plenty, 0, chunk_images_bytes=100 * cap)
    assert huge == cap // 4
    tight = memory.workspace_budget_bytes(2**30, 400 * 2**20, chunk_images_bytes=16 * 2**20)
    assert tight == int(0.5 * 2**30 - 400 * 2**20)  # the thread's share binds first


@pytest.mark.parametrize("prepass", [False, True])
def test_the_points_order_leaves_the_e_step_unchanged(data, monkeypatch, prepass):
    """The E-step takes its points in raster order within the bands its coarse passes
    cut at (the slice kernels' order); in plain radius order (any prefix) the poses are
    the same, and the scores and statistics agree to single-precision rounding: the
    float32 GEMMs and insertions sum in another order (measured here: max_prob 9e-6,
    log-likelihood 1e-7, accumulators 3e-6 of the largest voxel)."""
    from streamem.em import estep
    from streamem.em.coarse_pass import coarse_cuts

    store, images, metadata, truth = data
    model = _model(store, images, truth, 11.25)
    model = replace(model, grid=replace(model.grid, local_prepass=prepass))
    cuts = coarse_cuts(model)
    assert len(cuts) == (2 if prepass else 1)
    coords, _, _ = half_plane_points(BOX, model.max_radius_px, cuts=cuts)
    sorted_coords, _, _ = half_plane_points(BOX, model.max_radius_px)
    assert not np.array_equal(coords, sorted_coords)  # the orders do differ here
    banded = expectation(images, metadata, model)
    plain = half_plane_points
    monkeypatch.setattr(estep, "half_plane_points", lambda B, r, cuts=None: plain(B, r))
    _assert_same(expectation(images, metadata, model), banded, stats_rtol=3e-5, score_rtol=1e-6)
