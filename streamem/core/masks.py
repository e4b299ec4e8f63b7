"""Real-space masks with raised-cosine edges (RELION's ``relion_mask_create`` style).

Boxes are centred at index ``B // 2``. A raised-cosine edge of width w falls from 1
at distance 0 past the hard boundary to 0 at distance w:
``0.5 * (1 + cos(pi * d / w))``.
"""

from __future__ import annotations

import numpy as np

from streamem.core.backend import astype, xp_of


def _ndimage(xp):
    """``scipy.ndimage`` or ``cupyx.scipy.ndimage`` for the array module.

    NumPy and CuPy only by design: the array API has no image morphology, so
    functions that need it take host (or CuPy) arrays and stay off the strict path.
    """
    if xp is np:
        import scipy.ndimage

        return scipy.ndimage
    if xp.__name__ != "cupy":
        raise TypeError(f"scipy.ndimage functions need NumPy or CuPy arrays, not {xp.__name__}")
    import cupyx.scipy.ndimage

    return cupyx.scipy.ndimage


def raised_cosine_edge(distance, width):
    """1 for ``distance <= 0``, 0 for ``distance >= width``, raised cosine between.

    ``width <= 0`` gives a hard step at 0.
    """
    xp = xp_of(distance)
    if width <= 0:
        return astype(distance <= 0, xp.float64)
    t = xp.clip(distance / width, 0.0, 1.0)
    return 0.5 * (1.0 + xp.cos(np.pi * t))


def centred_radius(box_size: int, ndim: int = 3, xp=np):
    """Distance (pixels, float64) of each voxel from the centre ``B // 2``."""
    c = xp.arange(box_size, dtype=xp.float64) - box_size // 2
    r2 = c * c
    out = r2
    for _ in range(ndim - 1):
        out = out[..., None] + r2
    return xp.sqrt(out)


def soft_sphere(box_size: int, radius_px: float, edge_px: float, ndim: int = 3, xp=np):
    """Spherical (``ndim=3``) or circular (``ndim=2``) mask, float32.

    1 within ``radius_px`` of the centre, a raised-cosine edge over the next
    ``edge_px`` pixels, 0 beyond.
    """
    r = centred_radius(box_size, ndim, xp)
    return astype(raised_cosine_edge(r - radius_px, edge_px), xp.float32)


def threshold_mask(volume, threshold: float, extend_px: float = 0.0, soft_edge_px: float = 0.0):
    """Mask from a map: voxels >= ``threshold``, grown by ``extend_px`` pixels, with a
    raised-cosine edge of ``soft_edge_px`` pixels (as ``relion_mask_create --ini_threshold
    --extend_inimask --width_soft_edge``). float32, shape of ``volume``.

    Distances are Euclidean (exact distance transform), so growth is isotropic.
    NumPy or CuPy input only (``scipy.ndimage``'s distance transform; host-side mask
    making, not on the E-/M-step's device path).
    """
    xp = xp_of(volume)
    inside = volume >= threshold
    if not bool(xp.any(inside)):
        return xp.zeros(volume.shape, dtype=xp.float32)
    # Distance (pixels) of every voxel to the nearest voxel above threshold.
    dist = _ndimage(xp).distance_transform_edt(~inside)
    return astype(raised_cosine_edge(dist - extend_px, soft_edge_px), xp.float32)
