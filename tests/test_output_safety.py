"""Outputs never destroy inputs (issue 14): every case runs the real CLI.

A refused command exits 2 with one stderr line naming the path and the problem, leaves
no temporary behind, and every input file is byte-identical afterwards (hashes of the
whole tree before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from _relion_data import make_dataset

from streamem.cli import main
from streamem.errors import InputError
from streamem.io.atomic import (
    MARKER_FILE,
    STAR_MARK,
    clean_stale_temporaries,
    written_by_streamem,
)
from streamem.io.store import ParticleStore

NOT_OURS = "not written by streamem"


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (or of ``root`` itself), symlinks by target."""
    root = Path(root)
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "->" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in Path(folder).rglob("*") if ".partial-" in p.name or ".old-" in p.name]


def cli(capsys, *argv) -> tuple[int, list[str]]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err.splitlines()


def assert_refused(rc: int, lines: list[str], path: Path, *words: str) -> None:
    assert rc == 2, lines
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    assert str(path) in lines[0], (path, lines[0])
    for w in words:
        assert w in lines[0], (w, lines[0])


def write_user_map(path: Path, box: int = 16, seed: int = 0) -> None:
    """A map as another program writes it (no streamem label)."""
    rng = np.random.default_rng(seed)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(rng.normal(size=(box,) * 3).astype(np.float32))
        mrc.voxel_size = 1.5


@pytest.fixture
def project(tmp_path):
    """A RELION project (not streamem's) and a store imported from it, outside it."""
    star, _, _ = make_dataset(tmp_path / "proj", n_particles=20, box=16, n_stacks=2)
    store = tmp_path / "p.zarr"
    assert main(["import", str(star), str(store)]) == 0
    return star, store


# -- the four deletion cases ---------------------------------------------------------


@pytest.mark.parametrize("alias", [False, True], ids=["same-path", "symlink"])
def test_reconstruct_out_is_the_store(tmp_path, capsys, project, alias):
    _, store = project
    out = store
    if alias:
        out = tmp_path / "alias.zarr"
        out.symlink_to(store)
    before = tree_hashes(store)
    rc, lines = cli(capsys, "reconstruct", store, "--out", out, "--overwrite", "--no-cluster")
    assert_refused(rc, lines, out, "is the input")
    assert tree_hashes(store) == before
    assert temporaries(tmp_path) == []


def test_postprocess_out_is_the_folder_of_the_half_maps(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    write_user_map(run / "run_half1_class001_unfil.mrc", seed=1)
    write_user_map(run / "run_half2_class001_unfil.mrc", seed=2)
    # even a folder streamem marked as its own may not be replaced while it holds inputs
    (run / MARKER_FILE).write_text(json.dumps({"tool": "streamem", "command": "refine3d"}))
    before = tree_hashes(run)
    rc, lines = cli(
        capsys,
        "postprocess",
        run / "run_half1_class001_unfil.mrc",
        run / "run_half2_class001_unfil.mrc",
        "--out",
        run,
        "--overwrite",
    )
    assert_refused(rc, lines, run, "contains the input")
    assert tree_hashes(run) == before
    assert temporaries(tmp_path) == []


def test_export_stacks_dir_is_the_project_folder(tmp_path, capsys, project):
    star, store = project
    proj = star.parent
    before, store_before = tree_hashes(proj), tree_hashes(store)
    out = tmp_path / "e.star"
    rc, lines = cli(capsys, "export", store, out, "--stacks-dir", proj, "--overwrite")
    assert_refused(rc, lines, proj, NOT_OURS)
    assert tree_hashes(proj) == before and tree_hashes(store) == store_before
    assert not out.exists() and temporaries(tmp_path) == []


def test_pick_out_is_the_micrograph_folder(tmp_path, capsys):
    mics = tmp_path / "Micrographs"
    mics.mkdir()
    rng = np.random.default_rng(0)
    for k in (1, 2):
        with mrcfile.new(mics / f"mic{k}.mrc") as mrc:
            mrc.set_data(rng.normal(size=(64, 64)).astype(np.float32))
            mrc.voxel_size = 2.0
    before = tree_hashes(mics)
    rc, lines = cli(
        capsys,
        "pick",
        mics / "mic1.mrc",
        mics / "mic2.mrc",
        "--log",
        "--log-diameter-min",
        "10",
        "--log-diameter-max",
        "14",
        "--out",
        mics,
        "--overwrite",
    )
    assert_refused(rc, lines, mics, "contains the input")
    assert tree_hashes(mics) == before
    assert temporaries(tmp_path) == []


def test_runs_may_not_write_into_their_inputs(tmp_path, capsys, project):
    _, store = project
    ref = tmp_path / "ref.mrc"
    write_user_map(ref)
    before = tree_hashes(store)
    out = store / "run"
    rc, lines = cli(capsys, "refine3d", store, "--ref", ref, "--out", out, "--no-cluster")
    assert_refused(rc, lines, out, "lies inside the input")
    rc, lines = cli(capsys, "class3d", store, "--ref", ref, "--out", ref, "--no-cluster")
    assert_refused(rc, lines, ref, "is the input")
    assert tree_hashes(store) == before and not out.exists()


# -- --overwrite replaces only streamem's outputs ------------------------------------


def test_overwrite_of_unmarked_outputs_is_refused(tmp_path, capsys, project):
    star, store = project
    folder = tmp_path / "mine.zarr"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    rc, lines = cli(capsys, "import", star, folder, "--overwrite")
    assert_refused(rc, lines, folder, NOT_OURS)
    assert (folder / "notes.txt").read_text() == "keep me"

    user_map = tmp_path / "map.mrc"
    write_user_map(user_map)
    map_before = tree_hashes(user_map)
    rc, lines = cli(capsys, "reconstruct", store, "--out", user_map, "--overwrite", "--no-cluster")
    assert_refused(rc, lines, user_map, NOT_OURS)
    assert tree_hashes(user_map) == map_before

    user_star = tmp_path / "user.star"
    user_star.write_text("data_\nloop_\n_rlnImageName #1\n1@x.mrcs\n")
    rc, lines = cli(capsys, "export", store, user_star, "--overwrite")
    assert_refused(rc, lines, user_star, NOT_OURS)
    assert user_star.read_text().startswith("data_")
    assert not (tmp_path / "user_stacks").exists()

    rc, lines = cli(capsys, "demo", "--out", folder, "--overwrite", "--no-cluster")
    assert_refused(rc, lines, folder, NOT_OURS)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert temporaries(tmp_path) == []


def test_overwrite_of_marked_outputs_replaces_them(tmp_path, capsys, project):
    star, store = project
    assert written_by_streamem(store)
    assert json.loads((store / MARKER_FILE).read_text())["command"] == "import"

    star2, _, _ = make_dataset(tmp_path / "proj2", n_particles=12, box=16, seed=3)
    rc, _ = cli(capsys, "import", star2, store, "--overwrite")
    assert rc == 0 and ParticleStore(store).n_particles == 12

    out = tmp_path / "e.star"
    assert cli(capsys, "export", store, out)[0] == 0
    assert out.read_text().startswith(STAR_MARK)
    assert written_by_streamem(out) and written_by_streamem(tmp_path / "e_stacks")
    first = out.stat().st_ino
    assert cli(capsys, "export", store, out, "--overwrite")[0] == 0
    assert out.stat().st_ino != first  # a new file was renamed into place

    mask_src = tmp_path / "in.mrc"
    write_user_map(mask_src)
    mask = tmp_path / "mask.mrc"
    assert cli(capsys, "mask-create", mask_src, "--out", mask, "--threshold", "0")[0] == 0
    assert written_by_streamem(mask) and not written_by_streamem(mask_src)
    rc, _ = cli(capsys, "mask-create", mask_src, "--out", mask, "--threshold", "1", "--overwrite")
    assert rc == 0
    with mrcfile.open(mask) as mrc:
        labels = [bytes(x).decode() for x in mrc.header.label[: int(mrc.header.nlabl)]]
    assert any(label.startswith("written by streamem") for label in labels)
    assert temporaries(tmp_path) == []


# -- two writers, killed writers -----------------------------------------------------


def wait_for(predicate, timeout_s: float = 120.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def streamem_subprocess(*argv) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "streamem.cli", *map(str, argv)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


@pytest.fixture
def slow_star(tmp_path):
    """A set that imports in several seconds with one thread and tiny chunks."""
    star, _, _ = make_dataset(tmp_path / "slow", n_particles=240, box=16, n_stacks=2)
    return star


def test_second_of_two_imports_into_one_new_output_refuses(tmp_path, capsys, slow_star):
    small, _, _ = make_dataset(tmp_path / "small", n_particles=12, box=16, seed=3)
    out = tmp_path / "new.zarr"
    slow = streamem_subprocess("import", slow_star, out, "--chunk-size", "3", "-j", "1")
    try:
        wait_for(lambda: partials(out) or slow.poll() is not None)
        assert slow.poll() is None, "the slow import ended too early to race"
        assert not out.exists()  # the slow one checked `out` and is writing its temporary
        assert cli(capsys, "import", small, out)[0] == 0
        first = tree_hashes(out)
        _, err = slow.communicate(timeout=300)
    finally:
        slow.kill()
    lines = err.splitlines()
    assert_refused(slow.returncode, lines, out, "appeared while this command ran")
    assert tree_hashes(out) == first and ParticleStore(out).n_particles == 12
    assert temporaries(tmp_path) == []


def test_killed_import_and_export_are_cleaned_up_by_the_next_run(
    tmp_path, capsys, slow_star, project
):
    out = tmp_path / "killed.zarr"
    job = streamem_subprocess("import", slow_star, out, "--chunk-size", "3", "-j", "1")
    wait_for(lambda: partials(out) or job.poll() is not None)
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=60)
    assert job.returncode == -signal.SIGKILL
    stale = partials(out)
    assert stale and not out.exists()
    slow_before = tree_hashes(slow_star.parent)
    assert cli(capsys, "import", slow_star, out)[0] == 0
    assert partials(out) == [] and ParticleStore(out).n_particles == 240
    assert tree_hashes(slow_star.parent) == slow_before

    _, store = project
    star_out = tmp_path / "e.star"
    stacks = tmp_path / "e_stacks"
    job = streamem_subprocess("export", store, star_out, "--images-per-stack", "1", "-j", "1")
    wait_for(lambda: partials(stacks) or job.poll() is not None)
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=60)
    assert job.returncode == -signal.SIGKILL
    assert partials(stacks) and not stacks.exists()
    assert cli(capsys, "export", store, star_out)[0] == 0
    assert partials(stacks) == [] and partials(star_out) == []
    assert len(list(stacks.glob("*.mrcs"))) == 1
    assert temporaries(tmp_path) == []


def test_stale_old_copy_is_put_back_when_its_output_is_missing(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "maps"
    old = tmp_path / f".maps.old-{dead.pid}-0123abcd"  # died between its two renames
    old.mkdir()
    (old / "a.txt").write_text("the only copy")
    partial = tmp_path / f".maps.partial-{dead.pid}"
    partial.mkdir()
    alive = tmp_path / f".maps.partial-{os.getpid()}-feedbeef"  # ours: left alone
    alive.mkdir()
    cleaned = clean_stale_temporaries(out)
    assert sorted(p.name for p in cleaned) == sorted([old.name, partial.name])
    assert (out / "a.txt").read_text() == "the only copy"
    assert not partial.exists() and alive.exists()


def test_simulate_out_is_its_model_map(tmp_path, capsys):
    model = tmp_path / "model.mrc"
    write_user_map(model, box=16)
    before = tree_hashes(model)
    argv = ["simulate", model, "--model", model, "--box", "16", "--n-particles", "8"]
    rc, lines = cli(capsys, *argv, "--pixel-size", "1.5", "--overwrite")
    assert_refused(rc, lines, model, "is the input")
    assert tree_hashes(model) == before and temporaries(tmp_path) == []


def test_in_place_output_folder_keeps_the_old_one_until_done(tmp_path, monkeypatch):
    """demo's folder: the old output comes back if the new run fails."""
    from streamem.io.atomic import output_folder_in_place

    out = tmp_path / "demo"
    with output_folder_in_place(out, command="demo"):
        (out / "result.txt").write_text("first")
    with pytest.raises(RuntimeError), output_folder_in_place(out, True, command="demo"):
        assert not (out / "result.txt").exists()  # a fresh folder; the old one aside
        raise RuntimeError("the job failed")
    assert (out / "result.txt").read_text() == "first"
    with output_folder_in_place(out, True, command="demo"):
        (out / "result.txt").write_text("second")
    assert (out / "result.txt").read_text() == "second" and temporaries(tmp_path) == []
    (tmp_path / "user").mkdir()
    monkeypatch.chdir(tmp_path / "user")  # "." is the folder, with the same rules
    with pytest.raises(InputError, match="not written by streamem"):
        with output_folder_in_place(".", True):
            pass
    assert (tmp_path / "user").is_dir() and temporaries(tmp_path) == []
