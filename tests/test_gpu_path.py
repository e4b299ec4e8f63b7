"""``--gpu``: one-line refusals, the GPU cluster's options, and the model on the device.

This machine has no GPU and no CuPy, so the GPU path is tested through its CPU logic:
a missing CuPy (``sys.modules["cupy"] = None``), a CuPy that sees no device and a
missing dask-cuda give one stderr line, exit 2 and no output for every ``--gpu``
command; the GPU cluster's keyword arguments are checked (and accepted by the
``LocalCluster`` that ``LocalCUDACluster`` extends); ``model_on_device`` is run with
``array_api_strict`` standing in for CuPy, directly and through the worker plugin on a
real in-process cluster. The last test (marked ``gpu``) runs refine3d's E-step chunk
with CuPy through the plugin and skips where CuPy does not import.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from streamem.cli import main
from streamem.core.ctf import OpticsParams
from streamem.core.projector import FourierVolume, half_cube_shape
from streamem.dist import cluster as cluster_mod
from streamem.dist.device import (
    PLUGIN_NAME,
    DevicePlugin,
    device_namespace,
    device_stats,
    model_on_device,
    to_device,
    use_device,
)
from streamem.em.estep import EStepModel, SearchGrid
from streamem.em.inplane import Class2DModel
from streamem.errors import InputError

xps = pytest.importorskip("array_api_strict")
INSTALL = 'pip install "streamem[gpu]"'


# -- inputs for every --gpu command ------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A 40-particle store (box 16), a reference map and one micrograph STAR file."""
    from streamem.io.mrc import write_map

    d = tmp_path_factory.mktemp("gpu")
    sim = ["simulate", str(d / "store.zarr"), "--n-particles", "40", "--box", "16"]
    assert main([*sim, "--chunk-size", "20", "--seed", "1"]) == 0
    ref = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    write_map(d / "ref.mrc", ref, 3.0)
    mics = ["simulate-micrographs", str(d / "mics"), "--n-micrographs", "1", "--size", "64"]
    assert main([*mics, "--box", "16", "--particles", "2"]) == 0
    return d


def _argv(command: str, d: Path, out: Path) -> list[str]:
    store, ref = str(d / "store.zarr"), str(d / "ref.mrc")
    return {
        "refine3d": ["refine3d", store, "--ref", ref, "--out", str(out)],
        "class3d": ["class3d", store, "--ref", ref, "--k", "2", "--out", str(out)],
        "class2d": ["class2d", store, "--k", "2", "--out", str(out)],
        "reconstruct": ["reconstruct", store, "--truth", "--out", str(out)],
        "pick": ["pick", str(d / "mics" / "micrographs.star"), "--out", str(out), "--log"]
        + ["--log-diameter-min", "20", "--log-diameter-max", "40"],
    }[command] + ["--gpu"]


def _one_line_refusal(capsys, argv: list[str], out: Path) -> str:
    capsys.readouterr()
    rc = main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert rc == 2, lines
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    assert not out.exists()
    return lines[0]


def _fake_cupy(n_devices: int | Exception) -> types.ModuleType:
    """A stand-in ``cupy`` whose runtime reports ``n_devices`` (or raises it)."""

    def count() -> int:
        if isinstance(n_devices, Exception):
            raise n_devices
        return n_devices

    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=count))
    cupy.asarray = xps.asarray  # so that use_device("cupy") can convert, here on the CPU
    return cupy


COMMANDS = ["refine3d", "class3d", "class2d", "reconstruct", "pick"]


@pytest.mark.parametrize("command", COMMANDS)
def test_gpu_without_cupy_is_one_line_and_writes_nothing(
    capsys, inputs, tmp_path, monkeypatch, command
):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    out = tmp_path / ("out.mrc" if command == "reconstruct" else "out")
    line = _one_line_refusal(capsys, _argv(command, inputs, out), out)
    assert "--gpu needs CuPy" in line and INSTALL in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["refine3d", "pick"])
def test_gpu_without_dask_cuda_or_a_device(capsys, inputs, tmp_path, monkeypatch, command):
    out = tmp_path / "out"
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(1))
    monkeypatch.setitem(sys.modules, "dask_cuda", None)
    line = _one_line_refusal(capsys, _argv(command, inputs, out), out)
    assert "--gpu needs dask-cuda" in line and INSTALL in line, line

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(0))
    line = _one_line_refusal(capsys, _argv(command, inputs, out), out)
    assert "--gpu found no visible GPU" in line, line

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(RuntimeError("cudaErrorNoDevice\n  x")))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    line = _one_line_refusal(capsys, _argv(command, inputs, out), out)
    assert "no visible GPU (cudaErrorNoDevice x, CUDA_VISIBLE_DEVICES='')" in line, line


def test_gpu_problem_order_and_no_cluster(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setitem(sys.modules, "dask_cuda", None)
    assert "CuPy" in cluster_mod.gpu_problem()  # CuPy is named first
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(2))
    assert "dask-cuda" in cluster_mod.gpu_problem()
    # threads (--gpu --no-cluster) need no dask-cuda
    assert cluster_mod.gpu_problem(need_dask_cuda=False) is None
    with pytest.raises(InputError, match="needs dask-cuda"):
        cluster_mod.check_gpu()


# -- the GPU cluster's options -----------------------------------------------------------


def test_gpu_cluster_listens_on_localhost_with_the_right_allocator():
    plain = cluster_mod.gpu_cluster_options(2, "4GB", rmm_available=False)
    assert plain["host"] == "127.0.0.1"
    assert plain["dashboard_address"].startswith("127.0.0.1:")
    assert plain["threads_per_worker"] == 2 and plain["memory_limit"] == "4GB"
    assert "n_workers" not in plain  # dask-cuda: one worker per visible GPU
    assert not any(k.startswith("rmm") for k in plain)  # CuPy's own pool
    pooled = cluster_mod.gpu_cluster_options(rmm_available=True)
    assert pooled["rmm_pool_size"] == cluster_mod.RMM_POOL_FRACTION
    assert pooled["rmm_allocator_external_lib_list"] == ["cupy"]


def test_gpu_cluster_options_are_valid_local_cluster_options():
    """LocalCUDACluster passes them to LocalCluster: its dashboard is then on 127.0.0.1."""
    from distributed import Client, LocalCluster

    options = cluster_mod.gpu_cluster_options(rmm_available=False)
    # in-process workers over TCP (dask-cuda's are processes; the host is the same)
    with (
        LocalCluster(n_workers=1, processes=False, protocol="tcp", **options) as lc,
        Client(lc) as client,
    ):
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        assert lc.scheduler_address.startswith("tcp://127.0.0.1:")


# -- model_on_device ---------------------------------------------------------------------


def _estep_model(seed: int = 0) -> EStepModel:
    B = 16
    shape = half_cube_shape(8)
    rng = np.random.default_rng(seed)
    cube = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    model = EStepModel(
        projectors=(FourierVolume(cube, B), FourierVolume(cube.copy(), B)),
        box_size=B,
        work_box=B,
        pixel_size_A=3.0,
        max_radius_px=4.0,
        inv_sigma2=rng.uniform(0.5, 2, (1, B // 2 + 1)),
        optics=(OpticsParams(),),
        sigma_offset_A=3.0,
        grid=SearchGrid(),
    )
    model.coarse["refs"] = rng.normal(size=(3, 5)).astype(np.float32)  # a filled cache
    return model


def _class2d_model() -> Class2DModel:
    rng = np.random.default_rng(1)
    K, B = 3, 16
    return Class2DModel(
        class_images=rng.normal(size=(K, B, B)).astype(np.float32),
        log_class_prior=np.log(np.full(K, 1 / K)),
        psi_deg=np.arange(0.0, 360.0, 30.0),
        box_size=B,
        pixel_size_A=3.0,
        max_radius_px=6.0,
        inv_sigma2=np.ones((1, B // 2 + 1)),
        optics=(OpticsParams(),),
        sigma_offset_A=3.0,
        offset_range_px=2.0,
        offset_step_px=1.0,
    )


def _arrays(value, path="model"):
    """(path, array) of every array inside ``value`` (dataclasses, tuples, lists, dicts)."""
    if isinstance(value, np.ndarray) or type(value).__module__.startswith("array_api_strict"):
        yield path, value
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _arrays(getattr(value, f.name), f"{path}.{f.name}")
    elif isinstance(value, tuple | list):
        for i, v in enumerate(value):
            yield from _arrays(v, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _arrays(v, f"{path}[{k!r}]")


@pytest.mark.parametrize("make", [_estep_model, _class2d_model])
def test_every_array_goes_to_the_device_and_the_host_model_is_untouched(make):
    host = make()
    before = {p: a.copy() for p, a in _arrays(host)}
    assert all(isinstance(a, np.ndarray) for a in before.values())
    device = to_device(host, xps)
    on_device = dict(_arrays(device))
    assert on_device.keys() == before.keys()  # every array field, at every depth
    kept = {f"model.{name}" for name in getattr(type(host), "host_fields", ())}
    assert len(kept) < len(before)  # the E-step's namespace comes from the device arrays
    for path, a in on_device.items():
        if path in kept:  # the model's own choice (host_fields)
            assert a is getattr(host, path.removeprefix("model.")), path
            continue
        assert not isinstance(a, np.ndarray), path
        np.testing.assert_array_equal(np.asarray(a), before[path], err_msg=path)
    for path, a in _arrays(host):  # the host model still holds the same NumPy arrays
        assert isinstance(a, np.ndarray), path
        np.testing.assert_array_equal(a, before[path], err_msg=path)
    assert type(device) is type(host)
    # scalars and small parameter objects are shared, not copied
    assert device.optics is host.optics and device.pixel_size_A == host.pixel_size_A
    if isinstance(host, EStepModel):
        assert device.grid is host.grid  # no arrays in it today
        assert device.coarse is not host.coarse  # the device's cache is its own


def test_host_fields_stay_on_the_host():
    @dataclasses.dataclass(frozen=True)
    class Model:
        host_fields: ClassVar[tuple[str, ...]] = ("index",)
        weights: np.ndarray
        index: np.ndarray

    host = Model(np.ones(3), np.arange(3))
    device = to_device(host, xps)
    assert not isinstance(device.weights, np.ndarray)
    assert device.index is host.index


def test_explicit_namespace_is_cached_per_model():
    a, b = _class2d_model(), _class2d_model()
    da = model_on_device(a, xps)
    assert model_on_device(a, xps) is da  # same model: served from the cache
    db = model_on_device(b, xps)
    assert db is not da and model_on_device(b, xps) is db
    assert model_on_device(a, xps) is not da  # one entry: a's copy was dropped for b's


def test_without_a_device_the_model_is_unchanged():
    model = _estep_model()
    assert device_namespace() is None
    assert model_on_device(model) is model


def _probe(model):
    """Task: what model_on_device gives on this worker."""
    device = model_on_device(model)
    return {
        "converted": device is not model,
        "data_type": type(device.projectors[0].data).__module__.split(".")[0],
        "device_id": id(device),
        "stats": device_stats(),
    }


def test_worker_plugin_converts_once_per_worker_and_model():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        ) as lc,
        Client(lc) as client,
    ):
        model = client.scatter(_estep_model(), broadcast=True)
        # a CPU worker (no plugin): unchanged
        cpu = client.submit(_probe, model, pure=False).result()
        assert not cpu["converted"] and cpu["data_type"] == "numpy" and cpu["stats"] is None

        client.register_plugin(DevicePlugin("array_api_strict"))
        first = client.submit(_probe, model, pure=False).result()
        assert first["converted"] and first["data_type"] == "array_api_strict"
        assert first["stats"] == {"namespace": "array_api_strict", "conversions": 1, "hits": 0}
        second = client.submit(_probe, model, pure=False).result()
        assert second["device_id"] == first["device_id"]  # from the worker's cache
        assert second["stats"]["conversions"] == 1 and second["stats"]["hits"] == 1

        # the next iteration's model: converted once more, the old copy dropped
        newer = client.scatter(_estep_model(seed=1), broadcast=True)
        third = client.submit(_probe, newer, pure=False).result()
        assert third["stats"]["conversions"] == 2
        plugin = lc.workers[next(iter(lc.workers))].plugins[PLUGIN_NAME]
        assert plugin.cache._host is newer.result()  # holds only the newest model


def test_a_cluster_without_cupy_refuses_gpu_in_one_line(capsys, inputs, tmp_path, monkeypatch):
    """``--scheduler ADDRESS --gpu``: workers that cannot import CuPy are one line."""
    from distributed import LocalCluster

    monkeypatch.setitem(sys.modules, "cupy", None)
    out = tmp_path / "map.mrc"
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as lc:
        argv = _argv("reconstruct", inputs, out) + ["--scheduler", lc.scheduler_address]
        line = _one_line_refusal(capsys, argv, out)
    assert "the cluster's workers cannot import CuPy" in line, line


def test_threads_with_gpu_compute_on_the_process_device(monkeypatch):
    """``--gpu --no-cluster``: dask's threaded scheduler's tasks see the client's device."""
    import dask

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(1))
    model = _estep_model()
    task = dask.delayed(lambda m: type(model_on_device(m).inv_sigma2).__module__)(model)

    def job(client):
        assert client is None
        return dask.compute(task, scheduler="threads")[0]

    assert cluster_mod.run_with_client(job, use_cluster=False, gpu=True).startswith(
        "array_api_strict"
    )
    assert cluster_mod.run_with_client(job, use_cluster=False, gpu=False) == "numpy"
    with use_device(None):
        assert device_namespace() is None


# -- on a GPU ----------------------------------------------------------------------------


def _estep_on_worker(images, metadata, model):
    from streamem.em.estep import expectation

    return expectation(images, metadata, model_on_device(model))


@pytest.mark.gpu
def test_refine3d_estep_chunk_on_the_gpu_through_the_plugin():
    """A GPU worker (the plugin, CuPy) gives the CPU's poses and statistics."""
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as err:
        pytest.skip(f"no CUDA device: {err}")
    from distributed import Client, LocalCluster
    from test_backprojector import random_rotations
    from test_projector import smooth_volume

    from streamem.core.euler import matrix_to_euler
    from streamem.core.projector import make_projector, project_images
    from streamem.em.estep import expectation

    B, n = 24, 40
    rng = np.random.default_rng(0)
    vol = smooth_volume(B, seed=0).astype(np.float32)
    rot = random_rotations(n, rng)
    images = project_images(make_projector(vol), rot)
    images = (images + rng.normal(0, images.std(), images.shape)).astype(np.float32)
    r, t, p = matrix_to_euler(rot)
    metadata = {"rlnRandomSubset": np.arange(n) % 2 + 1}
    metadata |= {"rlnAngleRot": r, "rlnAngleTilt": t, "rlnAnglePsi": p}
    projector = make_projector(vol)
    model = EStepModel(
        projectors=(projector, projector),
        box_size=B,
        work_box=B,
        pixel_size_A=3.0,
        max_radius_px=B // 2 - 1,
        inv_sigma2=np.ones((1, B // 2 + 1)),
        optics=(OpticsParams(),),
        sigma_offset_A=3.0,
        grid=SearchGrid(healpix_order=2, offset_range_px=2, offset_step_px=1),
        do_ctf=False,
        scale_free=True,
    )
    stats_cpu, res_cpu = expectation(images, metadata, model)
    with (
        LocalCluster(n_workers=1, processes=False, dashboard_address=None) as lc,
        Client(lc) as client,
    ):
        client.register_plugin(DevicePlugin("cupy"))
        shared = client.scatter(model, broadcast=True)
        stats_gpu, res_gpu = client.submit(_estep_on_worker, images, metadata, shared).result()
    assert isinstance(stats_gpu.data_acc, np.ndarray)  # statistics come back to the host
    same = (res_cpu.rot == res_gpu.rot) & (res_cpu.tilt == res_gpu.tilt)
    assert np.mean(same) >= 0.95, np.mean(same)
    a, b = stats_cpu.data_acc, stats_gpu.data_acc
    assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max()
