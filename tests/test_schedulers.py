"""``--scheduler`` and the cluster options, through the real CLI, against real peers.

Unreachable, malformed or silent schedulers, garbage scheduler files and bad worker
counts give one line on stderr and exit 2 within the ``--scheduler-timeout`` deadline
(plus a few seconds), and write nothing. A real ``dask scheduler`` + ``dask worker``
(subprocesses on 127.0.0.1) runs ``reconstruct --truth``: through a scheduler file
that appears 2 s after the job started, and with relative paths while the worker
runs in another working folder (reconstruct, then export and import on that cluster).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from streamem.cli import main
from streamem.io.mrc import read_map
from streamem.io.store import ParticleStore

DASK = str(Path(sys.executable).with_name("dask"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "s.zarr"
    argv = ["simulate", str(path), "--n-particles", "40", "--box", "16", "--chunk-size", "20"]
    assert main([*argv, "--seed", "1"]) == 0
    return path


def fails_in_one_line(capsys, argv: list[str], out: Path, within_s: float) -> str:
    t0 = time.monotonic()
    rc = main(argv)
    seconds = time.monotonic() - t0
    lines = capsys.readouterr().err.splitlines()
    assert rc == 2, lines
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    assert seconds < within_s, seconds
    assert not out.exists()
    return lines[0]


def reconstruct(store: Path, out: Path, *extra: str) -> list[str]:
    return ["reconstruct", str(store), "--truth", "--out", str(out), *extra]


@pytest.fixture
def silent_peer():
    """A TCP server on 127.0.0.1 that accepts connections and never says anything."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_silent_peer_fails_within_the_deadline(capsys, store, tmp_path, silent_peer):
    out = tmp_path / "m.mrc"
    argv = reconstruct(store, out, "--scheduler", f"tcp://127.0.0.1:{silent_peer}")
    line = fails_in_one_line(capsys, [*argv, "--scheduler-timeout", "3"], out, within_s=3 + 4)
    assert f"--scheduler tcp://127.0.0.1:{silent_peer}" in line
    assert "no Dask handshake within 3 s" in line


@pytest.mark.parametrize(
    ("scheduler", "words"),
    [
        ("notaurl", "not a scheduler address"),
        ("tcp://", "no host"),
        ("tcp://127.0.0.1:notaport", "is not HOST:PORT"),
        ("tcp://127.0.0.1:1", "nothing listens at 127.0.0.1:1 (connection refused)"),
        ("tls://127.0.0.1:8786", "a tls:// scheduler needs TLS settings"),
        ("bogus://127.0.0.1:8786", "unknown protocol bogus://"),
    ],
)
def test_bad_addresses_fail_at_once(capsys, store, tmp_path, scheduler, words):
    out = tmp_path / "m.mrc"
    # the default 30 s deadline: none of these may wait for it
    line = fails_in_one_line(capsys, reconstruct(store, out, "--scheduler", scheduler), out, 10)
    assert f"--scheduler {scheduler}" in line
    assert words in line


@pytest.mark.parametrize(
    ("text", "words"),
    [("not json {", "is not JSON"), ('{"id": "Scheduler-1"}', "has no 'address'")],
)
def test_garbage_scheduler_files(capsys, store, tmp_path, text, words):
    f = tmp_path / "scheduler.json"
    f.write_text(text)
    out = tmp_path / "m.mrc"
    line = fails_in_one_line(capsys, reconstruct(store, out, "--scheduler", str(f)), out, 10)
    assert str(f) in line and "not a Dask scheduler file" in line and words in line
    assert f.read_text() == text  # the user's file is untouched


def test_a_scheduler_file_that_never_appears(capsys, store, tmp_path):
    f, out = tmp_path / "later.json", tmp_path / "m.mrc"
    argv = reconstruct(store, out, "--scheduler", str(f), "--scheduler-timeout", "1.5")
    line = fails_in_one_line(capsys, argv, out, within_s=1.5 + 4)
    assert "no scheduler file appeared within 1.5 s" in line
    assert not f.exists()


@pytest.mark.parametrize(
    "option",
    [
        ["--n-workers", "0"],
        ["--n-workers", "-2"],
        ["--threads-per-worker", "0"],
        ["--scheduler-timeout", "0"],
    ],
)
def test_bad_cluster_options_are_refused_before_a_cluster_starts(capsys, store, tmp_path, option):
    out = tmp_path / "m.mrc"
    line = fails_in_one_line(capsys, reconstruct(store, out, *option), out, within_s=5)
    assert option[0] in line and "must be" in line


# -- a real cluster ---------------------------------------------------------------------


def start_scheduler(scheduler_file: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [DASK, "scheduler", "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1"]
        + ["--port", "0", "--dashboard-address", "127.0.0.1:0"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def start_worker(scheduler_file: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [DASK, "worker", "--scheduler-file", str(scheduler_file), "--nworkers", "1"]
        + ["--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def wait_for_workers(scheduler_file: Path, n: int = 1, timeout_s: float = 60) -> None:
    from distributed import Client

    with Client(scheduler_file=str(scheduler_file), timeout="30s") as client:
        client.wait_for_workers(n, timeout=timeout_s)


def test_a_scheduler_file_that_appears_late(capsys, store, tmp_path):
    """The SLURM case: the job starts first, the scheduler writes its file 2 s later."""
    f, out = tmp_path / "cluster" / "scheduler.json", tmp_path / "m.mrc"
    f.parent.mkdir()
    procs: list[subprocess.Popen] = []

    def late_cluster():
        time.sleep(2.0)
        procs.append(start_scheduler(f, tmp_path))
        procs.append(start_worker(f, tmp_path))

    starter = threading.Timer(0, late_cluster)
    starter.start()
    try:
        t0 = time.monotonic()
        rc = main(reconstruct(store, out, "--scheduler", str(f), "--scheduler-timeout", "60"))
        seconds = time.monotonic() - t0
    finally:
        starter.join()
        stop(*procs)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert seconds > 2.0  # it did wait for the file
    volume, _ = read_map(out)
    assert volume.shape == (16, 16, 16) and np.isfinite(volume).all() and volume.std() > 0


def test_relative_paths_mean_the_client_folder_not_the_worker_folder(
    capsys, store, tmp_path, monkeypatch
):
    """The worker runs elsewhere, where a different store has the same relative name."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    (here / "data").mkdir()
    os.symlink(store, here / "data" / "s.zarr")
    decoy = ["simulate", str(elsewhere / "data" / "s.zarr"), "--n-particles", "30", "--box", "16"]
    assert main([*decoy, "--chunk-size", "30", "--seed", "7", "--phantom", "C4"]) == 0
    expected = tmp_path / "expected.mrc"
    assert main(reconstruct(store, expected, "--no-cluster")) == 0

    f = tmp_path / "scheduler.json"
    procs = [start_scheduler(f, elsewhere)]
    try:
        procs.append(start_worker(f, elsewhere))
        wait_for_workers(f)
        monkeypatch.chdir(here)
        rc = main(reconstruct(Path("data/s.zarr"), Path("out/m.mrc"), "--scheduler", str(f)))
        # import and export run their chunk tasks on the cluster too
        rc_export = main(["export", "data/s.zarr", "out/p.star", "--scheduler", str(f)])
        rc_import = main(["import", "out/p.star", "out/back.zarr", "--scheduler", str(f)])
    finally:
        stop(*procs)
    assert (rc, rc_export, rc_import) == (0, 0, 0), capsys.readouterr().err
    assert not (elsewhere / "out").exists()
    back = ParticleStore(here / "out" / "back.zarr").read_chunk(0, 40).images
    np.testing.assert_array_equal(back, ParticleStore(store).read_chunk(0, 40).images)
    assert (here / "out" / "m.mrc").is_file()
    assert not (elsewhere / "out").exists()
    got, _ = read_map(here / "out" / "m.mrc")
    want, _ = read_map(expected)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(np.abs(want).max()))
