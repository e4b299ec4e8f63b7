"""``streamem simulate-micrographs``: coordinates, contrast, RELION STAR files."""

import numpy as np
import pytest
import starfile

from streamem.cli import main
from streamem.errors import InputError
from streamem.io.mrc import read_map
from streamem.simulate.micrographs import place_particles, simulate_micrographs

KW = dict(size_px=200, pixel_size_A=6.0, box_size=32, particles_per_micrograph=12)


@pytest.fixture(scope="module")
def micset(tmp_path_factory):
    out = tmp_path_factory.mktemp("mics") / "set"
    return simulate_micrographs(out, n_micrographs=2, seed=4, **KW)


def test_coordinates_inside_and_not_overlapping(micset):
    truth = micset.truth
    assert len(truth) > 6
    diam_px = micset.particle_diameter_A / 6.0
    assert 10 < diam_px < 32
    half = 32 // 2
    for name, group in truth.groupby("rlnMicrographName"):
        xy = group[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy()
        assert (xy >= half).all() and (xy <= 200 - 1 - half).all()
        d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        assert d.min() >= diam_px
        coords = starfile.read(micset.out_dir / name.replace(".mrc", "_coords.star"))
        assert np.allclose(coords[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(), xy, atol=1e-5)


def test_star_files_are_relion_31(micset):
    mics = starfile.read(micset.micrographs_star)
    assert set(mics) == {"optics", "micrographs"}
    assert {"rlnOpticsGroup", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
            "rlnMicrographPixelSize"} <= set(mics["optics"].columns)  # fmt: skip
    table = mics["micrographs"]
    assert {"rlnMicrographName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle",
            "rlnCtfMaxResolution"} <= set(table.columns)  # fmt: skip
    assert list(table["rlnMicrographName"]) == ["mic_001.mrc", "mic_002.mrc"]
    assert ((table["rlnDefocusU"] >= 10000 - 1) & (table["rlnDefocusU"] <= 30000 + 300)).all()
    listing = starfile.read(micset.coordinates_star)
    assert list(listing["rlnMicrographCoordinates"]) == [
        "mic_001_coords.star",
        "mic_002_coords.star",
    ]
    for path in micset.micrographs:
        img, voxel = read_map(path)
        assert img.shape == (200, 200) and voxel == pytest.approx(6.0)


def test_raw_contrast_is_dark_protein(tmp_path):
    res = simulate_micrographs(
        tmp_path / "clean", n_micrographs=1, snr=50.0, carbon_edge=False, ice_blobs=0, seed=1, **KW
    )
    img, _ = read_map(res.micrographs[0])
    y, x = np.mgrid[:200, :200]
    near = np.zeros((200, 200), bool)
    for cx, cy in res.truth[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy():
        near |= (x - cx) ** 2 + (y - cy) ** 2 < 6**2
    assert img[near].mean() < img[~near].mean() - 0.5 * img.std()


def test_reproducible_with_seed(tmp_path, micset):
    again = simulate_micrographs(tmp_path / "again", n_micrographs=2, seed=4, workers=1, **KW)
    a, _ = read_map(micset.micrographs[1])
    b, _ = read_map(again.micrographs[1])
    assert np.array_equal(a, b)
    assert micset.truth.equals(again.truth)


def test_place_particles_respects_distance_and_veto():
    rng = np.random.default_rng(0)
    pts = place_particles(rng, 300, 40, 30.0, 20.0, allowed=lambda p: p[1] < 150)
    assert len(pts) > 10
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert d.min() >= 30.0 and (pts[:, 1] < 150).all() and (pts >= 20).all()


def test_bad_input_and_cli(tmp_path):
    with pytest.raises(InputError):
        simulate_micrographs(tmp_path / "bad", size_px=40, box_size=32)
    out = tmp_path / "cli"
    argv = ["simulate-micrographs", str(out), "--n-micrographs", "1", "--size", "160",
            "--box", "32", "--pixel-size", "6", "--particles", "5", "--no-carbon"]  # fmt: skip
    assert main(argv) == 0
    assert (out / "mic_001.mrc").exists() and (out / "truth_particles.star").exists()
    assert main(argv) == 2  # exists
