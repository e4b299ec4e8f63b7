"""RELION's ZYZ Euler convention, pinned by hand-computed cases."""

import numpy as np
import pytest

from streamem.core.euler import angular_distance_deg, euler_to_matrix, matrix_to_euler


def test_identity():
    np.testing.assert_allclose(euler_to_matrix(0, 0, 0), np.eye(3), atol=1e-15)


def test_rot_90_is_rotation_about_z():
    # a = 90: A = [[0, 1, 0], [-1, 0, 0], [0, 0, 1]] from the formula with b = g = 0
    np.testing.assert_allclose(
        euler_to_matrix(90, 0, 0), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-15
    )


def test_tilt_90_hand_case():
    # a = g = 0, b = 90: A = [[0, 0, -1], [0, 1, 0], [1, 0, 0]]
    np.testing.assert_allclose(
        euler_to_matrix(0, 90, 0), [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=1e-15
    )


def test_general_hand_case():
    a, b, g = np.deg2rad([30.0, 40.0, 50.0])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    expected = [
        [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
        [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
        [sb * ca, sb * sa, cb],
    ]
    np.testing.assert_allclose(euler_to_matrix(30, 40, 50), expected, atol=1e-15)


def test_matrices_are_rotations():
    rng = np.random.default_rng(0)
    ang = rng.uniform(-180, 180, size=(100, 3))
    A = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    np.testing.assert_allclose(
        A @ A.transpose(0, 2, 1), np.broadcast_to(np.eye(3), A.shape), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(A), 1.0, atol=1e-12)


def test_round_trip_angles():
    rng = np.random.default_rng(1)
    rot = rng.uniform(-180, 180, 200)
    tilt = rng.uniform(1, 179, 200)
    psi = rng.uniform(-180, 180, 200)
    r2, t2, p2 = matrix_to_euler(euler_to_matrix(rot, tilt, psi))
    np.testing.assert_allclose(
        euler_to_matrix(r2, t2, p2), euler_to_matrix(rot, tilt, psi), atol=1e-9
    )
    np.testing.assert_allclose(t2, tilt, atol=1e-9)
    np.testing.assert_allclose(r2, rot, atol=1e-8)
    np.testing.assert_allclose(p2, psi, atol=1e-8)


@pytest.mark.parametrize("tilt", [0.0, 180.0])
def test_degenerate_tilt_puts_rotation_in_psi(tilt):
    rot, tilt2, psi = matrix_to_euler(euler_to_matrix(25.0, tilt, 10.0))
    assert rot == 0.0
    assert tilt2 == pytest.approx(tilt)
    np.testing.assert_allclose(
        euler_to_matrix(rot, tilt2, psi), euler_to_matrix(25.0, tilt, 10.0), atol=1e-12
    )


def test_angular_distance():
    A = euler_to_matrix(10, 20, 30)
    B = euler_to_matrix(10, 20, 35)
    assert angular_distance_deg(A, B) == pytest.approx(5.0)
    assert angular_distance_deg(A, A) == pytest.approx(0.0, abs=1e-6)
