"""Raised-cosine low/high-pass, phase randomisation, Fourier crop/pad."""

import numpy as np
import pytest
from test_projector import smooth_volume

from streamem.core.filters import fourier_crop, fourier_pad, highpass, lowpass, phase_randomise
from streamem.core.fourier import radial_average, shell_index
from streamem.core.fsc import fsc


def shell_power(x):
    F = np.fft.rfftn(np.fft.ifftshift(x))
    return radial_average(np.abs(F) ** 2, shell_index(x.shape[0], x.ndim), x.shape[0] // 2 + 1)


@pytest.mark.parametrize("shape", [(32, 32), (24, 24, 24), (25, 25, 25)])
def test_lowpass_and_highpass(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    box = shape[0]
    pix = 1.5
    res = box * pix / 6.0  # cutoff at shell 6
    lo = lowpass(x, res, pix, edge_width_shells=2)
    assert lo.dtype == np.float32 and lo.shape == x.shape
    p, p0 = shell_power(lo), shell_power(x)
    np.testing.assert_allclose(p[:5], p0[:5], rtol=1e-5)  # below cutoff - w/2: untouched
    assert np.all(p[8:] < 1e-8 * p0[8:].max())  # beyond cutoff + w/2: gone
    assert 0 < p[6] < p0[6]
    hi = highpass(x, res, pix, edge_width_shells=2)
    np.testing.assert_allclose(lo + hi, x, atol=1e-5)


def test_lowpass_on_image_stack():
    rng = np.random.default_rng(1)
    stack = rng.standard_normal((3, 16, 16))
    out = lowpass(stack, 8.0, 1.0, ndim=2)
    for i in range(3):
        np.testing.assert_allclose(out[i], lowpass(stack[i], 8.0, 1.0), atol=1e-12)


def test_phase_randomise_keeps_amplitudes_and_low_resolution():
    vol = smooth_volume(24)
    pix = 2.0
    out = phase_randomise(vol, 24 * pix / 5, pix, np.random.default_rng(2))
    assert out.dtype == vol.dtype and np.isrealobj(out)
    np.testing.assert_allclose(shell_power(out), shell_power(vol), rtol=1e-8)
    curve = fsc(out, vol)
    np.testing.assert_allclose(curve[:6], 1.0, atol=1e-12)
    assert np.all(np.abs(curve[8:]) < 0.3)
    # reproducible from the seed
    again = phase_randomise(vol, 24 * pix / 5, pix, np.random.default_rng(2))
    np.testing.assert_array_equal(out, again)


@pytest.mark.parametrize("box,new", [(32, 16), (32, 21), (33, 16)])
def test_fourier_crop_and_pad(box, new):
    # a band-limited map survives crop -> pad unchanged
    vol = lowpass(smooth_volume(box), box / (new / 2 - 2), 1.0, edge_width_shells=1)
    small = fourier_crop(vol, new)
    assert small.shape == (new,) * 3
    back = fourier_pad(small, box)
    np.testing.assert_allclose(back, vol, atol=1e-6 * np.abs(vol).max())
    # constants stay constant
    c = fourier_crop(np.full((box, box), 3.0), new, ndim=2)
    np.testing.assert_allclose(c, 3.0)
