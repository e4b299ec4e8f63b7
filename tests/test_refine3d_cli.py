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


def test_missing_store(tmp_path, capsys):
    _fails(
        capsys,
        [
            "refine3d",
            str(tmp_path / "none.zarr"),
            "--ref",
            "r.mrc",
            "--out",
            str(tmp_path / "run"),
            "--no-cluster",
        ],
        "none.zarr",
    )
    assert not (tmp_path / "run").exists()


def test_reference_box_mismatch(store, tmp_path, capsys):
    ref = tmp_path / "ref.mrc"
    write_map(ref, np.zeros((20, 20, 20), np.float32), 5.0)
    _fails(
        capsys,
        [
            "refine3d",
            str(store.path),
            "--ref",
            str(ref),
            "--out",
            str(tmp_path / "run"),
            "--no-cluster",
        ],
        "ref.mrc",
        "(16,)",
    )
    assert not (tmp_path / "run").exists()


def test_reference_pixel_size_mismatch(store, tmp_path, capsys):
    ref = tmp_path / "ref.mrc"
    write_map(ref, np.zeros((16, 16, 16), np.float32), 2.0)
    _fails(
        capsys,
        [
            "refine3d",
            str(store.path),
            "--ref",
            str(ref),
            "--out",
            str(tmp_path / "run"),
            "--no-cluster",
        ],
        "voxel size",
    )


def test_continue_without_a_run(store, tmp_path, capsys):
    ref = tmp_path / "ref.mrc"
    write_map(ref, np.zeros((16, 16, 16), np.float32), 5.0)
    (tmp_path / "run").mkdir()
    _fails(
        capsys,
        [
            "refine3d",
            str(store.path),
            "--ref",
            str(ref),
            "--out",
            str(tmp_path / "run"),
            "--continue",
            "--no-cluster",
        ],
        "nothing to continue",
    )
