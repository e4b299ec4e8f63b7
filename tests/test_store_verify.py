"""Stores verify what they read: a missing or corrupt chunk, or NaN pixels, is one error line.

Zarr reads an absent chunk as the fill value (NaN images), so without the checks a
deleted chunk file became an all-NaN map with exit 0. Each test damages a small
simulated store the way a disk or a user would (delete a chunk file, overwrite
bytes in the middle of one), then runs real commands through the CLI.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import zarr

from streamem.cli import main
from streamem.errors import InputError
from streamem.io.store import ParticleStore, read_checked

N, BOX, CHUNK = 60, 16, 20


@pytest.fixture(scope="module")
def good_store(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sim")
    path = folder / "p.zarr"
    argv = ["simulate", str(path), "--n-particles", str(N), "--box", str(BOX)]
    argv += ["--chunk-size", str(CHUNK), "--workers", "1", "--seed", "3"]
    assert main(argv) == 0
    return path


def copy_store(src: Path, dst: Path) -> Path:
    """A byte copy (damage a copy, never the shared fixture)."""
    import shutil

    shutil.copytree(src, dst)
    return dst


def delete_chunk(store: Path, array: str, key: str) -> None:
    (store / array / key).unlink()


def corrupt_chunk(store: Path, array: str, key: str) -> None:
    """Overwrite 8 bytes in the middle of a chunk file."""
    path = store / array / key
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0xA5 for b in data[mid : mid + 8])
    path.write_bytes(bytes(data))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "zstd" not in err.lower()
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


def test_input_error_survives_pickling():
    err = pickle.loads(pickle.dumps(InputError("p.zarr", "images chunk c/3/0/0 is missing")))
    assert isinstance(err, InputError)
    assert (err.path, err.problem) == ("p.zarr", "images chunk c/3/0/0 is missing")
    assert err.one_line() == "p.zarr: images chunk c/3/0/0 is missing"


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_reconstruct_refuses_a_damaged_images_chunk(good_store, tmp_path, capsys, damage):
    store = copy_store(good_store, tmp_path / "p.zarr")
    (delete_chunk if damage == "missing" else corrupt_chunk)(store, "images", "c/1/0/0")
    out = tmp_path / "map.mrc"
    argv = ["reconstruct", str(store), "--truth", "--out", str(out), "--no-cluster"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert str(store) in line and "images chunk c/1/0/0 (particles 20-39)" in line
    assert ("is missing" if damage == "missing" else "is corrupt") in line
    assert not out.exists()


def test_export_refuses_a_missing_chunk_and_leaves_nothing(good_store, tmp_path, capsys):
    store = copy_store(good_store, tmp_path / "p.zarr")
    delete_chunk(store, "images", "c/2/0/0")
    out = tmp_path / "out" / "particles.star"
    out.parent.mkdir()
    assert main(["export", str(store), str(out)]) == 2
    line = one_error_line(capsys)
    assert "images chunk c/2/0/0 (particles 40-59) is missing" in line
    assert list(out.parent.iterdir()) == []  # no STAR file, no stacks


def test_class2d_refuses_a_corrupt_chunk(good_store, tmp_path, capsys):
    store = copy_store(good_store, tmp_path / "p.zarr")
    corrupt_chunk(store, "images", "c/0/0/0")
    out = tmp_path / "run"
    argv = ["class2d", str(store), "--out", str(out), "--k", "2", "--iterations", "1"]
    argv += ["--psi-step", "45", "--offset-range", "0", "--no-cluster"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "images chunk c/0/0/0 (particles 0-19) is corrupt" in line
    assert not out.exists() or not any(out.glob("run_it*"))  # no iteration written


def test_missing_metadata_chunk_is_an_error_not_nan(good_store, tmp_path, capsys):
    store = copy_store(good_store, tmp_path / "p.zarr")
    delete_chunk(store, "metadata/rlnDefocusU", "c/1")
    out = tmp_path / "map.mrc"
    argv = ["reconstruct", str(store), "--truth", "--out", str(out), "--no-cluster"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "metadata/rlnDefocusU chunk c/1 (particles 20-39) is missing" in line
    assert not out.exists()


def test_nan_pixels_are_named(good_store, tmp_path):
    store = copy_store(good_store, tmp_path / "p.zarr")
    images = zarr.open_group(str(store), mode="r+")["images"]
    block = images[20:40]
    block[5, 3, :4] = np.nan
    block[7, 0, 0] = np.inf
    images[20:40] = block
    with pytest.raises(InputError, match=r"c/1/0/0 \(particles 20-39\) holds 5 NaN/Inf pixels"):
        ParticleStore(store).read_chunk(20, 40)
    ParticleStore(store).read_chunk(0, 20)  # the other chunks still read


def test_a_read_across_chunks_names_the_bad_one(good_store, tmp_path):
    store = copy_store(good_store, tmp_path / "p.zarr")
    corrupt_chunk(store, "images", "c/2/0/0")
    with pytest.raises(InputError, match=r"c/2/0/0 \(particles 40-59\) is corrupt"):
        ParticleStore(store).read_chunk(10, 50)


def test_old_store_without_checksums_names_a_corrupt_zstd_chunk(tmp_path):
    """Stores written before the CRC32C codec: zstd's own error, still one line."""
    arr = zarr.create_array(
        str(tmp_path / "old.zarr"),
        shape=(40, 8, 8),
        chunks=(10, 8, 8),
        dtype="float32",
        compressors=[zarr.codecs.ZstdCodec(level=3)],
        fill_value=np.nan,
    )
    arr[:] = np.random.default_rng(0).normal(size=(40, 8, 8)).astype(np.float32)
    path = tmp_path / "old.zarr" / "c" / "2" / "0" / "0"
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(InputError) as info:
        read_checked(arr, 0, 40, "images chunk", "old.zarr", finite=True)
    msg = info.value.one_line()
    assert msg.startswith("old.zarr: images chunk c/2/0/0 (particles 20-29) is corrupt")
    assert "\n" not in msg


def test_verify_good_store(good_store, capsys):
    assert main(["info", "--verify", "--no-cluster", str(good_store)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"verify: all good \(\d+ arrays x 3 chunks", out)


def test_verify_lists_exactly_the_bad_chunks(good_store, tmp_path, capsys):
    store = copy_store(good_store, tmp_path / "p.zarr")
    delete_chunk(store, "images", "c/1/0/0")
    corrupt_chunk(store, "metadata/rlnDefocusV", "c/2")
    assert main(["info", "--verify", "--no-cluster", str(store)]) == 1
    out = capsys.readouterr().out
    bad = [ln for ln in out.splitlines() if " chunk c/" in ln]
    assert len(bad) == 2, out
    assert any("images chunk c/1/0/0 (particles 20-39) is missing" in ln for ln in bad)
    assert any("metadata/rlnDefocusV chunk c/2 (particles 40-59) is corrupt" in ln for ln in bad)
    assert "verify: 2 bad chunk(s)" in out and "40 of 60 particles" in out


def test_one_error_line_crosses_a_local_cluster(good_store, tmp_path, capfd):
    """The task's InputError is pickled by the worker process and re-raised by the client;
    the worker does not log it as a traceback on the same stderr."""
    store = copy_store(good_store, tmp_path / "p.zarr")
    delete_chunk(store, "images", "c/1/0/0")
    out = tmp_path / "map.mrc"
    argv = ["reconstruct", str(store), "--truth", "--out", str(out), "--n-workers", "1"]
    assert main(argv) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Compute Failed" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "images chunk c/1/0/0 (particles 20-39) is missing" in lines[0]
    assert not out.exists()
