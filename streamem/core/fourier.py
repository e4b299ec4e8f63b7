"""Fourier-grid bookkeeping shared by the projector, the E-step and the M-step.

Layout: the standard non-centred rfft layout of ``scipy.fft.rfftn`` — an image of
B x B pixels has coefficients on a ``(B, B // 2 + 1)`` grid whose row ``i`` holds
``ky = i`` for ``i < (B + 1) // 2`` and ``ky = i - B`` otherwise, and whose column ``j``
holds ``kx = j``; volumes have ``(B, B, B // 2 + 1)`` with axes (kz, ky, kx).
Frequencies are in *Fourier pixels* of the B box (shell k is the resolution
``B * pixel_size / k`` Å).

The rfft half grid holds each coefficient once, except the ``kx = 0`` column (plane
in 3-D), and for even B the ``kx = B/2`` column, which hold both members of a
Friedel pair. :func:`rfft_multiplicity` gives the weight (1 or 2) that turns a sum
over the half grid into the sum over the full grid.
"""

from __future__ import annotations

import numpy as np

from streamem.core.backend import astype, bincount, flatnonzero, scatter_unique, xp_of


def _signed_freqs(box_size: int, xp=np):
    """Integer frequencies of a length-B FFT axis in FFT order, float64."""
    return xp.fft.fftfreq(box_size, d=1.0 / box_size)


def rfft_grid_frequencies(box_size: int, ndim: int, xp=np):
    """Integer frequency components on the rfft grid of a B box.

    Returns ``ndim`` float64 arrays of the rfft grid shape, ordered like the array
    axes: ``(ky, kx)`` for ``ndim = 2`` and ``(kz, ky, kx)`` for ``ndim = 3``.
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    full = _signed_freqs(box_size, xp)
    half = xp.arange(box_size // 2 + 1, dtype=xp.float64)
    axes = [full] * (ndim - 1) + [half]
    return xp.meshgrid(*axes, indexing="ij")


def rfft_radius(box_size: int, ndim: int, xp=np):
    """Radius |k| (Fourier pixels, float64) of each rfft-grid point."""
    comps = rfft_grid_frequencies(box_size, ndim, xp)
    r2 = sum(c * c for c in comps)
    return xp.sqrt(r2)


def shell_index(box_size: int, ndim: int, xp=np):
    """Integer shell ``round(|k|)`` of each rfft-grid point, int64.

    Shape ``(B, B // 2 + 1)`` for ``ndim = 2`` and ``(B, B, B // 2 + 1)`` for ``ndim = 3``.
    Shells run from 0 to about ``B / 2 * sqrt(ndim)``; the ones that matter for
    resolution are ``0 .. B // 2``.
    """
    return astype(xp.round(rfft_radius(box_size, ndim, xp)), xp.int64)


def rfft_multiplicity(box_size: int, ndim: int, xp=np):
    """How many full-grid coefficients each rfft-grid point stands for (1 or 2), float64.

    The ``kx = 0`` column/plane (and ``kx = B/2`` for even B) already holds both
    members of its Friedel pairs, so it counts once; every other point counts twice.
    """
    shape = (box_size,) * (ndim - 1) + (box_size // 2 + 1,)
    m = xp.full(shape, 2.0)
    m[..., 0] = 1.0
    if box_size % 2 == 0:
        m[..., -1] = 1.0
    return m


def radial_sum(values, shells, n_shells: int, weights=None):
    """Sum of ``values`` per shell, over the trailing dims that ``shells`` covers.

    Parameters
    ----------
    values : real array ``batch + grid``.
    shells : int array ``grid`` (e.g. from :func:`shell_index`).
    n_shells : number of output shells; points with shell >= n_shells are dropped.
    weights : optional real array ``grid`` multiplying ``values`` (e.g.
        :func:`rfft_multiplicity`).

    Returns float64 ``batch + (n_shells,)``.
    """
    xp = xp_of(values, shells)
    grid_ndim = shells.ndim
    batch = values.shape[: values.ndim - grid_ndim]
    flat_shells = xp.reshape(shells, (-1,))
    keep = flatnonzero(flat_shells < n_shells)
    v = astype(xp.reshape(values, batch + (-1,)), xp.float64)
    if weights is not None:
        v = v * xp.reshape(weights, (-1,))
    v = xp.take(v, keep, axis=v.ndim - 1)
    s = xp.take(flat_shells, keep)
    # (nb, npts) -> one bincount over (batch index, shell) pairs
    v2 = xp.reshape(v, (-1, s.shape[0]))
    nb = v2.shape[0]
    idx = xp.reshape(xp.arange(nb, dtype=s.dtype)[:, None] * n_shells + s[None, :], (-1,))
    out = bincount(idx, weights=xp.reshape(v2, (-1,)), minlength=nb * n_shells)
    return xp.reshape(out, batch + (n_shells,))


def radial_average(values, shells, n_shells: int, weights=None):
    """Mean of ``values`` per shell (see :func:`radial_sum`); empty shells give 0."""
    xp = xp_of(values, shells)
    ones = xp.ones(shells.shape, dtype=xp.float64)
    total = radial_sum(values, shells, n_shells, weights)
    count = radial_sum(ones, shells, n_shells, weights)
    return xp.where(count > 0, total / xp.where(count > 0, count, 1.0), 0.0)


def image_fourier_coords(box_size: int, max_radius_px: float, xp=np):
    """The rfft-grid points of a (B, B) image with |k| <= ``max_radius_px``.

    Returns
    -------
    coords : float64 ``(M, 2)``, columns ``(ky, kx)`` in Fourier pixels of the B box,
        ``ky`` in ``[-B/2, B/2)`` and ``kx`` in ``[0, B/2]``.
    flat_index : int64 ``(M,)`` into the flattened ``(B, B // 2 + 1)`` rfft grid, so
        ``rfft2(img).reshape(..., -1)[..., flat_index]`` are the image's values there.

    Points are ordered by increasing radius (stable in the flat index), so the points
    within a smaller radius are a prefix. The ``kx = 0`` column keeps both members
    of its Friedel pairs; :func:`streamem.core.backprojector.insert_points` skips the
    ``kx = 0, ky < 0`` half so that nothing is inserted twice.
    """
    ky, kx = rfft_grid_frequencies(box_size, 2, np)
    r = np.sqrt(ky * ky + kx * kx).reshape(-1)
    flat = np.flatnonzero(r <= max_radius_px + 1e-9)
    order = np.argsort(r[flat], kind="stable")
    flat = flat[order]
    coords = np.stack([ky.reshape(-1)[flat], kx.reshape(-1)[flat]], axis=1)
    return xp.asarray(coords), xp.asarray(flat.astype(np.int64))


def n_points_within(coords, max_radius_px: float) -> int:
    """Length of the prefix of ``coords`` with |k| <= max_radius_px (+1e-9, as the point
    sets are cut). The points must be sorted by radius or cut at that radius
    (:func:`streamem.em.fourier_points.half_plane_points`), else ValueError: a pass
    taking ``coords[:count]`` would miss some of them."""
    xp = xp_of(coords)
    inside = xp.sqrt(xp.sum(coords * coords, axis=1)) <= max_radius_px + 1e-9
    count = int(xp.sum(astype(inside, xp.int64)))
    if not bool(xp.all(inside[:count])):
        raise ValueError(f"the points within {max_radius_px:g} px are not a prefix of the points")
    return count


def scatter_to_rfft(values, flat_index, box_size: int):
    """Put per-point values ``batch + (M,)`` back on the ``batch + (B, B // 2 + 1)`` rfft grid.

    Grid points not in ``flat_index`` are zero.
    """
    xp = xp_of(values)
    batch = tuple(values.shape[:-1])
    out = scatter_unique(flat_index, values, box_size * (box_size // 2 + 1))
    return xp.reshape(out, batch + (box_size, box_size // 2 + 1))
