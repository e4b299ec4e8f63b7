"""The host kernels of central slices (:mod:`streamem.core.slice_kernel`) give what the
array-API formulations give: :func:`project_points` value for value, and
:func:`insert_points` to the accumulators' rounding (its sums run in another order;
double precision, or single as the E-step's). The same
inputs through ``array_api_strict`` (which takes the array-API path) are the reference."""

import dataclasses

import numpy as np
import pytest
from test_backprojector import random_rotations
from test_projector import smooth_volume

from streamem.core import backprojector, projector, slice_kernel
from streamem.core.backend import to_numpy
from streamem.core.backprojector import empty_accumulators, insert_points
from streamem.core.fourier import image_fourier_coords
from streamem.core.projector import make_projector, project_points, slice_power

xps = pytest.importorskip("array_api_strict")


@pytest.mark.parametrize(("box", "cutoff_px"), [(24, None), (25, 7.0), (32, 11.5)])
def test_host_kernel_equals_array_api_path(box, cutoff_px):
    rng = np.random.default_rng(box)
    ref = make_projector(smooth_volume(box, seed=box).astype(np.float32), max_radius_px=cutoff_px)
    # a cutoff below the points' radius: the kernel fills only the columns inside it
    coords, _ = image_fourier_coords(box, box // 2)
    rot = random_rotations(50, rng)  # random poses: about half the points are Friedel-flipped
    got = project_points(ref, rot, coords)
    strict = dataclasses.replace(ref, data=xps.asarray(ref.data))
    want = to_numpy(project_points(strict, xps.asarray(rot), xps.asarray(coords)))
    assert got.dtype == np.complex64 and got.shape == (50, coords.shape[0])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    assert np.mean(got == want) > 0.99  # same float32 arithmetic: equal, not just close
    # on NumPy, the same operations in the same order: bit for bit
    np.testing.assert_array_equal(got, project_points(ref, rot, coords, host_kernel=False))
    if cutoff_px is not None:
        assert np.all(got[:, np.hypot(coords[:, 0], coords[:, 1]) > cutoff_px + 0.01] == 0)
    one = project_points(ref, rot[3], coords)
    np.testing.assert_array_equal(one, got[3])
    # |A|² by the host kernel: NumPy's real**2 + imag**2, bit for bit, and the array API's
    power = slice_power(got)
    assert power.dtype == np.float32
    np.testing.assert_array_equal(power, got.real**2 + got.imag**2)
    np.testing.assert_array_equal(power, to_numpy(slice_power(xps.asarray(got))))


@pytest.mark.parametrize("block", [1, 7, 64, 1000])
def test_slice_blocks_change_the_order_not_the_result(block):
    """The kernels run over blocks of slices (a cache order): the extraction gives the
    same values bit for bit whatever the block, the insertion the same sums to float64
    rounding (they are added in another order)."""
    box, n = 24, 150
    rng = np.random.default_rng(3)
    ref = make_projector(smooth_volume(box, seed=3).astype(np.float32))
    coords, _ = image_fourier_coords(box, box // 2)
    rot = random_rotations(n, rng)
    M, R, pf = coords.shape[0], ref.radius_padded, ref.padding_factor
    columns = np.arange(M)

    def projected(b):
        out = np.zeros((n, M), np.complex64)
        return slice_kernel.project_slices_host(ref.data, rot, coords, columns, pf, R, out, b)

    whole = projected(n)
    assert np.abs(whole).min() > 0
    np.testing.assert_array_equal(projected(block), whole)

    weights = rng.random((n, M))

    def inserted(b):
        d, w = empty_accumulators(box)
        slice_kernel.insert_slices_host(d, w, rot, coords, columns, whole, weights, pf, R, b)
        return d, w

    (d, w), (d_ref, w_ref) = inserted(block), inserted(n)
    assert np.abs(d_ref).max() > 0
    np.testing.assert_allclose(d, d_ref, rtol=0, atol=1e-12 * np.abs(d_ref).max())
    np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-12 * w_ref.max())


def test_the_points_order_changes_the_visits_not_the_values():
    """The kernels visit the points in the caller's order (the E-step's: raster order
    within radius bands): any order gives each point the same value, bit for bit, and
    the same sums to float64 rounding."""
    from streamem.em.fourier_points import half_plane_points

    box, n = 24, 40
    rng = np.random.default_rng(4)
    ref = make_projector(smooth_volume(box, seed=4).astype(np.float32))
    coords, _, _ = half_plane_points(box, box // 2 - 1)  # by radius
    banded, _, _ = half_plane_points(box, box // 2 - 1, cuts=(4.0, 7.5))
    rot = random_rotations(n, rng)
    M, R, pf = coords.shape[0], ref.radius_padded, ref.padding_factor
    by_point = {tuple(c): m for m, c in enumerate(coords)}
    weights = rng.random((n, M))

    def run(points):
        out = np.zeros((n, M), np.complex64)
        slice_kernel.project_slices_host(ref.data, rot, points, np.arange(M), pf, R, out)
        d, w = empty_accumulators(box)
        back = [by_point[tuple(c)] for c in points]  # each point's weights in that order
        slice_kernel.insert_slices_host(
            d, w, rot, points, np.arange(M), out, weights[:, back], pf, R
        )
        return out, back, d, w

    want, _, d_ref, w_ref = run(coords)
    for points in (banded, coords[rng.permutation(M)]):
        got, back, d, w = run(points)
        np.testing.assert_array_equal(got, want[:, back])
        np.testing.assert_allclose(d, d_ref, rtol=0, atol=1e-12 * np.abs(d_ref).max())
        np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-12 * w_ref.max())


def test_numpy_projection_runs_the_host_kernel(monkeypatch):
    ref = make_projector(smooth_volume(24, seed=0).astype(np.float32))
    coords, _ = image_fourier_coords(24, 12)

    def refuse(*args, **kwargs):
        raise RuntimeError("host kernel called")

    monkeypatch.setattr(projector, "project_slices_host", refuse)
    with pytest.raises(RuntimeError, match="host kernel"):
        project_points(ref, random_rotations(2, np.random.default_rng(0)), coords)


@pytest.mark.parametrize("box", [24, 25])
def test_host_insertion_equals_array_api_path(box):
    rng = np.random.default_rng(box)
    coords, _ = image_fourier_coords(box, box // 2)  # the rim and the kx = 0 column are skipped
    rot = random_rotations(30, rng)
    values = (rng.standard_normal((30, coords.shape[0])) + 1j * rng.standard_normal((30, coords.shape[0]))).astype(np.complex64)  # fmt: skip
    weights = rng.random(coords.shape[0])  # one row for every image: a broadcast view

    def inserted(xp, host_kernel=True):
        d, w = empty_accumulators(box, xp=xp)
        args = (xp.asarray(rot), xp.asarray(coords), xp.asarray(values), xp.asarray(weights))
        insert_points(d, w, *args, host_kernel=host_kernel)
        return to_numpy(d), to_numpy(w)

    (d, w) = inserted(np)
    for d_ref, w_ref in (inserted(xps), inserted(np, host_kernel=False)):
        assert np.abs(d_ref).max() > 0 and w_ref.max() > 0
        np.testing.assert_allclose(d, d_ref, rtol=0, atol=1e-12 * np.abs(d_ref).max())
        np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-12 * w_ref.max())
    again = inserted(np)  # deterministic: the same sums in the same order
    np.testing.assert_array_equal(again[0], d)
    np.testing.assert_array_equal(again[1], w)


def test_single_precision_insertion_agrees_with_double():
    """The E-step's complex64/float32 accumulators: the host kernel's sums in single
    precision agree with the double-precision ones to ~1e-6 of the largest voxel, the
    array-API path's in single precision too; many slices meet in each voxel."""
    box = 24
    rng = np.random.default_rng(3)
    coords, _ = image_fourier_coords(box, box // 2)
    rot = random_rotations(400, rng)
    values = (rng.standard_normal((400, coords.shape[0])) + 1j * rng.standard_normal((400, coords.shape[0]))).astype(np.complex64)  # fmt: skip
    weights = rng.random((400, coords.shape[0]))

    def inserted(xp, single, host_kernel=True):
        d, w = empty_accumulators(box, xp=xp, single=single)
        args = (xp.asarray(rot), xp.asarray(coords), xp.asarray(values), xp.asarray(weights))
        insert_points(d, w, *args, host_kernel=host_kernel)
        return to_numpy(d), to_numpy(w)

    d64, w64 = inserted(np, False)
    d32, w32 = inserted(np, True)
    assert d32.dtype == np.complex64 and w32.dtype == np.float32
    scale_d, scale_w = np.abs(d64).max(), w64.max()
    assert w64.max() > 50  # voxels summing ~10² insertions, as an E-step task's
    for d, w in ((d32, w32), inserted(xps, True), inserted(np, True, host_kernel=False)):
        err_d, err_w = np.abs(d - d64).max() / scale_d, np.abs(w - w64).max() / scale_w
        assert 0 < err_w < 2e-6 and err_d < 2e-6  # single precision, not a double sum cast
    assert np.abs(d32 - d64.astype(np.complex64)).max() > 0
    with pytest.raises(ValueError, match="accumulators of complex128 and float32"):
        insert_points(d64, w32, rot, coords, values, weights)


def test_numpy_insertion_runs_the_host_kernel(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("host kernel called")

    monkeypatch.setattr(backprojector, "insert_slices_host", refuse)
    coords, _ = image_fourier_coords(24, 12)
    d, w = empty_accumulators(24)
    rot = random_rotations(2, np.random.default_rng(0))
    with pytest.raises(RuntimeError, match="host kernel"):
        insert_points(
            d, w, rot, coords, np.ones((2, coords.shape[0]), np.complex64), np.ones(coords.shape[0])
        )
