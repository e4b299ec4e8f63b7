"""RELION's Euler angles (ZYZ, XMIPP form) and rotation matrices.

``euler_to_matrix(rot, tilt, psi)`` reproduces RELION's ``Euler_angles2matrix``
(``src/euler.cpp``) and ``matrix_to_euler`` its ``Euler_matrix2angles``: with
a = rot, b = tilt, g = psi,

    A = [[ cg cb ca - sg sa,   cg cb sa + sg ca,  -cg sb],
         [-sg cb ca - cg sa,  -sg cb sa + cg ca,   sg sb],
         [ sb ca,              sb sa,              cb   ]]

The projection of a map V at pose A is P(x, y) = ∫ V(Aᵀ (x, y, z)) dz, so the
image's Fourier coefficient at (kx, ky) is the map's at Aᵀ (kx, ky, 0): the
central slice spanned by the first two *rows* of A. Vectors are (x, y, z).

Host-only by design: angles and matrices are per-particle NumPy metadata; the
numerics that use them on a device move the (n, 3, 3) matrices there.
"""

from __future__ import annotations

import numpy as np

_EPS = float(np.finfo(np.float32).eps)


def euler_to_matrix(rot_deg, tilt_deg, psi_deg) -> np.ndarray:
    """Rotation matrices from RELION angles.

    Parameters: rot_deg, tilt_deg, psi_deg — array-likes of equal shape ``S``, degrees.
    Returns: float64 array ``S + (3, 3)``.
    """
    a, b, g = (np.deg2rad(np.asarray(v, dtype=np.float64)) for v in (rot_deg, tilt_deg, psi_deg))
    a, b, g = np.broadcast_arrays(a, b, g)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    m = np.empty(a.shape + (3, 3))
    m[..., 0, 0] = cg * cc - sg * sa
    m[..., 0, 1] = cg * cs + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cc - cg * sa
    m[..., 1, 1] = -sg * cs + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sc
    m[..., 2, 1] = ss
    m[..., 2, 2] = cb
    return m


def matrix_to_euler(matrices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RELION angles (rot, tilt, psi) in degrees from rotation matrices ``(..., 3, 3)``.

    Tilt lies in [0, 180]; at tilt 0 or 180, rot is 0 and psi holds the in-plane
    angle, as in RELION's ``Euler_matrix2angles``.
    """
    A = np.asarray(matrices, dtype=np.float64)
    abs_sb = np.hypot(A[..., 0, 2], A[..., 1, 2])
    regular = abs_sb > 16 * _EPS
    gamma = np.arctan2(A[..., 1, 2], -A[..., 0, 2])
    alpha = np.arctan2(A[..., 2, 1], A[..., 2, 0])
    sin_g, cos_g = np.sin(gamma), np.cos(gamma)
    with np.errstate(divide="ignore", invalid="ignore"):
        sign_from_cos = np.sign(-A[..., 0, 2] / cos_g)
    sign_sb = np.where(
        np.abs(sin_g) < _EPS,
        sign_from_cos,
        np.where(sin_g > 0, np.sign(A[..., 1, 2]), -np.sign(A[..., 1, 2])),
    )
    beta = np.arctan2(sign_sb * abs_sb, A[..., 2, 2])
    # Degenerate tilt: the whole in-plane rotation goes to psi.
    up = A[..., 2, 2] > 0
    gamma_deg = np.where(
        up, np.arctan2(-A[..., 1, 0], A[..., 0, 0]), np.arctan2(A[..., 1, 0], -A[..., 0, 0])
    )
    alpha = np.where(regular, alpha, 0.0)
    beta = np.where(regular, beta, np.where(up, 0.0, np.pi))
    gamma = np.where(regular, gamma, gamma_deg)
    return np.rad2deg(alpha), np.rad2deg(beta), np.rad2deg(gamma)


def angular_distance_deg(A, B, symmetry_matrices=None) -> np.ndarray:
    """Smallest rotation angle (degrees) taking pose A to pose B, ``(..., 3, 3)`` each.

    With ``symmetry_matrices`` (``(S, 3, 3)``, as :mod:`streamem.core.symmetry`
    gives), B is compared with every symmetry mate ``B @ L`` and the smallest
    angle is returned.
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    mates = [np.eye(3)] if symmetry_matrices is None else list(symmetry_matrices)
    best = None
    for L in mates:
        R = np.einsum("...ij,...kj->...ik", A, B @ L)
        trace = np.clip((np.trace(R, axis1=-2, axis2=-1) - 1) / 2, -1.0, 1.0)
        ang = np.rad2deg(np.arccos(trace))
        best = ang if best is None else np.minimum(best, ang)
    return best
