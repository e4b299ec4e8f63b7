"""Back-projection into padded Fourier accumulators and RELION's reconstruction.

Accumulators (:func:`empty_accumulators`) use the projector-centred half-cube
layout of :mod:`streamem.core.projector` — ``(D, D, R + 2)`` with ``D = 2 R + 3`` and
``R = ceil(padding_factor * max_radius_px)`` — as complex128 ``data`` and float64
``weight``. They are plain sums, so per-chunk accumulators add up in any order
(a monoid under ``+``) and the result does not depend on how a dataset is split.

:func:`insert_points` is the adjoint of :func:`streamem.core.projector.project_points`
(trilinear scatter-add of each slice point into its eight neighbours, Friedel
mates folded into the stored half with a complex conjugate). The caller inserts
CTF-multiplied image transforms as values and CTF² as weights (both divided by
the noise power when the M-step wants RELION's noise-weighted sums). Points with
``kx = 0, ky < 0`` are the Friedel mates of ``kx = 0, ky > 0`` points of the same
image and are skipped, as RELION's ``backproject2Dto3D`` does.

:func:`reconstruct` follows RELION's ``BackProjector::reconstruct`` (RELION 4/5
defaults):

1. Hermitian symmetry of the ``x = 0`` plane: points inserted near it from either
   side are summed with their mates (``enforceHermitianSymmetry``).
2. Point-group symmetry, if given: the accumulators are summed over the group by
   trilinear interpolation at ``L k`` (``applyPointGroupSymmetry``); cost is one
   interpolation of the whole cube per group element, independent of the number of
   particles. (Inserting every particle with all its symmetry mates —
   ``rotations @ L`` for L in the group — and reconstructing without symmetry is the
   exact, slower alternative.)
3. Regularisation (MAP): with a signal power ``tau2[s]`` per B-box shell s (in the
   units of ``|rfftn(ifftshift(map))|²`` with unnormalised FFTs, and with the same
   noise normalisation as the inserted values), every voxel of padded radius r gets
   ``weight += 1 / (padding_factor**3 * tau2_fudge * tau2[round(r / padding_factor)])``.
   The ``padding_factor**3`` is RELION's oversampling correction: a padded voxel
   receives about ``1 / padding_factor**3`` of the evidence of a B-box voxel, while
   ``tau2`` is a B-box quantity (with unnormalised FFTs the padded transform at
   ``padding_factor * k`` equals the B-box transform at k, so no other factor
   appears). Shells with ``tau2 == 0`` get ``weight *= 1001`` (RELION's
   ``1 / (0.001 weight)``); shells beyond ``len(tau2)`` are left unregularised.
4. Division ``data / weight`` with RELION's "skip gridding" floor (the default
   since RELION 4: ``--dont_skip_gridding`` is the opt-in): weights below 1/1000 of
   their shell's mean are raised to it. With ``n_gridding_iter > 0`` the
   Pipe & Menon (1999) iterative density compensation is used instead, with RELION's
   Kaiser-Bessel blob (radius 1.9 B-box pixels, alpha 15, order 0) as the
   convolution kernel.
5. Inverse FFT of the padded grid, crop to the B box, and gridding post-correction
   (divide by the separable ``sinc²`` of the trilinear kernel, as in the projector).
"""

from __future__ import annotations

import numpy as np

from streamem.core.backend import (
    add_at,
    asarray_like,
    astype,
    bincount,
    conj,
    copy,
    flatnonzero,
    has_numpy_api,
    imag,
    irfftn,
    make_complex,
    real,
    rfftn,
    take_rows,
    to_numpy,
    xp_of,
)
from streamem.core.projector import (
    BLOCK_POINTS,
    _separable,
    corner_offsets,
    half_cube_shape,
    padded_radius,
    radius_of_half_cube,
    slice_components,
    trilinear_gather,
    trilinear_kernel_ft,
    trilinear_setup,
)
from streamem.core.slice_kernel import insert_slices_host


def accumulator_dtypes(single: bool = False, xp=np) -> tuple:
    """(data, weight) dtypes of back-projection accumulators: complex128/float64, or
    complex64/float32 with ``single`` (the E-step's, whose sums are then made in single
    precision)."""
    return (xp.complex64, xp.float32) if single else (xp.complex128, xp.float64)


def empty_accumulators(
    box_size: int,
    padding_factor: int = 2,
    xp=np,
    max_radius_px: float | None = None,
    single: bool = False,
):
    """Zeroed ``(data, weight)`` half cubes for back-projection, of
    :func:`accumulator_dtypes`.

    ``max_radius_px`` (B-box Fourier pixels, default ``B // 2``) bounds what can be
    inserted; a smaller radius gives smaller arrays.
    """
    r_max = box_size // 2 if max_radius_px is None else min(float(max_radius_px), box_size / 2)
    shape = half_cube_shape(padded_radius(r_max, padding_factor))
    data_dtype, weight_dtype = accumulator_dtypes(single, xp)
    return xp.zeros(shape, dtype=data_dtype), xp.zeros(shape, dtype=weight_dtype)


def insert_points(
    data_acc,
    weight_acc,
    rotations,
    coords,
    values,
    weights,
    padding_factor: int = 2,
    block_points: int = BLOCK_POINTS,
    host_kernel: bool = True,
) -> None:
    """Trilinear scatter-add of image Fourier points into the accumulators, in place.

    Parameters
    ----------
    data_acc, weight_acc : half cubes from :func:`empty_accumulators` (modified).
    rotations : ``(n, 3, 3)`` poses.
    coords : ``(M, 2)`` (ky, kx) B-box Fourier pixels.
    values : complex ``(n, M)`` — e.g. CTF-multiplied image transforms (rfft2 of the
        ifftshifted, re-centred image at the coords' flat index).
    weights : real ``(n, M)`` or ``(M,)`` — e.g. CTF².
    padding_factor : must match the accumulators' use in :func:`reconstruct`.

    Points beyond the accumulators' radius, and the redundant ``kx = 0, ky < 0``
    half column, are skipped. The adjoint of
    :func:`streamem.core.projector.project_points` on the kept points. Runs in the
    namespace of the accumulators (the other inputs are moved there); scatter-adds
    go through :func:`streamem.core.backend.add_at` (in place on NumPy and CuPy; on
    other namespaces the accumulators are rewritten once at the end). The accumulators
    are a pair of :func:`accumulator_dtypes` (a mixed pair is refused); on NumPy the
    compiled host kernel fills them
    (:mod:`streamem.core.slice_kernel`, the same sums in another order;
    ``host_kernel=False`` runs the array-API path instead, for benchmarks and tests).
    """
    xp = xp_of(data_acc)
    rotations = asarray_like(rotations, data_acc, xp.float64)
    if rotations.ndim == 2:
        rotations = rotations[None, ...]
    coords = asarray_like(coords, data_acc, xp.float64)
    single = data_acc.dtype == xp.complex64  # then the products in single precision too
    expected = accumulator_dtypes(single, xp)
    if (data_acc.dtype, weight_acc.dtype) != expected:  # a mixed pair: wrong real views
        raise ValueError(f"accumulators of {data_acc.dtype} and {weight_acc.dtype}")
    values = asarray_like(values, data_acc, expected[0] if single else None)
    weights = asarray_like(weights, data_acc, expected[1])
    n = rotations.shape[0]
    M = coords.shape[0]
    values = xp.broadcast_to(values, (n, M))
    weights = xp.broadcast_to(weights, (n, M))
    R = radius_of_half_cube(data_acc.shape)
    if data_acc.shape != weight_acc.shape or data_acc.shape != half_cube_shape(R):
        raise ValueError(f"accumulator shapes {data_acc.shape}, {weight_acc.shape} do not match")
    native = has_numpy_api(xp)
    if native and not (data_acc.flags.c_contiguous and weight_acc.flags.c_contiguous):
        # the flat views below would silently be copies
        raise ValueError("accumulators must be C-contiguous arrays")
    r2 = xp.sum(coords * coords, axis=1) * padding_factor**2
    keep = (r2 <= R * R + 1e-6) & ~((coords[:, 1] == 0) & (coords[:, 0] < 0))
    keep_idx = flatnonzero(keep)
    if keep_idx.shape[0] == 0 or n == 0:
        return
    sub = take_rows(coords, keep_idx)
    Mi = sub.shape[0]
    host = host_kernel and isinstance(data_acc, np.ndarray) and isinstance(weight_acc, np.ndarray)
    if host:
        # C-contiguous (checked above): the kernel writes through flat views
        insert_slices_host(data_acc, weight_acc, rotations, sub, keep_idx, values, weights,
                           padding_factor, R)  # fmt: skip
        return
    if native:
        pairs = data_acc.reshape(-1).view(weight_acc.dtype)  # strided views, no copies
        data_re, data_im = pairs[0::2], pairs[1::2]
        weight_f = weight_acc.reshape(-1)
    else:  # no views in the standard: flat copies, written back below
        data_re = astype(real(xp.reshape(data_acc, (-1,))), xp.float64)
        data_im = astype(imag(xp.reshape(data_acc, (-1,))), xp.float64)
        weight_f = astype(xp.reshape(weight_acc, (-1,)), xp.float64)
    offsets = corner_offsets(R)
    nb = max(1, block_points // Mi)
    for s in range(0, n, nb):
        e = min(s + nb, n)
        x, y, z = slice_components(rotations[s:e, ...], sub, padding_factor)
        base, fx, fy, fz, flip = trilinear_setup(x, y, z, R)
        v = xp.take(values[s:e, ...], keep_idx, axis=1)
        w = xp.take(weights[s:e, ...], keep_idx, axis=1)
        v_re = astype(real(v), xp.float64)
        v_im = astype(xp.where(flip, -imag(v), imag(v)), xp.float64)  # conj for Friedel mates
        gx = (1 - fx, fx)
        gy = (1 - fy, fy)
        gz = (1 - fz, fz)
        for k, off in enumerate(offsets):
            # corner k has bits (z, y, x) = (k >> 2, k >> 1, k) & 1
            t = gz[(k >> 2) & 1] * gy[(k >> 1) & 1] * gx[k & 1]
            idx = base + off
            data_re = add_at(data_re, idx, t * v_re)
            data_im = add_at(data_im, idx, t * v_im)
            weight_f = add_at(weight_f, idx, t * w)
    if not native:
        data_acc[...] = astype(
            xp.reshape(make_complex(data_re, data_im), data_acc.shape), data_acc.dtype
        )
        weight_acc[...] = astype(xp.reshape(weight_f, weight_acc.shape), weight_acc.dtype)


# --------------------------------------------------------------------------------------
# Reconstruction


def enforce_hermitian(data, weight):
    """Sum the ``x = 0`` plane with its Friedel mates (new arrays; RELION's
    ``enforceHermitianSymmetry``)."""
    xp = xp_of(data)
    data = copy(data)
    weight = copy(weight)
    p = data[:, :, 0]
    w = weight[:, :, 0]
    # In the centred layout index i <-> -i is D - 1 - i: a flip of both axes.
    data[:, :, 0] = p + conj(xp.flip(p, axis=(0, 1)))
    weight[:, :, 0] = w + xp.flip(w, axis=(0, 1))
    return data, weight


def _half_cube_points(R: int, xp, radius: float):
    """Flat indices and (x, y, z) frequencies of half-cube voxels with |k| <= radius."""
    c = R + 1
    D = 2 * R + 3
    H = R + 2
    f = xp.arange(D, dtype=xp.float64) - c
    x = xp.arange(H, dtype=xp.float64)
    zz, yy, xx = (xp.reshape(g, (-1,)) for g in xp.meshgrid(f, f, x, indexing="ij"))
    idx = flatnonzero(zz * zz + yy * yy + xx * xx <= radius * radius + 1e-6)
    pts = xp.stack([xp.take(xx, idx), xp.take(yy, idx), xp.take(zz, idx)], axis=1)
    return idx, pts


def apply_symmetry(data, weight, symmetry_matrices, block_points: int = BLOCK_POINTS):
    """Sum the accumulators over a point group (RELION's ``applyPointGroupSymmetry``).

    ``symmetry_matrices`` ``(S, 3, 3)`` is the whole group (the identity may be
    included or not; it is always counted once). For each voxel k within radius R
    the result is the sum over the group of the trilinearly interpolated
    accumulators at ``L k``. Returns new arrays.
    The group comes from :func:`streamem.core.symmetry.symmetry_matrices` (host,
    NumPy); it is moved to the accumulators' namespace here.
    """
    xp = xp_of(data)
    L = to_numpy(symmetry_matrices).astype(np.float64).reshape(-1, 3, 3)
    not_identity = np.max(np.abs(L - np.eye(3)).reshape(L.shape[0], -1), axis=1) > 1e-6
    L = L[not_identity]
    if L.shape[0] == 0:
        return data, weight
    R = radius_of_half_cube(data.shape)
    idx, pts = _half_cube_points(R, xp, R)
    out_d = xp.reshape(copy(data), (-1,))
    out_w = xp.reshape(copy(weight), (-1,))
    n_pts = idx.shape[0]
    for Lm in L:
        LmT = asarray_like(Lm.T, data)
        for s in range(0, n_pts, block_points):
            e = min(s + block_points, n_pts)
            p = pts[s:e, ...] @ LmT  # (x, y, z) -> L (x, y, z)
            i = idx[s:e]
            x, y, z = p[:, 0], p[:, 1], p[:, 2]
            # distinct voxels i: add_at is a plain indexed add here
            out_d = add_at(out_d, i, trilinear_gather(data, x, y, z))
            out_w = add_at(out_w, i, trilinear_gather(weight, x, y, z))
    return xp.reshape(out_d, data.shape), xp.reshape(out_w, weight.shape)


def _decenter(half, padded_size: int, radius: float):
    """Projector-centred half cube -> rfft layout ``(P, P, P // 2 + 1)``, zero beyond radius."""
    xp = xp_of(half)
    R = radius_of_half_cube(half.shape)
    c = R + 1
    D = 2 * R + 3
    H = R + 2
    P = padded_size
    # A gather (the standard has no scatter): signed frequency of each rfft index,
    # +P/2 for the even-P Nyquist index, as the half cube's x >= 0 side holds it.
    f = xp.arange(P, dtype=xp.int64)
    f = xp.where(f > P // 2, f - P, f)
    h = xp.arange(P // 2 + 1, dtype=xp.int64)
    fz, fy, fx = f[:, None, None], f[None, :, None], h[None, None, :]
    r2 = fz * fz + fy * fy + fx * fx
    inside = astype(r2, xp.float64) <= radius * radius + 1e-6
    idx = (xp.clip(fz, -c, c) + c) * D * H + (xp.clip(fy, -c, c) + c) * H + xp.clip(fx, 0, H - 1)
    vals = take_rows(xp.reshape(half, (-1,)), idx)
    return xp.where(inside, vals, xp.zeros((), dtype=half.dtype))


def _padded_shells(P: int, padding_factor: int, xp):
    """B-box shell ``round(r / padding_factor)`` and padded radius on the rfft grid of P."""
    f = xp.fft.fftfreq(P, d=1.0 / P)
    h = xp.arange(P // 2 + 1, dtype=xp.float64)
    r = xp.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + h[None, None, :] ** 2)
    return astype(xp.round(r / padding_factor), xp.int64), r


def _blob_ft(omega, radius: float, alpha: float = 15.0):
    """3-D Fourier transform of an order-0 Kaiser-Bessel blob, normalised to 1 at 0.

    ``omega`` in cycles per voxel, ``radius`` in voxels (Lewitt 1990; I_3/2 and J_3/2
    written with hyperbolic / trigonometric functions).
    """
    xp = xp_of(omega)
    s = (2 * np.pi * radius * omega) ** 2
    z2 = alpha * alpha - s
    zi = xp.sqrt(xp.maximum(z2, 1e-12))
    zj = xp.sqrt(xp.maximum(-z2, 1e-12))
    # I_{3/2}(z) / z^{3/2} = sqrt(2/pi) (cosh z - sinh z / z) / z^2; J likewise with sin/cos.
    i_term = (xp.cosh(zi) - xp.sinh(zi) / zi) / (zi * zi)
    j_term = (xp.sin(zj) / zj - xp.cos(zj)) / (zj * zj)
    val = xp.where(z2 >= 0, i_term, j_term)
    za = alpha
    val0 = float((np.cosh(za) - np.sinh(za) / za) / (za * za))
    return val / val0


def reconstruction_noise_spectrum(
    weight_acc, box_size: int, padding_factor: int = 2, symmetry_matrices=None
):
    """RELION's "sigma2" of the reconstruction: per B-box shell, the inverse of the
    mean of ``padding_factor**3 * weight`` over the shell's padded voxels.

    float64 ``(B // 2 + 1,)``; 0 where a shell has no weight. With an FSC between
    half maps, ``tau2 = fsc / (1 - fsc) * noise`` is the signal power that
    :func:`reconstruct` expects (RELION's ``update_tau2_with_fsc``).
    """
    xp = xp_of(weight_acc)
    dummy = xp.zeros(weight_acc.shape, dtype=xp.complex128)
    _, w = enforce_hermitian(dummy, weight_acc)
    if symmetry_matrices is not None:
        _, w = apply_symmetry(dummy, w, symmetry_matrices)
    R = radius_of_half_cube(w.shape)
    idx, pts = _half_cube_points(R, xp, R)
    r = xp.sqrt(xp.sum(pts * pts, axis=1))
    shell = astype(xp.round(r / padding_factor), xp.int64)
    n_shells = box_size // 2 + 1
    keep = flatnonzero(shell < n_shells)
    shell = xp.take(shell, keep)
    vals = xp.take(xp.take(xp.reshape(w, (-1,)), idx), keep) * padding_factor**3
    tot = bincount(shell, weights=vals, minlength=n_shells)[:n_shells]
    cnt = astype(bincount(shell, minlength=n_shells)[:n_shells], xp.float64)
    return xp.where(tot > 0, cnt / xp.where(tot > 0, tot, 1.0), 0.0)


def reconstruct(
    data_acc,
    weight_acc,
    box_size: int,
    padding_factor: int = 2,
    tau2=None,
    n_gridding_iter: int = 0,
    symmetry_matrices=None,
    tau2_fudge: float = 1.0,
):
    """Real-space map ``(B, B, B)`` float32 (centre at ``B // 2``) from accumulators.

    Parameters
    ----------
    data_acc, weight_acc : summed accumulators (not modified).
    box_size : B.
    padding_factor : as used when inserting.
    tau2 : optional per-shell signal power on the B-box shells (module docstring);
        None gives the unregularised ``data / weight``.
    n_gridding_iter : 0 (default, RELION's "skip gridding") or the number of
        Pipe & Menon density-compensation iterations (RELION used 10).
    symmetry_matrices : optional ``(S, 3, 3)`` point group to impose.
    tau2_fudge : RELION's ``--tau2_fudge`` (T): multiplies tau2.
    """
    xp = xp_of(data_acc)
    B = box_size
    pf = int(padding_factor)
    P = pf * B
    R = radius_of_half_cube(data_acc.shape)
    radius = min(R, P // 2)
    data, weight = enforce_hermitian(data_acc, weight_acc)
    if symmetry_matrices is not None:
        data, weight = apply_symmetry(data, weight, symmetry_matrices)
    Fd = _decenter(data, P, radius)
    Fw = _decenter(weight, P, radius)
    del data, weight
    # Each padded-grid temporary is 70-140 MB at box 128: they are dropped as soon as
    # they are used, so the client's peak holds few of them (the same arithmetic).
    shells, r = _padded_shells(P, pf, xp)
    inside = r <= radius + 1e-6
    if tau2 is not None:
        tau2 = asarray_like(tau2, data_acc, xp.float64)
        ns = tau2.shape[0]
        in_range = inside & (shells < ns)
        t = take_rows(tau2, xp.clip(shells, 0, ns - 1)) * tau2_fudge
        inv_tau2 = xp.where(t > 0, 1.0 / (pf**3 * xp.where(t > 0, t, 1.0)), 1000.0 * Fw)
        del t
        Fw = xp.where(in_range, Fw + inv_tau2, Fw)
        del inv_tau2, in_range
    del shells
    if n_gridding_iter <= 0:
        # RELION's skip_gridding: floor each weight at 1/1000 of its shell's mean.
        s_floor = xp.clip(astype(xp.floor(r / pf), xp.int64), 0, max(B // 2 - 1, 0))
        del r
        n_s = B // 2
        sel = flatnonzero(inside)
        s_sel = xp.take(xp.reshape(s_floor, (-1,)), sel)
        tot = bincount(s_sel, weights=xp.take(xp.reshape(Fw, (-1,)), sel), minlength=n_s)
        cnt = astype(bincount(s_sel, minlength=n_s), xp.float64)
        del sel, s_sel
        floor_w = tot[:n_s] / xp.maximum(cnt[:n_s], 1.0) / 1000.0
        w = xp.maximum(Fw, take_rows(floor_w, s_floor))
        del s_floor, Fw
        keep = inside & (w > 0)
        Fconv = Fd / xp.where(w > 0, w, 1.0)
        del w, Fd
        Fconv = xp.where(keep, Fconv, xp.zeros((), dtype=Fconv.dtype))
        del keep
    else:
        del r
        Fconv = Fd * _gridding_weights(Fw, inside, P, pf, n_gridding_iter)
        del Fd, Fw
    vol = irfftn(Fconv, s=(P, P, P), axes=(0, 1, 2))
    del Fconv
    # the centred B-box of fftshift(vol), taken without shifting all of vol: index
    # i of the shifted axis is (i − P//2) mod P of the unshifted one (np.fft.fftshift)
    o = P // 2 - B // 2
    crop = xp.asarray((np.arange(o, o + B) - P // 2) % P)
    for axis in range(3):
        vol = xp.take(vol, crop, axis=axis)
    corr = _separable(trilinear_kernel_ft(B, P, xp), 3)
    return astype(vol / corr, xp.float32)


def _gridding_weights(Fw, inside, P: int, pf: int, n_iter: int):
    """Pipe & Menon (1999) iterative density compensation on the padded grid.

    Finds ``Fnew`` with ``(Fnew * Fw) ⊛ blob ≈ 1`` inside the radius; the convolution
    is a real-space product with the blob's transform (RELION's
    ``convoluteBlobRealSpace``).
    """
    xp = xp_of(Fw)
    f = xp.fft.fftfreq(P, d=1.0 / P)
    # Real-space position of each padded voxel (FFT layout), in cycles per padded voxel.
    rr = xp.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2) / P
    blob = _blob_ft(rr, radius=1.9 * pf)
    Fnew = astype(inside, xp.float64)
    for _ in range(n_iter):
        # the standard's irfftn takes complex input only (scipy converts a real one itself)
        conv = irfftn(astype(Fnew * Fw, xp.complex128), s=(P, P, P), axes=(0, 1, 2)) * blob
        conv = rfftn(conv, axes=(0, 1, 2))
        Fnew = xp.where(inside, Fnew / xp.maximum(xp.abs(conv), 1e-6), 0.0)
    return Fnew
