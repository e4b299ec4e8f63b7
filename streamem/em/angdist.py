"""Angular distribution: particles' viewing directions binned on a HEALPix grid.

A pure function of the poses (no files, no plots): :func:`direction_counts` bins
(rot, tilt) in degrees into the ``12 * 4**order`` pixels of the nested HEALPix grid
that :mod:`streamem.core.sampling` searches (astropy-healpix; rot = longitude, tilt =
colatitude), optionally per class. psi does not change the viewing direction and is
ignored; symmetry is not folded (every particle counts where its pose puts it). The
``.bild`` file (:mod:`streamem.io.bild`) and the heat map (:mod:`streamem.em.plots`)
are drawn from these counts; ``pixel_directions(order)`` gives the pixels' centres
(:func:`streamem.core.sampling.healpix_directions`).
"""

from __future__ import annotations

import numpy as np
from astropy_healpix import healpy as _hp

from streamem.core.sampling import healpix_directions as pixel_directions  # noqa: F401

#: HEALPix order of the written distributions (7.5° pixels: 768 directions).
ANGDIST_ORDER = 3


def direction_counts(rot_deg, tilt_deg, order: int = ANGDIST_ORDER) -> np.ndarray:
    """Number of particles whose direction (rot, tilt) falls in each HEALPix pixel.

    rot_deg, tilt_deg: (N,) degrees (RELION's rlnAngleRot, rlnAngleTilt); NaN poses
    (particles without a result) are left out. Returns (12 * 4**order,) int64, nested
    pixel order, summing to the number of finite poses.
    """
    rot = np.asarray(rot_deg, np.float64).ravel()
    tilt = np.asarray(tilt_deg, np.float64).ravel()
    ok = np.isfinite(rot) & np.isfinite(tilt)
    nside = 2**order
    theta = np.deg2rad(np.clip(tilt[ok], 0.0, 180.0))
    phi = np.deg2rad(np.mod(rot[ok], 360.0))
    pixels = _hp.ang2pix(nside, theta, phi, nest=True)
    return np.bincount(pixels, minlength=12 * nside * nside).astype(np.int64)


def class_direction_counts(
    rot_deg, tilt_deg, classes, n_classes: int, order: int = ANGDIST_ORDER
) -> np.ndarray:
    """:func:`direction_counts` per class: (n_classes, 12 * 4**order) int64; ``classes``
    (N,) rlnClassNumber, 1..n_classes (others are left out)."""
    classes = np.asarray(classes).ravel()
    rot, tilt = np.asarray(rot_deg).ravel(), np.asarray(tilt_deg).ravel()
    return np.stack(
        [
            direction_counts(rot[classes == k], tilt[classes == k], order)
            for k in range(1, n_classes + 1)
        ]
    )


def unit_directions(rot_deg, tilt_deg) -> np.ndarray:
    """RELION's ``Euler_angles2direction``: (..., 3) unit vectors
    (cos rot · sin tilt, sin rot · sin tilt, cos tilt), x, y, z."""
    rot, tilt = np.deg2rad(np.asarray(rot_deg)), np.deg2rad(np.asarray(tilt_deg))
    return np.stack([np.cos(rot) * np.sin(tilt), np.sin(rot) * np.sin(tilt), np.cos(tilt)], axis=-1)
