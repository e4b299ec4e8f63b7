"""The E-step's Fourier points (:mod:`streamem.em.fourier_points`): the points within
each radius the coarse passes cut at are a prefix, whatever the order
(:func:`streamem.core.fourier.n_points_within` counts it)."""

import numpy as np
import pytest

from streamem.core.fourier import n_points_within
from streamem.em.fourier_points import half_plane_points


def _radii(coords):
    return np.sqrt(coords[:, 0] ** 2 + coords[:, 1] ** 2)


@pytest.mark.parametrize(
    ("box", "radius", "cuts"), [(32, 15.0, (5.0, 9.5)), (33, 12.5, (3.0, 12.5))]
)
def test_cuts_are_prefixes_and_bands_are_in_raster_order(box, radius, cuts):
    coords, flat, shell = half_plane_points(box, radius, cuts=cuts)
    by_radius, flat_r, shell_r = half_plane_points(box, radius)
    # the same points (each with its flat index and shell), another order
    order, order_r = np.argsort(flat), np.argsort(flat_r)
    np.testing.assert_array_equal(flat[order], flat_r[order_r])
    np.testing.assert_array_equal(coords[order], by_radius[order_r])
    np.testing.assert_array_equal(shell[order], shell_r[order_r])
    r = _radii(coords)
    assert np.all(np.diff(_radii(by_radius)) >= 0)
    start = 0
    for cut in (*sorted(cuts), radius):
        count = n_points_within(coords, cut)
        assert count == np.count_nonzero(r <= cut) == n_points_within(by_radius, cut)
        band = coords[start:count]  # empty where a cut is the radius itself
        # raster order: ky, then kx, increasing
        key = band[:, 0] * (4 * box) + band[:, 1]
        assert np.all(np.diff(key) > 0)
        start = count
    assert start == coords.shape[0]


def test_a_radius_that_is_not_a_cut_is_refused():
    coords, _, _ = half_plane_points(32, 15.0, cuts=(5.0,))
    with pytest.raises(ValueError, match="not a prefix"):
        n_points_within(coords, 9.0)
    by_radius, _, _ = half_plane_points(32, 15.0)
    assert n_points_within(by_radius, 9.0) == np.count_nonzero(_radii(by_radius) <= 9.0)
