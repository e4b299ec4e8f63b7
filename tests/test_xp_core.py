"""The core numerics under every array backend (the ``xp`` fixture: NumPy,
array_api_strict, CuPy on a GPU) give NumPy's results and stay in the input's
namespace: a NumPy-only call in a kernel fails here under array_api_strict."""

import numpy as np
import pytest
from scipy.special import logsumexp as scipy_logsumexp
from test_backprojector import random_rotations
from test_projector import smooth_volume

from streamem.core import backend
from streamem.core.backend import to_numpy, xp_of
from streamem.core.backprojector import (
    apply_symmetry,
    empty_accumulators,
    insert_points,
    reconstruct,
    reconstruction_noise_spectrum,
)
from streamem.core.ctf import OpticsParams, ctf_rfft, phase_flip
from streamem.core.filters import fourier_crop, fourier_pad, lowpass, phase_randomise
from streamem.core.fourier import (
    image_fourier_coords,
    n_points_within,
    radial_average,
    scatter_to_rfft,
    shell_index,
)
from streamem.core.fsc import fsc
from streamem.core.masks import soft_sphere
from streamem.core.projector import make_projector, project_images, project_points
from streamem.core.sampling import shift_phases
from streamem.core.symmetry import symmetry_matrices

BOX = 24


def _close(got, want, xp, rtol=1e-5, atol=1e-6):
    """``got`` lives in ``xp`` and matches the NumPy result ``want``."""
    assert xp_of(got) is xp, type(got)
    np.testing.assert_allclose(to_numpy(got), want, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------
# backend shims


def test_xp_of_names_the_namespace_and_rejects_mixtures(xp):
    a = xp.asarray([1.0, 2.0])
    assert xp_of(a) is xp
    assert xp_of(a, None, 3.0) is xp
    assert xp_of() is np
    if xp is not np:
        with pytest.raises(TypeError):
            xp_of(a, np.ones(2))
    np.testing.assert_array_equal(to_numpy(a), [1.0, 2.0])
    assert xp_of(backend.asarray_like(np.ones(3), a)) is xp
    assert isinstance(backend.asarray_like(a, np.ones(1)), np.ndarray)


def test_segment_shims_match_numpy(xp):
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 9, 60)
    vals = rng.standard_normal(60) + 1j * rng.standard_normal(60)
    I, V = xp.asarray(idx), xp.asarray(vals)
    _close(backend.bincount(I, backend.real(V), 11), np.bincount(idx, vals.real, 11), xp)
    np.testing.assert_array_equal(to_numpy(backend.bincount(I)), np.bincount(idx))
    ref = np.zeros(11, complex)
    np.add.at(ref, idx, vals)
    _close(backend.add_at(xp.zeros(11, dtype=xp.complex128), I, V), ref, xp, atol=1e-12)
    unique = np.array([5, 0, 9])
    rows = rng.standard_normal((2, 3))
    want = np.zeros((2, 12))
    want[:, unique] = rows
    _close(backend.scatter_unique(xp.asarray(unique), xp.asarray(rows), 12), want, xp)
    x = rng.standard_normal((4, 7))
    x[1] = -np.inf
    _close(backend.logsumexp(xp.asarray(x), axis=1), scipy_logsumexp(x, axis=1), xp)
    table = rng.standard_normal((6, 2))
    take = np.array([[0, 5], [3, 3]])
    _close(backend.take_rows(xp.asarray(table), xp.asarray(take)), table[take], xp)
    _close(backend.sinc(xp.asarray([0.0, 0.5, 2.5])), np.sinc([0.0, 0.5, 2.5]), xp)


# --------------------------------------------------------------------------------------
# projection and back-projection


@pytest.mark.parametrize("box", [BOX, BOX + 1])
def test_projection_matches_numpy(xp, box):
    rng = np.random.default_rng(1)
    vol = smooth_volume(box, seed=1).astype(np.float32)
    rot = random_rotations(7, rng)
    coords, _ = image_fourier_coords(box, box // 2)
    # a cutoff below the coords' radius: the points beyond it must come back zero
    ref_np = make_projector(vol, max_radius_px=7)
    ref_xp = make_projector(xp.asarray(vol), max_radius_px=7)
    want = project_points(ref_np, rot, coords)
    got = project_points(ref_xp, xp.asarray(rot), xp.asarray(coords))
    scale = np.abs(want).max()
    _close(got, want, xp, rtol=0, atol=1e-5 * scale)
    assert np.all(to_numpy(got)[:, np.hypot(coords[:, 0], coords[:, 1]) > 7.01] == 0)
    imgs = project_images(make_projector(xp.asarray(vol)), rot)
    want_imgs = project_images(make_projector(vol), rot)
    _close(imgs, want_imgs, xp, rtol=0, atol=1e-5 * np.abs(want_imgs).max())


def _inserted(xp, rng, n=40, box=BOX):
    vol = smooth_volume(box, seed=2).astype(np.float32)
    rot = random_rotations(n, rng)
    coords, _ = image_fourier_coords(box, box // 2)
    vals = project_points(make_projector(vol), rot, coords)
    ctf2 = rng.random(coords.shape[0])
    d, w = empty_accumulators(box, xp=xp)
    insert_points(d, w, xp.asarray(rot), xp.asarray(coords), xp.asarray(vals), xp.asarray(ctf2))
    return d, w


@pytest.mark.parametrize("box", [BOX, BOX + 1])
def test_insert_points_and_reconstruction_match_numpy(xp, box):
    d_np, w_np = _inserted(np, np.random.default_rng(3), box=box)
    d, w = _inserted(xp, np.random.default_rng(3), box=box)
    _close(d, d_np, xp, rtol=0, atol=1e-9 * np.abs(d_np).max())
    _close(w, w_np, xp, rtol=0, atol=1e-9 * np.abs(w_np).max())
    noise_np = reconstruction_noise_spectrum(w_np, box)
    _close(reconstruction_noise_spectrum(w, box), noise_np, xp, rtol=1e-10)
    tau2 = np.linspace(5.0, 0.0, box // 2 + 1)
    for kw in ({}, {"tau2": tau2}, {"n_gridding_iter": 2}):
        want = reconstruct(d_np, w_np, box, **kw)
        got = reconstruct(d, w, box, **kw)
        _close(got, want, xp, rtol=0, atol=1e-4 * np.abs(want).max())


def test_symmetry_on_accumulators_matches_numpy(xp):
    d_np, w_np = _inserted(np, np.random.default_rng(4), n=10)
    d, w = _inserted(xp, np.random.default_rng(4), n=10)
    L = symmetry_matrices("C3")
    want_d, want_w = apply_symmetry(d_np, w_np, L)
    got_d, got_w = apply_symmetry(d, w, L)
    _close(got_d, want_d, xp, rtol=0, atol=1e-9 * np.abs(want_d).max())
    _close(got_w, want_w, xp, rtol=0, atol=1e-9 * np.abs(want_w).max())


# --------------------------------------------------------------------------------------
# Fourier helpers, CTF, filters, masks, FSC


def test_fourier_helpers_match_numpy(xp):
    rng = np.random.default_rng(5)
    shells_np = shell_index(BOX, 2)
    shells = shell_index(BOX, 2, xp)
    _close(shells, shells_np, xp)
    vals = rng.standard_normal((3, BOX, BOX // 2 + 1))
    _close(
        radial_average(xp.asarray(vals), shells, BOX // 2 + 1),
        radial_average(vals, shells_np, BOX // 2 + 1),
        xp,
        rtol=1e-12,
    )
    coords, flat = image_fourier_coords(BOX, 9.5, xp)
    coords_np, flat_np = image_fourier_coords(BOX, 9.5)
    assert n_points_within(coords, 5.0) == n_points_within(coords_np, 5.0)
    pts = rng.standard_normal((2, flat_np.shape[0]))
    _close(scatter_to_rfft(xp.asarray(pts), flat, BOX), scatter_to_rfft(pts, flat_np, BOX), xp)
    shifts = np.array([[0.5, -1.0], [2.0, 0.0]])
    _close(shift_phases(coords, xp.asarray(shifts), BOX), shift_phases(coords_np, shifts, BOX), xp)


def test_ctf_on_device_matches_numpy(xp):
    optics = OpticsParams(300.0, 2.7, 0.1)
    du = np.array([12000.0, 20000.0])
    dv = np.array([11000.0, 21000.0])
    ang = np.array([10.0, 80.0])
    want = ctf_rfft(BOX, 1.5, du, dv, ang, optics, bfactor_A2=50.0, dtype=np.float64)
    # per-image parameters may be host metadata or device arrays
    for params in ((du, dv, ang), tuple(xp.asarray(p) for p in (du, dv, ang))):
        got = ctf_rfft(BOX, 1.5, *params, optics, bfactor_A2=50.0, xp=xp, dtype=xp.float64)
        _close(got, want, xp, atol=1e-9)
    _close(phase_flip(xp.asarray(want)), np.where(want < 0, -1.0, 1.0), xp)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_filters_masks_fsc_match_numpy(xp, dtype):
    vol = smooth_volume(BOX, seed=6).astype(dtype)
    v = xp.asarray(vol)
    _close(lowpass(v, 8.0, 1.0), lowpass(vol, 8.0, 1.0), xp, atol=1e-6)
    _close(fourier_crop(v, 16), fourier_crop(vol, 16), xp, atol=1e-6)
    _close(fourier_pad(v, 30), fourier_pad(vol, 30), xp, atol=1e-6)
    _close(fourier_crop(v, 15), fourier_crop(vol, 15), xp, atol=1e-6)
    noisy = phase_randomise(v, 6.0, 1.0, np.random.default_rng(7))
    want_noisy = phase_randomise(vol, 6.0, 1.0, np.random.default_rng(7))
    _close(noisy, want_noisy, xp, atol=1e-6)
    _close(soft_sphere(BOX, 8.0, 3.0, xp=xp), soft_sphere(BOX, 8.0, 3.0), xp)
    curve = fsc(v, noisy)
    assert isinstance(curve, np.ndarray)  # a short per-shell curve comes back to the host
    np.testing.assert_allclose(curve, fsc(vol, want_noisy), atol=1e-6)
    assert curve[2] > 0.99 and curve[-1] < 0.9
