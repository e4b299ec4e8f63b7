"""select: the chosen classes' particles (images, metadata, truth, run results) in a new store."""

import numpy as np
import pytest

from streamem.cli import main
from streamem.em import runfiles
from streamem.em.classify3d import Class3DOptions, classify3d
from streamem.io.mrc import read_map
from streamem.io.store import ParticleStore
from streamem.simulate.particles import simulate_particles, truth_volume_paths

POSES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    store = simulate_particles(
        root / "p.zarr", 120, box_size=24, pixel_size_A=5.0, snr=0.5, seed=1, chunk_size=32
    )
    truth = store.read_table("truth")
    for label in POSES:
        store.add_field(label, np.float64)
    store.write_region(0, metadata={label: truth[label] for label in POSES})
    ref, _ = read_map(truth_volume_paths(store.path)[0])
    classify3d(
        store,
        ref,
        root / "run",
        Class3DOptions(n_classes=3, iterations=1, skip_align=True, ini_high_A=20.0),
    )
    return root, store


def test_select_copies_the_chosen_classes(run, tmp_path):
    root, store = run
    numbers = runfiles.read_results(root / "run" / "particles.zarr", 1)["rlnClassNumber"]
    wanted = [c for c in (1, 2, 3) if (numbers == c).any()][:2]
    assert main(["select", str(store.path), str(tmp_path / "s.zarr"), "--run", str(root / "run"),
                 "--classes", ",".join(map(str, wanted))]) == 0  # fmt: skip
    out = ParticleStore(tmp_path / "s.zarr")
    idx = np.flatnonzero(np.isin(numbers, wanted))
    assert out.n_particles == idx.size
    np.testing.assert_array_equal(
        out.read_chunk(0, idx.size).images, store.read_chunk(0, 120).images[idx]
    )
    meta = out.read_table()
    np.testing.assert_array_equal(meta["rlnClassNumber"], numbers[idx])
    np.testing.assert_array_equal(meta["rlnDefocusU"], store.read_field("rlnDefocusU")[idx])
    np.testing.assert_array_equal(
        out.read_table("truth")["rlnClassNumber"], store.read_table("truth")["rlnClassNumber"][idx]
    )
    assert out.optics_groups == store.optics_groups


def test_min_size_and_bad_input(run, tmp_path):
    root, store = run
    numbers = runfiles.read_results(root / "run" / "particles.zarr", 1)["rlnClassNumber"]
    sizes = np.bincount(numbers, minlength=4)[1:]
    threshold = int(sizes.max())
    assert (
        main(
            [
                "select",
                str(store.path),
                str(tmp_path / "m.zarr"),
                "--run",
                str(root / "run"),
                "--min-size",
                str(threshold),
            ]
        )
        == 0
    )
    assert ParticleStore(tmp_path / "m.zarr").n_particles == sizes[sizes >= threshold].sum()
    assert (
        main(
            [
                "select",
                str(store.path),
                str(tmp_path / "b.zarr"),
                "--run",
                str(root / "run"),
                "--classes",
                "9",
            ]
        )
        == 2
    )
    assert not (tmp_path / "b.zarr").exists()
    assert main(["select", str(store.path), str(tmp_path / "c.zarr"), "--run", str(tmp_path)]) == 2
