"""Particle extraction: geometry against the simulator, RELION's normalisation, edge
skips, the store's CTF and optics, and the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile

from streamem.cli import main
from streamem.core.ctf import ctf_rfft
from streamem.core.euler import euler_to_matrix
from streamem.io.mrc import read_map
from streamem.io.store import CTF_FIELDS, ParticleStore
from streamem.pick.extract import extract_particles, normalise_particles
from streamem.simulate.micrographs import simulate_micrographs
from streamem.simulate.projection import RealSpaceProjector

PIXEL_A = 3.5


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Two noise-free micrographs (no carbon, no ice) with a few particles each."""
    out = tmp_path_factory.mktemp("extract") / "clean"
    return simulate_micrographs(
        out,
        n_micrographs=2,
        size_px=384,
        pixel_size_A=PIXEL_A,
        particles_per_micrograph=6,
        box_size=48,
        snr=1e8,
        carbon_edge=False,
        ice_blobs=0,
        seed=5,
    )


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    out = tmp_path_factory.mktemp("extract") / "noisy"
    return simulate_micrographs(
        out,
        n_micrographs=2,
        size_px=384,
        pixel_size_A=PIXEL_A,
        particles_per_micrograph=10,
        box_size=48,
        snr=0.1,
        seed=6,
    )


def _expected_particle(sim, row, box: int, mics: pd.DataFrame) -> np.ndarray:
    """The simulator's projection at the true pose, shifted by the coordinate's sub-pixel
    rest, CTF-modulated with the micrograph's CTF, white (inverted) — in a ``box`` box."""
    vol, _ = read_map(sim.out_dir / "truth_class001.mrc")
    proj = RealSpaceProjector(vol).project(
        euler_to_matrix(row.rlnAngleRot, row.rlnAngleTilt, row.rlnAnglePsi)[None]
    )[0]
    b = proj.shape[0]
    img = np.zeros((box, box))
    o = box // 2 - b // 2
    img[o : o + b, o : o + b] = proj
    dy = row.rlnCoordinateY - np.rint(row.rlnCoordinateY)
    dx = row.rlnCoordinateX - np.rint(row.rlnCoordinateX)
    ky = np.fft.fftfreq(box)[:, None]
    kx = np.fft.rfftfreq(box)[None, :]
    mic = mics[mics.rlnMicrographName == row.rlnMicrographName].iloc[0]
    from streamem.core.ctf import OpticsParams

    ctf = ctf_rfft(
        box,
        PIXEL_A,
        mic.rlnDefocusU,
        mic.rlnDefocusV,
        mic.rlnDefocusAngle,
        OpticsParams(300.0, 2.7, 0.1),
        dtype=np.float64,
    )
    F = np.fft.rfft2(np.fft.ifftshift(img)) * np.exp(-2j * np.pi * (ky * dy + kx * dx)) * ctf
    return np.fft.fftshift(np.fft.irfft2(F, s=(box, box)))


def test_extracted_particle_matches_the_simulated_projection(tmp_path, clean):
    box = 64
    res = extract_particles(
        clean.micrographs_star, clean.out_dir, tmp_path / "p.zarr", box, invert_contrast=True
    )
    store = ParticleStore(res.store_path)
    meta = store.read_table()
    images = store.read_chunk(0, store.n_particles).images
    truth = clean.truth
    mics = starfile.read(clean.micrographs_star)["micrographs"]
    # the particle with the most room around it (neighbours inside the box blur the test)
    xy = truth[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy()
    same = truth.rlnMicrographName.to_numpy()[:, None] == truth.rlnMicrographName.to_numpy()
    d = np.where(
        same & ~np.eye(len(xy), dtype=bool),
        np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1)),
        np.inf,
    )
    k = int(np.argmax(d.min(axis=1)))
    row = truth.iloc[k]
    i = int(
        np.nonzero(
            (meta["rlnMicrographName"] == row.rlnMicrographName)
            & np.isclose(meta["rlnCoordinateX"], row.rlnCoordinateX)
        )[0][0]
    )
    expected = _expected_particle(clean, row, box, mics)
    c = np.arange(box) - box // 2
    disc = np.hypot(*np.meshgrid(c, c)) < 0.375 * box
    cc = np.corrcoef(images[i][disc], expected[disc])[0, 1]
    shifted = np.roll(expected, 3, axis=1)
    print(f"correlation with the expected particle: {cc:.3f}")
    assert cc > 0.9
    assert cc > np.corrcoef(images[i][disc], shifted[disc])[0, 1] + 0.1
    # without --invert-contrast the particle is dark
    dark = extract_particles(clean.micrographs_star, clean.out_dir, tmp_path / "d.zarr", box)
    img_dark = ParticleStore(dark.store_path).read_chunk(i, i + 1).images[0]
    assert np.corrcoef(img_dark[disc], expected[disc])[0, 1] < -0.9


def test_normalisation_background_mean_zero_std_one(tmp_path, noisy):
    box = 48
    res = extract_particles(
        noisy.micrographs_star, noisy.out_dir, tmp_path / "n.zarr", box, invert_contrast=True
    )
    images = ParticleStore(res.store_path).read_chunk(0, res.n_particles).images
    c = np.arange(box) - box // 2
    bg = np.hypot(*np.meshgrid(c, c)) > 0.375 * box  # RELION's default background radius
    values = images[:, bg]
    assert np.abs(values.mean(axis=1)).max() < 1e-4
    assert np.abs(values.std(axis=1) - 1).max() < 1e-3


def test_ramp_is_removed_before_normalising():
    """normalise(noise + plane) == normalise(noise): the background plane fit is exact."""
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((3, 40, 40))
    c = np.arange(40) - 20
    yy, xx = np.meshgrid(c, c, indexing="ij")
    plane = 3.0 + 0.2 * xx - 0.35 * yy
    a = normalise_particles(noise + plane, 15.0)
    b = normalise_particles(noise, 15.0)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.abs(normalise_particles(noise + plane, 15.0, ramp=False) - b).max() > 0.5


def test_edge_particles_are_skipped_and_counted(tmp_path, noisy):
    """Box 64 in a 384 px micrograph: x0 = round(x) − 32 must be in [0, 320]."""
    coords = tmp_path / "coords"
    coords.mkdir()
    xy = [
        (31.6, 200),
        (31.4, 200),
        (352.4, 200),
        (352.6, 200),
        (200, 31.6),
        (200, 352.6),
        (200, 200),
    ]
    table = pd.DataFrame(xy, columns=["rlnCoordinateX", "rlnCoordinateY"])
    starfile.write(table, coords / "mic_001_autopick.star")
    starfile.write(table.iloc[6:], coords / "mic_002_autopick.star")
    res = extract_particles(noisy.micrographs_star, coords, tmp_path / "e.zarr", 64, bin_factor=2)
    assert res.n_skipped_edge == 3
    assert res.n_particles == 5
    assert list(res.per_micrograph["n_extracted"]) == [4, 1]
    store = ParticleStore(res.store_path)
    np.testing.assert_allclose(store.read_field("rlnCoordinateX"), [31.6, 352.4, 200, 200, 200])
    assert store.box_size == 32
    assert store.pixel_size_A == pytest.approx(2 * PIXEL_A)


def test_store_has_ctf_optics_and_half_sets(tmp_path, noisy):
    res = extract_particles(
        noisy.micrographs_star,
        noisy.out_dir,
        tmp_path / "s.zarr",
        64,
        bin_factor=2,
        invert_contrast=True,
        chunk_size=7,
    )
    store = ParticleStore(res.store_path)
    assert store.has_fields(CTF_FIELDS)
    mics = starfile.read(noisy.micrographs_star)["micrographs"].set_index("rlnMicrographName")
    names = store.read_field("rlnMicrographName")
    np.testing.assert_allclose(store.read_field("rlnDefocusU"), mics.loc[names, "rlnDefocusU"])
    np.testing.assert_allclose(
        store.read_field("rlnDefocusAngle"), mics.loc[names, "rlnDefocusAngle"]
    )
    (group,) = store.optics_groups
    assert group["rlnImagePixelSize"] == pytest.approx(2 * PIXEL_A)
    assert group["rlnImageSize"] == 32 and group["rlnVoltage"] == 300.0
    subsets = store.read_field("rlnRandomSubset")
    assert abs(int((subsets == 1).sum()) - int((subsets == 2).sum())) <= 1
    images = store.read_chunk(0, store.n_particles).images
    assert np.all(np.isfinite(images))  # every chunk was written


def test_extract_cli_and_bad_input(tmp_path, noisy, capsys):
    out = tmp_path / "cli.zarr"
    rc = main(
        [
            "extract",
            str(noisy.micrographs_star),
            str(noisy.out_dir),
            str(out),
            "--box",
            "48",
            "--invert-contrast",
        ]
    )
    assert rc == 0
    assert ParticleStore(out).n_particles == len(noisy.truth)
    bad = tmp_path / "bad.zarr"
    rc = main(
        ["extract", str(noisy.micrographs_star), str(tmp_path / "nowhere"), str(bad), "--box", "48"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nowhere" in err[0]
    assert not bad.exists()
    rc = main(["extract", str(noisy.micrographs_star), str(noisy.out_dir), str(bad), "--box", "47"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "even" in err[0]
    assert not bad.exists()
