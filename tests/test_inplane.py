"""class2d's E-step (em/inplane.py) follows the array namespace of its model.

The E-step runs where ``model.inv_sigma2`` lives (what ``dist.device.model_on_device``
moves to a GPU worker; ``Class2DModel.host_fields`` keep the class images, psi and
priors on the host, since the references are rotated with scipy.ndimage). Under
``array_api_strict`` every NumPy-only call on a device array fails, so equal statistics
under NumPy and array_api_strict show the E-step is written against the standard.
"""

import dataclasses

import numpy as np
import pytest

from streamem.core.ctf import OpticsParams
from streamem.dist.device import to_device
from streamem.em import fourier_points, inplane

xps = pytest.importorskip("array_api_strict")

B, N, K = 24, 16, 2


def _chunk(scale_free: bool = False):
    """Two random classes, noisy rotated and shifted copies with CTFs, and a model."""
    rng = np.random.default_rng(3)
    c = np.arange(B) - B // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    classes = np.stack(
        [
            np.exp(-((x - 4) ** 2 + y**2) / 6.0) + np.exp(-(x**2 + (y - 5) ** 2) / 3.0),
            np.exp(-((x + 3) ** 2 + (y + 3) ** 2) / 5.0),
        ]
    ).astype(np.float32)
    labels = rng.integers(0, K, N)
    psi = rng.choice(np.arange(6) * 60.0, N)
    imgs = np.stack(
        [
            inplane.rotate_images(classes[k][None], [p])[0, 0]
            for k, p in zip(labels, psi, strict=True)
        ]
    )
    imgs = np.roll(imgs, 1, axis=-1) + 0.3 * rng.standard_normal((N, B, B))
    metadata = {
        "rlnDefocusU": rng.uniform(12000, 20000, N),
        "rlnDefocusV": rng.uniform(12000, 20000, N),
        "rlnDefocusAngle": rng.uniform(0, 180, N),
        "rlnOpticsGroup": np.ones(N, np.int64),
        "rlnOriginXAngst": rng.uniform(-3, 3, N),
        "rlnOriginYAngst": rng.uniform(-3, 3, N),
    }
    model = inplane.Class2DModel(
        class_images=classes, log_class_prior=np.log([0.6, 0.4]), psi_deg=np.arange(6) * 60.0,
        box_size=B, pixel_size_A=3.0, max_radius_px=9.0, inv_sigma2=np.full((1, B // 2 + 1), 5.0),
        optics=(OpticsParams(300.0, 2.7, 0.1),), sigma_offset_A=6.0, offset_range_px=2.0,
        offset_step_px=1.0, scale_free=scale_free, ctf_intact_first_peak=True,
    )  # fmt: skip
    return imgs.astype(np.float32), metadata, model


def _assert_same(a, b, rtol=1e-5):
    (sa, ra), (sb, rb) = a, b
    for f in dataclasses.fields(sa):
        if f.name in ("phase_seconds", "coarse_flops"):  # timings, not statistics
            continue
        x, y = getattr(sa, f.name), getattr(sb, f.name)
        if f.name in ("grid_shape", "phase_points"):  # layout and work done, not statistics
            assert x == y, f.name
            continue
        if f.name == "class_weight_halves":  # kept by the 3D jobs only (None in class2d)
            assert x is None and y is None, f.name
            continue
        assert isinstance(y, np.ndarray | float | int), f.name  # statistics on the host
        scale = max(float(np.max(np.abs(x))), 1e-30)
        assert np.max(np.abs(np.asarray(x) - np.asarray(y))) <= rtol * scale, f.name
    for f in dataclasses.fields(ra):
        x, y = getattr(ra, f.name), getattr(rb, f.name)
        assert isinstance(y, np.ndarray), f.name
        assert np.allclose(x, y, rtol=rtol, atol=1e-12), f.name


def _fourier_data_on_host(images, metadata, coords, flat, pixel_size_A, optics, do_ctf, xp):
    """fourier_points.fourier_data on the host, its results moved to ``xp``."""
    X, ctf, groups = _HOST_FOURIER_DATA(
        images, metadata, coords, flat, pixel_size_A, optics, do_ctf, np
    )
    return xp.asarray(X), xp.asarray(ctf), groups


_HOST_FOURIER_DATA = fourier_points.fourier_data


@pytest.mark.parametrize("scale_free", [False, True])
def test_estep_arrays_are_array_api_clean(monkeypatch, scale_free):
    """With the chunk's transforms made on the host and moved to array_api_strict, the
    rest of the E-step (rotated references, GEMMs, posteriors, significance, sums, noise)
    runs on strict arrays and gives NumPy's statistics and per-particle results.
    (fourier_points.fourier_data has its own strict test in the whole-path test below.)"""
    images, metadata, model = _chunk(scale_free)
    want = inplane.expectation_2d(images, metadata, model)
    assert want[0].weight_sum == N and np.isclose(want[0].class_weight.sum(), N, rtol=1e-4)
    monkeypatch.setattr(inplane, "fourier_data", _fourier_data_on_host)
    device = to_device(model, xps)
    assert device.class_images is model.class_images  # host_fields stay on the host
    assert not isinstance(device.inv_sigma2, np.ndarray)
    _assert_same(want, inplane.expectation_2d(images, metadata, device))
    # class images given on the device too: rotated on the host all the same
    both = dataclasses.replace(device, class_images=xps.asarray(model.class_images))
    _assert_same(want, inplane.expectation_2d(images, metadata, both))


def test_whole_estep_under_array_api_strict():
    """The whole chunk E-step, images moved to the model's namespace inside it."""
    images, metadata, model = _chunk()
    want = inplane.expectation_2d(images, metadata, model)
    # the images' float32 FFTs differ in rounding (scipy.fft on NumPy, numpy.fft under
    # array_api_strict): ~4e-5 relative in the posteriors, hence the looser tolerance
    _assert_same(want, inplane.expectation_2d(images, metadata, to_device(model, xps)), 2e-4)


def test_weighted_real_sums_is_the_weighted_sum():
    """kernels.weighted_real_sums (appended for class2d): Σ_s W[s, r] Y[s, m], batched."""
    from streamem.em.kernels import weighted_real_sums

    rng = np.random.default_rng(0)
    W, Y = rng.random((3, 7, 4)), rng.standard_normal((3, 7, 5))
    want = np.einsum("bsr,bsm->brm", W, Y)
    assert np.allclose(weighted_real_sums(W, Y), want)
    got = weighted_real_sums(xps.asarray(W), xps.asarray(Y))
    assert np.allclose(np.asarray(got), want)
