"""refine3d's command line: bad input gives one line, exit 2, and no output."""

import numpy as np
import pytest

from streamem.cli import main
from streamem.io.mrc import write_map
from streamem.simulate.particles import simulate_particles


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return simulate_particles(
        tmp_path_factory.mktemp("cli") / "p.zarr",
        40,
        box_size=16,
        pixel_size_A=5.0,
        snr=1.0,
        seed=2,
    )


def _fails(capsys, argv, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    for w in words:
        assert w in err[0]


def _argv(store_path, ref, out, *extra):
    return [
        "refine3d",
        str(store_path),
        "--ref",
        str(ref),
        "--out",
        str(out),
        "--no-cluster",
        *extra,
    ]


def _map(path, box, voxel_A):
    write_map(path, np.zeros((box,) * 3, np.float32), voxel_A)
    return path


def test_missing_store(tmp_path, capsys):
    _fails(
        capsys,
        _argv(tmp_path / "none.zarr", "r.mrc", tmp_path / "run"),
        "none.zarr",
    )
    assert not (tmp_path / "run").exists()


def test_reference_box_mismatch(store, tmp_path, capsys):
    ref = _map(tmp_path / "ref.mrc", 20, 5.0)
    _fails(
        capsys,
        _argv(store.path, ref, tmp_path / "run"),
        "ref.mrc",
        "(16,)",
    )
    assert not (tmp_path / "run").exists()


def test_reference_pixel_size_mismatch(store, tmp_path, capsys):
    ref = _map(tmp_path / "ref.mrc", 16, 2.0)
    _fails(
        capsys,
        _argv(store.path, ref, tmp_path / "run"),
        "voxel size",
    )


def test_continue_without_a_run(store, tmp_path, capsys):
    ref = _map(tmp_path / "ref.mrc", 16, 5.0)
    (tmp_path / "run").mkdir()
    _fails(
        capsys,
        _argv(store.path, ref, tmp_path / "run", "--continue"),
        "nothing to continue",
    )
