"""``streamem ctf``: accuracy on simulated micrographs, bad micrographs, pick/extract read
its STAR file, FEI headers and integer/half modes, and the fit on hand-made spectra."""

from __future__ import annotations

import logging

import mrcfile
import numpy as np
import pytest
import starfile

from streamem.cli import main
from streamem.core.ctf import OpticsParams, ctf_rfft
from streamem.ctf.fit import FAILED_RESOLUTION_A, CtfSearch, fit_ctf
from streamem.ctf.spectrum import amplitude_spectrum, tile_starts
from streamem.io.mrc import write_map
from streamem.simulate.micrographs import simulate_micrographs

PIXEL_A = 1.5


def _angle_error_deg(a, b):
    """Smallest difference of two astigmatism angles (defined modulo 180°)."""
    return np.abs((np.asarray(a) - np.asarray(b) + 90.0) % 180.0 - 90.0)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """Four 1024-px micrographs, defocus 0.5-3.5 µm, astigmatism 0-1000 Å, SNR 0.05,
    carbon edge and ice blobs (the simulator's defaults)."""
    out = tmp_path_factory.mktemp("ctf") / "mics"
    return simulate_micrographs(
        out,
        n_micrographs=4,
        size_px=1024,
        pixel_size_A=PIXEL_A,
        particles_per_micrograph=10,
        box_size=64,
        snr=0.05,
        defocus_range_A=(5000.0, 35000.0),
        astigmatism_A=1000.0,
        seed=1,
    )


@pytest.fixture(scope="module")
def fitted(sim, tmp_path_factory):
    """``streamem ctf`` on the simulated micrographs' STAR file (its CTF is replaced).

    ``--res-max 3.5``: the simulation has no B-factor, so Thon rings reach Nyquist
    (3 Å); at 1024 px (9 tiles) the rings beyond 5 Å are what pins the astigmatism.
    """
    out = tmp_path_factory.mktemp("ctf") / "ctf"
    assert main([
        "ctf", str(sim.micrographs_star), "--out", str(out), "--res-max", "3.5",
        "--workers", "2",
    ]) == 0  # fmt: skip
    return out


def test_ctf_matches_the_simulated_truth(sim, fitted):
    truth = starfile.read(sim.micrographs_star)["micrographs"]
    est = starfile.read(fitted / "micrographs_ctf.star")["micrographs"]
    assert len(est) == len(truth)
    mean_t = 0.5 * (truth["rlnDefocusU"] + truth["rlnDefocusV"]).to_numpy()
    mean_e = 0.5 * (est["rlnDefocusU"] + est["rlnDefocusV"]).to_numpy()
    rel = np.abs(mean_e - mean_t) / mean_t
    assert np.median(rel) < 0.01, rel
    assert rel.max() < 0.03, rel
    astig = (truth["rlnDefocusU"] - truth["rlnDefocusV"]).to_numpy()
    big = astig > 200.0
    assert big.sum() >= 2
    err = _angle_error_deg(est["rlnDefocusAngle"], truth["rlnDefocusAngle"])[big]
    assert np.median(err) < 5.0 and err.max() < 8.0, err
    # RELION's conventions: U >= V, angle in [0, 180), astigmatism column = U - V
    assert (est["rlnDefocusU"] >= est["rlnDefocusV"]).all()
    assert ((est["rlnDefocusAngle"] >= 0) & (est["rlnDefocusAngle"] < 180)).all()
    np.testing.assert_allclose(
        est["rlnCtfAstigmatism"], est["rlnDefocusU"] - est["rlnDefocusV"], rtol=1e-9
    )
    assert (est["rlnCtfMaxResolution"] < 10.0).all()
    assert (est["rlnCtfFigureOfMerit"] > 0.03).all()
    # outputs: one PNG per micrograph and the summary
    assert (fitted / "ctf_summary.png").is_file()
    assert len(list(fitted.glob("mic_*_ctf.png"))) == 4


def test_pick_and_extract_read_micrographs_ctf_star(sim, fitted, tmp_path):
    from streamem.io.store import ParticleStore
    from streamem.pick.extract import extract_particles
    from streamem.pick.job import micrograph_inputs

    star = fitted / "micrographs_ctf.star"
    est = starfile.read(star)["micrographs"]
    mics = micrograph_inputs([str(star)])
    assert [m.ctf.defocus_u_A for m in mics] == pytest.approx(est["rlnDefocusU"].tolist())
    assert mics[0].pixel_size_A == pytest.approx(PIXEL_A)
    res = extract_particles(star, sim.coordinates_star, tmp_path / "p.zarr", box_size=64)
    assert res.n_particles > 10
    store = ParticleStore(tmp_path / "p.zarr")
    names = np.asarray(store.read_field("rlnMicrographName")).astype(str)
    du = np.asarray(store.read_field("rlnDefocusU"))
    by_name = dict(zip(est["rlnMicrographName"].map(lambda n: n.split("/")[-1]),
                       est["rlnDefocusU"], strict=True))  # fmt: skip
    for n, d in zip(names, du, strict=True):
        assert d == pytest.approx(by_name[n.split("/")[-1]])


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_bad_micrographs_are_flagged_or_left_out(sim, tmp_path, caplog):
    rng = np.random.default_rng(3)
    folder = tmp_path / "in"
    folder.mkdir()
    good = folder / "good.mrc"
    good.write_bytes(sim.micrographs[0].read_bytes())
    write_map(folder / "blank.mrc", np.zeros((600, 600), np.float32), PIXEL_A)
    write_map(folder / "equal.mrc", np.full((600, 600), 7.0, np.float32), PIXEL_A)
    write_map(folder / "small.mrc", rng.standard_normal((200, 200)).astype(np.float32), PIXEL_A)
    nan = rng.standard_normal((600, 600)).astype(np.float32)
    nan[10, 20] = np.nan
    write_map(folder / "nan.mrc", nan, PIXEL_A)
    noise = rng.standard_normal((1024, 1024)).astype(np.float32)
    write_map(folder / "noise.mrc", noise, PIXEL_A)
    out = tmp_path / "ctf"
    with caplog.at_level(logging.WARNING, logger="streamem"):
        assert main(["ctf", str(folder / "*.mrc"), "--out", str(out), "--no-plots"]) == 0
    est = starfile.read(out / "micrographs_ctf.star")["micrographs"].set_index("rlnMicrographName")
    names = {n.split("/")[-1] for n in est.index}
    assert names == {"good.mrc", "noise.mrc"}
    row = {n.split("/")[-1]: r for n, r in est.iterrows()}
    assert row["noise.mrc"]["rlnCtfMaxResolution"] == FAILED_RESOLUTION_A
    assert row["good.mrc"]["rlnCtfMaxResolution"] < 10.0
    assert row["noise.mrc"]["rlnCtfFigureOfMerit"] < 0.5 * row["good.mrc"]["rlnCtfFigureOfMerit"]
    text = caplog.text
    for name, why in [
        ("blank.mrc", "all pixels are equal"),
        ("equal.mrc", "all pixels are equal"),
        ("small.mrc", "smaller than one 512 px tile"),
        ("nan.mrc", "NaN"),
    ]:
        line = next(ln for ln in text.splitlines() if name in ln)
        assert why in line, line
    assert "noise.mrc" in text and "flagged" in text


def test_no_fittable_micrograph_is_one_line_exit_2(tmp_path, capsys):
    write_map(tmp_path / "flat.mrc", np.ones((600, 600), np.float32), PIXEL_A)
    code = main(["ctf", str(tmp_path / "flat.mrc"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "flat.mrc" in err and "equal" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--tile", "63"], "--tile"),
        (["--res-min", "4", "--res-max", "5"], "res-min > res-max"),
        (["--q0", "1.5"], "--q0"),
        (["--angpix", "20"], "band"),  # Nyquist 40 Å: nothing left of the 30-5 Å band
    ],
)
def test_bad_options_are_one_line(sim, tmp_path, capsys, argv, words):
    code = main(["ctf", str(sim.micrographs[0]), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and words in err, err


def test_fei_pixel_size_and_integer_and_half_modes(tmp_path):
    from mrcfile.dtypes import get_ext_header_dtype

    from streamem.io.micrograph_read import micrograph_pixel_size_A, read_micrograph

    data = (np.arange(64 * 64).reshape(64, 64) % 1000).astype(np.uint16)
    path = tmp_path / "epu.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        ext = np.zeros(1, dtype=get_ext_header_dtype(b"FEI1"))
        ext["Metadata size"] = ext.dtype.itemsize
        ext["Pixel size X"] = 1.06e-10
        ext["Pixel size Y"] = 1.06e-10
        mrc.set_extended_header(ext)
        mrc.header.exttyp = b"FEI1"
        mrc.voxel_size = 0.0
    assert micrograph_pixel_size_A(path) == pytest.approx(1.06)
    image, pixel = read_micrograph(path)
    assert image.dtype == np.float32 and pixel == pytest.approx(1.06)
    np.testing.assert_array_equal(image, data.astype(np.float32))
    for dtype in (np.float16, np.int8):
        p = tmp_path / f"{np.dtype(dtype).name}.mrc"
        with mrcfile.new(p) as mrc:
            mrc.set_data((data % 100).astype(dtype))
            mrc.voxel_size = 1.5
        image, pixel = read_micrograph(p)
        assert image.dtype == np.float32 and pixel == pytest.approx(1.5)
        np.testing.assert_array_equal(image, (data % 100).astype(np.float32))


def _synthetic_spectrum(u, v, angle, phase_deg=0.0, tile=512, seed=0):
    """Amplitude spectrum ``sqrt(background + envelope · CTF²)`` with 5 % noise, made
    from RELION's formula (core.ctf), with a smooth background, on the rfft grid."""
    optics = OpticsParams(300.0, 2.7, 0.07)
    ctf = ctf_rfft(tile, PIXEL_A, u, v, angle, optics, phase_deg, bfactor_A2=40.0,
                   dtype=np.float64)  # fmt: skip
    ky = np.fft.fftfreq(tile, PIXEL_A)[:, None]
    kx = np.fft.rfftfreq(tile, PIXEL_A)[None, :]
    k = np.hypot(ky, kx)
    background = 1.0 + 3.0 * np.exp(-k / 0.05)
    power = background + 2.0 * np.asarray(ctf) ** 2
    rng = np.random.default_rng(seed)
    return np.sqrt(power) * (1.0 + 0.05 * rng.standard_normal(power.shape)), optics


@pytest.mark.parametrize("u, v, angle", [(21000.0, 20400.0, 30.0), (8000.0, 7200.0, 125.0)])
def test_fit_recovers_a_hand_made_spectrum(u, v, angle):
    spectrum, optics = _synthetic_spectrum(u, v, angle)
    fit, _ = fit_ctf(spectrum, PIXEL_A, optics, CtfSearch())
    assert fit.defocus_u_A == pytest.approx(u, rel=2e-3)
    assert fit.defocus_v_A == pytest.approx(v, rel=2e-3)
    assert _angle_error_deg(fit.defocus_angle_deg, angle) < 1.0
    assert fit.max_resolution_A < 4.0 and fit.figure_of_merit > 0.5


def test_fit_recovers_a_phase_shift():
    spectrum, optics = _synthetic_spectrum(15000.0, 14500.0, 70.0, phase_deg=60.0)
    fit, _ = fit_ctf(spectrum, PIXEL_A, optics, CtfSearch(phase_shift=True))
    assert fit.phase_shift_deg == pytest.approx(60.0, abs=3.0)
    assert 0.5 * (fit.defocus_u_A + fit.defocus_v_A) == pytest.approx(14750.0, rel=3e-3)


def test_tiles_cover_the_micrograph_and_spectrum_is_scale_free():
    assert tile_starts(1000, 512).tolist() == [0, 256, 488]
    assert tile_starts(511, 512).size == 0
    img = np.random.default_rng(0).standard_normal((700, 600)).astype(np.float32)
    a = amplitude_spectrum(img, 128)
    b = amplitude_spectrum(10.0 * img + 3.0, 128)
    assert a.shape == (128, 65)
    np.testing.assert_allclose(b, 10.0 * a, rtol=1e-4)


def test_scheduler_run_equals_threaded_run(sim, fitted, tmp_path):
    from distributed import LocalCluster

    out = tmp_path / "ctf"
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, protocol="tcp",
        dashboard_address=None,
    ) as cluster:  # fmt: skip
        argv = ["ctf", str(sim.micrographs[0]), "--angpix", str(PIXEL_A), "--res-max", "3.5",
                "--out", str(out), "--no-plots", "--scheduler", cluster.scheduler_address]  # fmt: skip
        assert main(argv) == 0
    one = starfile.read(out / "micrographs_ctf.star")["micrographs"].iloc[0]
    ref = starfile.read(fitted / "micrographs_ctf.star")["micrographs"].iloc[0]
    for label in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfMaxResolution"):
        assert one[label] == pytest.approx(ref[label], rel=1e-9), label
