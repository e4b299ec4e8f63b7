"""Fourier-grid helpers and the trilinear Fourier projector.

The projector is checked against an independent real-space projector
(rotate-and-sum with scipy.ndimage.map_coordinates) at poses with non-zero rot,
tilt and psi, for even and odd boxes.
"""

import numpy as np
import pytest
import scipy.ndimage as ndi

from streamem.core.euler import euler_to_matrix
from streamem.core.fourier import (
    image_fourier_coords,
    n_points_within,
    radial_average,
    rfft_multiplicity,
    scatter_to_rfft,
    shell_index,
)
from streamem.core.projector import (
    FourierVolume,
    make_projector,
    project_images,
    project_points,
)


def smooth_volume(box, seed=0):
    """Gaussian-filtered noise inside a soft sphere of radius box/4 (content to Nyquist)."""
    rng = np.random.default_rng(seed)
    v = ndi.gaussian_filter(rng.standard_normal((box,) * 3), 1.0)
    z, y, x = np.indices((box,) * 3) - box // 2
    r = np.sqrt(x * x + y * y + z * z)
    return v * 0.5 * (1 + np.cos(np.pi * np.clip((r - box / 4) / (box / 8), 0, 1)))


def realspace_projection(vol, A):
    """P(x, y) = sum_z V(Aᵀ (x, y, z)), cubic interpolation, centre at B // 2."""
    box = vol.shape[0]
    c = box // 2
    iy, ix, iz = np.meshgrid(*(np.arange(box) - c,) * 3, indexing="ij")
    pts = ix[..., None] * A[0] + iy[..., None] * A[1] + iz[..., None] * A[2]  # (x, y, z)
    idx = np.stack([pts[..., 2] + c, pts[..., 1] + c, pts[..., 0] + c]).reshape(3, -1)
    vals = ndi.map_coordinates(vol, idx, order=3, mode="constant")
    return vals.reshape((box,) * 3).sum(-1)


def complex_corr(a, b):
    return np.real(np.vdot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b))


# ---- fourier.py -----------------------------------------------------------------------


@pytest.mark.parametrize("box", [8, 9])
def test_image_fourier_coords_layout(box):
    coords, flat = image_fourier_coords(box, box // 2)
    ky = np.fft.fftfreq(box, 1 / box)[:, None] * np.ones((1, box // 2 + 1))
    kx = np.arange(box // 2 + 1)[None, :] * np.ones((box, 1))
    np.testing.assert_array_equal(coords[:, 0], ky.reshape(-1)[flat])
    np.testing.assert_array_equal(coords[:, 1], kx.reshape(-1)[flat])
    r = np.hypot(coords[:, 0], coords[:, 1])
    assert np.all(np.diff(r) >= 0) and r.max() <= box // 2
    assert coords[0].tolist() == [0, 0]
    # every grid point within the radius is there exactly once
    assert len(np.unique(flat)) == len(flat) == np.sum(np.hypot(ky, kx) <= box // 2)
    # kx = 0 column keeps both Friedel members
    assert np.any((coords[:, 1] == 0) & (coords[:, 0] == -1))
    # smaller radius is a prefix
    c2, f2 = image_fourier_coords(box, 2.5)
    assert n_points_within(coords, 2.5) == len(c2)
    np.testing.assert_array_equal(f2, flat[: len(f2)])


def test_scatter_to_rfft_round_trip():
    box = 10
    img = np.random.default_rng(0).standard_normal((3, box, box))
    F = np.fft.rfft2(img)
    coords, flat = image_fourier_coords(box, box)  # the whole grid
    G = scatter_to_rfft(F.reshape(3, -1)[:, flat], flat, box)
    np.testing.assert_allclose(G, F)


def test_shell_index_and_radial_average():
    s2 = shell_index(8, 2)
    assert s2.shape == (8, 5)
    assert s2[0, 0] == 0 and s2[0, 3] == 3 and s2[3, 4] == 5 and s2[-1, 0] == 1
    s3 = shell_index(8, 3)
    assert s3.shape == (8, 8, 5) and s3[1, 1, 1] == 2
    avg = radial_average(np.full(s3.shape, 7.0), s3, 5)
    np.testing.assert_allclose(avg, 7.0)
    # batch dims
    vals = np.stack([s2.astype(float), 2 * s2.astype(float)])
    np.testing.assert_allclose(radial_average(vals, s2, 5)[1, 1:], 2 * np.arange(1, 5), atol=0.3)


@pytest.mark.parametrize("box", [8, 9])
def test_rfft_multiplicity_gives_full_grid_sums(box):
    x = np.random.default_rng(1).standard_normal((box, box, box))
    full = np.sum(np.abs(np.fft.fftn(x)) ** 2)
    half = np.sum(np.abs(np.fft.rfftn(x)) ** 2 * rfft_multiplicity(box, 3))
    np.testing.assert_allclose(half, full, rtol=1e-12)


# ---- projector.py ---------------------------------------------------------------------

POSES = [(0.0, 0.0, 0.0), (30.0, 40.0, 50.0), (-120.0, 100.0, 200.0), (75.0, 170.0, -33.0)]


@pytest.mark.parametrize("box", [24, 25])
def test_projection_matches_realspace_projection(box):
    vol = smooth_volume(box)
    fvol = make_projector(vol.astype(np.float32))
    coords, flat = image_fourier_coords(box, box // 2)
    A = euler_to_matrix(*np.array(POSES).T)
    vals = project_points(fvol, A, coords)
    assert vals.dtype == np.complex64 and vals.shape == (len(POSES), len(coords))
    for j, pose in enumerate(POSES):
        P = realspace_projection(vol, A[j])
        ref = np.fft.rfft2(np.fft.ifftshift(P)).reshape(-1)[flat]
        assert complex_corr(ref, vals[j]) > 0.99, pose
        # no scale factor between the two (unnormalised FFTs)
        assert 0.95 < np.linalg.norm(vals[j]) / np.linalg.norm(ref) < 1.06
        # the contract: scattered onto the rfft grid it is rfft2(ifftshift(P))
        grid = scatter_to_rfft(vals[j], flat, box)
        np.testing.assert_allclose(grid.reshape(-1)[flat], vals[j])


@pytest.mark.parametrize("box", [16, 17])
def test_project_images_real_space(box):
    vol = smooth_volume(box, seed=2)
    fvol = make_projector(vol)
    A = euler_to_matrix([0.0, 30.0], [0.0, 60.0], [0.0, 10.0])
    imgs = project_images(fvol, A)
    assert imgs.shape == (2, box, box) and imgs.dtype == np.float32
    # identity pose: the sum along z
    assert np.corrcoef(imgs[0].ravel(), vol.sum(0).ravel())[0, 1] > 0.99
    assert np.corrcoef(imgs[1].ravel(), realspace_projection(vol, A[1]).ravel())[0, 1] > 0.99


def test_single_rotation_and_float64_input():
    vol = smooth_volume(12)
    fvol = make_projector(vol.astype(np.float64), padding_factor=2)
    coords, _ = image_fourier_coords(12, 6)
    A = euler_to_matrix(10, 20, 30)
    one = project_points(fvol, A, coords)
    many = project_points(fvol, A[None], coords)
    assert one.shape == (len(coords),)
    np.testing.assert_array_equal(one, many[0])


def test_friedel_mates_on_kx0_column_are_conjugate():
    vol = smooth_volume(16, seed=3)
    fvol = make_projector(vol)
    coords, _ = image_fourier_coords(16, 7)
    vals = project_points(fvol, euler_to_matrix(12, 34, 56)[None], coords)[0]
    col = {tuple(c): v for c, v in zip(coords.tolist(), vals, strict=True) if c[1] == 0}
    for (ky, kx), v in col.items():
        if ky > 0 and (-ky, kx) in col:
            np.testing.assert_allclose(col[(-ky, kx)], np.conj(v), rtol=1e-5, atol=1e-3)


def test_cutoff_radius_and_small_cube():
    box = 16
    vol = smooth_volume(box)
    full = make_projector(vol)
    low = make_projector(vol, max_radius_px=4)
    assert low.data.shape[-1] < full.data.shape[-1]
    coords, _ = image_fourier_coords(box, box // 2)
    A = euler_to_matrix([20.0], [50.0], [80.0])
    v_full = project_points(full, A, coords)[0]
    v_low = project_points(low, A, coords)[0]
    r = np.hypot(coords[:, 0], coords[:, 1])
    assert np.all(v_low[r > 4] == 0)
    np.testing.assert_allclose(v_low[r <= 4], v_full[r <= 4], rtol=1e-5, atol=1e-3)
    # a FourierVolume built by hand infers its cutoff from the cube
    fv = FourierVolume(low.data, box, 2)
    assert fv.cutoff_px == pytest.approx(4.0)


def test_padding_factor_one_and_three_agree_at_low_resolution():
    box = 16
    vol = smooth_volume(box, seed=5)
    coords, _ = image_fourier_coords(box, 4)
    A = euler_to_matrix([33.0], [66.0], [99.0])
    v2 = project_points(make_projector(vol, 2), A, coords)[0]
    v3 = project_points(make_projector(vol, 3), A, coords)[0]
    assert complex_corr(v2, v3) > 0.999


def test_rejects_non_cube():
    with pytest.raises(ValueError):
        make_projector(np.zeros((8, 8, 9)))
