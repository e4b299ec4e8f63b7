"""Solvent masks from a map, as ``relion_mask_create`` makes them.

A mask is float32 in [0, 1] on the map's grid: optionally low-pass filter the map,
keep voxels at or above a threshold, grow (or, for a negative extension, shrink)
that region by a number of pixels, and add a raised-cosine soft edge. Distances are
Euclidean (exact distance transform), so growth is isotropic; the edge goes from 1
at the grown boundary to 0 at ``soft_edge_px`` pixels beyond it
(:func:`streamem.core.masks.threshold_mask`).

:func:`auto_mask` picks the threshold itself for ``postprocess --auto-mask``:
RELION's postprocess removed ``--auto_mask`` (it asks for a mask from
``relion_mask_create``), so the rule here is ours, written down in its docstring.
"""

from __future__ import annotations

import numpy as np

from streamem.core.backend import xp_of
from streamem.core.filters import lowpass
from streamem.core.masks import centred_radius, threshold_mask


def create_mask(
    volume,
    threshold: float,
    extend_px: float = 0.0,
    soft_edge_px: float = 0.0,
    lowpass_A: float | None = None,
    pixel_size_A: float | None = None,
):
    """Mask ``(B, B, B)`` float32 from a map (``relion_mask_create --ini_threshold
    --extend_inimask --width_soft_edge [--lowpass]``).

    Parameters
    ----------
    volume : real ``(B, B, B)`` map.
    threshold : density at or above which a voxel is inside (after the low-pass).
    extend_px : grow the thresholded region by this many pixels; negative erodes it.
    soft_edge_px : width of the raised-cosine edge (pixels), 0 for a hard edge.
    lowpass_A : low-pass the map to this resolution (Å) first; needs ``pixel_size_A``.
    """
    if soft_edge_px < 0:
        raise ValueError(f"soft edge must be >= 0 px, got {soft_edge_px}")
    xp = xp_of(volume)
    vol = xp.asarray(volume, dtype=xp.float64)
    if lowpass_A is not None:
        if pixel_size_A is None or pixel_size_A <= 0:
            raise ValueError("a low-pass needs a positive pixel size")
        vol = lowpass(vol, lowpass_A, pixel_size_A)
    if extend_px >= 0:
        return threshold_mask(vol, threshold, extend_px, soft_edge_px)
    # Erosion: keep the voxels deeper than |extend_px| inside the region, then edge.
    # The solvent grown by |extend_px| is a hard threshold mask of the outside.
    outside = (vol < threshold).astype(xp.float64)
    core = 1.0 - threshold_mask(outside, 0.5, -extend_px, 0.0).astype(xp.float64)
    return threshold_mask(core, 0.5, 0.0, soft_edge_px)


def _ndimage(xp):
    """``scipy.ndimage`` or ``cupyx.scipy.ndimage`` for the array module."""
    if xp is np:
        import scipy.ndimage

        return scipy.ndimage
    import cupyx.scipy.ndimage

    return cupyx.scipy.ndimage


def auto_threshold(volume, solvent_sigmas: float = 4.0, fraction_of_max: float = 0.1) -> float:
    """Density threshold separating a particle from solvent noise.

    ``max(fraction_of_max · max, median + solvent_sigmas · σ)`` where median and σ
    (from the median absolute deviation) describe the voxels outside a sphere of
    0.45 of the box, which a centred particle leaves to solvent. The noise term keeps
    noise out of the mask; the fraction of the maximum keeps a clean map from giving
    a threshold at the level of its numerical noise.
    """
    xp = xp_of(volume)
    B = volume.shape[-1]
    shell = centred_radius(B, volume.ndim, xp) > 0.45 * B
    solvent = xp.asarray(volume, dtype=xp.float64)[shell]
    med = float(xp.median(solvent))
    sigma = 1.4826 * float(xp.median(xp.abs(solvent - med)))
    return max(fraction_of_max * float(xp.max(volume)), med + solvent_sigmas * sigma)


def largest_components(inside, keep_fraction: float = 0.2):
    """The connected parts (6-connectivity) of a boolean map with at least
    ``keep_fraction`` of the voxels of the largest part, as a boolean map."""
    xp = xp_of(inside)
    labels, n = _ndimage(xp).label(inside)
    if int(n) <= 1:
        return inside
    sizes = xp.bincount(labels.reshape(-1))
    sizes[0] = 0
    keep = sizes >= keep_fraction * sizes.max()
    keep[0] = False
    return keep[labels]


def auto_mask(
    volume,
    pixel_size_A: float,
    lowpass_A: float = 15.0,
    extend_px: float = 3.0,
    soft_edge_px: float = 6.0,
    solvent_sigmas: float = 4.0,
    fraction_of_max: float = 0.1,
):
    """A mask for post-processing without a user mask.

    Low-pass the map (usually the average of the half maps) to ``lowpass_A``,
    threshold it at :func:`auto_threshold`, drop small parts (noise;
    :func:`largest_components`), extend by ``extend_px`` and add a ``soft_edge_px``
    edge (RELION's defaults for its former ``--auto_mask``: 3 and 6 px). Returns
    float32 ``(B, B, B)``.
    """
    xp = xp_of(volume)
    smooth = lowpass(xp.asarray(volume, dtype=xp.float64), lowpass_A, pixel_size_A)
    inside = largest_components(smooth >= auto_threshold(smooth, solvent_sigmas, fraction_of_max))
    return threshold_mask(inside.astype(xp.float64), 0.5, extend_px, soft_edge_px)


def mask_volume_fraction(mask) -> float:
    """Fraction of the box with mask value > 0.5 (as RELION counts it)."""
    xp = xp_of(mask)
    return float(xp.mean(mask > 0.5))


__all__ = [
    "auto_mask",
    "auto_threshold",
    "create_mask",
    "largest_components",
    "mask_volume_fraction",
]
