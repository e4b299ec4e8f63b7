"""MRC files from other packages: no "MAP " ID string or a zero machine stamp are read
(with one warning naming the file); truly corrupt files are still refused with one line."""

from __future__ import annotations

import logging
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from _relion_data import make_dataset

from streamem.cli import main
from streamem.errors import InputError
from streamem.io.importer import read_stack_header
from streamem.io.mrc import open_stack_mmap, read_map
from streamem.io.store import ParticleStore

ID = slice(208, 212)  # bytes 209-212: "MAP "
STAMP = slice(212, 216)  # bytes 213-216: machine stamp
MODE = slice(12, 16)


def patch(path: Path, where: slice, value: bytes, out: Path | None = None) -> Path:
    data = bytearray(path.read_bytes())
    data[where] = value
    out = out or path
    out.write_bytes(bytes(data))
    return out


@pytest.fixture
def stack(tmp_path) -> tuple[Path, np.ndarray]:
    images = np.random.default_rng(0).normal(size=(5, 12, 12)).astype(np.float32)
    path = tmp_path / "good.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(images)
        mrc.set_image_stack()
        mrc.voxel_size = 1.25
    return path, images


@pytest.mark.parametrize("what", ["no_id", "zero_stamp", "both"])
def test_missing_id_or_stamp_reads_with_one_warning(stack, tmp_path, caplog, what):
    path, images = stack
    bad = tmp_path / f"{what}.mrcs"
    patch(path, ID if what != "zero_stamp" else STAMP, b"\0\0\0\0", bad)
    if what == "both":
        patch(bad, STAMP, b"\0\0\0\0")
    with pytest.raises(ValueError):  # mrcfile alone refuses it
        mrcfile.open(bad, permissive=False).close()
    with caplog.at_level(logging.WARNING):
        data, voxel = read_map(bad)
    np.testing.assert_array_equal(data, images)
    assert voxel == pytest.approx(1.25)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and str(bad) in lines[0] and "read anyway" in lines[0]
    assert read_stack_header(bad).n_images == 5
    mrc = open_stack_mmap(bad)
    try:
        np.testing.assert_array_equal(mrc.data, images)
    finally:
        mrc.close()


def test_unknown_mode_and_short_file_still_refused(stack, tmp_path):
    path, _ = stack
    for bad in (
        patch(path, MODE, (77).to_bytes(4, "little"), tmp_path / "mode.mrcs"),
        patch(patch(path, MODE, (77).to_bytes(4, "little"), tmp_path / "m2.mrcs"), ID, b"\0" * 4),
    ):
        for read in (read_map, read_stack_header, open_stack_mmap):
            with pytest.raises(InputError, match="mode"):
                read(bad)
    short = tmp_path / "short.mrcs"
    short.write_bytes(patch(path, ID, b"\0" * 4, tmp_path / "noid.mrcs").read_bytes()[:-40])
    for read in (read_map, read_stack_header, open_stack_mmap):
        with pytest.raises(InputError) as err:
            read(short)
        assert str(short) in str(err.value) and "\n" not in str(err.value)


def test_import_stack_without_id_warns_once_per_stack(tmp_path, caplog):
    star, table, stacks = make_dataset(tmp_path / "proj", n_particles=12, n_stacks=2)
    first = sorted(stacks)[0]
    patch(first, ID, b"\0" * 4)
    patch(first, STAMP, b"\0" * 4)
    with caplog.at_level(logging.WARNING):
        assert main(["import", str(star), str(tmp_path / "p.zarr"), "--chunk-size", "4"]) == 0
    lines = [r.getMessage() for r in caplog.records if "read anyway" in r.getMessage()]
    assert len(lines) == 1 and str(first) in lines[0]
    store = ParticleStore(tmp_path / "p.zarr")
    names = starfile.read(star, always_dict=True)["particles"]["rlnImageName"]
    got = store.read_chunk(0, store.n_particles).images
    for row, name in enumerate(names):
        idx, rel = name.split("@")
        np.testing.assert_array_equal(got[row], stacks[tmp_path / "proj" / rel][int(idx) - 1])


def test_threads_opening_tolerated_stacks_leave_the_warning_filters_alone(stack, tmp_path):
    """The import opens stacks from many threads. ``catch_warnings`` swaps the process's
    filters, so unserialised, one thread's restore lets another's mrcfile warnings
    through (as errors here) or leaves "ignore" behind for good."""
    import threading
    import warnings

    from streamem.io.mrc import open_mrc

    path = patch(stack[0], ID, b"\0\0\0\0", tmp_path / "no_id.mrcs")
    failures = []

    def opens():
        for _ in range(40):
            try:
                open_mrc(path, warn=False).close()
            except Exception as exc:  # a leaked RuntimeWarning, raised by the filter
                failures.append(exc)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before = list(warnings.filters)
        threads = [threading.Thread(target=opens) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures[:1]
        assert warnings.filters == before
