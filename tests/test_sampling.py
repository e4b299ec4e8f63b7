"""HEALPix orientation grids, oversampling, local searches, translations, shift phases."""

import numpy as np
import pytest
from astropy_healpix import healpy as hp
from test_backprojector import random_rotations

from streamem.core.euler import angular_distance_deg, euler_to_matrix
from streamem.core.fourier import image_fourier_coords, scatter_to_rfft
from streamem.core.sampling import (
    angular_step_deg,
    gaussian_orientation_prior,
    healpix_directions,
    local_orientations,
    orientation_grid,
    oversample_orientations,
    oversample_translations,
    psi_angles,
    shift_phases,
    translation_grid,
)
from streamem.core.symmetry import symmetry_matrices, symmetry_order


def test_relion_steps():
    assert angular_step_deg(2) == 15.0 and angular_step_deg(3) == 7.5
    rot, tilt = healpix_directions(2)
    assert len(rot) == 12 * 16
    assert np.all((tilt >= 0) & (tilt <= 180)) and np.all((rot >= 0) & (rot < 360))
    psi = psi_angles(2)
    assert len(psi) == 24 and psi[0] == 0 and np.allclose(np.diff(psi), 15.0)


def test_directions_are_nested_pixel_centres():
    rot, tilt = healpix_directions(1)
    pix = hp.ang2pix(2, np.deg2rad(tilt), np.deg2rad(rot), nest=True)
    np.testing.assert_array_equal(pix, np.arange(48))


@pytest.mark.parametrize("sym", ["C1", "C4", "D2", "O"])
def test_orientation_grid_covers_so3_modulo_symmetry(sym):
    order = 2 if sym != "O" else 3
    R, angles = orientation_grid(order, sym)
    np.testing.assert_allclose(R, euler_to_matrix(*angles.T))
    n_c1 = 12 * 4**order * len(psi_angles(order))
    assert len(R) == pytest.approx(n_c1 / symmetry_order(sym), rel=0.1)
    # every random pose has a grid pose within ~0.75 step (modulo the group)
    Q = random_rotations(30, np.random.default_rng(0))
    d = np.min(angular_distance_deg(Q[:, None], R[None], symmetry_matrices(sym)), axis=1)
    assert d.max() < 0.8 * angular_step_deg(order)


def test_oversampled_children_lie_in_parent_pixel():
    order = 2
    _, angles = orientation_grid(order)
    parents = angles[::97]
    kids = oversample_orientations(parents, order, oversampling=1)
    assert kids.shape == (len(parents), 8, 3)
    pix_parent = hp.ang2pix(4, np.deg2rad(parents[:, 1]), np.deg2rad(parents[:, 0]), nest=True)
    pix_kids = hp.ang2pix(4, np.deg2rad(kids[..., 1]), np.deg2rad(kids[..., 0]), nest=True)
    assert np.all(pix_kids == pix_parent[:, None])
    # psi children: 2 sub-steps centred on the parent psi, half a step apart
    step = angular_step_deg(order)
    psis = np.unique(kids[0, :, 2])
    np.testing.assert_allclose(psis, parents[0, 2] + np.array([-step / 4, step / 4]))
    # 2 levels of oversampling: 4**2 directions x 2**2 psis
    assert oversample_orientations(parents, order, 2).shape == (len(parents), 64, 3)
    np.testing.assert_array_equal(oversample_orientations(parents, order, 0)[:, 0], parents)


def test_local_orientations_and_prior():
    prior = np.array([40.0, 70.0, 100.0])
    loc = local_orientations(prior, order=3, max_angle_deg=10.0)
    A = euler_to_matrix(*loc.T)
    d_dir = np.rad2deg(np.arccos(np.clip(A[:, 2] @ euler_to_matrix(*prior)[2], -1, 1)))
    assert np.all(d_dir <= 10.0 + 1e-9)
    assert np.all(np.abs((loc[:, 2] - prior[2] + 180) % 360 - 180) <= 10.0 + 1e-9)
    assert len(loc) > 10
    logp = gaussian_orientation_prior(loc, prior, sigma_deg=5.0)
    assert logp.shape == (len(loc),)
    assert np.log(np.sum(np.exp(logp))) == pytest.approx(0.0, abs=1e-12)
    closest = np.argmin(angular_distance_deg(A, euler_to_matrix(*prior)))
    assert np.argmax(logp) == closest
    # never empty, even with a tiny range
    assert len(local_orientations(prior, order=1, max_angle_deg=0.1)) >= 1


def test_translation_grid():
    t = translation_grid(2.0, 1.0)
    assert t.shape == (13, 2)  # the disc of radius 2 on the integer grid
    assert [0.0, 0.0] in t.tolist()
    assert np.all(np.hypot(t[:, 0], t[:, 1]) <= 2.0 + 1e-9)
    assert translation_grid(0.0, 1.0).tolist() == [[0.0, 0.0]]
    np.testing.assert_allclose(np.sort(t, axis=0), np.sort(-t, axis=0))


def test_oversample_translations():
    t = translation_grid(3.0, 2.0)
    kids = oversample_translations(t, 2.0, oversampling=1)
    assert kids.shape == (len(t), 4, 2)
    np.testing.assert_allclose(kids.mean(axis=1), t)
    np.testing.assert_allclose(np.unique(kids[0, :, 1] - t[0, 1]), [-0.5, 0.5])
    assert oversample_translations(t, 2.0, 2).shape == (len(t), 16, 2)


@pytest.mark.parametrize("box", [16, 15])
def test_shift_phases_sign_matches_np_roll(box):
    rng = np.random.default_rng(1)
    img = rng.standard_normal((box, box))
    coords, flat = image_fourier_coords(box, box)  # whole rfft grid
    F = np.fft.rfft2(img).reshape(-1)[flat]
    shifts = np.array([[2.0, 3.0], [-1.0, 0.0], [0.0, -4.0]])  # (dy, dx)
    ph = shift_phases(coords, shifts, box)
    assert ph.dtype == np.complex64 and ph.shape == (3, len(coords))
    for s, p in zip(shifts, ph, strict=True):
        out = np.fft.irfft2(scatter_to_rfft(F * p, flat, box), s=(box, box))
        expected = np.roll(img, (int(s[0]), int(s[1])), axis=(0, 1))
        np.testing.assert_allclose(out, expected, atol=1e-4)
    # two half-pixel shifts make one pixel
    half = shift_phases(coords, [[0.5, 0.5]], box)[0]
    one = shift_phases(coords, [[1.0, 1.0]], box)[0]
    np.testing.assert_allclose(half * half, one, atol=1e-5)
