"""The CPU kernels of central slices: extraction (rotate, Friedel-flip, gather and lerp)
and insertion (rotate, flip, trilinear scatter-add), each one compiled function (Numba).

:func:`streamem.core.projector.project_points` is written once over the array API (it
is what runs on CuPy and under ``array_api_strict``). On NumPy that formulation makes
about twenty (poses × points) temporaries per block (three components, their
fractions and integer parts, eight gathered corners, seven lerps) and is bound by
memory traffic: projection was ~80% of a box-128 local-search E-step. This kernel
does the same arithmetic tile by tile in a few small buffers, in the same float32 order
(components ``kx·r0 + ky·r1``, truncation after the flip, lerps along x, then y,
then z), so it returns the same values as the array-API path, bit for bit
(``tests/test_slice_kernel.py``); it is that path's specialisation for host arrays,
not a second algorithm. ``streamem bench project`` times both (``host_kernel=False``
runs the array-API path on NumPy).

Insertion (:func:`streamem.core.backprojector.insert_points`) is the adjoint: on NumPy
the array-API formulation makes 24 ``np.add.at`` passes per block (8 corners × real,
imaginary, weight, ~15 ns per element each); the kernel adds each point's 8 corners
in one visit, in the accumulators' precision (double, or single as the E-step's). Its
sums are in another order than the array-API path's, so they agree to that
precision's rounding, not bit for bit; the kernel is deterministic (same inputs, same
sums), which the chunking-invariance tests rely on. ``streamem bench backproject``
times both.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, inline="always")
def _tile_corners(kx, ky, rows, c, start, stop, sz, sy, base, frac, sign):  # pragma: no cover
    """Points start..stop of the slice with rotation rows ``rows`` (6,) float32: each
    one's flat corner index (z0, y0, x0) into ``base``, its fractions into ``frac``
    (3, tile) and into ``sign`` −1 where it was Friedel-flipped (x < 0), else 1.

    A loop of its own, free of loads from the half cube and of branches (the flip is a
    product by ±1, exact, as is the mate's conjugation by it), so that the compiler
    runs it in SIMD lanes over the tile.
    """
    one = np.float32(1.0)
    # the rows in registers: the stores below might alias them, which would otherwise
    # reload them at every point and keep the loop scalar
    r0, r1, r2, r3, r4, r5 = rows[0], rows[1], rows[2], rows[3], rows[4], rows[5]
    for m in range(start, stop):
        t = m - start
        x = kx[m] * r0 + ky[m] * r3
        y = kx[m] * r1 + ky[m] * r4
        z = kx[m] * r2 + ky[m] * r5
        s = -one if x < 0 else one
        x = x * s
        y = y * s + c
        z = z * s + c
        # every component is ≥ 0 here, where truncation through int32 (one SIMD
        # instruction) is the floor; the half cube has far fewer than 2³¹ voxels
        ix, iy, iz = np.int32(x), np.int32(y), np.int32(z)
        frac[0, t], frac[1, t] = x - np.float32(ix), y - np.float32(iy)
        frac[2, t] = z - np.float32(iz)
        # unsigned: indexing by it skips Numba's negative-index wrap-around (1.4x, measured)
        base[t] = np.uintp(iz) * sz + np.uintp(iy) * sy + np.uintp(ix)  # corner (z0, y0, x0)
        sign[t] = s


#: Points per tile of the extraction: every slice of a call reads the tile's corners
#: before the next tile, so slices of nearby poses (a local search's candidates, a
#: parent's children) find them in cache. With the corners computed before the reads
#: (below), ``streamem bench project --box 128`` went from 109 to 84 ns per point.
TILE_POINTS = 128

#: Slices per block of the extraction: the tiles run over one block of slices at a
#: time. Over a whole call (a part's thousands of slices at scattered poses) a tile's
#: reads overflow the caches before the next tile, which reads the neighbouring
#: voxels; within a block (the callers keep slices of nearby poses together) both the
#: slices of a tile and the tiles of a slice find their voxels in cache.
#: ``streamem bench project --local`` (128 images × 64 slices at σ 2.5° around each
#: image's pose, box 128, radius 46, padding 2), one run: 36 ns per point as one
#: block, 24-26 in blocks of 64-256, 30 slice by slice. With the lerps in real parts
#: and unsigned indices, two runs of each kernel alternated: 25-26 → 19-20 at blocks
#: of 64, 33-39 → 26.5 as one block.
SLICE_BLOCK = 64


@numba.njit(cache=True, nogil=True)
def _slices(data, rows, kx, ky, inside, radius_padded, out, block):  # pragma: no cover
    # Per (tile, slice) four loops: corners, the 8 corner reads, the lerps, the writes.
    # Only the reads are scalar; the corners and lerps run in SIMD lanes. Point by point
    # in one loop (b05d5e6) the same arithmetic, with the same slices bit for bit, was
    # slower: ``streamem bench project --local`` at blocks of 64, the two commits
    # alternated twice, 13.2 and 14.8 → 10.3 and 11.6 ns per point.
    c = np.float32(radius_padded + 1)
    flat = data.ravel()
    sz, sy = np.uintp(data.shape[1] * data.shape[2]), np.uintp(data.shape[2])
    one = np.uintp(1)
    n_points = kx.shape[0]
    base = np.empty(TILE_POINTS, np.uintp)
    frac = np.empty((3, TILE_POINTS), np.float32)
    sign = np.empty(TILE_POINTS, np.float32)
    corner = np.empty((8, TILE_POINTS), np.complex64)
    v_re = np.empty(TILE_POINTS, np.float32)
    v_im = np.empty(TILE_POINTS, np.float32)
    n_slices = rows.shape[0]
    for first in range(0, n_slices, block):
        last = min(first + block, n_slices)
        for start in range(0, n_points, TILE_POINTS):
            stop = min(start + TILE_POINTS, n_points)
            size = stop - start
            for n in range(first, last):
                _tile_corners(kx, ky, rows[n], c, start, stop, sz, sy, base, frac, sign)
                for t in range(size):
                    b0 = base[t]
                    b1 = b0 + sz
                    corner[0, t], corner[1, t] = flat[b0], flat[b0 + one]
                    corner[2, t], corner[3, t] = flat[b0 + sy], flat[b0 + sy + one]
                    corner[4, t], corner[5, t] = flat[b1], flat[b1 + one]
                    corner[6, t], corner[7, t] = flat[b1 + sy], flat[b1 + sy + one]
                for t in range(size):
                    fx, fy, fz = frac[0, t], frac[1, t], frac[2, t]
                    a0, a1, a2, a3 = corner[0, t], corner[1, t], corner[2, t], corner[3, t]
                    a4, a5, a6, a7 = corner[4, t], corner[5, t], corner[6, t], corner[7, t]
                    # real and imaginary parts apart: a complex lerp by a real fraction
                    # costs Numba a full complex product (the fraction promoted to
                    # complex); the parts take the same float32 steps
                    c00r = a0.real + fx * (a1.real - a0.real)
                    c00i = a0.imag + fx * (a1.imag - a0.imag)
                    c01r = a2.real + fx * (a3.real - a2.real)
                    c01i = a2.imag + fx * (a3.imag - a2.imag)
                    c10r = a4.real + fx * (a5.real - a4.real)
                    c10i = a4.imag + fx * (a5.imag - a4.imag)
                    c11r = a6.real + fx * (a7.real - a6.real)
                    c11i = a6.imag + fx * (a7.imag - a6.imag)
                    c0r = c00r + fy * (c01r - c00r)
                    c0i = c00i + fy * (c01i - c00i)
                    c1r = c10r + fy * (c11r - c10r)
                    c1i = c10i + fy * (c11i - c10i)
                    v_re[t] = c0r + fz * (c1r - c0r)
                    v_im[t] = (c0i + fz * (c1i - c0i)) * sign[t]  # the mate's: conjugate
                row = out[n]
                for t in range(size):
                    row[inside[start + t]] = complex(v_re[t], v_im[t])


def _rotation_rows(rotations, padding_factor: int) -> np.ndarray:
    """(n, 6) float32: rows 0 and 1 of each rotation times the padding factor, rounded
    to float32 after the product (as :func:`streamem.core.projector.slice_components`)."""
    rotations = np.asarray(rotations, np.float64)
    return np.ascontiguousarray(
        (rotations[:, :2, :] * padding_factor).astype(np.float32).reshape(-1, 6)
    )


def _points(coords, columns):
    """(kx, ky) float32 and their columns (unsigned: no wrap-around test), in the
    caller's order, which is the order the kernels visit the points in.

    Callers that read many slices give the points in raster order (ky, then kx) within
    radius bands (:func:`streamem.em.fourier_points.half_plane_points` with ``cuts``,
    as the E-step does): neighbouring points then read neighbouring voxels, and a
    slice's values are written (an insertion's values read) one after the other. Before
    83182f8 the kernels sorted every call's points into raster order themselves and
    wrote (read) through that permutation. ``bench refine-phases``, the two commits
    paired in ``farm-bench --vs`` runs, both orders: the 0.94° iterations' projection
    13.1-13.8 → 11.0-11.9 ns per point and back-projection 43-48 → 37-42, the whole
    run 0.935 and 0.954 of the time, with the same FSC and angular error.
    ``streamem bench project --local`` prints the E-step's order against plain radius
    order at the default blocks (extraction 0.84-0.89, three runs on a quiet machine).
    """
    coords = np.asarray(coords)
    kx = np.ascontiguousarray(coords[:, 1], dtype=np.float32)
    ky = np.ascontiguousarray(coords[:, 0], dtype=np.float32)
    return kx, ky, np.ascontiguousarray(columns, dtype=np.uintp)


def project_slices_host(
    data: np.ndarray,
    rotations: np.ndarray,
    coords: np.ndarray,
    inside: np.ndarray,
    padding_factor: int,
    radius_padded: int,
    out: np.ndarray,
    slice_block: int = SLICE_BLOCK,
) -> np.ndarray:
    """Trilinear central slices of a half cube, on the host.

    data: complex64 (D, D, R + 2) half cube (layout of :mod:`streamem.core.projector`);
    rotations: (n, 3, 3) float64; coords: (Mi, 2) (ky, kx) float64 B-box Fourier pixels
    of the points within the cutoff; inside: (Mi,) their columns in ``out``, complex64
    (n, M) C-contiguous, which is filled there (the other columns are left) and returned.
    slice_block: slices per block (:data:`SLICE_BLOCK`); any value gives the same slices.
    """
    kx, ky, columns = _points(coords, inside)
    rows = _rotation_rows(rotations, padding_factor)
    _slices(
        np.ascontiguousarray(data),
        rows,
        kx,
        ky,
        columns,
        int(radius_padded),
        out,
        max(1, int(slice_block)),
    )
    return out


@numba.njit(cache=True, nogil=True)
def _power(z, out):  # pragma: no cover
    zf, of = z.reshape(-1), out.reshape(-1)
    for i in range(zf.size):
        v = zf[i]
        of[i] = v.real * v.real + v.imag * v.imag


def slice_power_host(slices: np.ndarray) -> np.ndarray:
    """|A|² of complex64 slices (n, M), float32: NumPy's ``real**2 + imag**2`` bit for bit,
    in one pass (NumPy's strided real/imaginary views took 6x longer: 19.5 vs 3.3 ms on
    5,000 × 1,238 slices, scratch micro-benchmark, one run)."""
    slices = np.ascontiguousarray(slices)
    out = np.empty(slices.shape, np.float32)
    _power(slices, out)
    return out


#: Points per tile of the insertion: every slice of a call adds the tile's corners
#: before the next tile, so slices of nearby poses (one image's significant children, a
#: flush's images sorted by table row) add into cache lines still held. Measured with
#: the class3d run of issue 25 paused (scratch micro-benchmark, box 128, padding 2, 400
#: slices, ns per point, slice by slice → tiles of 2,048): random poses 154 → 133,
#: σ 1° around one pose 83 → 64, σ 3° 95 → 67, ten clusters of 40 at σ 1° 90 → 79.
INSERT_TILE_POINTS = 2048

#: Slices per block of the insertion (as :data:`SLICE_BLOCK`). The same bench: 57 ns
#: per point as one block, 51-54 in blocks of 16-64 (the scattered adds gain less).
INSERT_SLICE_BLOCK = 16


@numba.njit(cache=True, nogil=True)
def _insert(
    data_re, weight_acc, rows, kx, ky, keep, values, weights, radius_padded, block
):  # pragma: no cover
    # Point by point: the adds' cache misses, not the arithmetic, set the pace here. The
    # extraction's layout (each point's 8 weights and its value in SIMD lanes first,
    # then the adds alone) was tried and gained only where the accumulators sat in
    # cache, not at a local search's poses (the insert column of ``streamem bench
    # project --local`` is the figure a new layout has to beat). data_re: the data
    # accumulator's (re, im) pairs as reals of weight_acc's dtype; the products are
    # made in that precision (insert_points hands single-precision accumulators
    # complex64 values and float32 weights).
    c = np.float32(radius_padded + 1)
    one = np.float32(1.0)
    data, weight = data_re.ravel(), weight_acc.ravel()
    zero = weight[0] - weight[0]  # weight_acc's precision (0 + x is exact)
    sz, sy = np.uintp(weight_acc.shape[1] * weight_acc.shape[2]), np.uintp(weight_acc.shape[2])
    n_points = kx.shape[0]
    base = np.empty(INSERT_TILE_POINTS, np.uintp)
    frac = np.empty((3, INSERT_TILE_POINTS), np.float32)
    sign = np.empty(INSERT_TILE_POINTS, np.float32)
    n_slices = rows.shape[0]
    two = np.uintp(2)
    for first in range(0, n_slices, block):
        last = min(first + block, n_slices)
        for start in range(0, n_points, INSERT_TILE_POINTS):
            stop = min(start + INSERT_TILE_POINTS, n_points)
            for n in range(first, last):
                # the corners first: no dependence on the adds
                _tile_corners(kx, ky, rows[n], c, start, stop, sz, sy, base, frac, sign)
                for m in range(start, stop):
                    j = m - start
                    fx, fy, fz = frac[0, j], frac[1, j], frac[2, j]
                    v = values[n, keep[m]]
                    v_re = v.real + zero
                    v_im = (v.imag + zero) * sign[j]  # the mate's: conjugate
                    w = weights[n, keep[m]] + zero
                    for dz in range(2):
                        gz = fz if dz else one - fz
                        for dy in range(2):
                            gzy = gz * (fy if dy else one - fy)
                            b = base[j] + np.uintp(dz) * sz + np.uintp(dy) * sy
                            for dx in range(2):
                                t = gzy * (fx if dx else one - fx) + zero
                                i = b + np.uintp(dx)
                                data[two * i] += t * v_re
                                data[two * i + np.uintp(1)] += t * v_im
                                weight[i] += t * w


def insert_slices_host(
    data_acc: np.ndarray,
    weight_acc: np.ndarray,
    rotations: np.ndarray,
    coords: np.ndarray,
    keep: np.ndarray,
    values: np.ndarray,
    weights: np.ndarray,
    padding_factor: int,
    radius_padded: int,
    slice_block: int = INSERT_SLICE_BLOCK,
) -> None:
    """Trilinear scatter-add of slices into half-cube accumulators, on the host, in place.

    data_acc, weight_acc: a pair of
    :func:`~streamem.core.backprojector.accumulator_dtypes` (complex64/float32: the
    products and sums are made in single precision), (D, D, R + 2) C-contiguous;
    rotations (n, 3, 3) float64; coords (Mi, 2) (ky, kx) float64 of the points to
    insert, at columns ``keep`` (Mi,) of values (n, M) complex and weights (n, M) real
    (any strides, broadcast views too).
    """
    kx, ky, columns = _points(coords, keep)
    rows = _rotation_rows(rotations, padding_factor)
    _insert(
        data_acc.view(weight_acc.dtype),
        weight_acc,
        rows,
        kx,
        ky,
        columns,
        values,
        weights,
        int(radius_padded),
        max(1, int(slice_block)),
    )
