"""Real-space projection for the simulator, independent of the Fourier projector.

The core numerics project a map by taking central slices of its padded Fourier
transform (``streamem.core.projector``). The simulator must not share that code,
or tests of one against the other would prove nothing, so here a projection is
computed the slow, obvious way: rotate the sampling grid, interpolate the map
with a cubic B-spline (``scipy.ndimage.map_coordinates``) and sum along z:

    P(x, y) = sum_z V(Aᵀ (x, y, z))

with (x, y, z) in voxels relative to the box centre ``B // 2`` and the map indexed
``[z, y, x]`` (RELION's convention, ``CONVENTIONS.md``): a point r of the map
(relative to the centre, ordered x, y, z) lands in the image at ``(A r)_xy``. The
sum runs over voxel steps, so the projection is in map units times voxels.

Only grid points inside the sphere holding the map's support are interpolated
(``support_radius_px``), which is about 3x fewer than the whole cube for a
particle filling 0.7 of the box, and gives identical results as long as the map
is zero outside that sphere (which :func:`support_radius_px` guarantees by
construction, up to the spline's reach).

Sub-pixel shifts use the Fourier shift theorem (:func:`shift_images`), so shifting
commutes exactly with the CTF, which is also applied in Fourier space.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from streamem.core.backend import irfftn, rfftn


def support_radius_px(volume: np.ndarray, rel_threshold: float = 1e-6) -> float:
    """Radius (voxels, from the centre ``B // 2``) of the sphere holding the map's support.

    The support is every voxel with ``|V| > rel_threshold * max|V|``; 2 voxels are
    added for the reach of the cubic spline. A map with nothing above the threshold
    gives 0.
    """
    vol = np.asarray(volume)
    peak = float(np.abs(vol).max()) if vol.size else 0.0
    if peak == 0.0:
        return 0.0
    b = vol.shape[0]
    idx = np.nonzero(np.abs(vol) > rel_threshold * peak)
    c = b // 2
    r2 = sum((i.astype(np.float64) - c) ** 2 for i in idx)
    return float(np.sqrt(r2.max())) + 2.0


class RealSpaceProjector:
    """Projects one cubic map at many poses (the spline prefilter is done once).

    ``volume``: (B, B, B) real map, ``[z, y, x]``, centre ``B // 2``.
    ``order``: spline order of the interpolation (3 = cubic, 1 = trilinear).
    ``radius_px``: only points within this distance of the centre are summed;
    ``None`` measures it with :func:`support_radius_px`.
    """

    def __init__(self, volume: np.ndarray, order: int = 3, radius_px: float | None = None):
        vol = np.asarray(volume, dtype=np.float32)
        if vol.ndim != 3 or len(set(vol.shape)) != 1:
            raise ValueError(f"volume must be a cube (B, B, B), got shape {vol.shape}")
        self.box_size = int(vol.shape[0])
        self.order = int(order)
        if order > 1:
            self.coeffs = ndimage.spline_filter(vol, order=order, output=np.float32)
        else:
            self.coeffs = vol
        if radius_px is None:
            radius_px = support_radius_px(vol)
        self._setup_grid(float(radius_px))

    def _setup_grid(self, radius_px: float) -> None:
        b = self.box_size
        c = b // 2
        ax = np.arange(b, dtype=np.float64) - c
        # Pixels whose ray meets the sphere, and the z-extent of each ray inside it.
        yy, xx = np.meshgrid(ax, ax, indexing="ij")
        rho2 = yy * yy + xx * xx
        half = np.floor(np.sqrt(np.clip(radius_px**2 - rho2, 0.0, None)))
        inside = rho2 <= radius_px**2
        pix = np.flatnonzero(inside)  # flat [y, x] indices of pixels with samples
        counts = (2 * half.ravel()[pix] + 1).astype(np.int64)  # samples per ray
        # Flattened ray samples: (3, S) points ordered (x, y, z), rays contiguous.
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        ray = np.repeat(np.arange(pix.size), counts)
        z = (
            np.arange(counts.sum())
            - np.repeat(starts, counts)
            - np.repeat(half.ravel()[pix], counts)
        )
        self._points = np.stack(
            [xx.ravel()[pix][ray], yy.ravel()[pix][ray], z.astype(np.float64)]
        )  # (3, S) x, y, z relative to the centre
        self._pixels = pix
        self._starts = starts

    def project(self, rotations: np.ndarray) -> np.ndarray:
        """Projections ``(n, B, B)`` float32 at rotation matrices ``(n, 3, 3)`` (or (3, 3))."""
        rot = np.asarray(rotations, dtype=np.float64)
        single = rot.ndim == 2
        rot = rot.reshape(-1, 3, 3)
        b = self.box_size
        c = b // 2
        out = np.zeros((rot.shape[0], b * b), dtype=np.float32)
        if self._pixels.size:
            for i, A in enumerate(rot):
                r = A.T @ self._points  # (3, S) map coordinates (x, y, z) rel. centre
                coords = r[::-1] + c  # (3, S) array indices [z, y, x]
                vals = ndimage.map_coordinates(
                    self.coeffs, coords, order=self.order, mode="constant", cval=0.0,
                    prefilter=False, output=np.float32,
                )  # fmt: skip
                out[i, self._pixels] = np.add.reduceat(vals, self._starts, dtype=np.float64)
        out = out.reshape(-1, b, b)
        return out[0] if single else out


def project_real_space(
    volume: np.ndarray, rotations: np.ndarray, order: int = 3, radius_px: float | None = None
) -> np.ndarray:
    """``P(x, y) = sum_z V(Aᵀ (x, y, z))`` for each rotation: ``(n, B, B)`` float32.

    ``volume`` (B, B, B) ``[z, y, x]`` centred at ``B // 2``; ``rotations`` (n, 3, 3)
    RELION matrices (``euler_to_matrix``); a single (3, 3) gives one (B, B) image.
    """
    return RealSpaceProjector(volume, order=order, radius_px=radius_px).project(rotations)


def shift_images(images: np.ndarray, shifts_px: np.ndarray) -> np.ndarray:
    """Translate images by ``shifts_px`` (n, 2) = (dy, dx) pixels with a Fourier phase shift.

    Content at (y, x) moves to (y + dy, x + dx) (periodically). ``images`` is
    ``(n, B, B)`` (or (B, B) with shifts (2,)); returns float32 of the same shape.
    """
    img = np.asarray(images, dtype=np.float32)
    shifts = np.asarray(shifts_px, dtype=np.float64)
    return np.asarray(
        irfftn(
            rfftn(img, axes=(-2, -1)) * shift_phases(img.shape[-1], shifts),
            s=img.shape[-2:],
            axes=(-2, -1),
        ),
        dtype=np.float32,
    )


def shift_phases(box_size: int, shifts_px: np.ndarray) -> np.ndarray:
    """Phase factors ``exp(-2πi k·d)`` on the rfft grid: ``batch + (B, B // 2 + 1)`` complex64.

    Multiplying an image's rfft by them moves its content by ``d = (dy, dx)`` pixels.
    """
    d = np.asarray(shifts_px, dtype=np.float64)
    ky = np.fft.fftfreq(box_size)
    kx = np.fft.rfftfreq(box_size)
    phase = d[..., 0, None, None] * ky[:, None] + d[..., 1, None, None] * kx[None, :]
    return np.exp(-2j * np.pi * phase).astype(np.complex64)
