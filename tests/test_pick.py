"""Auto-picking: RELION-2's template picker, the LoG picker, peaks and the CLI.

End-to-end cases run on micrographs from ``simulate_micrographs`` (carbon edge and
ice blobs as distractors, known coordinates) and score picks by one-to-one matching
within a particle radius.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import starfile

from streamem.cli import main
from streamem.core.euler import euler_to_matrix
from streamem.core.projector import make_projector, project_images
from streamem.pick.log import LogPickParams, pick_log
from streamem.pick.peaks import find_peaks, match_coordinates, non_maximum_suppression
from streamem.pick.template import (
    prepare_micrograph,
    prepare_templates,
    rotated_template_ft,
    template_fom,
    work_grid,
)
from streamem.simulate.micrographs import simulate_micrographs
from streamem.simulate.phantoms import phantom

PIXEL_A = 3.5
BOX = 48


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """Three 512 px micrographs, 25 particles each, carbon edge and two ice blobs each."""
    out = tmp_path_factory.mktemp("pick") / "mics"
    s = simulate_micrographs(
        out,
        n_micrographs=3,
        size_px=512,
        pixel_size_A=PIXEL_A,
        particles_per_micrograph=25,
        box_size=BOX,
        snr=0.1,
        seed=2,
    )
    return s


def _score(out_dir, sim, micrographs=None):
    """Recall and FDR of the picks in ``out_dir`` against the simulation's truth."""
    radius = 0.5 * sim.particle_diameter_A / PIXEL_A
    n_true = n_picks = n_matched = 0
    for mic in micrographs or sorted(sim.truth["rlnMicrographName"].unique()):
        picks = starfile.read(out_dir / mic.replace(".mrc", "_autopick.star"))
        truth = sim.truth[sim.truth["rlnMicrographName"] == mic]
        m = match_coordinates(
            picks[["rlnCoordinateY", "rlnCoordinateX"]].to_numpy(),
            truth[["rlnCoordinateY", "rlnCoordinateX"]].to_numpy(),
            radius,
        )
        n_true, n_picks, n_matched = (
            n_true + m.n_truth,
            n_picks + m.n_picks,
            n_matched + m.n_matched,
        )
    return n_matched / n_true, 1 - n_matched / max(n_picks, 1)


def _pick(tmp_path, sim, name, *extra):
    out = tmp_path / name
    rc = main(["pick", str(sim.micrographs_star), "--out", str(out), *extra])
    assert rc == 0
    return out


def test_template_picking_recall_and_fdr_at_the_default_threshold(tmp_path, sim):
    diameter = json.loads((sim.out_dir / "simulation.json").read_text())["particle_diameter_A"]
    out = _pick(
        tmp_path,
        sim,
        "tpl",
        "--reference",
        str(sim.out_dir / "truth_class001.mrc"),
        "--healpix-order",
        "0",
        "--particle-diameter",
        f"{diameter:.1f}",
        "--lowpass",
        "20",
    )
    recall, fdr = _score(out, sim)
    print(f"template picking, 20 A low-pass: recall {recall:.3f}, FDR {fdr:.3f}")
    assert recall >= 0.9
    assert fdr <= 0.1
    # outputs: RELION columns, summary, index for extract, PNG of the first micrograph
    picks = starfile.read(out / "mic_001_autopick.star")
    for col in (
        "rlnCoordinateX",
        "rlnCoordinateY",
        "rlnAutopickFigureOfMerit",
        "rlnClassNumber",
        "rlnAnglePsi",
    ):
        assert col in picks.columns
    assert picks["rlnClassNumber"].between(1, 12).all()
    summary = starfile.read(out / "autopick_summary.star")
    assert summary["rlnGroupNrParticles"].sum() == sum(
        len(starfile.read(out / f"mic_00{k}_autopick.star")) for k in (1, 2, 3)
    )
    assert (out / "autopick.star").is_file() and (out / "mic_001_picks.png").stat().st_size > 0
    # extraction reads the picker's index (autopick.star)
    store = tmp_path / "picked.zarr"
    assert main(["extract", str(sim.micrographs_star), str(out), str(store), "--box", "48"]) == 0
    from streamem.io.store import ParticleStore

    n_inside = ParticleStore(store).n_particles
    assert 0.9 * summary["rlnGroupNrParticles"].sum() <= n_inside


def test_log_picking_recall_and_fdr(tmp_path, sim):
    out = _pick(
        tmp_path,
        sim,
        "log",
        "--log",
        "--log-diameter-min",
        "60",
        "--log-diameter-max",
        "120",
        "--write-fom-maps",
    )
    recall, fdr = _score(out, sim)
    print(f"LoG picking: recall {recall:.3f}, FDR {fdr:.3f}")
    assert recall >= 0.8
    assert fdr <= 0.2
    assert (out / "mic_002_fom.mrc").is_file()


def test_log_default_diameters_from_the_particle_diameter_or_the_reference(tmp_path, sim, caplog):
    """Issue 24: ``--log`` without --log-diameter-min/max takes 0.8-1.2x
    ``--particle-diameter`` (or the size of ``--reference``), says so in the log, and
    picks as well as with the range given by hand."""
    import logging

    from streamem.pick.log import default_log_diameters_A

    assert default_log_diameters_A(250.0) == pytest.approx((200.0, 300.0))
    d = sim.particle_diameter_A
    mics = [str(sim.out_dir / "mic_001.mrc"), str(sim.out_dir / "mic_002.mrc")]
    names = ["mic_001.mrc", "mic_002.mrc"]
    caplog.set_level(logging.INFO, logger="streamem")
    out = tmp_path / "logd"
    assert main(["pick", *mics, "--log", "--particle-diameter", f"{d:.1f}", "--out", str(out)]) == 0
    said = [r.getMessage() for r in caplog.records if "LoG diameters" in r.getMessage()]
    assert said == [
        f"LoG diameters {0.8 * d:.1f}-{1.2 * d:.1f} A (0.8-1.2x {d:.1f} A from --particle-diameter)"
    ]
    recall, fdr = _score(out, sim, names)
    print(f"LoG with the default range around {d:.0f} A: recall {recall:.3f}, FDR {fdr:.3f}")
    assert recall >= 0.8 and fdr <= 0.2
    # from the reference's size: a range around the measured diameter
    caplog.clear()
    ref = str(sim.out_dir / "truth_class001.mrc")
    out2 = tmp_path / "logr"
    assert main(["pick", *mics, "--log", "--reference", ref, "--out", str(out2)]) == 0
    said = [r.getMessage() for r in caplog.records if "LoG diameters" in r.getMessage()]
    assert len(said) == 1 and "truth_class001.mrc" in said[0]
    lo, hi = (float(v) for v in said[0].split()[2].split("-"))
    assert lo < d < hi  # the measured size brackets the true one
    recall2, fdr2 = _score(out2, sim, names)
    assert recall2 >= 0.8 and fdr2 <= 0.2
    # neither a diameter nor a reference: one line naming the options
    assert main(["pick", *mics, "--log", "--out", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none").exists()


def test_picks_with_and_without_the_lowpass_agree(tmp_path, sim):
    """RELION-2 Table 1: downscaling to the 20 Å filter barely changes the picks."""
    common = [
        "--reference",
        str(sim.out_dir / "truth_class001.mrc"),
        "--healpix-order",
        "0",
        "--psi-step",
        "20",
        "--particle-diameter",
        "108",
    ]
    fast = _pick(tmp_path, sim, "lp20", *common, "--lowpass", "20")
    full = _pick(tmp_path, sim, "lp0", *common, "--lowpass", "0")
    radius = 0.5 * 108 / PIXEL_A
    matched = total = 0
    for k in (1, 2, 3):
        a = starfile.read(fast / f"mic_00{k}_autopick.star")
        b = starfile.read(full / f"mic_00{k}_autopick.star")
        m = match_coordinates(
            a[["rlnCoordinateY", "rlnCoordinateX"]].to_numpy(),
            b[["rlnCoordinateY", "rlnCoordinateX"]].to_numpy(),
            radius,
        )
        matched += m.n_matched
        total += max(len(a), len(b))
    print(f"low-pass vs full resolution: {matched} of {total} picks in common")
    assert matched >= 0.9 * total


def test_batched_scan_matches_the_reference_loop(sim):
    """Issue 24: the batched scan (quarter turns by permutation, filter on the
    micrograph, one batched FFT per angle) gives the reference loop's FOM maps to
    float32 rounding and >= 99 % of its picks within 2 px."""
    from streamem.io.mrc import read_map
    from streamem.pick.template import (
        MicrographCtf,
        TemplatePickParams,
        pick_templates,
        projection_templates,
    )

    volume, _ = read_map(sim.out_dir / "truth_class001.mrc")
    templates, _ = projection_templates(volume, 0)
    bank = prepare_templates(np.asarray(templates))
    table = starfile.read(sim.micrographs_star)["micrographs"]
    agree = total = 0
    for path, row in zip(sim.micrographs[:2], table.itertuples(), strict=False):
        mic, _ = read_map(path)
        ctf = MicrographCtf(row.rlnDefocusU, row.rlnDefocusV, row.rlnDefocusAngle)
        out = {}
        for batched in (True, False):
            params = TemplatePickParams(108.0, psi_step_deg=10.0, batched=batched, coarse_psi=False)
            out[batched] = pick_templates(mic, PIXEL_A, bank, params, ctf)
        (a, fa, _), (b, fb, _) = out[True], out[False]
        assert fa.template_scale == pytest.approx(fb.template_scale, rel=1e-5)
        close = np.abs(fa.fom - fb.fom) <= 1e-4 * np.abs(fb.fom).max()
        assert close.mean() >= 0.999
        assert (fa.class_index == fb.class_index).mean() >= 0.99
        m = match_coordinates(np.stack([a.y, a.x], 1), np.stack([b.y, b.x], 1), 2.0)
        agree, total = agree + m.n_matched, total + max(len(a), len(b))
    print(f"batched vs reference scan: {agree} of {total} picks within 2 px")
    assert total > 20 and agree >= 0.99 * total


@pytest.mark.parametrize("psi_step", [7.0, 20.0, 90.0])
def test_batched_scan_without_quarter_turns_and_with_a_fixed_scale(psi_step):
    """Angle sets not closed under +90° (51 or 18 psi) or a single quarter: the batched
    scan falls back to fewer shortcuts and still equals the loop, also with RELION's
    fixed template scale."""
    mic, template, _ = _planted(1.0)
    grid = work_grid(mic.shape, 2.0, 8.0)
    bg = (1.0 - (np.hypot(*np.meshgrid(np.arange(32) - 16, np.arange(32) - 16)) < 10)).astype(
        np.float32
    )
    prep = prepare_micrograph(mic, grid, bg)
    bank = prepare_templates(np.stack([template, template.T * 0.5 + np.roll(template, 3, 0)]))
    for scale in (None, 0.5):
        kw = dict(psi_step_deg=psi_step, invert=False, template_scale=scale, min_distance_px=30)
        a = template_fom(prep, bank, None, 10, batched=True, coarse_psi=False, **kw)
        b = template_fom(prep, bank, None, 10, batched=False, **kw)
        np.testing.assert_allclose(a.fom, b.fom, atol=1e-4 * np.abs(b.fom).max())
        assert (a.psi_deg == b.psi_deg).mean() > 0.99


# -- conventions and kernels ---------------------------------------------------------------


def test_rotated_template_is_the_projection_at_that_psi():
    """T̂(Aᵀk) of the (rot, tilt, 0) projection is the projection at (rot, tilt, psi)."""
    vol = phantom("asym", 40, 4.0)
    fvol = make_projector(vol, 2)
    rot, tilt, psi = 30.0, 50.0, 70.0
    p0 = project_images(fvol, euler_to_matrix(rot, tilt, 0.0)[None])
    ppsi = np.asarray(project_images(fvol, euler_to_matrix(rot, tilt, psi)[None]))[0]
    grid = work_grid((40, 40), 4.0, None)
    ft = rotated_template_ft(prepare_templates(p0), psi, grid)[0]
    img = np.fft.fftshift(np.fft.irfft2(ft, s=(40, 40)))
    cc = np.corrcoef(img.ravel(), ppsi.ravel())[0, 1]
    wrong = np.fft.fftshift(
        np.fft.irfft2(rotated_template_ft(prepare_templates(p0), -psi, grid)[0], s=(40, 40))
    )
    assert cc > 0.99
    assert np.corrcoef(wrong.ravel(), ppsi.ravel())[0, 1] < cc - 0.05


def _planted(amplitude, seed=0, size=256, box=32):
    """White noise with a Gaussian-blob template planted at known positions."""
    rng = np.random.default_rng(seed)
    c = np.arange(box) - box // 2
    template = np.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / (2 * 4.0**2)).astype(np.float32)
    mic = rng.standard_normal((size, size)).astype(np.float32)
    centres = [(60, 60), (60, 180), (180, 70), (170, 190)]
    for y, x in centres:
        mic[y - box // 2 : y + box // 2, x - box // 2 : x + box // 2] += amplitude * template
    return mic, template, np.array(centres)


@pytest.mark.parametrize("scale", [None, "true"])
def test_fom_is_one_on_planted_templates_and_negative_elsewhere(scale):
    """RELION's FOM: ≈ 1 where the micrograph holds s·A, ≈ −1 on noise (module docstring)."""
    amp = 1.0
    mic, template, centres = _planted(amp)
    grid = work_grid(mic.shape, 1.0, None)
    radius = 10
    bg = 1.0 - (np.hypot(*np.meshgrid(np.arange(32) - 16, np.arange(32) - 16)) < radius)
    prep = prepare_micrograph(mic, grid, bg.astype(np.float32))
    s_true = amp / float(mic.std())  # the micrograph is normalised to unit std
    res = template_fom(
        prep,
        prepare_templates(template),
        None,
        radius,
        psi_step_deg=360,
        invert=False,
        template_scale=None if scale is None else s_true,
        min_distance_px=30,
        border_px=16,
    )
    at = res.fom[centres[:, 0], centres[:, 1]]
    assert np.all(np.abs(at - 1.0) < 0.35), at
    away = np.ones_like(res.fom, dtype=bool)
    for y, x in centres:
        away[y - 20 : y + 20, x - 20 : x + 20] = False
    assert np.median(res.fom[away]) < -0.5
    if scale is None:
        assert res.template_scale == pytest.approx(s_true, rel=0.2)


def test_carbon_edge_is_flagged_by_the_background_structure():
    """A step edge raises the background's low-resolution contrast; flat noise does not."""
    rng = np.random.default_rng(1)
    mic = rng.standard_normal((256, 256)).astype(np.float32)
    mic[:, 128:] -= 1.5  # "carbon" on the right
    grid = work_grid(mic.shape, 3.5, 20.0)
    bg = np.ones((32, 32), np.float32)
    bg[8:24, 8:24] = 0
    prep = prepare_micrograph(mic, grid, bg)
    assert prep.structure_at(128.0, 120.0) > 2.0
    assert prep.structure_at(128.0, 50.0) < 1.3


def test_log_finds_dark_discs_of_the_right_size():
    rng = np.random.default_rng(3)
    n, pixel = 384, 4.0
    yy, xx = np.mgrid[0:n, 0:n]
    mic = rng.standard_normal((n, n)).astype(np.float32)
    centres = [(80, 90), (90, 280), (250, 120), (290, 300)]
    for y, x in centres:
        mic -= 1.0 * (np.hypot(yy - y, xx - x) < 12.5)  # 100 Å diameter, dark
    picks, _, _ = pick_log(mic, pixel, LogPickParams(70, 130, threshold=6.0))
    m = match_coordinates(np.stack([picks.y, picks.x], 1), np.array(centres), 6)
    assert m.recall == 1.0 and m.fdr == 0.0
    assert np.all((picks.diameter_A >= 70) & (picks.diameter_A <= 130))


def test_peaks_suppression_border_and_matching():
    score = np.zeros((50, 50))
    score[20, 20], score[20, 24], score[40, 40], score[2, 25] = 5.0, 4.0, 3.0, 9.0
    peaks = find_peaks(score, 1.0, min_distance_px=6, border_px=5)
    assert list(zip(peaks.iy, peaks.ix, strict=True)) == [
        (20, 20),
        (40, 40),
    ]  # (2, 25) at the border
    # exactly one min-distance apart: both kept
    keep = non_maximum_suppression(np.array([[0.0, 0.0], [0.0, 6.0]]), np.array([1.0, 2.0]), 6.0)
    assert list(keep) == [1, 0]
    m = match_coordinates(np.array([[0, 0], [10, 0], [50, 50]]), np.array([[1, 0], [9, 0]]), 3)
    assert m.n_matched == 2 and m.recall == 1.0 and m.fdr == pytest.approx(1 / 3)
    # one-to-one: two picks near one particle count once
    m = match_coordinates(np.array([[0, 0], [0, 1]]), np.array([[0, 0.5]]), 3)
    assert m.n_matched == 1


# -- bad input -------------------------------------------------------------------------------


def test_pick_mrc_files_without_star(tmp_path, sim):
    """MRC files (pixel size from the header, no CTF), a glob pattern, LoG."""
    out = tmp_path / "mrc"
    pattern = str(sim.out_dir / "mic_00[12].mrc")
    rc = main(
        [
            "pick",
            pattern,
            "--log",
            "--log-diameter-min",
            "60",
            "--log-diameter-max",
            "120",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    summary = starfile.read(out / "autopick_summary.star")
    assert list(summary["rlnMicrographName"]) == ["mic_001.mrc", "mic_002.mrc"]
    assert (summary["rlnGroupNrParticles"] > 15).all()


def test_pick_bad_input_is_one_line_and_leaves_nothing(tmp_path, sim, capsys):
    out = tmp_path / "bad"
    rc = main(
        [
            "pick",
            str(sim.micrographs_star),
            "--templates",
            str(tmp_path / "none.mrcs"),
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "none.mrcs" in err[0] and "not found" in err[0]
    assert not out.exists()
    rc = main(
        [
            "pick",
            str(sim.micrographs_star),
            "--log",
            "--log-diameter-min",
            "120",
            "--log-diameter-max",
            "60",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "min <= max" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("threads, batch_templates", [(2, None), (3, 2)])
def test_threaded_scan_is_the_one_thread_scan_bit_for_bit(threads, batch_templates, monkeypatch):
    """The batched scan split over threads (angle runs, smaller template batches)
    gives exactly the one-thread scan's maps: same FOM, template, psi at every pixel."""
    from streamem.pick import fastscan

    mic, template, _ = _planted(1.0)
    grid = work_grid(mic.shape, 2.0, 8.0)
    bg = (1.0 - (np.hypot(*np.meshgrid(np.arange(32) - 16, np.arange(32) - 16)) < 10)).astype(
        np.float32
    )
    prep = prepare_micrograph(mic, grid, bg)
    rng = np.random.default_rng(3)
    bank = prepare_templates(
        np.stack([template, template.T * 0.5 + np.roll(template, 3, 0)] +
                 [template + 0.3 * rng.standard_normal(template.shape) for _ in range(3)])
    )  # fmt: skip
    kw = dict(psi_step_deg=10.0, invert=False, min_distance_px=30, batched=True)
    if batch_templates:  # several template batches: the threads' merge order per batch
        monkeypatch.setattr(fastscan, "TARGET_ELEMENTS", grid.work_px**2 * batch_templates)
    one = template_fom(prep, bank, None, 10, workers=1, **kw)
    many = template_fom(prep, bank, None, 10, workers=threads, **kw)
    np.testing.assert_array_equal(many.fom, one.fom)
    np.testing.assert_array_equal(many.class_index, one.class_index)
    np.testing.assert_array_equal(many.psi_deg, one.psi_deg)
    assert len(set(one.class_index.ravel().tolist())) > 1  # the templates compete
