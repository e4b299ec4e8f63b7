"""The Fourier points an E-step works on, and a chunk's images at them (no I/O, no Dask).

As in RELION, the points are those of the half-plane within the current resolution
radius (each independent complex value of a real image once, DC excluded), ordered so
that the points within each smaller radius the E-step cuts at (its coarse passes') are
a prefix: sorted by radius, or, given those radii, in raster order within the bands
they bound (the order the host slice kernels read the half cube best in). Images are Fourier
transformed where the model's arrays live (NumPy or a device namespace); CTFs are
computed on the host and moved once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from streamem.core import sampling
from streamem.core.backend import ifftshift, rfftn
from streamem.core.ctf import ctf_from_frequencies
from streamem.em.kernels import namespace

if TYPE_CHECKING:
    from streamem.em.estep import EStepModel


def half_plane_points(box_size: int, max_radius_px: float, cuts=None):
    """Independent Fourier points of a real image within a radius, DC excluded.

    Returns (coords (M, 2) float (ky, kx) in Fourier pixels, flat (M,) int index into
    the (B, B//2+1) rfft grid, shell (M,) int radius). Points with kx = 0 and
    ky < 0 are the complex conjugates of ky > 0 and are left out.

    cuts: None, points sorted by radius (any smaller radius is a prefix); or the radii
    (pixels) the caller takes prefixes at
    (:func:`streamem.core.fourier.n_points_within`): the points with |k| ≤ each cut
    come first, and within each band between cuts they are in raster order (ky, then
    kx), so that a central slice's neighbouring points read neighbouring voxels
    (:func:`streamem.core.slice_kernel._points`).
    """
    B = box_size
    r = int(np.floor(max_radius_px))
    ky = np.arange(-r, r + 1)
    kx = np.arange(0, r + 1)
    KY, KX = np.meshgrid(ky, kx, indexing="ij")
    rad = np.sqrt(KY**2 + KX**2)
    keep = (rad <= max_radius_px) & ((KX > 0) | (KY > 0)) & (np.abs(KY) < B / 2 + 0.5 * (B % 2))
    keep &= KX <= B // 2
    KY, KX, rad = KY[keep], KX[keep], rad[keep]  # raster order (ky, then kx)
    if cuts is None:
        order = np.argsort(rad, kind="stable")
    else:
        edges = np.sort(np.asarray(cuts, np.float64)) + 1e-9  # n_points_within's edge
        band = np.searchsorted(edges, rad, side="left")
        order = np.argsort(band, kind="stable")
    KY, KX, rad = KY[order], KX[order], rad[order]
    flat = (KY % B) * (B // 2 + 1) + KX
    coords = np.stack([KY, KX], axis=1).astype(np.float64)
    return coords, flat.astype(np.int64), np.rint(rad).astype(np.int64)


@dataclass(frozen=True)
class PreparedImages:
    """Fourier data of a set of images restricted to the current points (all (n, M))."""

    X: np.ndarray  # complex64 image transforms
    ctf: np.ndarray  # float32 CTF
    inv_sigma2: np.ndarray  # float32 1/σ²
    norm: np.ndarray  # (n,) float64 Σ|X|²/2σ²
    prior_offset_px: np.ndarray  # (n, 2) (dy, dx) previous origin in pixels


def fourier_data(images, metadata, coords, flat, pixel_size_A, optics, do_ctf=True, xp=np):
    """Image transforms and CTFs at the given Fourier points.

    images: (n, B, B) float32 centred at B//2; coords/flat from :func:`half_plane_points`;
    optics: one OpticsParams per optics group; xp: the array module of the results
    (NumPy, or CuPy for a GPU E-step: the images go to the device once, the CTFs are
    computed on the host). Returns (X (n, M) complex64, ctf (n, M) float32, groups (n,)
    0-based optics group, on the host).
    """
    n, B = images.shape[0], images.shape[-1]
    images = xp.asarray(images)
    X = rfftn(ifftshift(images, axes=(-2, -1)), axes=(-2, -1))
    ns = namespace(X)  # standard calls: NumPy, CuPy and strict array-API namespaces alike
    X = ns.astype(ns.take(ns.reshape(X, (n, -1)), ns.asarray(flat), axis=1), ns.complex64)
    groups = np.asarray(metadata.get("rlnOpticsGroup", np.ones(n)), dtype=np.int64) - 1
    if groups.min() < 0 or groups.max() >= len(optics):
        raise ValueError("rlnOpticsGroup out of range of the optics groups")
    if do_ctf and "rlnDefocusU" in metadata:
        freq = 1.0 / (B * pixel_size_A)
        ctf = np.empty((n, coords.shape[0]), np.float32)
        for g in np.unique(groups):
            sel = groups == g
            ctf[sel] = ctf_from_frequencies(
                coords[:, 0] * freq,
                coords[:, 1] * freq,
                metadata["rlnDefocusU"][sel],
                metadata["rlnDefocusV"][sel],
                metadata["rlnDefocusAngle"][sel],
                optics[g],
                metadata.get("rlnPhaseShift", np.zeros(n))[sel],
                metadata.get("rlnCtfBfactor", np.zeros(n))[sel],
            )
    else:
        ctf = np.ones((n, coords.shape[0]), np.float32)
    return X, xp.asarray(ctf), groups


def origins_px(metadata, pixel_size_A: float, n: int) -> np.ndarray:
    """(n, 2) (dy, dx) stored origins in pixels (zeros where absent)."""
    if "rlnOriginYAngst" not in metadata:
        return np.zeros((n, 2))
    o = np.stack([metadata["rlnOriginYAngst"], metadata["rlnOriginXAngst"]], axis=1)
    return np.nan_to_num(o.astype(np.float64)) / pixel_size_A


def prepare_images(images, metadata, model: EStepModel, coords, flat, shell) -> PreparedImages:
    """Fourier transform, CTF and noise weights of a chunk's images.

    images: (n, B, B) float32, centred at B//2. metadata: RELION labels → (n,) arrays.
    """
    projectors = getattr(model, "projectors", None)  # class2d's model holds images instead
    xp = namespace(projectors[0].data) if projectors else np  # the E-step runs where they are
    X, ctf, groups = fourier_data(
        images, metadata, coords, flat, model.pixel_size_A, model.optics, model.do_ctf, xp
    )
    inv_s2 = xp.asarray(np.asarray(model.inv_sigma2)[groups][:, shell].astype(np.float32))
    power = (xp.real(X) ** 2 + xp.imag(X) ** 2) * inv_s2
    norm = 0.5 * xp.sum(power, axis=1, dtype=xp.float64)
    prior = origins_px(metadata, model.pixel_size_A, images.shape[0])
    return PreparedImages(X, ctf, inv_s2, norm, prior)


@dataclass(frozen=True)
class Translations:
    """An iteration's translation grid and its phase factors at a task's Fourier points.

    shifts: (T, 2) float64 coarse translations (dy, dx) px around each image's previous
    origin; sub: (S, 2) the fine pass's offsets around a coarse translation (the
    ``2**os × 2**os`` sub-steps of :func:`streamem.core.sampling.oversample_translations`);
    phases (T, M) and sub_phases (S, M) complex64: their
    :func:`streamem.core.sampling.shift_phases` at the points, in the E-step's namespace
    (the coarse pass takes the prefix of its radius). Made once per task: per sub-batch
    the complex exponentials were ~6% of a box-128 0.94° local E-step (scratch profile).
    """

    shifts: np.ndarray
    sub: np.ndarray
    phases: object
    sub_phases: object

    @classmethod
    def of_grid(cls, offset_range_px: float, offset_step_px: float, oversampling: int,
                coords, box_size: int, xp=np) -> Translations:  # fmt: skip
        shifts = np.asarray(sampling.translation_grid(offset_range_px, offset_step_px))
        sub = np.asarray(
            sampling.oversample_translations(np.zeros((1, 2)), offset_step_px, oversampling)
        ).reshape(-1, 2)
        return cls(
            shifts,
            sub,
            xp.asarray(sampling.shift_phases(coords, shifts, box_size)),
            xp.asarray(sampling.shift_phases(coords, sub, box_size)),
        )


def slice_metadata(metadata: dict, sl: slice, n: int) -> dict:
    """The (n,) columns of ``metadata`` cut to ``sl`` (other entries unchanged)."""
    return {
        k: v[sl] if isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == n else v
        for k, v in metadata.items()
    }
