"""Orientation and translation grids as RELION samples them (``HealpixSampling``).

Directions come from the HEALPix grid of ``nside = 2**order`` in the nested scheme
(astropy-healpix): (rot, tilt) = (longitude, colatitude) of the pixel centres, in
degrees. The angular step of an order is ``60 / 2**order`` degrees (order 2: 15°,
order 3: 7.5°, ...), and psi is sampled in ``[0, 360)`` with the same step.

Oversampling (adaptive oversampling's fine pass) splits a parent orientation into
the ``4**os`` HEALPix children of its direction pixel at ``order + os`` (nested
indices ``p * 4**os .. (p + 1) * 4**os - 1``) times ``2**os`` psi sub-steps centred
on the parent psi: ``psi - step/2 + (i + 1/2) step / 2**os``. Translations split
likewise into ``2**os x 2**os`` sub-steps centred on the parent.

Host-only by design: the grids (HEALPix through astropy-healpix, psi, translations,
priors) are NumPy tables built once per iteration on the host; only
:func:`shift_phases` runs in the namespace of its ``coords`` (the E-step's device).

Translations are (dy, dx) in pixels; :func:`shift_phases` gives the factors that
shift an image's transform by (dy, dx) (content moves towards +x for dx > 0).
"""

from __future__ import annotations

import functools

import numpy as np
from astropy_healpix import healpy as _hp

from streamem.core.backend import astype, xp_of
from streamem.core.euler import euler_to_matrix
from streamem.core.symmetry import _directions, asymmetric_unit_mask


def angular_step_deg(healpix_order: int) -> float:
    """RELION's angular sampling step (degrees) of a HEALPix order."""
    return 60.0 / 2**healpix_order


@functools.cache
def healpix_directions(order: int) -> tuple[np.ndarray, np.ndarray]:
    """(rot_deg, tilt_deg) of all ``12 * 4**order`` HEALPix pixel centres (nested order),
    read-only: computed once per order (a local search asks for them per image)."""
    nside = 2**order
    theta, phi = _hp.pix2ang(nside, np.arange(12 * nside * nside), nest=True)
    return _read_only(np.rad2deg(phi)), _read_only(np.rad2deg(theta))


@functools.cache
def _healpix_unit_directions(order: int) -> np.ndarray:
    """(12·4**order, 3) read-only unit directions of :func:`healpix_directions`."""
    return _read_only(_directions(*healpix_directions(order)))


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def psi_angles(order: int) -> np.ndarray:
    """In-plane angles (degrees) ``0, step, ..., 360 - step`` with the order's step."""
    n = int(round(360.0 / angular_step_deg(order)))
    return np.arange(n) * (360.0 / n)


def orientation_grid(order: int, symmetry: str = "C1") -> tuple[np.ndarray, np.ndarray]:
    """All orientations of an order within the asymmetric unit of ``symmetry``.

    Returns ``(rotations (J, 3, 3), angles (J, 3))``: HEALPix directions in the
    asymmetric unit times every psi, direction-major (psi varies fastest), angles
    as (rot, tilt, psi) degrees.
    """
    rot, tilt = healpix_directions(order)
    keep = asymmetric_unit_mask(rot, tilt, symmetry)
    rot, tilt = rot[keep], tilt[keep]
    psi = psi_angles(order)
    angles = np.stack(
        [
            np.repeat(rot, psi.size),
            np.repeat(tilt, psi.size),
            np.tile(psi, rot.size),
        ],
        axis=1,
    )
    return euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]), angles


def oversample_orientations(angles, order: int, oversampling: int = 1) -> np.ndarray:
    """Children of orientations at ``order + oversampling`` (RELION's fine pass).

    ``angles`` ``(J, 3)`` (rot, tilt, psi) degrees, from a grid of ``order`` (the
    direction's HEALPix pixel is looked up, so any direction inside the pixel
    works). Returns ``(J, 4**os * 2**os, 3)``: for each of the ``4**os`` child
    directions, the ``2**os`` child psis.
    """
    angles = np.asarray(angles, dtype=np.float64).reshape(-1, 3)
    J = angles.shape[0]
    if oversampling <= 0:
        return angles[:, None, :].copy()
    nside = 2**order
    pix = _hp.ang2pix(nside, np.deg2rad(angles[:, 1]), np.deg2rad(angles[:, 0]), nest=True)
    nd = 4**oversampling
    children = pix[:, None] * nd + np.arange(nd)[None, :]  # (J, nd)
    theta, phi = _hp.pix2ang(nside * 2**oversampling, children.reshape(-1), nest=True)
    step = angular_step_deg(order)
    npsi = 2**oversampling
    dpsi = -0.5 * step + (np.arange(npsi) + 0.5) * step / npsi
    psi = angles[:, 2, None] + dpsi[None, :]  # (J, npsi)
    out = np.empty((J, nd, npsi, 3))
    out[..., 0] = np.rad2deg(phi).reshape(J, nd, 1)
    out[..., 1] = np.rad2deg(theta).reshape(J, nd, 1)
    out[..., 2] = psi[:, None, :]
    return out.reshape(J, nd * npsi, 3)


def _psi_difference_deg(a, b):
    """|a - b| wrapped to [0, 180]."""
    return np.abs((np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0)


def _direction_angle_deg(rot1, tilt1, rot2, tilt2):
    """Angle (degrees) between projection directions."""
    return _unit_angle_deg(_directions(rot1, tilt1), _directions(rot2, tilt2))


def _unit_angle_deg(d1, d2):
    """Angle (degrees) between unit vectors (..., 3)."""
    return np.rad2deg(np.arccos(np.clip(np.sum(d1 * d2, axis=-1), -1.0, 1.0)))


def local_orientations(prior_angles, order: int, max_angle_deg: float) -> np.ndarray:
    """Grid orientations of ``order`` near a prior pose (local searches).

    Keeps HEALPix directions within ``max_angle_deg`` of the prior's direction and
    psi values within ``max_angle_deg`` of its psi (RELION treats direction and psi
    separately, too). Returns angles ``(K, 3)`` degrees; never empty: the nearest
    direction and psi are always included.
    """
    rot0, tilt0, psi0 = (float(v) for v in np.asarray(prior_angles, dtype=np.float64))
    rot, tilt = healpix_directions(order)
    dang = _unit_angle_deg(_healpix_unit_directions(order), _directions(rot0, tilt0))
    dsel = np.flatnonzero(dang <= max_angle_deg)
    if dsel.size == 0:
        dsel = np.array([int(np.argmin(dang))])
    psi = psi_angles(order)
    dpsi = _psi_difference_deg(psi, psi0)
    psel = np.flatnonzero(dpsi <= max_angle_deg)
    if psel.size == 0:
        psel = np.array([int(np.argmin(dpsi))])
    return np.stack(
        [
            np.repeat(rot[dsel], psel.size),
            np.repeat(tilt[dsel], psel.size),
            np.tile(psi[psel], dsel.size),
        ],
        axis=1,
    )


def gaussian_orientation_prior(angles, prior_angles, sigma_deg: float) -> np.ndarray:
    """Normalised log-prior of orientations around a prior pose.

    Independent Gaussians (sigma ``sigma_deg``) on the angle between projection
    directions and on the psi difference, as RELION's local searches use; the
    result is normalised over the given orientations (``logsumexp == 0``).
    ``angles`` ``(K, 3)`` -> float64 ``(K,)``.
    """
    a = np.asarray(angles, dtype=np.float64).reshape(-1, 3)
    p = np.asarray(prior_angles, dtype=np.float64)
    dd = _direction_angle_deg(a[:, 0], a[:, 1], p[0], p[1])
    dp = _psi_difference_deg(a[:, 2], p[2])
    logp = -0.5 * (dd * dd + dp * dp) / (sigma_deg * sigma_deg)
    m = logp.max()
    return logp - (m + np.log(np.sum(np.exp(logp - m))))


def translation_grid(range_px: float, step_px: float) -> np.ndarray:
    """Translations (dy, dx) pixels on a grid of ``step_px`` within a disc of ``range_px``.

    Always contains (0, 0). float64 ``(T, 2)``, row-major over (dy, dx).
    """
    if step_px <= 0:
        raise ValueError(f"step_px must be positive, got {step_px}")
    n = int(np.floor(range_px / step_px + 1e-9))
    g = np.arange(-n, n + 1) * step_px
    dy, dx = np.meshgrid(g, g, indexing="ij")
    keep = dy * dy + dx * dx <= range_px * range_px + 1e-9
    return np.stack([dy[keep], dx[keep]], axis=1)


def oversample_translations(shifts, step_px: float, oversampling: int = 1) -> np.ndarray:
    """``(T, 2)`` -> ``(T, 4**os, 2)``: each shift split into ``2**os x 2**os`` sub-steps
    centred on it (offsets ``-step/2 + (i + 1/2) step / 2**os`` in y and in x)."""
    s = np.asarray(shifts, dtype=np.float64).reshape(-1, 2)
    n = 2**oversampling
    d = -0.5 * step_px + (np.arange(n) + 0.5) * step_px / n if oversampling > 0 else np.zeros(1)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    off = np.stack([dy.reshape(-1), dx.reshape(-1)], axis=1)  # (4**os, 2)
    return s[:, None, :] + off[None, :, :]


def shift_phases(coords, shifts, box_size: int):
    """Phase factors that shift images by (dy, dx) pixels, complex64 ``(T, M)``.

    ``coords`` ``(M, 2)`` (ky, kx) Fourier pixels, ``shifts`` ``(T, 2)`` (dy, dx).
    Multiplying an image's transform by ``exp(-2πi (kx dx + ky dy) / B)`` moves its
    content by +dx, +dy pixels (``np.roll(img, (dy, dx), axis=(0, 1))`` for integers).
    The result lives in the array namespace of ``coords``.
    """
    xp = xp_of(coords)
    coords = xp.asarray(coords, dtype=xp.float64)
    shifts = xp.reshape(xp.asarray(shifts, dtype=xp.float64), (-1, 2))
    phase = (shifts @ coords.T) * (-2.0 * np.pi / box_size)  # (T, M)
    return astype(xp.exp(astype(phase, xp.complex128) * 1j), xp.complex64)
