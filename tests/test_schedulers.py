"""``--scheduler`` and the cluster options, through the real CLI, against real peers.

Unreachable, malformed or silent schedulers, garbage scheduler files and bad worker
counts give one line on stderr and exit 2 within the ``--scheduler-timeout`` deadline
(plus a few seconds), and write nothing. A real ``dask scheduler`` + ``dask worker``
(subprocesses on 127.0.0.1) runs ``reconstruct --truth``: through a scheduler file
that appears 2 s after the job started, and with relative paths while the worker
runs in another working folder (reconstruct, then export and import on that cluster).
simulate, simulate-micrographs, pick, extract and info --verify run on such a cluster
with the results of a threaded run; each command's --scheduler-timeout bounds a silent
peer; demo refuses an unreachable scheduler before creating its folder.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from streamem.bench.chaos import stop_processes
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


stop = stop_processes  # the process groups these tests start


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


# -- every command that runs Dask work, on a real cluster -------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler file of a real ``dask scheduler`` + one ``dask worker`` whose working
    folder is elsewhere (relative task paths would resolve there)."""
    root = tmp_path_factory.mktemp("cluster")
    f, elsewhere = root / "scheduler.json", root / "elsewhere"
    elsewhere.mkdir()
    procs = [start_scheduler(f, elsewhere)]
    try:
        procs.append(start_worker(f, elsewhere))
        wait_for_workers(f)
        yield f
    finally:
        stop(*procs)
    assert list(elsewhere.iterdir()) == []  # nothing was written in the worker's folder


def test_simulate_on_the_cluster_equals_threads(capsys, store, tmp_path, monkeypatch, cluster):
    monkeypatch.chdir(tmp_path)
    argv = ["simulate", "c.zarr", "--n-particles", "40", "--box", "16", "--chunk-size", "20"]
    assert main([*argv, "--seed", "1", "--scheduler", str(cluster)]) == 0, capsys.readouterr()
    got, want = ParticleStore(tmp_path / "c.zarr"), ParticleStore(store)
    np.testing.assert_array_equal(got.read_chunk(0, 40).images, want.read_chunk(0, 40).images)
    for field in ("rlnAngleRot", "rlnClassNumber"):
        np.testing.assert_array_equal(
            got.read_field(field, "truth"), want.read_field(field, "truth")
        )


def test_micrographs_pick_and_extract_on_the_cluster_equal_threads(
    capsys, tmp_path, monkeypatch, cluster
):
    """simulate-micrographs, pick (LoG) and extract: relative paths, on the cluster and on
    threads, give the same files."""
    monkeypatch.chdir(tmp_path)
    sim = ["simulate-micrographs", "--n-micrographs", "2", "--size", "200", "--box", "32"]
    sim += ["--pixel-size", "6", "--particles", "12", "--seed", "4"]
    pick = ["--log", "--log-diameter-min", "80", "--log-diameter-max", "160"]
    for name, where in (("threads", []), ("cluster", ["--scheduler", str(cluster)])):
        assert main([*sim, f"{name}/mics", *where]) == 0, capsys.readouterr().err
        star = f"{name}/mics/micrographs.star"
        assert main(["pick", star, "--out", f"{name}/picks", *pick, *where]) == 0
        assert (
            main(["extract", star, f"{name}/picks", f"{name}/p.zarr", "--box", "32", *where]) == 0
        )
    for mic in ("mic_001.mrc", "mic_002.mrc"):
        a, _ = read_map(tmp_path / "threads" / "mics" / mic)
        b, _ = read_map(tmp_path / "cluster" / "mics" / mic)
        np.testing.assert_array_equal(a, b)
        coords = mic.replace(".mrc", "_autopick.star")
        a, b = (starfile.read(tmp_path / n / "picks" / coords) for n in ("threads", "cluster"))
        pd.testing.assert_frame_equal(a, b)
    a, b = (ParticleStore(tmp_path / n / "p.zarr") for n in ("threads", "cluster"))
    assert a.n_particles == b.n_particles > 0
    np.testing.assert_array_equal(
        a.read_chunk(0, a.n_particles).images, b.read_chunk(0, b.n_particles).images
    )


def test_info_verify_on_the_cluster(capsys, store, cluster):
    assert main(["info", str(store), "--verify", "--scheduler", str(cluster)]) == 0
    assert "verify: all good" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["simulate", "simulate-micrographs", "pick", "extract"])
def test_the_deadline_applies_to_every_command(capsys, tmp_path, silent_peer, command):
    out, sim = tmp_path / "out", tmp_path / "sim"
    if command in ("pick", "extract"):  # one micrograph with its coordinates
        mics = ["simulate-micrographs", str(sim), "--n-micrographs", "1", "--size", "64"]
        assert main([*mics, "--box", "16", "--particles", "2"]) == 0
        capsys.readouterr()
    star, coords = str(sim / "micrographs.star"), str(sim / "coordinates.star")
    argv = {
        "simulate": ["simulate", str(out), "--n-particles", "8", "--box", "16"],
        "simulate-micrographs": ["simulate-micrographs", str(out), "--size", "64", "--box", "16"],
        "pick": ["pick", star, "--out", str(out), "--log", "--log-diameter-min", "20"]
        + ["--log-diameter-max", "40"],
        "extract": ["extract", star, coords, str(out), "--box", "8"],
    }[command]
    scheduler = f"tcp://127.0.0.1:{silent_peer}"
    argv += ["--scheduler", scheduler, "--scheduler-timeout", "2"]
    line = fails_in_one_line(capsys, argv, out, within_s=2 + 5)
    assert f"--scheduler {scheduler}" in line and "no Dask handshake within 2 s" in line


def test_demo_with_an_unreachable_scheduler_fails_at_once(capsys, tmp_path):
    out = tmp_path / "demo"
    line = fails_in_one_line(
        capsys, ["demo", "--out", str(out), "--scheduler", "tcp://127.0.0.1:1"], out, within_s=10
    )
    assert "--scheduler tcp://127.0.0.1:1" in line and "connection refused" in line
