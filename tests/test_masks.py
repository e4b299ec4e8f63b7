"""Soft spherical and threshold masks."""

import numpy as np
import pytest

from streamem.core.masks import centred_radius, raised_cosine_edge, soft_sphere, threshold_mask


@pytest.mark.parametrize("box", [16, 17])
def test_soft_sphere_profile(box):
    m = soft_sphere(box, radius_px=4, edge_px=2)
    c = box // 2
    assert m.shape == (box,) * 3 and m.dtype == np.float32
    assert m[c, c, c] == 1.0 and m[c, c, c + 4] == 1.0
    assert m[c, c, c + 5] == pytest.approx(0.5)  # half-way through the edge
    assert m[c, c, c + 6] == 0.0 and m[0, 0, 0] == 0.0
    assert np.all((m >= 0) & (m <= 1))
    # symmetric about the centre
    np.testing.assert_allclose(m[c, c, c - 3 : c + 4], m[c, c, c - 3 : c + 4][::-1])
    m2 = soft_sphere(box, 4, 2, ndim=2)
    np.testing.assert_allclose(m2, m[c])


def test_hard_edge_and_radius():
    r = centred_radius(8, 2)
    assert r[4, 4] == 0 and r[4, 7] == 3 and r[0, 0] == pytest.approx(np.sqrt(32))
    e = raised_cosine_edge(np.array([-1.0, 0.0, 0.5]), 0)
    np.testing.assert_array_equal(e, [1.0, 1.0, 0.0])


def test_threshold_mask_extends_and_softens():
    box = 24
    vol = np.zeros((box,) * 3)
    vol[10:14, 10:14, 10:14] = 1.0
    hard = threshold_mask(vol, 0.5)
    np.testing.assert_array_equal(hard, (vol >= 0.5).astype(np.float32))
    m = threshold_mask(vol, 0.5, extend_px=2, soft_edge_px=3)
    assert m.dtype == np.float32
    assert np.all(m[vol > 0.5] == 1)
    assert m[12, 12, 15] == 1.0  # 2 px beyond the cube face: inside the extension
    assert m[12, 12, 17] == pytest.approx(0.5 * (1 + np.cos(np.pi * 2 / 3)))  # 4 px: in the edge
    assert m[12, 12, 19] == 0.0  # 6 px > 2 + 3
    assert np.all(np.diff(m[12, 12, 13:]) <= 0)  # monotone outwards
    assert np.all(threshold_mask(vol, 5.0) == 0)
