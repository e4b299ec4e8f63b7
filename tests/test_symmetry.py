"""Point groups with RELION's axes, and the asymmetric unit of directions."""

import numpy as np
import pytest
import scipy.ndimage as ndi
from test_backprojector import _symmetrise
from test_projector import smooth_volume

from streamem.core.sampling import healpix_directions
from streamem.core.symmetry import (
    asymmetric_unit_mask,
    axis_rotation,
    symmetry_matrices,
    symmetry_order,
)

GROUPS = {"C1": 1, "C2": 2, "C7": 7, "C12": 12, "D2": 4, "D7": 14, "T": 12, "O": 24, "I": 60}
GROUPS.update({"I1": 60, "I2": 60, "I3": 60, "I4": 60})


def _contains(group, M):
    return np.min(np.abs(group - M).reshape(len(group), -1).max(axis=1)) < 1e-6


@pytest.mark.parametrize("name,order", sorted(GROUPS.items()))
def test_groups_are_groups_of_the_right_order(name, order):
    G = symmetry_matrices(name)
    assert G.shape == (order, 3, 3) and symmetry_order(name) == order
    np.testing.assert_allclose(G[0], np.eye(3))
    np.testing.assert_allclose(
        G @ G.transpose(0, 2, 1), np.broadcast_to(np.eye(3), G.shape), atol=1e-9
    )
    np.testing.assert_allclose(np.linalg.det(G), 1.0, atol=1e-9)
    for a in G:
        assert _contains(G, a.T)  # inverses
        for b in G[:: max(1, order // 12)]:
            assert _contains(G, a @ b)  # closure


def test_relion_axes():
    assert _contains(symmetry_matrices("C7"), axis_rotation([0, 0, 1], 360 / 7))
    assert _contains(symmetry_matrices("D7"), np.diag([1.0, -1.0, -1.0]))  # 2-fold about x
    assert _contains(symmetry_matrices("T"), axis_rotation([0, 0.816496, 0.577350], 180))
    assert _contains(symmetry_matrices("O"), axis_rotation([1, 1, 1], 120))
    assert _contains(symmetry_matrices("O"), axis_rotation([0, 0, 1], 90))
    I2 = symmetry_matrices("I")
    assert _contains(I2, axis_rotation([0, 0, 1], 180))
    assert _contains(I2, axis_rotation([0.525731114, 0, 0.850650807], 72))
    assert _contains(I2, axis_rotation([0, 0.356822076, 0.934172364], 120))
    assert not _contains(I2, axis_rotation([0, 0, 1], 72))  # I2: no 5-fold on z
    assert _contains(symmetry_matrices("I3"), axis_rotation([0, 0, 1], 72))
    assert _contains(symmetry_matrices("i1"), axis_rotation([1, 0, 0], 180))


def test_unknown_group():
    with pytest.raises(ValueError, match="unknown symmetry"):
        symmetry_matrices("X5")


@pytest.mark.parametrize("name", ["D7", "T"])
def test_symmetrised_map_is_invariant(name):
    box = 20
    G = symmetry_matrices(name)
    vol = _symmetrise(smooth_volume(box, seed=1), G)
    c = box // 2
    g = (np.indices(vol.shape).reshape(3, -1) - c)[::-1].astype(float)  # (x, y, z)
    for L in G[1:4]:
        moved = ndi.map_coordinates(vol, (L @ g)[::-1] + c, order=3).reshape(vol.shape)
        assert np.corrcoef(moved.ravel(), vol.ravel())[0, 1] > 0.999
    # and a map without the symmetry is not
    raw = smooth_volume(box, seed=1)
    moved = ndi.map_coordinates(raw, (G[1] @ g)[::-1] + c, order=3).reshape(raw.shape)
    assert np.corrcoef(moved.ravel(), raw.ravel())[0, 1] < 0.9


@pytest.mark.parametrize("name", ["C1", "C5", "D3", "T", "O", "I"])
def test_asymmetric_unit_holds_one_mate_of_each_direction(name):
    G = symmetry_matrices(name)
    rng = np.random.default_rng(2)
    d = rng.standard_normal((400, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    mates = np.einsum("sij,nj->nsi", G, d)  # (n, S, 3)
    rot = np.rad2deg(np.arctan2(mates[..., 1], mates[..., 0]))
    tilt = np.rad2deg(np.arccos(np.clip(mates[..., 2], -1, 1)))
    count = asymmetric_unit_mask(rot, tilt, name).sum(axis=1)
    assert np.all(count == 1)
    # the unit holds about 1/|G| of the HEALPix directions
    r, t = healpix_directions(4)
    frac = asymmetric_unit_mask(r, t, name).mean()
    assert frac == pytest.approx(1 / len(G), rel=0.15)


def test_cyclic_and_dihedral_units_are_relion_wedges():
    rot = np.array([0.0, 30.0, -30.0, 40.0, 340.0, 10.0])
    tilt = np.array([50.0, 50.0, 50.0, 50.0, 50.0, 120.0])
    np.testing.assert_array_equal(
        asymmetric_unit_mask(rot, tilt, "C5"), [True, True, True, False, True, True]
    )
    np.testing.assert_array_equal(
        asymmetric_unit_mask(rot, tilt, "D5"), [True, True, True, False, True, False]
    )
