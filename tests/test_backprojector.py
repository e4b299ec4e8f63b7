"""Back-projection and RELION-style reconstruction.

Invariants: insert_points is the adjoint of project_points; reconstruction from
noise-free projections (ours, and an independent real-space projector's) matches
the truth; the tau2 (Wiener) term has the right scale (the MSE is smallest with
the true signal power); symmetry from one asymmetric unit recovers a D7 map.
"""

import numpy as np
import pytest
import scipy.ndimage as ndi
from test_projector import realspace_projection, smooth_volume

from streamem.core.backend import ifftshift, rfftn
from streamem.core.backprojector import (
    empty_accumulators,
    insert_points,
    reconstruct,
    reconstruction_noise_spectrum,
)
from streamem.core.euler import euler_to_matrix, matrix_to_euler
from streamem.core.fourier import image_fourier_coords, radial_average, shell_index
from streamem.core.fsc import fsc
from streamem.core.projector import FourierVolume, make_projector, project_points
from streamem.core.symmetry import asymmetric_unit_mask, symmetry_matrices


def random_rotations(n, rng):
    """Uniform random rotations (from unit quaternions)."""
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        1,
    )


def test_empty_accumulators_layout():
    d, w = empty_accumulators(16)
    assert d.shape == w.shape == (35, 35, 18)  # R = 16: (2R + 3, 2R + 3, R + 2)
    assert d.dtype == np.complex128 and w.dtype == np.float64
    d2, _ = empty_accumulators(16, padding_factor=2, max_radius_px=4)
    assert d2.shape == (19, 19, 10)


def test_insert_is_adjoint_of_project():
    rng = np.random.default_rng(0)
    box = 12
    d, w = empty_accumulators(box)
    cube = (rng.standard_normal(d.shape) + 1j * rng.standard_normal(d.shape)).astype(np.complex64)
    fvol = FourierVolume(cube, box, 2)
    coords, _ = image_fourier_coords(box, box // 2)
    # insert_points skips the redundant kx = 0, ky < 0 half column: leave it out here
    coords = coords[~((coords[:, 1] == 0) & (coords[:, 0] < 0))]
    A = random_rotations(7, rng)
    u = rng.standard_normal((7, len(coords))) + 1j * rng.standard_normal((7, len(coords)))
    Pv = project_points(fvol, A, coords)
    insert_points(d, w, A, coords, u, np.ones(len(coords)))
    lhs = np.sum(Pv.real * u.real + Pv.imag * u.imag)  # real inner product
    rhs = np.sum(cube.real * d.real + cube.imag * d.imag)
    assert lhs == pytest.approx(rhs, rel=1e-5)
    # trilinear weights are a partition of unity
    assert w.sum() == pytest.approx(7 * len(coords))


def test_insert_skips_friedel_duplicates_and_outside_points():
    box = 8
    d, w = empty_accumulators(box, max_radius_px=2)
    coords = np.array([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 3.0]])
    insert_points(d, w, np.eye(3)[None], coords, np.ones((1, 4)), np.ones((1, 4)))
    assert w.sum() == pytest.approx(2.0)  # (-1, 0) is a Friedel duplicate, (0, 3) too far


def test_insert_is_additive_over_batches():
    rng = np.random.default_rng(1)
    box = 10
    coords, _ = image_fourier_coords(box, box // 2)
    A = random_rotations(6, rng)
    v = rng.standard_normal((6, len(coords))) + 1j * rng.standard_normal((6, len(coords)))
    wts = rng.random((6, len(coords)))
    d1, w1 = empty_accumulators(box)
    insert_points(d1, w1, A, coords, v, wts)
    d2, w2 = empty_accumulators(box)
    insert_points(d2, w2, A[:2], coords, v[:2], wts[:2])
    d3, w3 = empty_accumulators(box)
    insert_points(d3, w3, A[2:], coords, v[2:], wts[2:], block_points=50)
    np.testing.assert_allclose(d2 + d3, d1, atol=1e-10)
    np.testing.assert_allclose(w2 + w3, w1, atol=1e-10)


def _reconstruct_from_own_projections(vol, n, rng, **kw):
    box = vol.shape[0]
    fvol = make_projector(vol)
    coords, _ = image_fourier_coords(box, box // 2)
    A = random_rotations(n, rng)
    d, w = empty_accumulators(box)
    insert_points(d, w, A, coords, project_points(fvol, A, coords), 1.0)
    return reconstruct(d, w, box, **kw)


@pytest.mark.parametrize("box", [24, 25])
def test_reconstruction_from_noise_free_projections(box):
    vol = smooth_volume(box, seed=4)
    rec = _reconstruct_from_own_projections(vol, 2000, np.random.default_rng(box))
    assert rec.shape == (box,) * 3 and rec.dtype == np.float32
    curve = fsc(rec, vol)
    last = int(0.9 * (box // 2))
    assert np.all(curve[: last + 1] > 0.9), curve
    assert np.std(rec) / np.std(vol) == pytest.approx(1.0, abs=0.02)


def test_reconstruction_with_iterative_gridding():
    vol = smooth_volume(24, seed=6)
    rec = _reconstruct_from_own_projections(vol, 1500, np.random.default_rng(7), n_gridding_iter=5)
    curve = fsc(rec, vol)
    assert np.all(curve[: int(0.9 * 12) + 1] > 0.9), curve


def test_reconstruction_from_independent_realspace_projections():
    box = 20
    vol = smooth_volume(box, seed=8)
    rng = np.random.default_rng(9)
    A = random_rotations(400, rng)
    coords, flat = image_fourier_coords(box, box // 2)
    imgs = np.stack([realspace_projection(vol, a) for a in A])
    F = np.fft.rfft2(np.fft.ifftshift(imgs, axes=(-2, -1))).reshape(len(A), -1)[:, flat]
    d, w = empty_accumulators(box)
    insert_points(d, w, A, coords, F, 1.0)
    curve = fsc(reconstruct(d, w, box), vol)
    assert np.all(curve[: int(0.8 * (box // 2)) + 1] > 0.9), curve


def test_tau2_has_the_right_scale():
    """With noisy data, the reconstruction is closest to the truth when tau2 is the
    true signal power (not 4x smaller or larger): pins the padding_factor**3 term."""
    box = 20
    vol = smooth_volume(box, seed=10)
    rng = np.random.default_rng(11)
    fvol = make_projector(vol)
    coords, _ = image_fourier_coords(box, box // 2)
    A = random_rotations(600, rng)
    vals = project_points(fvol, A, coords)
    sigma2 = 1000.0
    noise = (rng.standard_normal(vals.shape) + 1j * rng.standard_normal(vals.shape)) * np.sqrt(
        sigma2 / 2
    )
    d, w = empty_accumulators(box)
    insert_points(d, w, A, coords, (vals + noise) / sigma2, 1.0 / sigma2)
    VF = rfftn(ifftshift(vol, (0, 1, 2)), (0, 1, 2))
    tau2 = radial_average(np.abs(VF) ** 2, shell_index(box, 3), box // 2 + 1)

    def err(t):
        rec = reconstruct(d, w, box, tau2=t)
        return np.mean((rec - vol) ** 2)

    e_none, e_lo, e_ok, e_hi = err(None), err(tau2 / 4), err(tau2), err(tau2 * 4)
    assert e_ok < e_lo and e_ok < e_hi and e_ok < e_none
    # tau2_fudge multiplies tau2
    np.testing.assert_allclose(
        reconstruct(d, w, box, tau2=tau2, tau2_fudge=4.0), reconstruct(d, w, box, tau2=4 * tau2)
    )
    # the reconstruction's noise spectrum halves when the evidence doubles
    ns1 = reconstruction_noise_spectrum(w, box)
    ns2 = reconstruction_noise_spectrum(2 * w, box)
    assert np.all(ns1[1:] > 0)
    np.testing.assert_allclose(ns2[1:], ns1[1:] / 2)


def _symmetrise(vol, mats):
    box = vol.shape[0]
    c = box // 2
    g = (np.indices(vol.shape).reshape(3, -1) - c)[::-1].astype(float)  # (x, y, z)
    out = np.zeros(vol.size)
    for L in mats:
        p = L @ g  # V(L r)
        out += ndi.map_coordinates(vol, p[::-1] + c, order=3, mode="constant")
    return (out / len(mats)).reshape(vol.shape)


def test_d7_reconstruction_from_one_asymmetric_unit():
    box = 20
    mats = symmetry_matrices("D7")
    vol = _symmetrise(smooth_volume(box, seed=12), mats)
    rng = np.random.default_rng(13)
    A = random_rotations(8000, rng)
    rot, tilt, _ = matrix_to_euler(A)
    A = A[asymmetric_unit_mask(rot, tilt, "D7")][:800]
    fvol = make_projector(vol)
    coords, _ = image_fourier_coords(box, box // 2)
    d, w = empty_accumulators(box)
    insert_points(d, w, A, coords, project_points(fvol, A, coords), 1.0)
    sym = fsc(reconstruct(d, w, box, symmetry_matrices=mats), vol)
    nosym = fsc(reconstruct(d, w, box), vol)
    upto = int(0.8 * (box // 2)) + 1
    assert np.all(sym[:upto] > 0.9), sym
    assert nosym[1:upto].mean() < sym[1:upto].mean() - 0.05  # symmetry did the work


def test_symmetrised_insertion_of_mates_equals_symmetric_reconstruction():
    """Inserting every pose with its mates A @ L == symmetrising the accumulators."""
    box = 16
    mats = symmetry_matrices("C3")
    vol = _symmetrise(smooth_volume(box, seed=14), mats)
    fvol = make_projector(vol)
    coords, _ = image_fourier_coords(box, box // 2)
    A = random_rotations(300, np.random.default_rng(15))
    vals = project_points(fvol, A, coords)
    d1, w1 = empty_accumulators(box)
    insert_points(d1, w1, A, coords, vals, 1.0)
    rec_sym = reconstruct(d1, w1, box, symmetry_matrices=mats)
    d2, w2 = empty_accumulators(box)
    for L in mats:
        insert_points(d2, w2, A @ L, coords, vals, 1.0)
    rec_mates = reconstruct(d2, w2, box)
    assert np.corrcoef(rec_sym.ravel(), rec_mates.ravel())[0, 1] > 0.995


def test_identity_pose_insertion_reconstructs_one_plane():
    """A single identity-pose image lands in the kz = 0 plane: the reconstruction is
    constant along z (up to the gridding correction) and its z-sum is the image."""
    box = 8
    rng = np.random.default_rng(16)
    img = rng.standard_normal((box, box))
    coords, flat = image_fourier_coords(box, box // 2)
    F = np.fft.rfft2(np.fft.ifftshift(img)).reshape(-1)[flat]
    d, w = empty_accumulators(box)
    insert_points(d, w, euler_to_matrix(0, 0, 0)[None], coords, F[None], 1.0)
    rec = reconstruct(d, w, box)
    # compare the z-sum with the image low-passed to the inserted disc
    mask = np.zeros(box * (box // 2 + 1))
    mask[flat] = 1
    ref = np.fft.fftshift(
        np.fft.irfft2(np.fft.rfft2(np.fft.ifftshift(img)) * mask.reshape(box, -1), s=(box, box))
    )
    assert np.corrcoef(rec.sum(0).ravel(), ref.ravel())[0, 1] > 0.98


@pytest.mark.gpu
def test_cupy_matches_numpy():
    """One code path: the same functions on CuPy arrays give NumPy's results."""
    cp = pytest.importorskip("cupy")
    from streamem.core.sampling import shift_phases

    box = 16
    vol = smooth_volume(box, seed=17).astype(np.float32)
    A = random_rotations(50, np.random.default_rng(18))
    coords, _ = image_fourier_coords(box, box // 2)
    ref = project_points(make_projector(vol), A, coords)
    fv_gpu = make_projector(cp.asarray(vol))
    got = project_points(fv_gpu, cp.asarray(A), cp.asarray(coords))
    assert isinstance(got, cp.ndarray)
    np.testing.assert_allclose(got.get(), ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max())
    d, w = empty_accumulators(box)
    insert_points(d, w, A, coords, ref, 1.0)
    dg, wg = empty_accumulators(box, xp=cp)
    insert_points(dg, wg, cp.asarray(A), cp.asarray(coords), cp.asarray(ref), 1.0)
    np.testing.assert_allclose(wg.get(), w, atol=1e-9)
    mats = symmetry_matrices("C2")
    rec = reconstruct(d, w, box, symmetry_matrices=mats)
    rec_g = reconstruct(dg, wg, box, symmetry_matrices=cp.asarray(mats))
    np.testing.assert_allclose(rec_g.get(), rec, atol=1e-4 * np.abs(rec).max())
    assert fsc(rec_g, cp.asarray(vol))[5] == pytest.approx(fsc(rec, vol)[5], abs=1e-6)
    ph = shift_phases(cp.asarray(coords), [[1.0, 2.0]], box)
    np.testing.assert_allclose(ph.get(), shift_phases(coords, [[1.0, 2.0]], box), atol=1e-6)
