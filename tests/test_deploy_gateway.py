"""deployments/gateway and ``--gateway``: jobs through a real dask-gateway server.

The module fixture starts ``dask-gateway-server`` with deployments/gateway's config
(its local backend, the simple authenticator with a password) on 127.0.0.1; the
tests create clusters with options through it, run a small reconstruct and check
the map, the workers' environment, TLS, the one-line refusals and that every cluster
is shut down at the end.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dask_gateway")
pytest.importorskip("dask_gateway_server.backends.local")  # needs the [local] extra (sqlalchemy)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "deployments" / "gateway" / "dask_gateway_config.py"
BOX, PIXEL, N = 24, 4.0, 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """(url, password) of a running dask-gateway server on loopback; stopped at the end."""
    root = tmp_path_factory.mktemp("gateway")
    url = f"http://127.0.0.1:{_free_port()}"
    password = secrets.token_hex(8)
    env = dict(
        os.environ,
        STREAMEM_GATEWAY_ADDRESS=url.removeprefix("http://"),
        STREAMEM_GATEWAY_PASSWORD=password,
        STREAMEM_GATEWAY_MAX_CORES="2",
    )
    server = [sys.executable, "-m", "dask_gateway_server", "-f", str(CONFIG)]
    log = open(root / "server.log", "wb")  # noqa: SIM115 (open while the server runs)
    proc = subprocess.Popen(server, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(
                f"dask-gateway-server did not start:\n{(root / 'server.log').read_text()[-3000:]}"
            )
        time.sleep(0.3)
    yield url, password
    proc.terminate()  # an in-memory database: the server stops its clusters on the way out
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def auth(gateway):
    """dask-gateway's credentials in the Dask config, as a user would set them."""
    import dask

    url, password = gateway
    with dask.config.set(
        {"gateway.auth.type": "basic", "gateway.auth.kwargs": {"password": password}}
    ):
        yield url


def _clusters(url: str) -> list:
    from dask_gateway import Gateway

    from streamem.dist.gateway import close_gateway

    gw = Gateway(url)
    try:
        return gw.list_clusters()
    finally:
        close_gateway(gw)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from streamem.simulate.particles import simulate_particles

    root = tmp_path_factory.mktemp("gateway-data")
    s = simulate_particles(
        root / "p.zarr", N, box_size=BOX, pixel_size_A=PIXEL, snr=0.5, seed=5, chunk_size=50
    )
    return Path(s.path)


def test_reconstruct_through_the_gateway_equals_local(auth, store, tmp_path):
    """``streamem reconstruct --gateway URL`` with options: the local map, then no cluster left."""
    from streamem.cli import main
    from streamem.core.fsc import fsc
    from streamem.io.mrc import read_map

    base = ["reconstruct", str(store), "--truth"]
    assert main(base + ["--out", str(tmp_path / "local.mrc"), "--no-cluster"]) == 0
    gw = ["--gateway", auth, "--gateway-option", "worker_cores=1", "--gateway-workers", "2"]
    assert main(base + ["--out", str(tmp_path / "gw.mrc")] + gw) == 0
    local, gw_map = read_map(tmp_path / "local.mrc")[0], read_map(tmp_path / "gw.mrc")[0]
    assert np.min(fsc(local, gw_map)[1 : BOX // 2]) > 0.999
    np.testing.assert_allclose(gw_map, local, rtol=1e-4, atol=1e-5 * np.abs(local).max())
    assert _clusters(auth) == []  # shut down at the end


def test_gateway_cluster_is_tls_with_streamems_worker_environment(auth):
    """Options reach the cluster, adapt MIN:MAX works, TLS only, the malloc/BLAS settings."""
    sys.path.insert(0, str(REPO / "deployments" / "slurm"))
    try:
        from launch import WORKER_ENV
    finally:
        sys.path.pop(0)
    from streamem.dist.gateway import gateway_client

    with gateway_client(auth, ["worker_cores=1", "worker_memory_GiB=1.5"], "1:2") as client:
        info = client.scheduler_info()
        assert info["address"].startswith("tls://")
        (worker,) = info["workers"].values()
        assert worker["nthreads"] == 1 and worker["memory_limit"] == int(1.5 * 2**30)
        env = next(iter(client.run(lambda: {k: os.environ.get(k) for k in WORKER_ENV}).values()))
        assert env == WORKER_ENV
        assert len(_clusters(auth)) == 1
    assert _clusters(auth) == []


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--gateway-option", "worker_cores=9"], "--gateway-option worker_cores=9: refused"),
        (["--gateway-option", "gpus=1"], "not one of the gateway's options (worker_cores=1"),
        (["--gateway-option", "list"], "cluster options: worker_cores=1, worker_memory_GiB=2.0"),
        (["--gateway-workers", "3:1"], "--gateway-workers 3:1: need N >= 1"),
        (["--no-cluster"], "give --gateway or --no-cluster, not both"),
    ],
)
def test_bad_gateway_options_are_one_line(auth, store, tmp_path, capsys, extra, expected):
    from streamem.cli import main

    args = [
        "reconstruct",
        str(store),
        "--truth",
        "--out",
        str(tmp_path / "m.mrc"),
        "--gateway",
        auth,
    ]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.mrc").exists()
    assert _clusters(auth) == []


def test_wrong_password_is_refused_in_one_line(gateway, store, tmp_path, capsys):
    import dask

    from streamem.cli import main

    url, _ = gateway
    args = [
        "reconstruct",
        str(store),
        "--truth",
        "--out",
        str(tmp_path / "m.mrc"),
        "--gateway",
        url,
    ]
    with dask.config.set({"gateway.auth.type": "basic", "gateway.auth.kwargs": {"password": "no"}}):
        assert main(args) == 2
    err = capsys.readouterr().err
    assert "the gateway refused the credentials (HTTP 401)" in err
    assert len(err.strip().splitlines()) == 1, err
