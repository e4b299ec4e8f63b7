"""FSC per shell and the resolution at a threshold."""

import numpy as np
import pytest
from test_projector import smooth_volume

from streamem.core.fsc import fsc, fsc_fourier, resolution_at, shell_resolution_A


def full_grid_fsc(a, b):
    """Independent reference: FSC over the full (non-rfft) FFT grid."""
    box = a.shape[0]
    fa, fb = np.fft.fftn(a), np.fft.fftn(b)
    k = np.fft.fftfreq(box, 1 / box)
    r = np.sqrt(sum(g**2 for g in np.meshgrid(*(k,) * a.ndim, indexing="ij")))
    s = np.rint(r).astype(int).ravel()
    n = box // 2 + 1
    keep = s < n
    num = np.bincount(s[keep], np.real(fa * np.conj(fb)).ravel()[keep], n)
    d1 = np.bincount(s[keep], (np.abs(fa) ** 2).ravel()[keep], n)
    d2 = np.bincount(s[keep], (np.abs(fb) ** 2).ravel()[keep], n)
    return num / np.sqrt(d1 * d2)


@pytest.mark.parametrize("box", [16, 17])
@pytest.mark.parametrize("ndim", [2, 3])
def test_fsc_matches_full_grid_reference(box, ndim):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((box,) * ndim)
    b = a + 2 * rng.standard_normal((box,) * ndim)
    curve = fsc(a, b)
    assert curve.shape == (box // 2 + 1,)
    np.testing.assert_allclose(curve[1:], full_grid_fsc(a, b)[1:], atol=1e-12)
    assert curve[0] == 1.0


def test_fsc_invariants():
    v = smooth_volume(16)
    np.testing.assert_allclose(fsc(v, v), 1.0)
    np.testing.assert_allclose(fsc(v, 3 * v), 1.0)
    np.testing.assert_allclose(fsc(v, -v)[1:], -1.0)
    # shifts in real space change phases: the FSC is not translation invariant
    assert fsc(v, np.roll(v, 3, axis=2))[5] < 0.9
    rng = np.random.default_rng(1)
    noise = fsc(rng.standard_normal((24,) * 3), rng.standard_normal((24,) * 3))
    assert np.all(np.abs(noise[3:]) < 0.2)
    with pytest.raises(ValueError):
        fsc(v, v[:-1])


def test_fsc_fourier_is_the_same_curve():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 12, 12, 12))
    fa = np.fft.rfftn(np.fft.ifftshift(a))
    fb = np.fft.rfftn(np.fft.ifftshift(b))
    np.testing.assert_allclose(fsc_fourier(fa, fb, 12), fsc(a, b))


def test_shell_resolution():
    res = shell_resolution_A(100, 1.5)
    assert res[0] == np.inf and res[1] == 150.0 and res[50] == 3.0


def test_resolution_at_interpolates_the_first_crossing():
    # falls from 0.5 at shell 4 to 0.1 at shell 5: 0.143 is crossed at 4 + 0.357/0.4
    curve = np.array([1.0, 0.9, 0.8, 0.7, 0.5, 0.1, 0.3, 0.0, 0.0])
    k = 4 + (0.5 - 0.143) / 0.4
    assert resolution_at(curve, 0.143, 16, 2.0) == pytest.approx(16 * 2.0 / k)
    # exactly on the threshold at shell 4 (not below it): the crossing is shell 4
    assert resolution_at(curve, 0.5, 16, 2.0) == pytest.approx(16 * 2.0 / 4.0)
    # never below: Nyquist
    assert resolution_at(np.ones(9), 0.143, 16, 2.0) == pytest.approx(4.0)
    # below already at shell 1: no better than shell 1
    assert resolution_at(np.array([1.0, 0.0, 0.0]), 0.5, 4, 1.0) <= 4.0


def test_classification_ssnr_resolution_and_map_power():
    from streamem.em.mstep import resolution_from_ssnr, tau2_from_map

    ssnr = np.array([9.0, 5.0, 3.0, 2.0, 0.5, 2.0])
    assert resolution_from_ssnr(ssnr, 32, 2.0) == pytest.approx(32 * 2.0 / 3)
    assert resolution_from_ssnr(np.array([9.0, 0.5, 2.0]), 32, 2.0) == 999.0
    assert resolution_from_ssnr(np.full(5, 3.0), 32, 2.0) == pytest.approx(32 * 2.0 / 4)
    # white noise of variance s²: E|F(k)|² = B³ s² (unnormalised DFT), τ² = half of it
    B, s = 32, 0.7
    vol = np.random.default_rng(0).normal(0, s, (B, B, B))
    tau2 = tau2_from_map(vol)
    np.testing.assert_allclose(tau2[3:].mean(), B**3 * s**2 / 2, rtol=0.05)
