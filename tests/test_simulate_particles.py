"""``streamem simulate``: image formation, conventions, reproducibility, the store it writes."""

import numpy as np
import pytest
import starfile

from streamem.cli import main
from streamem.core.backend import rfftn
from streamem.core.ctf import ctf_rfft
from streamem.errors import InputError
from streamem.io.mrc import read_map
from streamem.io.store import ParticleStore
from streamem.simulate.particle_draws import ParticleSimParams, draw_particles
from streamem.simulate.particles import (
    background_mask,
    clean_images,
    make_images,
    signal_variance,
    simulate_particles,
    truth_volume_paths,
)
from streamem.simulate.phantoms import phantom
from streamem.simulate.projection import RealSpaceProjector

BOX, PX = 40, 4.0


@pytest.fixture(scope="module")
def projectors():
    return [
        RealSpaceProjector(phantom("asym", BOX, PX)),
        RealSpaceProjector(phantom("asym-B", BOX, PX)),
    ]


def _params(**kw):
    base = dict(n_particles=300, box_size=BOX, pixel_size_A=PX, seed=3)
    base.update(kw)
    return ParticleSimParams(**base)


@pytest.mark.parametrize("snr", [0.05, 1.0])
def test_measured_snr_matches_request(projectors, snr):
    # one particle per micrograph: S is an average over defoci, and a few micrographs'
    # defoci would dominate a small set (their signal variances differ by ~30 %)
    p = _params(snr=snr, particles_per_micrograph=1)
    sigma = np.sqrt(signal_variance(p, projectors[:1]) / snr)
    draws, rngs = draw_particles(p, 0, p.n_particles)
    sim = make_images(p, projectors[:1], sigma, draws, rngs)
    noise = sim.images - sim.clean  # noise plus a per-image constant (the removed mean)
    n = p.n_particles
    measured = sim.clean.reshape(n, -1).var(1).mean() / noise.reshape(n, -1).var(1).mean()
    assert measured == pytest.approx(snr, rel=0.10)


def test_normalised_like_relion_preprocess(projectors):
    p = _params(n_particles=20)
    draws, rngs = draw_particles(p, 0, 20)
    sim = make_images(p, projectors[:1], 5.0, draws, rngs)
    bg = background_mask(BOX, 0.75 * BOX / 2)
    assert np.allclose(sim.images[:, bg].mean(1), 0.0, atol=1e-5)
    assert np.allclose(sim.images[:, bg].std(1), 1.0, atol=1e-5)


def test_ctf_applied_is_ctf_rfft(projectors):
    with_ctf = _params(n_particles=6, bfactor_A2=50.0)
    without = _params(n_particles=6, bfactor_A2=50.0, ctf=False)
    draws, _ = draw_particles(with_ctf, 0, 6)
    a = rfftn(clean_images(with_ctf, projectors[:1], draws), axes=(-2, -1))
    b = rfftn(clean_images(without, projectors[:1], draws), axes=(-2, -1))
    ctf = ctf_rfft(
        BOX, PX, draws["defocus_u"], draws["defocus_v"], draws["defocus_angle"],
        with_ctf.optics, bfactor_A2=50.0, dtype=np.float64,
    )  # fmt: skip
    assert np.allclose(a, b * ctf, atol=1e-3 * np.abs(b).max())
    # white particles: positive CTF at low frequency keeps the protein bright
    assert (ctf[:, 0, 0] > 0).all()


def test_origin_sign_and_pose_truth(projectors):
    """The particle's centre of mass sits at -origin / pixel_size from the box centre."""
    p = _params(n_particles=12, ctf=False, max_shift_A=10.0)
    draws, _ = draw_particles(p, 0, 12)
    clean = clean_images(p, projectors[:1], draws)
    from streamem.simulate.particles import particle_tables

    _, truth = particle_tables(p, draws, 0)
    c = BOX // 2
    y, x = np.mgrid[:BOX, :BOX] - c
    for k, img in enumerate(clean):
        com = np.array([(img * x).sum(), (img * y).sum()]) / img.sum()
        want = -np.array([truth["rlnOriginXAngst"][k], truth["rlnOriginYAngst"][k]]) / PX
        assert np.allclose(com, want, atol=0.05)
    assert np.abs(truth["rlnOriginXAngst"]).max() > 2 * PX  # the shifts are not all tiny
    # the truth angles are the pose that was projected
    from streamem.core.euler import euler_to_matrix
    from streamem.simulate.projection import shift_images

    A = euler_to_matrix(truth["rlnAngleRot"][0], truth["rlnAngleTilt"][0], truth["rlnAnglePsi"][0])
    direct = shift_images(
        projectors[0].project(A)[None], [[draws["shift_y"][0], draws["shift_x"][0]]]
    )
    assert np.allclose(direct[0], clean[0], atol=1e-4 * np.abs(clean[0]).max())


def test_mix_fractions_junk_and_preferred_orientation(projectors):
    p = _params(n_particles=4000, fractions=(0.7, 0.3), junk_fraction=0.2)
    draws, _ = draw_particles(p, 0, p.n_particles)
    share = np.bincount(draws["class"], minlength=3) / p.n_particles
    expected = np.array([0.2, 0.8 * 0.7, 0.8 * 0.3])
    assert np.allclose(share, expected, atol=4 * np.sqrt(expected * (1 - expected) / 4000))
    # junk images are pure noise: no signal at all
    few = {k: v[:40] for k, v in draws.items()}
    clean = clean_images(p, projectors, few)
    assert np.all(clean[few["class"] == 0] == 0)
    assert np.all(np.abs(clean[few["class"] > 0]).max(axis=(1, 2)) > 0)
    # uniform: cos(tilt) uniform; preferred: mostly near tilt 0
    uni, _ = draw_particles(_params(n_particles=2000), 0, 2000)
    pref, _ = draw_particles(_params(n_particles=2000, orientation="preferred"), 0, 2000)
    top = 1 - np.cos(np.deg2rad(40.0))  # share of the sphere within 40 deg of +z, x2
    assert np.mean(uni["tilt"] < 40) == pytest.approx(top / 2, abs=0.03)
    assert np.mean(pref["tilt"] < 40) > 0.6
    assert np.mean(np.cos(np.deg2rad(uni["tilt"]))) == pytest.approx(0.0, abs=0.05)


def test_defocus_per_micrograph_and_subsets():
    p = _params(n_particles=250, particles_per_micrograph=100, astigmatism_A=800.0)
    draws, _ = draw_particles(p, 0, 250)
    assert list(np.unique(draws["micrograph"])) == [0, 1, 2]
    mean = (draws["defocus_u"] + draws["defocus_v"]) / 2
    for m in range(3):
        sel = draws["micrograph"] == m
        assert np.ptp(mean[sel]) <= 2 * p.defocus_spread_A + 1e-6
        assert np.ptp(draws["defocus_angle"][sel]) == 0
    assert (draws["defocus_u"] >= draws["defocus_v"]).all()
    assert (mean > 10000 - 100).all() and (mean < 30000 + 100).all()


def test_store_reproducible_and_independent_of_chunk_size(tmp_path):
    kw = dict(n_particles=90, box_size=32, pixel_size_A=6.0, seed=7, junk_fraction=0.1)
    a = simulate_particles(tmp_path / "a.zarr", chunk_size=16, **kw)
    b = simulate_particles(tmp_path / "b.zarr", chunk_size=50, workers=1, **kw)
    c = simulate_particles(tmp_path / "c.zarr", chunk_size=16, **{**kw, "seed": 8})
    ia, ib, ic = (s.read_chunk(0, 90, with_truth=True) for s in (a, b, c))
    assert np.array_equal(ia.images, ib.images)
    for label in ia.metadata:
        assert np.array_equal(ia.metadata[label], ib.metadata[label])
    for label in ia.truth:
        assert np.array_equal(ia.truth[label], ib.truth[label])
    assert not np.allclose(ia.images, ic.images)
    assert not np.array_equal(ia.truth["rlnAngleRot"], ic.truth["rlnAngleRot"])
    assert np.isfinite(ia.images).all()


def test_store_contents_and_truth_volumes(tmp_path):
    out = tmp_path / "sim.zarr"
    store = simulate_particles(
        out, 40, box_size=32, pixel_size_A=6.0, volumes=None, phantom="asym", bfactor_A2=20.0
    )
    assert isinstance(store, ParticleStore) and store.n_particles == 40
    meta = set(store.fields())
    assert {"rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfBfactor"} <= meta
    assert {"rlnOpticsGroup", "rlnRandomSubset", "rlnMicrographName"} <= meta
    assert set(store.fields("truth")) == {
        "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
        "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber",
    }  # fmt: skip
    subsets = store.read_field("rlnRandomSubset")
    assert set(subsets) == {1, 2} and abs((subsets == 1).sum() - 20) <= 1
    optics = store.optics_groups[0]
    assert optics["rlnImageSize"] == 32 and optics["rlnImagePixelSize"] == 6.0
    assert optics["rlnVoltage"] == 300.0 and optics["rlnImageDimensionality"] == 2
    paths = truth_volume_paths(out)
    assert [p.name for p in paths] == ["sim_truth_class001.mrc"]
    vol, voxel = read_map(paths[0])
    assert vol.shape == (32, 32, 32) and voxel == pytest.approx(6.0)
    assert np.allclose(vol, phantom("asym", 32, 6.0))
    no_ctf = simulate_particles(tmp_path / "n.zarr", 8, box_size=32, pixel_size_A=6.0, ctf=False)
    assert "rlnDefocusU" not in no_ctf.fields()


def test_bad_input_and_existing_output(tmp_path):
    with pytest.raises(InputError):
        simulate_particles(tmp_path / "x.zarr", 0, box_size=32)
    with pytest.raises(InputError):
        simulate_particles(tmp_path / "x.zarr", 5, box_size=32, snr=-1)
    with pytest.raises(InputError):
        simulate_particles(tmp_path / "x.zarr", 5, box_size=32, defocus_range_A=(3e4, 1e4))
    with pytest.raises(InputError):
        simulate_particles(tmp_path / "x.zarr", 5, box_size=32, volumes=[np.zeros((16,) * 3)])
    simulate_particles(tmp_path / "x.zarr", 5, box_size=32, pixel_size_A=6.0)
    with pytest.raises(InputError):
        simulate_particles(tmp_path / "x.zarr", 5, box_size=32, pixel_size_A=6.0)
    assert not list(tmp_path.glob(".*partial*"))


def test_cli_simulate_mix_relion_and_errors(tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    rel = tmp_path / "relion"
    argv = ["simulate", str(out), "--n-particles", "60", "--box", "32", "--pixel-size", "6",
            "--mix", "asym:0.5,asym-B:0.5", "--junk", "0.1", "--seed", "2",
            "--relion", str(rel), "--chunk-size", "25"]  # fmt: skip
    assert main(argv) == 0
    store = ParticleStore(out)
    classes = store.read_field("rlnClassNumber", group="truth")
    assert set(classes) <= {0, 1, 2} and {1, 2} <= set(classes)
    assert len(truth_volume_paths(out)) == 2
    star = starfile.read(rel / "particles.star")
    assert len(star["particles"]) == 60
    assert "rlnDefocusU" in star["particles"].columns
    assert float(star["optics"]["rlnImagePixelSize"][0]) == 6.0
    capsys.readouterr()
    assert main(["simulate", str(out), "--box", "32"]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    assert main(["simulate", str(tmp_path / "y.zarr"), "--phantom", "nope"]) == 2
    assert main(["simulate", str(tmp_path / "y.zarr"), "--mix", "asym:x"]) == 2
    assert main(["simulate", str(tmp_path / "y.zarr"), "--defocus", "5"]) == 2
    assert main(["simulate", str(tmp_path / "y.zarr"), "--model", str(tmp_path / "no.pdb")]) == 2
    assert not (tmp_path / "y.zarr").exists()
