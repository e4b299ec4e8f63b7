"""Coarse-to-fine psi in the template scan (:mod:`streamem.pick.psi_refine`, issue 24):
the real-space scores equal the work-grid correlations, the coarse step follows the
particle's size, and the picks and maps are the exhaustive scan's where it matters."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import starfile

from streamem.io.mrc import read_map
from streamem.pick.bank import rotated_template_ft, template_images
from streamem.pick.peaks import match_coordinates
from streamem.pick.psi_refine import coarse_psi_factor, template_box_px
from streamem.pick.template import (
    MicrographCtf,
    TemplatePickParams,
    pick_templates,
    prepare_templates,
    projection_templates,
    work_grid,
)
from streamem.simulate.micrographs import simulate_micrographs

PIXEL_A = 3.5


def test_template_images_correlate_as_the_work_grid_spectra():
    """``Σ_s t_ψ(s) y(r + s)`` with the real-space template equals the inverse FFT of
    ``conj(T̂_ψ) Ŷ`` on the work grid at every pixel (centre and orientation included)."""
    rng = np.random.default_rng(0)
    B = 32
    c = np.arange(B) - B // 2
    blob = np.exp(-((c[:, None] - 3) ** 2 + (c[None, :] + 5) ** 2 / 4) / 18.0)  # asymmetric
    bank = prepare_templates(blob.astype(np.float32))
    grid = work_grid((256, 256), 2.0, 8.0)  # 8 Å: work grid 128 px, scale 0.5
    W = grid.work_px
    Y = scipy.fft.rfft2(rng.standard_normal((W, W)))
    y = scipy.fft.irfft2(Y, s=(W, W))
    small = template_box_px(bank, grid)  # where it keeps all but 1e-4 of its energy
    full = 26  # holds the rotated 16 px template box
    assert small < full
    h = lambda box: box // 2  # noqa: E731

    def correlate(t):  # Σ_s t(s) y(r + s), s = u − box // 2
        got = np.zeros((W, W))
        for u in range(t.shape[0]):
            for v in range(t.shape[1]):
                got += t[u, v] * np.roll(y, (h(t.shape[0]) - u, h(t.shape[1]) - v), axis=(0, 1))
        return got

    for psi in (0.0, 35.0, 250.0):
        want = scipy.fft.irfft2(np.conj(rotated_template_ft(bank, psi, grid)[0]) * Y, s=(W, W))
        scale = np.abs(want).max()
        # the work-grid spectra also hold faint copies of the template one padded box
        # away (the bilinear kernel's sinc² at ±P): ~1 % here, none in the real-space box
        for box in (full, small):
            t = template_images(bank, psi, grid, box)[0].astype(np.float64)
            assert np.abs(correlate(t) - want).max() < 3e-2 * scale, (psi, box)
        wrong = template_images(bank, -psi - 90.0, grid, full)[0].astype(np.float64)
        assert np.abs(correlate(wrong) - want).max() > 0.3 * scale
        shifted = np.roll(template_images(bank, psi, grid, full)[0], 1, axis=0)
        assert np.abs(correlate(shifted.astype(np.float64)) - want).max() > 0.1 * scale


@pytest.mark.parametrize(
    ("n_psi", "radius_work_px", "factor"),
    [(72, 4.6, 9), (72, 20.0, 3), (72, 40.0, 1), (36, 2.0, 9), (36, 12.0, 1), (51, 2.0, 17)],
)
def test_coarse_step_moves_the_rim_by_at_most_six_work_pixels(n_psi, radius_work_px, factor):
    """The largest factor whose step moves the rim by <= 6 work px and keeps a count
    divisible by 4 (quarter turns) when the fine count is (72 -> 6, 36 -> 18 skipped)."""
    assert coarse_psi_factor(n_psi, radius_work_px) == factor


@pytest.fixture(scope="module")
def picked(tmp_path_factory):
    """Two 512 px micrographs picked at 5° psi: coarse-to-fine (45° coarse), exhaustive,
    and coarse only (the coarse angles alone, exhaustively)."""
    sim = simulate_micrographs(
        tmp_path_factory.mktemp("psi") / "mics",
        n_micrographs=2,
        size_px=512,
        pixel_size_A=PIXEL_A,
        particles_per_micrograph=25,
        box_size=48,
        snr=0.1,
        seed=5,
    )
    volume, _ = read_map(sim.out_dir / "truth_class001.mrc")
    bank = prepare_templates(np.asarray(projection_templates(volume, 1)[0]))
    table = starfile.read(sim.micrographs_star)["micrographs"]
    runs = {"c2f": (5.0, True), "exhaustive": (5.0, False), "coarse": (45.0, False)}
    out = []
    for path, row in zip(sim.micrographs, table.itertuples(), strict=True):
        mic, _ = read_map(path)
        ctf = MicrographCtf(row.rlnDefocusU, row.rlnDefocusV, row.rlnDefocusAngle)
        res = {}
        for name, (step, coarse) in runs.items():
            params = TemplatePickParams(108.0, psi_step_deg=step, coarse_psi=coarse)
            res[name] = pick_templates(mic, PIXEL_A, bank, params, ctf)[:2]
        res["inputs"] = (mic, ctf, bank)
        out.append(res)
    return out


def test_coarse_to_fine_picks_are_the_exhaustive_picks(picked):
    agree = total = 0
    for res in picked:
        (a, fa), (b, fb) = res["c2f"], res["exhaustive"]
        assert fa.psi_refined["coarse_factor"] == 9 and fb.psi_refined is None  # set-up
        assert fa.psi_refined["peaks"] > len(b)
        m = match_coordinates(np.stack([a.y, a.x], 1), np.stack([b.y, b.x], 1), 2.0)
        agree, total = agree + m.n_matched, total + max(len(a), len(b))
        assert fa.template_scale == pytest.approx(fb.template_scale, rel=0.01)
    print(f"coarse-to-fine vs exhaustive psi: {agree} of {total} picks within 2 px")
    assert total > 30 and agree >= 0.95 * total


def test_fine_angles_restore_the_exhaustive_scores_at_the_picks(picked):
    """At the exhaustive scan's picks the scores are the exhaustive ones (the fine
    angles found), where the coarse angles alone fall short; nowhere do they exceed
    the exhaustive scores by more than the real-space scoring's error."""
    for res in picked:
        (b, fb), (_, fa), (_, fc) = res["exhaustive"], res["c2f"], res["coarse"]
        g = fb.grid
        iy, ix = np.rint(b.y * g.scale).astype(int), np.rint(b.x * g.scale).astype(int)
        exh, c2f, coarse = fb.score[iy, ix], fa.score[iy, ix], fc.score[iy, ix]
        assert np.mean(exh - coarse) > 0.005 * np.mean(exh)  # the fine angles matter
        assert np.mean(np.abs(exh - c2f)) < 0.25 * np.mean(exh - coarse)
        assert np.mean(fa.psi_deg[iy, ix] == fb.psi_deg[iy, ix]) > 0.85
        assert (fa.score - fb.score).max() < 2e-2 * fb.score.max()


def test_coarse_to_fine_with_a_fixed_template_scale(picked):
    """RELION's fixed scale (the scan maximises the FOM itself): the same picks."""
    res = picked[0]
    scale = res["exhaustive"][1].template_scale  # a scale that fits these templates
    sim_mic, ctf, bank = res["inputs"]
    out = {}
    for coarse in (True, False):
        params = TemplatePickParams(
            108.0, psi_step_deg=5.0, coarse_psi=coarse, template_scale=scale
        )
        out[coarse] = pick_templates(sim_mic, PIXEL_A, bank, params, ctf)[:2]
    (a, fa), (b, fb) = out[True], out[False]
    assert fa.psi_refined["coarse_factor"] == 9 and len(b) > 15
    m = match_coordinates(np.stack([a.y, a.x], 1), np.stack([b.y, b.x], 1), 2.0)
    assert m.n_matched >= 0.95 * max(len(a), len(b))
    assert (fa.fom - fb.fom).max() < 2e-2 * np.abs(fb.fom).max()


def test_candidates_too_costly_in_real_space_fall_back_to_every_angle(picked, monkeypatch):
    """Past the real-space budget the scan runs every angle by FFT: the exhaustive maps."""
    from streamem.pick import psi_refine

    monkeypatch.setattr(psi_refine, "REAL_SPACE_BUDGET", 0.0)
    mic, ctf, bank = picked[0]["inputs"]
    params = TemplatePickParams(108.0, psi_step_deg=5.0)
    _, res = pick_templates(mic, PIXEL_A, bank, params, ctf)[:2]
    exhaustive = picked[0]["exhaustive"][1]
    assert res.psi_refined is None
    np.testing.assert_array_equal(res.fom, exhaustive.fom)
    np.testing.assert_array_equal(res.psi_deg, exhaustive.psi_deg)
