"""Post-processing: phase randomisation, mask-corrected FSC, Guinier B-factor,
sharpening helpers, local resolution, and the three CLI commands.

The two "must show" tests:

- ``test_guinier_recovers_applied_bfactor``: half maps of a phantom whose amplitude
  spectrum was first made flat (each Fourier coefficient divided by the mean
  amplitude of its shell: the pseudo-atoms' own Gaussian fall-off would otherwise
  add its own ~100 Å² to the slope), then multiplied by ``exp(-B s² / 4)``, plus
  independent white noise per half (so the SNR falls with resolution as
  ``exp(-B s² / 2)``). The fitted B-factor is within 20 % of B.
- ``test_mask_corrected_fsc_matches_truth``: the reference is the FSC of the half
  maps against the truth "converted for half maps". With half map ``h = T + n``
  (signal power S, noise power N per shell, independent noise),
  ``FSC(h1, h2) = S / (S + N)`` and ``FSC(h, T) = S / sqrt(S (S + N))
  = sqrt(S / (S + N))``, so the half-map FSC the truth predicts is ``FSC(h, T)²``
  (averaged over both halves). The truth is a random density filling the whole
  box, with a strong low-resolution component, and the noise is uniform, so signal
  and noise are the same everywhere and the true FSC of any region equals the
  whole box's: the reference holds for the masked region too. A hard-edged sphere
  mask cuts through that density, its edge spreads the strong low-resolution
  signal into high shells where both halves share it, and the masked FSC is
  inflated; the phase-randomisation correction removes that. The remaining
  difference is sampling noise of one realisation in a 64-voxel box (the masked
  region holds 22 % of it): over 10 random realisations the largest deviation was
  0.02-0.052 (9 of 10 within 0.05; all within 0.035 in a 96-voxel box); the seeds
  here are fixed.
"""

import warnings

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from streamem.cli import main
from streamem.core.backend import irfftn, rfftn
from streamem.core.filters import phase_randomise
from streamem.core.fourier import radial_average, rfft_multiplicity, rfft_radius, shell_index
from streamem.core.fsc import fsc, resolution_at
from streamem.core.masks import soft_sphere
from streamem.io.mrc import read_map, write_map
from streamem.post.guinier import (
    apply_bfactor,
    apply_shell_weights,
    divide_by_mtf,
    fit_guinier,
    fsc_weights,
    guinier_curve,
    mtf_on_grid,
)
from streamem.post.locres import local_resolution, local_resolution_points
from streamem.post.mask import auto_mask
from streamem.post.postprocess import Mtf, corrected_fsc, postprocess, randomize_shell

AXES = (0, 1, 2)
B = 64
PIX = 1.5


def ft(x):
    return rfftn(np.fft.ifftshift(x), AXES)


def ift(F, box=B):
    return np.fft.fftshift(irfftn(F, (box,) * 3, AXES))


def frequency_A(box=B, pix=PIX):
    return rfft_radius(box, 3) / (box * pix)


def random_field(profile, rng, box=B):
    """Gaussian random density with amplitude ``profile`` on the rfft grid."""
    return irfftn(ft(rng.standard_normal((box,) * 3)) * profile, (box,) * 3, AXES)


# -- helpers ------------------------------------------------------------------------


def test_randomize_shell_and_corrected_fsc_formula():
    assert randomize_shell(np.array([1.0, 0.95, 0.85, 0.79, 0.9, 0.1])) == 3
    with pytest.raises(ValueError):
        randomize_shell(np.array([1.0, 0.99, 0.9]))
    t = np.array([1.0, 0.99, 0.9, 0.8, 0.6, 0.5, 0.4])
    n = np.array([1.0, 0.99, 0.9, 0.5, 0.2, 0.1, 0.0])
    c = corrected_fsc(t, n, randomize_from_shell=2)
    # shells < 2 + 2 keep the masked FSC; beyond, (t - n) / (1 - n)
    np.testing.assert_allclose(c[:4], t[:4])
    np.testing.assert_allclose(c[4:], [(0.6 - 0.2) / 0.8, (0.5 - 0.1) / 0.9, 0.4])


def test_fsc_weights():
    w = fsc_weights(np.array([1.0, 0.5, 0.2, 0.05, -0.1, 0.3]))
    np.testing.assert_allclose(
        w, [1.0, np.sqrt(1 / 1.5), np.sqrt(0.4 / 1.2), np.sqrt(0.1 / 1.05), 0.0, 0.0]
    )
    # weights apply per shell round(|k|); shells past the curve get 0
    F = np.ones((8, 8, 5), dtype=complex)
    out = apply_shell_weights(F, np.array([1.0, 0.5, 0.25]))
    shells = shell_index(8, 3)
    np.testing.assert_allclose(out.real, np.choose(np.minimum(shells, 3), [1, 0.5, 0.25, 0]))


def test_bfactor_sign_and_guinier_fit_on_a_clean_map():
    """exp(-B s²/4) on a flat spectrum: the fit gives slope -B/4 and RELION's
    sharpening B-factor -B; applying it restores the flat spectrum up to Nyquist."""
    rng = np.random.default_rng(0)
    F = ft(rng.standard_normal((B,) * 3))
    F /= np.abs(F)  # flat amplitude 1
    decayed = F * np.exp(-80.0 * frequency_A() ** 2 / 4)
    g = guinier_curve(decayed, PIX)
    fit = fit_guinier(g, B, PIX, 10.0, 2 * PIX)
    assert fit.decay_bfactor_A2 == pytest.approx(80.0, rel=0.02)
    assert fit.bfactor_A2 == pytest.approx(-80.0, rel=0.02)
    assert fit.correlation < -0.99
    restored = apply_bfactor(decayed, -80.0, PIX)
    nyq = frequency_A() <= 1 / (2 * PIX)
    np.testing.assert_allclose(np.abs(restored[nyq]), 1.0, rtol=1e-10)
    assert np.all(restored[~nyq] == 0)  # RELION zeroes the corners beyond Nyquist
    with pytest.raises(ValueError, match="shells"):
        fit_guinier(g, B, PIX, 10.0, 9.0)


def test_mtf_division_inverts_mtf():
    inv_px = np.linspace(0.0, 0.5, 11)
    value = np.exp(-3 * inv_px)  # a detector MTF, 1/pixel of a 1.0 Å micrograph
    mtf = Mtf.from_relion(inv_px, value, micrograph_pixel_size_A=1.0)
    np.testing.assert_allclose(mtf.frequency_A, inv_px / 1.0)
    rng = np.random.default_rng(1)
    F = ft(rng.standard_normal((B,) * 3))
    on_grid = mtf_on_grid(F, PIX, mtf.frequency_A, mtf.value)
    s = frequency_A()
    table = s <= 0.5  # linear interpolation inside the table, held constant beyond
    np.testing.assert_allclose(on_grid[table], np.exp(-3 * s[table]), rtol=4e-3)
    np.testing.assert_allclose(on_grid[~table], np.exp(-1.5))
    back = divide_by_mtf(F * on_grid, PIX, mtf.frequency_A, mtf.value)
    nyq = s < 1 / (2 * PIX)
    np.testing.assert_allclose(back[nyq], F[nyq], rtol=1e-10)
    with pytest.raises(ValueError):
        mtf_on_grid(F, PIX, [0.0, 0.1], [1.0, 0.0])


def test_phase_randomisation_keeps_amplitudes_and_decorrelates_beyond():
    rng = np.random.default_rng(3)
    vol = random_field(np.exp(-20 * frequency_A() ** 2), rng)
    cut_shell = 12
    out = phase_randomise(vol, B * PIX / (cut_shell + 0.5), PIX, np.random.default_rng(4))
    F, G = ft(vol), ft(out)
    np.testing.assert_allclose(np.abs(G), np.abs(F), rtol=1e-6, atol=1e-9 * np.abs(F).max())
    curve = fsc(vol, out)
    np.testing.assert_allclose(curve[: cut_shell + 1], 1.0, atol=1e-10)
    # beyond the cut the phases are random: FSC ~ 0 within its sampling noise 1/sqrt(n)
    shells = shell_index(B, 3)
    n_coeff = np.bincount(shells.ravel(), weights=rfft_multiplicity(B, 3).ravel())[: B // 2 + 1]
    beyond = curve[cut_shell + 1 :]
    assert np.all(np.abs(beyond) < 4 / np.sqrt(n_coeff[cut_shell + 1 :] / 2))
    assert abs(beyond.mean()) < 0.02


# -- must show 1: Guinier B-factor ----------------------------------------------------


@pytest.fixture(scope="module")
def whitened_phantom():
    from streamem.simulate.phantoms import phantom

    F = ft(phantom("asym", B, PIX).astype(np.float64))
    shells = shell_index(B, 3)
    mean_amp = radial_average(np.abs(F), shells, int(shells.max()) + 1, rfft_multiplicity(B, 3))
    return F / np.where(mean_amp[shells] > 0, mean_amp[shells], 1.0)  # flat spectrum


@pytest.mark.parametrize("bfactor", [100.0, 150.0])
def test_guinier_recovers_applied_bfactor(whitened_phantom, bfactor):
    truth = ift(whitened_phantom * np.exp(-bfactor * frequency_A() ** 2 / 4))
    rng = np.random.default_rng(int(bfactor))
    sigma = 3.0 * truth.std()
    half1 = truth + sigma * rng.standard_normal(truth.shape)
    half2 = truth + sigma * rng.standard_normal(truth.shape)
    mask = auto_mask(truth, PIX)  # 15 Å low-pass, 3 px extension, 6 px soft edge
    res = postprocess(half1, half2, PIX, mask=mask)
    fit = res.guinier_fit
    print(
        f"B applied {bfactor}: estimated {fit.decay_bfactor_A2:.1f} Å², "
        f"resolution {res.resolution_A:.2f} Å, fit {fit.n_points} shells"
    )
    assert 10.0 / res.resolution_A > 2  # the fit spans a real range
    assert fit.decay_bfactor_A2 == pytest.approx(bfactor, rel=0.2)
    assert res.bfactor_A2 == pytest.approx(-fit.decay_bfactor_A2)  # RELION's sign
    # Sharpening undoes the decay: inside the mask, the sharpened map's amplitudes
    # stay flat from 10 Å to just before the low-pass edge at the resolution.
    flat = fit_guinier(
        guinier_curve(ft(res.sharpened * mask), PIX),
        B,
        PIX,
        10.0,
        B * PIX / (B * PIX / res.resolution_A - 2),
    )
    assert abs(flat.decay_bfactor_A2) < 0.2 * bfactor
    assert res.sharpened.shape == (B,) * 3 and res.sharpened.dtype == np.float32
    np.testing.assert_allclose(res.sharpened_masked, res.sharpened * mask, rtol=1e-6)


# -- must show 2: mask-corrected FSC against the truth --------------------------------


def test_mask_corrected_fsc_matches_truth():
    rng = np.random.default_rng(5)
    s = frequency_A()
    signal = np.exp(-100 * s**2 / 4) * (1 + 30 * np.exp(-((30 * s) ** 2)))  # strong low res
    truth = random_field(signal, rng)
    sigma = np.sqrt(np.mean(random_field(np.exp(-100 * s**2 / 4), rng) ** 2))
    half1 = truth + sigma * rng.standard_normal(truth.shape)
    half2 = truth + sigma * rng.standard_normal(truth.shape)
    mask = soft_sphere(B, 24, 0)  # hard edge through the density
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = postprocess(half1, half2, PIX, mask=mask, bfactor_A2=0.0, force_mask=True, seed=11)
    reference = 0.5 * (fsc(half1, truth) ** 2 + fsc(half2, truth) ** 2)
    where = reference > 0.2
    deviation = np.abs(res.fsc_corrected - reference)[where]
    inflation = (res.fsc_masked - reference)[where]
    print(
        f"max |corrected - truth| {deviation.max():.3f}; masked inflated by up to "
        f"{inflation.max():.3f}; randomised from shell {res.randomize_from_shell}"
    )
    assert inflation.max() > 0.06  # the test has teeth: without correction it fails
    assert deviation.max() <= 0.05
    assert res.resolution_A == pytest.approx(resolution_at(reference, 0.143, B, PIX), rel=0.05)


def test_clean_mask_changes_nothing_and_unmasked_mode():
    """A mask that contains all of a compact particle gives a corrected FSC equal to
    the masked one (no phase-randomised correlation), and no mask gives the
    unmasked curve."""
    rng = np.random.default_rng(6)
    s = frequency_A()
    truth = random_field(np.exp(-60 * s**2 / 4), rng) * soft_sphere(B, 12, 4)
    half1 = truth + 0.5 * truth.std() * rng.standard_normal(truth.shape)
    half2 = truth + 0.5 * truth.std() * rng.standard_normal(truth.shape)
    res = postprocess(half1, half2, PIX, mask=soft_sphere(B, 18, 6), bfactor_A2=-50.0)
    k = res.randomize_from_shell
    assert np.all(np.abs(res.fsc_random_masked[k + 2 :]) < 0.1)
    np.testing.assert_allclose(res.fsc_corrected, res.fsc_masked, atol=0.1)
    assert res.bfactor_A2 == -50.0 and res.guinier_fit is None
    plain = postprocess(half1, half2, PIX, bfactor_A2=-50.0)
    assert plain.fsc_masked is None and plain.sharpened_masked is None
    np.testing.assert_array_equal(plain.fsc_corrected, plain.fsc_unmasked)


def test_postprocess_rejects_bad_arrays():
    a = np.zeros((16,) * 3)
    with pytest.raises(ValueError):
        postprocess(a, np.zeros((16, 16, 17)), 1.0)
    with pytest.raises(ValueError):
        postprocess(a, a, 1.0, mask=np.full((16,) * 3, 2.0))


def low_resolution_halves(box=B, pix=PIX, seed=2):
    """Half maps of a soft-edged blob whose FSC falls below 0.143 near 10 Å."""
    rng = np.random.default_rng(seed)
    s = rfft_radius(box, 3) / (box * pix)
    t = irfftn(ft(rng.standard_normal((box,) * 3)) * np.exp(-3000 * s**2 / 4), (box,) * 3, AXES)
    t = t * soft_sphere(box, box // 4, 10)
    sd = t.std()
    return t + sd * rng.standard_normal(t.shape), t + sd * rng.standard_normal(t.shape)


def test_postprocess_at_low_resolution_warns_and_does_not_sharpen():
    """Issue 24: half maps at ~10 Å leave < 3 shells for a Guinier fit from 10 Å.
    As RELION: a warning, no B-factor, and still every FSC, the resolution and the
    (FSC-weighted, low-passed) maps; a given B-factor is applied as usual."""
    h1, h2 = low_resolution_halves()
    mask = soft_sphere(B, 24, 6)
    with pytest.warns(UserWarning, match="no sharpening"):
        res = postprocess(h1, h2, PIX, mask=mask)
    assert res.resolution_A > 9.0
    assert res.guinier_fit is None and res.guinier_fitted is None and res.bfactor_A2 == 0.0
    assert any("Guinier fit" in w for w in res.warnings)
    for curve in (res.fsc_unmasked, res.fsc_masked, res.fsc_random_masked, res.fsc_corrected):
        assert curve.shape == (B // 2 + 1,) and np.all(np.isfinite(curve))
    assert res.randomize_from_shell is not None
    np.testing.assert_allclose(res.guinier_sharpened, res.guinier_weighted)  # nothing applied
    assert res.lowpass_A == pytest.approx(res.resolution_A)
    assert np.isfinite(res.sharpened).all() and res.sharpened.std() > 0
    np.testing.assert_allclose(res.sharpened_masked, res.sharpened * mask, rtol=1e-6)
    # with --bfactor the given B-factor is applied, without a warning about the fit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        given = postprocess(h1, h2, PIX, mask=mask, bfactor_A2=-200.0)
    assert not any("Guinier" in str(w.message) for w in caught)
    assert given.bfactor_A2 == -200.0 and given.resolution_A == pytest.approx(res.resolution_A)
    s2 = given.frequency_squared_A2
    k = int(B * PIX / 20.0)  # a shell at 20 Å: sharpened by exp(+200 s² / 4)
    assert given.guinier_sharpened[k] - given.guinier_weighted[k] == pytest.approx(
        50 * s2[k], rel=0.05
    )


# -- local resolution -------------------------------------------------------------------


def test_local_resolution_follows_local_noise():
    """Noise low on one side (-x) and high on the other (+x): the local resolution on
    each side matches the global resolution of maps with that noise everywhere."""
    rng = np.random.default_rng(1)
    truth = random_field(np.exp(-100 * frequency_A() ** 2 / 4), rng)
    x = np.arange(B) - B // 2
    low, high = 1.5, 4.0
    ramp = low + (high - low) / (1 + np.exp(-x / 2.0))
    n1, n2 = rng.standard_normal(truth.shape), rng.standard_normal(truth.shape)
    sd = truth.std()
    half1 = truth + sd * ramp * n1
    half2 = truth + sd * ramp * n2
    reference = {
        level: resolution_at(fsc(truth + sd * level * n1, truth + sd * level * n2), 0.143, B, PIX)
        for level in (low, high)
    }
    lr = local_resolution_points(
        half1, half2, PIX, step_px=10, window_radius_px=8, edge_px=8, randomize_at_A=15.0
    )
    px = lr.points_px[:, 2] - B // 2
    left, right = np.median(lr.resolution_A[px < -8]), np.median(lr.resolution_A[px > 8])
    print(
        f"local {left:.2f} / {right:.2f} Å vs global {reference[low]:.2f} / {reference[high]:.2f} Å"
    )
    assert left == pytest.approx(reference[low], rel=0.15)
    assert right == pytest.approx(reference[high], rel=0.25)
    m = lr.map
    assert m.shape == (B,) * 3 and m.dtype == np.float32
    assert np.median(m[:, :, 8:20]) < np.median(m[:, :, 44:56])
    # every covered voxel holds a resolution between Nyquist and the cap
    covered = m > 0
    assert covered.mean() > 0.5
    assert np.all((m[covered] >= 2 * PIX - 1e-4) & (m[covered] <= 50.0 + 1e-4))
    # a mask restricts the sampled points to its neighbourhood
    mask = soft_sphere(B, 10, 2)
    only = local_resolution_points(
        half1, half2, PIX, mask=mask, step_px=10, window_radius_px=8, edge_px=8, randomize_at_A=15.0
    )
    assert 0 < len(only.points_px) < len(lr.points_px)
    assert np.all(np.linalg.norm(only.points_px - B // 2, axis=1) <= 10 + 2 + 5)
    np.testing.assert_array_equal(
        local_resolution(
            half1, half2, mask, PIX, step_px=10, window_radius_px=8, edge_px=8, randomize_at_A=15.0
        ),
        only.map,
    )


# -- CLI ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """Half maps and a truth map of a phantom on disk (box 48, 2 Å)."""
    from streamem.simulate.phantoms import phantom

    box, pix = 48, 2.0
    d = tmp_path_factory.mktemp("maps")
    truth = phantom("asym", box, pix).astype(np.float64)
    s = rfft_radius(box, 3) / (box * pix)
    truth = np.fft.fftshift(
        irfftn(rfftn(np.fft.ifftshift(truth), AXES) * np.exp(-60 * s**2 / 4), (box,) * 3, AXES)
    )
    rng = np.random.default_rng(7)
    sd = truth.std()
    write_map(d / "truth.mrc", truth, pix)
    write_map(
        d / "run_half1_class001_unfil.mrc", truth + sd * rng.standard_normal(truth.shape), pix
    )
    write_map(
        d / "run_half2_class001_unfil.mrc", truth + sd * rng.standard_normal(truth.shape), pix
    )
    return d, box, pix


def test_cli_mask_create_postprocess_local_resolution(maps, tmp_path, capsys):
    d, box, pix = maps
    h1, h2 = str(d / "run_half1_class001_unfil.mrc"), str(d / "run_half2_class001_unfil.mrc")
    mask_path = tmp_path / "mask.mrc"
    truth, _ = read_map(d / "truth.mrc")
    args = ["--threshold", str(0.05 * truth.max()), "--extend", "3", "--soft-edge", "5"]
    assert (
        main(
            ["mask-create", str(d / "truth.mrc"), *args, "--lowpass", "10", "--out", str(mask_path)]
        )
        == 0
    )
    mask, voxel = read_map(mask_path)
    assert voxel == pytest.approx(pix) and mask.shape == (box,) * 3
    assert mask.min() == 0 and mask.max() == 1

    out = tmp_path / "post"
    assert main(["postprocess", h1, h2, "--mask", str(mask_path), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {
        ".streamem-output",
        "postprocess.mrc",
        "postprocess_masked.mrc",
        "postprocess.star",
        "postprocess_fsc.png",
        "postprocess_guinier.png",
    }
    for name in ("postprocess.mrc", "postprocess_masked.mrc"):
        with mrcfile.open(out / name) as mrc:
            assert mrc.data.shape == (box,) * 3 and mrc.data.dtype == np.float32
            assert float(mrc.voxel_size.x) == pytest.approx(pix)
    star = starfile.read(out / "postprocess.star", always_dict=True)
    general, fsc_table, guinier = star["general"], star["fsc"], star["guinier"]
    general = general.iloc[0] if isinstance(general, pd.DataFrame) else pd.Series(general)
    # the STAR holds what the library computes from the same files
    h1m, _ = read_map(h1)
    h2m, _ = read_map(h2)
    lib = postprocess(h1m, h2m, pix, mask=mask)
    assert float(general["rlnFinalResolution"]) == pytest.approx(lib.resolution_A)
    assert float(general["rlnBfactorUsedForSharpening"]) == pytest.approx(lib.bfactor_A2)
    assert float(general["rlnBfactorUsedForSharpening"]) < 0
    assert float(general["rlnRandomiseFrom"]) == pytest.approx(lib.randomize_from_A)
    assert general["rlnMaskName"] == str(mask_path)
    assert list(fsc_table["rlnSpectralIndex"]) == list(range(box // 2 + 1))
    np.testing.assert_allclose(
        fsc_table["rlnAngstromResolution"][1:], box * pix / np.arange(1, box // 2 + 1)
    )
    for col, curve in [
        ("rlnFourierShellCorrelationCorrected", lib.fsc_corrected),
        ("rlnFourierShellCorrelationUnmaskedMaps", lib.fsc_unmasked),
        ("rlnFourierShellCorrelationMaskedMaps", lib.fsc_masked),
        ("rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps", lib.fsc_random_masked),
    ]:
        np.testing.assert_allclose(fsc_table[col], curve)
    for col in (
        "rlnResolutionSquared",
        "rlnLogAmplitudesOriginal",
        "rlnLogAmplitudesWeighted",
        "rlnLogAmplitudesSharpened",
        "rlnLogAmplitudesIntercept",
    ):
        assert col in guinier
    sharpened, _ = read_map(out / "postprocess.mrc")
    np.testing.assert_allclose(sharpened, lib.sharpened, atol=1e-6 * np.abs(lib.sharpened).max())
    assert "final resolution" in capsys.readouterr().out

    # auto-mask, given B-factor, MTF
    mtf = tmp_path / "mtf.star"
    starfile.write(
        {
            "mtf": pd.DataFrame(
                {
                    "rlnResolutionInversePixel": np.linspace(0, 0.5, 6),
                    "rlnMtfValue": np.linspace(1.0, 0.5, 6),
                }
            )
        },
        mtf,
    )
    out2 = tmp_path / "post_auto"
    assert (
        main(
            [
                "postprocess",
                h1,
                h2,
                "--auto-mask",
                "--bfactor",
                "-40",
                "--mtf",
                str(mtf),
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    assert (out2 / "postprocess_automask.mrc").exists()
    star2 = starfile.read(out2 / "postprocess.star", always_dict=True)
    g2 = star2["general"]
    g2 = g2.iloc[0] if isinstance(g2, pd.DataFrame) else pd.Series(g2)
    assert float(g2["rlnBfactorUsedForSharpening"]) == -40.0
    assert "rlnLogAmplitudesMTFCorrected" in star2["guinier"]
    # existing output is refused without --overwrite, and replaced with it
    assert main(["postprocess", h1, h2, "--auto-mask", "--out", str(out2)]) == 2
    assert main(["postprocess", h1, h2, "--auto-mask", "--out", str(out2), "--overwrite"]) == 0

    locres = tmp_path / "locres.mrc"
    assert (
        main(
            [
                "local-resolution",
                h1,
                h2,
                "--mask",
                str(mask_path),
                "--sampling",
                "16",
                "--out",
                str(locres),
            ]
        )
        == 0
    )
    lr, voxel = read_map(locres)
    assert voxel == pytest.approx(pix) and lr.shape == (box,) * 3
    inside = mask > 0.5
    assert np.all((lr[inside] >= 2 * pix - 1e-4) & (lr[inside] <= 50 + 1e-4))


def _write(path, data, pix=2.0):
    write_map(path, data, pix)
    return str(path)


@pytest.mark.filterwarnings("ignore:Data array contains NaN:RuntimeWarning")
@pytest.mark.parametrize(
    "case",
    ["missing", "box", "voxel", "nan", "mask_box", "mask_range", "mtf_columns", "not_cubic"],
)
def test_cli_bad_input(maps, tmp_path, capsys, case):
    d, box, pix = maps
    h1, h2 = str(d / "run_half1_class001_unfil.mrc"), str(d / "run_half2_class001_unfil.mrc")
    good, _ = read_map(h1)
    extra = []
    if case == "missing":
        h2 = str(tmp_path / "nope.mrc")
    elif case == "box":
        h2 = _write(tmp_path / "small.mrc", good[:40, :40, :40])
    elif case == "voxel":
        h2 = _write(tmp_path / "vox.mrc", good, pix=1.0)
    elif case == "nan":
        bad = good.copy()
        bad[3, 3, 3] = np.nan
        h2 = _write(tmp_path / "nan.mrc", bad)
    elif case == "mask_box":
        extra = ["--mask", _write(tmp_path / "m.mrc", np.ones((32,) * 3, np.float32))]
    elif case == "mask_range":
        extra = ["--mask", _write(tmp_path / "m.mrc", np.full((box,) * 3, 2.0, np.float32))]
    elif case == "mtf_columns":
        bad_mtf = tmp_path / "mtf.star"
        starfile.write(
            {"mtf": pd.DataFrame({"rlnResolution": [0.0, 0.5], "rlnMtfValue": [1, 0.5]})}, bad_mtf
        )
        extra = ["--mtf", str(bad_mtf)]
    elif case == "not_cubic":
        h2 = _write(tmp_path / "flat.mrc", good[:, :, :40])
    out = tmp_path / "post"
    assert main(["postprocess", h1, h2, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("streamem postprocess: error:") and "\n" not in err
    assert not out.exists()
    assert not any(p.name.startswith(".post") for p in tmp_path.iterdir())
    if case in ("missing", "box", "voxel", "nan", "not_cubic"):
        locres = tmp_path / "locres.mrc"
        assert main(["local-resolution", h1, h2, "--out", str(locres)]) == 2
        assert not locres.exists()


def test_cli_mask_create_bad_input(tmp_path, capsys):
    out = tmp_path / "mask.mrc"
    assert (
        main(["mask-create", str(tmp_path / "none.mrc"), "--threshold", "1", "--out", str(out)])
        == 2
    )
    vol = _write(tmp_path / "v.mrc", np.zeros((16,) * 3, np.float32))
    assert main(["mask-create", vol, "--threshold", "1", "--out", str(out)]) == 2  # empty
    assert (
        main(["mask-create", vol, "--threshold", "-1", "--soft-edge", "-2", "--out", str(out)]) == 2
    )
    assert not out.exists()
    assert "error" in capsys.readouterr().err


def test_cli_identical_half_maps(maps, tmp_path, capsys):
    d, _, _ = maps
    h1 = str(d / "run_half1_class001_unfil.mrc")
    out = tmp_path / "post"
    assert main(["postprocess", h1, h1, "--auto-mask", "--out", str(out)]) == 2
    assert "never falls below 0.8" in capsys.readouterr().err
    assert not out.exists()


def test_cli_postprocess_at_low_resolution(tmp_path, capsys):
    """Issue 24: ``streamem postprocess`` on ~10 Å half maps with a mask exits 0 with a
    warning, B-factor 0 in the STAR, and writes the FSCs, the resolution and the maps."""
    h1, h2 = low_resolution_halves()
    mask = soft_sphere(B, 24, 6)
    paths = [_write(tmp_path / f"{n}.mrc", a, PIX) for n, a in (("h1", h1), ("h2", h2))]
    mask_path = _write(tmp_path / "mask.mrc", mask.astype(np.float32), PIX)
    out = tmp_path / "post"
    assert main(["postprocess", *paths, "--mask", mask_path, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "warning: Guinier fit" in printed and "no sharpening" in printed
    for name in ("postprocess.mrc", "postprocess_masked.mrc", "postprocess_fsc.png"):
        assert (out / name).is_file()
    star = starfile.read(out / "postprocess.star", always_dict=True)
    general = star["general"]
    general = general.iloc[0] if isinstance(general, pd.DataFrame) else pd.Series(general)
    assert float(general["rlnBfactorUsedForSharpening"]) == 0.0
    assert float(general["rlnFinalResolution"]) > 9.0
    assert "rlnFittedSlopeGuinierPlot" not in general
    fsc_table = star["fsc"]
    for col in (
        "rlnFourierShellCorrelationCorrected",
        "rlnFourierShellCorrelationMaskedMaps",
        "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps",
    ):
        assert np.isfinite(fsc_table[col]).all()
    sharpened, _ = read_map(out / "postprocess.mrc")
    assert np.isfinite(sharpened).all() and sharpened.std() > 0
