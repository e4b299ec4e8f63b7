"""Run folders are owned and identified (refine3d/class3d/class2d ``--out``), through the CLI.

One job per folder (a held lock refuses a second one), ``--continue`` only with the
run's store and options (up to the documented safe changes), an unusable newest
checkpoint falls back to the previous one, and a run killed in its first iteration
restarts in the same folder. Every refusal: exit 2, one line, no traceback, the run
folder byte-identical.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamem.cli import main
from streamem.em.refine import RefineOptions, refine3d
from streamem.errors import InputError
from streamem.io import runlock


def _simulate(path: Path, n_particles: int) -> Path:
    argv = ["simulate", str(path), "--n-particles", str(n_particles), "--box", "16"]
    assert main(argv + ["--pixel-size", "5", "--snr", "1", "--seed", "2"]) == 0
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(store of 40 particles, its truth map, a complete 2-iteration refine3d run folder)."""
    root = tmp_path_factory.mktemp("runs")
    store = _simulate(root / "s.zarr", 40)
    ref = root / "s_truth_class001.mrc"
    assert main(_refine(store, ref, root / "done", "--max-iterations", "2")) == 0
    return store, ref, root / "done"


def _refine(store, ref, out, *extra) -> list[str]:
    return ["refine3d", str(store), "--ref", str(ref), "--out", str(out), "--no-cluster", *extra]


def tree_hash(folder: Path) -> str:
    """SHA-256 over every file's relative path and bytes (hidden files included)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _refused(capsys, argv, folder: Path, *words) -> str:
    """Run argv: exit 2, one line naming ``words``, ``folder`` unchanged."""
    before = tree_hash(folder)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for word in words:
        assert word in err[0], err[0]
    assert tree_hash(folder) == before
    return err[0]


def test_a_finished_job_leaves_no_lock(data):
    _, _, done = data
    assert not runlock.lock_path(done).exists()
    assert (done / "run_class001.mrc").exists()


def test_second_job_on_a_folder_is_refused(data, capsys):
    """A job (here: another process holding the same lock helper) owns the folder:
    --continue and a fresh start are refused naming its pid, touching nothing."""
    store, ref, done = data
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from streamem.io.runlock import acquire; "
            "lock = acquire(sys.argv[1], 'test holder'); print('locked', flush=True); "
            "sys.stdin.read()",
            str(done),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = f"another streamem job (pid {holder.pid}) is running in this folder"
        _refused(capsys, _refine(store, ref, done, "--continue"), done, str(done), busy)
        _refused(capsys, _refine(store, ref, done), done, busy)
        with pytest.raises(InputError, match=rf"pid {holder.pid}"):
            runlock.acquire(done)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # the holder is gone: the kernel dropped its lock; its file is stale and harmless
    runlock.check_free(done)
    runlock.lock_path(done).unlink()


def test_continue_with_a_different_store_is_refused(data, tmp_path, capsys):
    store, ref, done = data
    other = _simulate(tmp_path / "other.zarr", 60)
    _refused(
        capsys,
        _refine(other, ref, done, "--continue"),
        done,
        "other.zarr",
        "different particle store",
        "60 particles, the run's store had 40",
    )


def test_continue_with_a_changed_option_is_refused(data, capsys):
    store, ref, done = data
    _refused(
        capsys,
        _refine(store, ref, done, "--continue", "--ini-high", "20"),
        done,
        "--continue with --ini-high 20.0, but the run was started with 30.0",
    )
    _refused(
        capsys,
        _refine(store, ref, done, "--continue", "--no-ctf"),
        done,
        "--continue with --no-ctf, but the run was started without it",
    )


def test_continue_with_more_iterations_is_allowed(data, tmp_path):
    """--max-iterations is safe to change: a run started for 3 ends after 2."""
    store, ref, _ = data
    out = tmp_path / "run"
    refine3d(store, ref, out, RefineOptions(max_iterations=3), stop_after_iteration=1)
    assert not (out / "run_it002_optimiser.json").exists()
    assert main(_refine(store, ref, out, "--continue", "--max-iterations", "2")) == 0
    assert (out / "run_it002_optimiser.json").exists() and (out / "run_class001.mrc").exists()
    assert not (out / "run_it003_optimiser.json").exists()


def test_truncated_newest_checkpoint_falls_back(data, tmp_path, caplog):
    store, ref, _ = data
    out = tmp_path / "run"
    refine3d(store, ref, out, RefineOptions(max_iterations=3), stop_after_iteration=2)
    newest = out / "run_it002_optimiser.json"
    text = newest.read_bytes()
    newest.write_bytes(text[: len(text) // 2])  # a crash while it was written
    with caplog.at_level(logging.INFO, logger="streamem"):
        assert main(_refine(store, ref, out, "--continue", "--max-iterations", "3")) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("run_it002_optimiser.json" in w and "previous" in w for w in warnings), warnings
    assert "continuing from iteration 1" in caplog.text
    assert (out / "run_it003_optimiser.json").exists() and (out / "run_class001.mrc").exists()
    assert newest.read_bytes() != text[: len(text) // 2]  # iteration 2 was run again


def test_run_killed_in_iteration_1_restarts_in_place(data, tmp_path, capsys):
    store, ref, _ = data
    out = tmp_path / "run"
    job = subprocess.Popen(
        [sys.executable, "-m", "streamem.cli", *_refine(store, ref, out, "--max-iterations", "2")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (out / "particles.zarr" / "it001").exists():  # iteration 1's E-step began
        assert job.poll() is None and time.monotonic() < deadline, "the job never started"
        time.sleep(0.01)
    os.kill(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    assert not list(out.glob("run_it*_optimiser.json")), "iteration 1 ended before the kill"
    assert runlock.lock_path(out).exists()  # stale: the kernel released the lock itself
    runlock.check_free(out)

    _refused(
        capsys,
        _refine(store, ref, out, "--continue"),
        out,
        "no complete iteration yet; run again without --continue to restart",
    )
    (out / "notes.txt").write_text("mine")  # a user's file: never removed
    _refused(capsys, _refine(store, ref, out), out, "not empty")
    (out / "notes.txt").unlink()

    assert main(_refine(store, ref, out, "--max-iterations", "2")) == 0
    assert (out / "run_it002_optimiser.json").exists() and (out / "run_class001.mrc").exists()
    assert not runlock.lock_path(out).exists()


def test_run_named_files_of_a_folder_streamem_did_not_create_are_never_cleared(
    data, tmp_path, capsys
):
    """A user's folder holding files that look like a run's (a RELION ``run_data.star``)
    but no streamem marker: a fresh start refuses and leaves every byte as it was."""
    store, ref, _ = data
    out = tmp_path / "relion_run"
    out.mkdir()
    (out / "run_data.star").write_text("data_particles\n")
    (out / "run_it001_model.star").write_text("data_model_general\n")
    _refused(capsys, _refine(store, ref, out), out, "not empty")
    assert (out / "run_data.star").read_text() == "data_particles\n"


def test_class2d_continue_checks_options(data, tmp_path, capsys, caplog):
    """class2d: a changed --k is refused by name; the start-only --seed is ignored."""
    store, _, _ = data
    out = tmp_path / "c2"
    argv = ["class2d", str(store), "--k", "2", "--psi-step", "30", "--out", str(out)]
    argv += ["--no-cluster"]
    assert main(argv + ["--iterations", "1"]) == 0
    _refused(
        capsys,
        [*argv, "--iterations", "2", "--continue", "--psi-step", "45"],
        out,
        "--continue with --psi-step 45.0, but the run was started with 30.0",
    )
    with caplog.at_level(logging.WARNING, logger="streamem"):
        assert main(argv + ["--iterations", "2", "--continue", "--seed", "5"]) == 0
    assert "--seed 5 only shapes the first iteration" in caplog.text
    assert (out / "run_it002_optimiser.json").exists()
