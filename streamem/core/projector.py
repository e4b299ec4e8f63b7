"""Fourier-space projection of a 3-D map (RELION's ``Projector``, trilinear).

Conventions (see ``CONVENTIONS.md``): a map is ``[z, y, x]`` with its centre at
index ``B // 2``; the image of pose A has at frequency (kx, ky) the map's Fourier
coefficient at ``Aᵀ (kx, ky, 0) = kx A[0, :] + ky A[1, :]`` (vector order x, y, z).
With unnormalised FFTs (``scipy.fft``) the central-slice theorem then holds with no
scale factor: the projection image P(x, y) = ∫ V(Aᵀ (x, y, z)) dz has
``rfft2(ifftshift(P))`` equal to the slice of ``rfftn(ifftshift(V))``.

How the reference is prepared (:func:`make_projector`), as RELION does:

1. gridding pre-correction: the map is divided in real space by the Fourier
   transform of the trilinear kernel, ``sinc²(x/P) sinc²(y/P) sinc²(z/P)`` with P the
   padded box and (x, y, z) voxels from the centre (RELION uses the radial
   ``sinc²(r/P)``; the separable form is exact for a separable kernel);
2. zero-padding to ``P = padding_factor * B`` with the centre kept at ``P // 2``;
3. forward FFT of the ifftshifted padded map, so that the samples of the padded
   transform at ``padding_factor * k`` equal the B-box transform at k.

Layout of :attr:`FourierVolume.data` (RELION's "projector-centred half cube"):
complex64 ``(D, D, R + 2)`` with ``R = ceil(padding_factor * max_radius_px)`` and
``D = 2 R + 3``. Element ``[z + R + 1, y + R + 1, x]`` holds the padded map's Fourier
coefficient at integer frequency (x, y, z) (padded-grid units, x >= 0); the other
half follows from Friedel symmetry ``F(-k) = conj F(k)``. The one-voxel margin
around radius R lets trilinear interpolation at any point with |k| <= R read its
eight neighbours with constant index offsets (no wrap-around, no bounds checks),
and the cube only spans the radius in use, so low-resolution iterations work on
a small array. The accumulators of :mod:`streamem.core.backprojector` use the
same layout (complex128 / float64).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from streamem.core.backend import (
    asarray_like,
    astype,
    conj,
    fftshift,
    flatnonzero,
    has_numpy_api,
    ifftshift,
    irfftn,
    is_complex,
    rfftn,
    sinc,
    take_rows,
    xp_of,
)
from streamem.core.fourier import image_fourier_coords, scatter_to_rfft
from streamem.core.slice_kernel import project_slices_host, slice_power_host

# Points per vectorised block in project/insert: small enough that the temporaries
# stay in cache (measured: 64k points is ~2x faster than 1M on a laptop-class CPU).
BLOCK_POINTS = 1 << 16


def padded_radius(max_radius_px: float, padding_factor: int) -> int:
    """Half-cube radius R (padded Fourier voxels) for a B-box radius."""
    return int(math.ceil(padding_factor * max_radius_px - 1e-9))


def half_cube_shape(radius_padded: int) -> tuple[int, int, int]:
    """Shape ``(D, D, R + 2)`` of the projector-centred half cube of radius R."""
    return (2 * radius_padded + 3, 2 * radius_padded + 3, radius_padded + 2)


def radius_of_half_cube(shape) -> int:
    """Inverse of :func:`half_cube_shape`."""
    return int(shape[-1]) - 2


@functools.lru_cache(maxsize=4)
def half_cube_reach(shape: tuple[int, int, int]) -> np.ndarray:
    """``(D, D, R + 2)`` bool, read-only: the voxels of a half cube that trilinear
    insertion of points with ``|k| <= R`` can reach, ``|voxel| <= R + 2`` (a point's
    eight neighbours lie within ``sqrt(3)`` of it). The rest of the cube (about 47% of
    it) stays zero in every accumulator, so statistics leave an E-step task holding
    these voxels only (:meth:`streamem.em.statistics.SufficientStatistics.compact`)."""
    R = radius_of_half_cube(shape)
    z = np.arange(shape[0]) - (R + 1)
    y = np.arange(shape[1]) - (R + 1)
    x = np.arange(shape[2])
    r2 = z[:, None, None] ** 2 + y[None, :, None] ** 2 + x[None, None, :] ** 2
    reach = r2 <= (R + 2) ** 2
    reach.flags.writeable = False
    return reach


@dataclass(frozen=True, eq=False)
class FourierVolume:
    """A reference prepared for projection.

    Attributes
    ----------
    data : complex64 ``(D, D, R + 2)`` projector-centred half cube (module docstring).
    box_size : B, the real-space box of the map and of the images.
    padding_factor : P / B (RELION's ``--pad``, usually 2).
    max_radius_px : slices are zero beyond this radius (B-box Fourier pixels);
        ``None`` means ``R / padding_factor`` from the shape of ``data``.
    """

    data: object
    box_size: int
    padding_factor: int = 2
    max_radius_px: float | None = field(default=None)

    @property
    def radius_padded(self) -> int:
        return radius_of_half_cube(self.data.shape)

    @property
    def cutoff_px(self) -> float:
        """Radius (B-box Fourier pixels) beyond which slices are zero."""
        if self.max_radius_px is None:
            return self.radius_padded / self.padding_factor
        return float(self.max_radius_px)


def trilinear_kernel_ft(box_size: int, padded_size: int, xp=np, dtype=None):
    """Separable FT of the trilinear kernel at the voxels of a centred B box.

    Returns the 1-D factor ``sinc²(x / P)`` for ``x = i - B // 2``, ``i = 0..B-1``;
    the 3-D correction is the outer product of three copies.
    """
    x = xp.arange(box_size, dtype=xp.float64) - box_size // 2
    s = sinc(x / padded_size) ** 2
    return s if dtype is None else astype(s, dtype)


def _separable(f1d, ndim: int):
    """Outer product of ``ndim`` copies of a 1-D array."""
    out = f1d
    for _ in range(ndim - 1):
        out = out[..., None] * f1d
    return out


def full_fft_to_half_cube(F, padded_size: int, radius_padded: int):
    """Cut the projector-centred half cube of radius R out of an rfft of a P box.

    ``F`` is ``rfftn`` output ``(P, P, P // 2 + 1)``; returns ``(D, D, R + 2)`` holding
    the coefficients at integer frequencies |x|, |y|, |z| <= R + 1 (periodic
    extension beyond the padded Nyquist, as the DFT implies).
    """
    xp = xp_of(F)
    P = padded_size
    R = radius_padded
    c = R + 1
    f = xp.arange(-c, c + 1)
    zi = f % P
    neg = (-f) % P
    half = P // 2
    cols = []
    for x in range(R + 2):
        if x <= half:
            cols.append(F[zi[:, None], zi[None, :], x])
        else:
            # Beyond the stored rfft half: F(z, y, x) = conj F(-z, -y, P - x)
            cols.append(conj(F[neg[:, None], neg[None, :], P - x]))
    return xp.stack(cols, axis=-1)


def make_projector(
    volume, padding_factor: int = 2, max_radius_px: float | None = None
) -> FourierVolume:
    """Prepare a real-space map ``(B, B, B)`` for Fourier-space projection.

    Parameters
    ----------
    volume : real ``(B, B, B)`` map, centre at ``B // 2`` (NumPy or CuPy).
    padding_factor : integer oversampling of the Fourier grid (RELION default 2).
    max_radius_px : highest frequency (B-box Fourier pixels) the projections need;
        default ``B // 2`` (Nyquist). Smaller radii give a smaller, faster cube.

    Returns a :class:`FourierVolume` with complex64 data (layout in the module
    docstring).
    """
    xp = xp_of(volume)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"volume must be a cube (B, B, B), got shape {volume.shape}")
    if int(padding_factor) != padding_factor or padding_factor < 1:
        raise ValueError(f"padding_factor must be a positive integer, got {padding_factor}")
    padding_factor = int(padding_factor)
    B = volume.shape[0]
    r_max = B // 2 if max_radius_px is None else min(float(max_radius_px), B / 2)
    P = padding_factor * B
    R = padded_radius(r_max, padding_factor)
    real_dtype = xp.float64 if volume.dtype == xp.float64 else xp.float32
    corr = _separable(trilinear_kernel_ft(B, P, xp, real_dtype), 3)
    padded = xp.zeros((P, P, P), dtype=real_dtype)
    o = P // 2 - B // 2
    padded[o : o + B, o : o + B, o : o + B] = astype(volume, real_dtype) / corr
    F = rfftn(ifftshift(padded, axes=(0, 1, 2)), axes=(0, 1, 2))
    data = astype(full_fft_to_half_cube(F, P, R), xp.complex64)
    return FourierVolume(data, B, padding_factor, r_max)


# --------------------------------------------------------------------------------------
# Trilinear interpolation in the half cube (shared with the back-projector)


def slice_components(rotations, coords, padding_factor: int, dtype=None):
    """Padded-grid 3-D frequencies (x, y, z) of image points at poses.

    ``rotations`` ``(n, 3, 3)``, ``coords`` ``(M, 2)`` as (ky, kx) -> three arrays
    ``(n, M)``: ``padding_factor * (kx A[0, :] + ky A[1, :])`` split into components.
    float32 by default: indices stay exact and fractions are good to ~1e-5 voxel.
    """
    xp = xp_of(rotations, coords)
    dtype = xp.float32 if dtype is None else dtype
    r0 = astype(rotations[:, 0, :] * padding_factor, dtype)
    r1 = astype(rotations[:, 1, :] * padding_factor, dtype)
    ky = astype(coords[:, 0], dtype)[None, :]
    kx = astype(coords[:, 1], dtype)[None, :]
    return tuple(kx * r0[:, i, None] + ky * r1[:, i, None] for i in range(3))


def trilinear_setup(x, y, z, radius_padded: int):
    """Friedel flip, base index and fractional offsets of points in the half cube.

    ``x, y, z`` float arrays of one shape, points within radius R of the origin.
    Returns ``(base, fx, fy, fz, flip)``: int64 flat index of the (x0, y0, z0)
    corner, fractions in the dtype of x, and bool "stored as the Friedel mate"
    (conjugate the value).
    """
    xp = xp_of(x)
    R = radius_padded
    c = R + 1
    D = 2 * R + 3
    H = R + 2
    flip = x < 0
    one = xp.ones((), dtype=x.dtype)
    s = xp.where(flip, -one, one)
    # After the flip x >= 0 and y + c, z + c >= 1, so truncation is floor.
    x = x * s
    y = y * s + c
    z = z * s + c
    ix = astype(x, xp.int64)
    iy = astype(y, xp.int64)
    iz = astype(z, xp.int64)
    if has_numpy_api(xp):  # in place, casting the integers (no temporaries)
        x -= ix
        y -= iy
        z -= iz
    else:
        x = x - astype(ix, x.dtype)
        y = y - astype(iy, y.dtype)
        z = z - astype(iz, z.dtype)
    base = (iz * D + iy) * H + ix
    return base, x, y, z, flip


def corner_offsets(radius_padded: int) -> tuple[int, ...]:
    """Flat-index offsets of the 8 trilinear corners, ordered (z, y, x) bits 000..111."""
    D = 2 * radius_padded + 3
    H = radius_padded + 2
    return tuple(dz * D * H + dy * H + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1))


def trilinear_gather(data, x, y, z):
    """Trilinear interpolation of a half cube (complex or real) at points (x, y, z).

    Complex data are conjugated where the point's Friedel mate was read. Points
    must lie within radius R of the origin (callers drop the others).
    """
    xp = xp_of(data)
    R = radius_of_half_cube(data.shape)
    base, fx, fy, fz, flip = trilinear_setup(x, y, z, R)
    flat = xp.reshape(data, (-1,))
    v = [take_rows(flat, base + k) for k in corner_offsets(R)]
    # Lerp along x, then y, then z: 7 lerps instead of 8 weight products.
    c00 = v[0] + fx * (v[1] - v[0])
    c01 = v[2] + fx * (v[3] - v[2])
    c10 = v[4] + fx * (v[5] - v[4])
    c11 = v[6] + fx * (v[7] - v[6])
    c0 = c00 + fy * (c01 - c00)
    c1 = c10 + fy * (c11 - c10)
    out = c0 + fz * (c1 - c0)
    if is_complex(data):
        out = xp.where(flip, conj(out), out)
    return out


# --------------------------------------------------------------------------------------
# Projection


def project_points(
    fvol: FourierVolume,
    rotations,
    coords,
    block_points: int = BLOCK_POINTS,
    host_kernel: bool = True,
):
    """Central-slice values of the reference at image Fourier points, for many poses.

    Parameters
    ----------
    fvol : from :func:`make_projector`.
    rotations : ``(n, 3, 3)`` RELION rotation matrices (or ``(3, 3)``).
    coords : ``(M, 2)`` (ky, kx) in B-box Fourier pixels, e.g. from
        :func:`streamem.core.fourier.image_fourier_coords`.
    block_points : poses are processed in blocks of about this many points.

    Returns complex64 ``(n, M)``: the trilinearly interpolated coefficient at 3-D
    frequency ``padding_factor * (kx A[0, :] + ky A[1, :])``; zero for points beyond
    ``fvol.cutoff_px``. Scattered onto the rfft grid at the coords' ``flat_index``
    it approximates ``rfft2(ifftshift(P))`` of the real-space projection P.
    Runs in the namespace of ``fvol.data``; ``rotations`` and ``coords`` are moved
    there (:func:`~streamem.core.backend.asarray_like`, no copy if already there).
    NumPy half cubes are read by the compiled host kernel
    (:mod:`streamem.core.slice_kernel`: the same values; ``host_kernel=False`` runs the
    array-API path instead, for benchmarks and tests).
    """
    xp = xp_of(fvol.data)
    rotations = asarray_like(rotations, fvol.data, xp.float64)
    if rotations.ndim == 2:
        return project_points(fvol, rotations[None, ...], coords, block_points, host_kernel)[0, ...]
    coords = asarray_like(coords, fvol.data, xp.float64)
    n = rotations.shape[0]
    M = coords.shape[0]
    out = xp.zeros((n, M), dtype=xp.complex64)
    r2 = xp.sum(coords * coords, axis=1)
    cutoff = min(fvol.cutoff_px, fvol.radius_padded / fvol.padding_factor)
    inside_mask = r2 <= cutoff * cutoff + 1e-6
    inside = flatnonzero(inside_mask)
    Mi = inside.shape[0]
    if Mi == 0 or n == 0:
        return out
    # Within the cutoff the rotated points stay inside the half cube: no masking needed.
    fancy = has_numpy_api(xp)
    if Mi == M or fancy:
        sub = take_rows(coords, inside)
    else:
        # No fancy assignment in the standard: points beyond the cutoff read the
        # origin and are zeroed after the gather.
        sub = xp.where(inside_mask[:, None], coords, 0.0)
    if host_kernel and isinstance(fvol.data, np.ndarray) and fvol.data.dtype == np.complex64:
        return project_slices_host(
            fvol.data, rotations, sub, inside, fvol.padding_factor,
            radius_of_half_cube(fvol.data.shape), out,
        )  # fmt: skip
    nb = max(1, block_points // Mi)
    for s in range(0, n, nb):
        e = min(s + nb, n)  # the standard does not clip out-of-range slice stops
        x, y, z = slice_components(rotations[s:e, ...], sub, fvol.padding_factor)
        vals = trilinear_gather(fvol.data, x, y, z)
        if Mi == M:
            out[s:e, ...] = vals
        elif fancy:
            out[s:e, inside] = vals
        else:
            out[s:e, ...] = xp.where(inside_mask, vals, xp.zeros((), dtype=vals.dtype))
    return out


def slice_power(slices):
    """|A|² of slices (n, M) complex: ``real**2 + imag**2`` (float32 for complex64), in
    their namespace; complex64 host arrays in one compiled pass, the same values
    (:func:`streamem.core.slice_kernel.slice_power_host`). A pass of its own: written
    by the extraction kernel as it went, the extra store made the kernel slower (scratch
    micro-benchmark, 17.4 vs 16.3 ns per point at radius 28)."""
    if isinstance(slices, np.ndarray) and slices.dtype == np.complex64:
        return slice_power_host(slices)
    xp = xp_of(slices)
    return xp.real(slices) ** 2 + xp.imag(slices) ** 2


def project_images(fvol: FourierVolume, rotations, max_radius_px: float | None = None):
    """Real-space projection images ``(n, B, B)`` (centre at ``B // 2``) at the given poses.

    A convenience over :func:`project_points` on the full rfft grid up to
    ``max_radius_px`` (default: the projector's cutoff). Real dtype float32.
    """
    xp = xp_of(fvol.data)
    B = fvol.box_size
    r = fvol.cutoff_px if max_radius_px is None else max_radius_px
    coords, flat = image_fourier_coords(B, r, xp)
    vals = project_points(fvol, rotations, coords)
    grid = scatter_to_rfft(vals, flat, B)
    img = irfftn(grid, s=(B, B), axes=(-2, -1))
    return astype(fftshift(img, axes=(-2, -1)), xp.float32)
