"""class2d's E-step: in-plane rotations as the orientation set, on the E-step's kernels.

Frames and units. A class is kept as a real (B, B) image centred at B//2; the E-step
and the statistics use its rfft coefficients at the half-plane points of
:func:`streamem.em.fourier_points.half_plane_points` (full-box DFT units, as the images).

In-plane rotation (RELION's convention, pinned by a test against the projector): an
image at pose (0, 0, psi) is the class rotated by psi, i.e. its coefficient at k is the
class's at ``M k`` with ``M = [[c, −s], [s, c]]`` (x, y order), and in real space
``out(x) = in(M x)`` about the centre (:func:`rotate_images`). References are rotated
in real space (cubic spline, ``scipy.ndimage.map_coordinates``) and re-transformed.

E-step (per chunk, image sub-batches bounded in memory, :func:`class2d_batch_size`), on
the E-step's kernels (:mod:`streamem.em.kernels`): the K·P rotated references
(class-major, row k·P + p) against every image × translation in one GEMM
(``cross_terms``, ``ref_power_terms``), log-posterior = −diff2 + log π_k + Gaussian
offset prior (translations searched around the particle's previous origin, as refine3d).
No fine pass: the grid is the psi step × the offset step. The posterior is one row per
image over its T·(K·P) samples (``normalised_posterior``); the samples holding
``adaptive_fraction`` of each row's mass are kept and renormalised
(``significant_weights_rows``, RELION's significant weights), for the whole sub-batch at
once; the best sample of each row gives class, psi and origin.

Statistics: per (class, psi) row J, Σ_{i,t} w · CTF·X_t/σ² (``weighted_image_sums``:
(J, n·T) @ (n·T, M)) and Σ_i w · CTF²/σ² (``weighted_real_sums``); the rows are rotated
back to the class frame by −psi once per chunk and summed over psi: the data sums in
real space (inverse FT, cubic rotation, FT), the CTF² weights by bilinear interpolation
on the centred Fourier grid (they are real and even in k). Noise sums per optics group
and shell (Σ w |X_t − CTF·A_J|², its cross term through Σ_J w A_J), class weights,
offsets as refine3d.

Devices: the E-step runs in the array namespace of ``model.inv_sigma2`` (NumPy, CuPy,
array_api_strict), which :func:`streamem.dist.device.model_on_device` moves to a GPU
worker; ``Class2DModel.host_fields`` keep the class images, psi and priors on the host.
The references are rotated on the host (scipy.ndimage) and moved once per chunk, the
images are transformed in the namespace (``fourier_points.fourier_data``), and the
device arrays see only array-API calls. What comes back to the host: per sub-batch the
best indices, log-evidence, top weight and significant counts (n,) and the noise rows
summed per optics group (M,); per chunk the (J, M) row sums, rotated back on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy import ndimage

from streamem.core import sampling
from streamem.core.backend import fftshift, ifftshift, irfftn, rfftn, to_numpy, xp_of
from streamem.core.ctf import OpticsParams, ctf_phase_from_frequencies
from streamem.core.projector import slice_power
from streamem.em import memory
from streamem.em.fourier_points import fourier_data, half_plane_points, origins_px
from streamem.em.kernels import (
    cross_terms,
    log_likelihood,
    normalised_posterior,
    offset_log_prior,
    ref_power_terms,
    significant_weights_rows,
    weighted_image_sums,
    weighted_real_sums,
)
from streamem.em.statistics import ChunkResult, SufficientStatistics
from streamem.errors import InputError


@dataclass(frozen=True)
class Class2DModel:
    """What the E-step needs, sent to the workers once per iteration.

    class_images: (K, B, B) float32 class averages (real space, centred at B//2)
    log_class_prior: (K,) log class fractions (−inf for an empty class)
    psi_deg: (P,) in-plane angles searched
    inv_sigma2: (G, B//2+1) 1/σ² per optics group and shell
    max_radius_px: highest Fourier shell used
    scale_free: fit the reference scale per sample (first iteration)
    """

    class_images: np.ndarray
    log_class_prior: np.ndarray
    psi_deg: np.ndarray
    box_size: int
    pixel_size_A: float
    max_radius_px: float
    inv_sigma2: np.ndarray
    optics: tuple[OpticsParams, ...]
    sigma_offset_A: float
    offset_range_px: float
    offset_step_px: float
    do_ctf: bool = True
    ctf_intact_first_peak: bool = False
    scale_free: bool = False
    adaptive_fraction: float = 0.999
    memory_per_worker_bytes: int | None = None  # E-step budget (streamem.em.memory)

    #: Kept on the host by streamem.dist.device.model_on_device: the classes are rotated
    #: with scipy.ndimage, psi and the priors index host-side results. inv_sigma2 goes
    #: to the device and names the E-step's namespace.
    host_fields: ClassVar[tuple[str, ...]] = ("class_images", "log_class_prior", "psi_deg")

    @property
    def n_classes(self) -> int:
        return self.class_images.shape[0]

    @property
    def n_shells(self) -> int:
        return self.box_size // 2 + 1


# -- rotations ---------------------------------------------------------------------------


def rotate_images(
    images: np.ndarray, psi_deg, order: int = 3, mode: str = "constant"
) -> np.ndarray:
    """Images rotated in-plane by each psi about the centre B//2 (RELION's sense).

    images: (K, B, B) real; psi_deg: (P,). Returns (K, P, B, B) float32 with
    ``out[k, p](x) = images[k](M_p x)``, ``M = [[cos, −sin], [sin, cos]]`` on (x, y): the
    projection at Euler angles (0, 0, psi) is the one at (0, 0, 0) rotated by psi.
    ``mode``: how the input extends beyond the box (``scipy.ndimage``): "constant" (0)
    or "grid-wrap" (periodic, exact for the constant part of band-limited data).
    """
    images = np.asarray(images)
    K, B = images.shape[0], images.shape[-1]
    psi = np.deg2rad(np.atleast_1d(np.asarray(psi_deg, np.float64)))
    c = np.arange(B, dtype=np.float64) - B // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    cos, sin = np.cos(psi)[:, None, None], np.sin(psi)[:, None, None]
    xs = cos * x - sin * y + B // 2  # (P, B, B) source x
    ys = sin * x + cos * y + B // 2
    out = np.empty((K, psi.size, B, B), np.float32)
    for k in range(K):
        src = np.asarray(images[k], np.float64)
        if order > 1:
            src = ndimage.spline_filter(src, order=order, mode=mode)
        for p in range(psi.size):
            out[k, p] = ndimage.map_coordinates(
                src, [ys[p], xs[p]], order=order, mode=mode, cval=0.0, prefilter=False
            )
    return out


def image_coefficients(images: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """rfft coefficients (..., M) complex64 at the half-plane points of centred images."""
    B = images.shape[-1]
    F = rfftn(ifftshift(np.asarray(images, np.float64), axes=(-2, -1)), axes=(-2, -1))
    return F.reshape(*images.shape[:-2], B * (B // 2 + 1))[..., flat].astype(np.complex64)


def coefficients_to_images(values: np.ndarray, coords: np.ndarray, flat: np.ndarray, box_size: int):
    """Inverse of :func:`image_coefficients`: (..., M) half-plane values → (..., B, B) images.

    Points not given are 0; the kx = 0 column gets the conjugates of its ky > 0 points.
    """
    B = box_size
    lead = values.shape[:-1]
    grid = np.zeros((*lead, B * (B // 2 + 1)), np.complex128)
    grid[..., flat] = values
    axis0 = coords[:, 1] == 0  # kx = 0, ky > 0: add the conjugate at −ky
    mirror = ((-coords[axis0, 0]).astype(np.int64) % B) * (B // 2 + 1)
    grid[..., mirror] = np.conj(values[..., axis0])
    img = irfftn(grid.reshape(*lead, B, B // 2 + 1), s=(B, B), axes=(-2, -1))
    return fftshift(img, axes=(-2, -1))


def rotated_references(class_images, psi_deg, flat) -> np.ndarray:
    """(K·P, M) complex64: row k·P + p is class k rotated by psi_p, at the half-plane points."""
    rot = rotate_images(class_images, psi_deg)  # (K, P, B, B)
    K, P = rot.shape[:2]
    return image_coefficients(rot, flat).reshape(K * P, -1)


def rotate_weights_back(weights: np.ndarray, coords: np.ndarray, psi_deg) -> np.ndarray:
    """Real even Fourier functions (J, M) taken from image frames to the class frame.

    Row j was accumulated in the frame of an image rotated by psi_j; the class-frame
    value at q is the row's value at ``Mᵀ q``, interpolated bilinearly on the centred
    Fourier grid (filled with the conjugate-symmetric half, W(−k) = W(k); DC = mean of
    shell 1). weights: (J, M); psi_deg: (J,). Returns (J, M) float64.
    """
    J = weights.shape[0]
    r = int(np.ceil(np.hypot(coords[:, 0], coords[:, 1]).max())) + 1
    n = 2 * r + 1
    ky, kx = coords[:, 0].astype(np.int64) + r, coords[:, 1].astype(np.int64) + r
    grid = np.zeros((J, n, n))
    grid[:, ky, kx] = weights
    grid[:, 2 * r - ky, 2 * r - kx] = weights
    ring = np.hypot(coords[:, 0], coords[:, 1]) < 1.5
    grid[:, r, r] = weights[:, ring].mean(axis=1) if ring.any() else 0.0
    psi = np.deg2rad(np.asarray(psi_deg, np.float64))
    out = np.empty((J, coords.shape[0]))
    for j in range(J):
        c, s = np.cos(psi[j]), np.sin(psi[j])
        # Mᵀ q with M = [[c, −s], [s, c]] on (x, y): x' = c qx + s qy, y' = −s qx + c qy
        xq = c * coords[:, 1] + s * coords[:, 0] + r
        yq = -s * coords[:, 1] + c * coords[:, 0] + r
        out[j] = ndimage.map_coordinates(grid[j], [yq, xq], order=1, mode="constant")
    return out


def rotate_data_back(data: np.ndarray, coords, flat, box_size: int, psi_deg) -> np.ndarray:
    """Hermitian Fourier data (J, M) from image frames to the class frame (rotation by −psi_j).

    Inverse FT, cubic real-space rotation, FT. The data lack DC (half-plane points), so
    the image is periodic with a constant offset: it is rotated with periodic extension,
    which keeps that offset out of the low frequencies. The last few shells below the
    band edge carry an error of a few % of the band's peak (ringing of the sharp edge
    wraps around the box); they are the shells beyond the current resolution (the
    radius is the resolution + 10 shells). Returns (J, M) complex128.
    """
    imgs = coefficients_to_images(data, coords, flat, box_size)  # (J, B, B)
    out = np.empty(data.shape, np.complex128)
    for j in range(data.shape[0]):
        rot = rotate_images(imgs[j : j + 1], [-float(psi_deg[j])], mode="grid-wrap")[0, 0]
        out[j] = image_coefficients(rot, flat)
    return out


# -- E-step ----------------------------------------------------------------------------------


def _intact_first_peak(ctf, metadata, coords, model: Class2DModel, groups):
    """CTF set to 1 before its first peak (|γ| < π/2), RELION's --ctf_intact_first_peak."""
    freq = 1.0 / (model.box_size * model.pixel_size_A)
    n = ctf.shape[0]
    out = ctf.copy()
    for g in np.unique(groups):
        sel = groups == g
        gamma = ctf_phase_from_frequencies(
            coords[:, 0] * freq,
            coords[:, 1] * freq,
            metadata["rlnDefocusU"][sel],
            metadata["rlnDefocusV"][sel],
            metadata["rlnDefocusAngle"][sel],
            model.optics[g],
            metadata.get("rlnPhaseShift", np.zeros(n))[sel],
        )
        out[sel] = np.where(np.abs(gamma) < np.pi / 2, 1.0, ctf[sel])
    return out


def empty_statistics(n_classes: int, n_points: int, n_groups: int, n_shells: int):
    """Statistics with data_acc/weight_acc (K, M) on the class frame's half-plane points."""
    return SufficientStatistics(
        data_acc=np.zeros((n_classes, n_points), np.complex128),
        weight_acc=np.zeros((n_classes, n_points)),
        noise_power=np.zeros((n_groups, n_shells)),
        noise_count=np.zeros((n_groups, n_shells)),
        class_weight=np.zeros(n_classes),
    )


def class2d_batch_size(model: Class2DModel, n_images: int, n_points: int, n_refs: int, T: int):
    """Images per sub-batch of class2d's E-step for this task's memory budget
    (:mod:`streamem.em.memory`); InputError when one image does not fit."""
    thread_bytes = memory.thread_memory_bytes(model.memory_per_worker_bytes)
    resident = n_images * model.box_size**2 * 4 + memory.class2d_fixed_bytes(n_points, n_refs)
    resident += math.prod(model.class_images.shape) * 4  # float32 (any namespace)
    images_bytes = n_images * model.box_size**2 * 4
    budget = memory.workspace_budget_bytes(thread_bytes, resident, chunk_images_bytes=images_bytes)
    what = f"class2d, box {model.box_size}, {n_points} Fourier points, {n_refs} references"
    if budget <= 0:
        raise InputError(
            None,
            f"{what}: the references, sums and images of one task need "
            f"~{resident / 2**20:.0f} MiB but a thread has {thread_bytes / 2**20:.0f} MiB "
            "(half of it may be used); give more memory per worker (--memory-per-worker), "
            "fewer threads per worker, fewer classes or a smaller box",
        )
    limit = memory.workspace_budget_bytes(thread_bytes, resident, capped=False)
    return memory.images_per_batch(
        lambda k: memory.class2d_stage_bytes(n_points, n_refs, T, k), n_images, budget, what, limit
    )


def expectation_2d(
    images: np.ndarray, metadata: dict[str, np.ndarray], model: Class2DModel
) -> tuple[SufficientStatistics, ChunkResult]:
    """E-step of one chunk over (class, psi, translation) (module docstring).

    images: (n, B, B) float32 centred at B//2 (host); metadata: RELION labels → (n,)
    arrays (CTF, rlnOpticsGroup, previous rlnOriginX/YAngst). The E-step runs in the
    array namespace of ``model.inv_sigma2`` (NumPy, CuPy, array_api_strict: see
    :func:`streamem.dist.device.model_on_device`); ``class_images`` may be a host or a
    device array (it is rotated on the host). Returns the chunk's statistics (data_acc,
    weight_acc (K, M)) and per-particle results (rlnClassNumber from 1, rlnAnglePsi,
    origins in Å; rot = tilt = 0), both on the host.
    """
    xp = xp_of(model.inv_sigma2)
    n, B, p = images.shape[0], model.box_size, model.pixel_size_A
    K, psi = model.n_classes, np.asarray(to_numpy(model.psi_deg), np.float64)
    P = psi.size
    coords, flat, shell = half_plane_points(B, model.max_radius_px)
    M = coords.shape[0]
    X, X0, ctf, inv_s2, norm, prior_px, groups = _chunk_data(images, metadata, model, xp)
    cw = ctf * inv_s2  # (n, M) CTF/σ²
    ctf2w = ctf * cw  # (n, M) CTF²/σ²
    refs = xp.asarray(rotated_references(to_numpy(model.class_images), psi, flat))  # (J, M)
    power = slice_power(refs)  # (J, M) float32 |A_j|²
    shifts = np.asarray(sampling.translation_grid(model.offset_range_px, model.offset_step_px))
    T, J = shifts.shape[0], K * P
    phases = xp.asarray(sampling.shift_phases(coords, shifts, B))  # (T, M)
    log_pi = np.repeat(np.asarray(to_numpy(model.log_class_prior), np.float64), P)  # (J,)
    log_pi = xp.asarray(log_pi)

    stats = empty_statistics(K, M, len(model.optics), model.n_shells)
    result = ChunkResult(*(np.zeros(n) for _ in range(9)))
    sums = _RowSums(xp, J, M, len(model.optics))
    batch = class2d_batch_size(model, n, M, J, T)
    for b0 in range(0, n, batch):
        sl = slice(b0, min(n, b0 + batch))
        nb = sl.stop - sl.start
        Xs = X0[sl, None, :] * phases[None, :, :]  # (nb, T, M) shifted images
        total = prior_px[sl, None, :] + shifts[None]  # (nb, T, 2) total offsets, px (host)
        C = cross_terms(Xs, cw[sl, :], refs)  # (nb, T, J)
        S = ref_power_terms(ctf2w[sl, :], power)  # (nb, J)
        logp = log_likelihood(C, S[:, None, :], norm[sl, None, None], model.scale_free)
        offset = xp.asarray(offset_log_prior(total, model.sigma_offset_A, p))  # (nb, T)
        logp = logp + offset[:, :, None] + log_pi  # (nb, T, J) float64
        # one posterior row per image over its T·J samples (row index t·J + k·P + psi)
        del C, S  # the posterior's sort and sums below are the stage's peak
        W, lse, best = normalised_posterior(xp.reshape(logp, (nb, T * J)))
        del logp
        top = xp.max(W, axis=1)
        W, count = significant_weights_rows(W, model.adaptive_fraction)
        W = xp.reshape(xp.astype(W, xp.float32), (nb, T, J))
        sums.add(W, Xs, X[sl, :], ctf[sl, :], cw[sl, :], ctf2w[sl, :], refs, power, groups[sl])
        # per-particle results from the batched best samples: one transfer per sub-batch
        t, j = np.divmod(to_numpy(best).astype(np.int64), J)
        result.class_number[sl] = j // P + 1
        result.psi[sl] = psi[j % P]
        result.origin_y_A[sl], result.origin_x_A[sl] = (total[np.arange(nb), t] * p).T
        result.max_prob[sl] = to_numpy(top)
        result.n_significant[sl] = to_numpy(count)
        lse = to_numpy(lse)
        result.loglik[sl] = lse
        w_t = to_numpy(xp.sum(W, axis=2))  # (nb, T) weight per translation
        stats.offset_sq_A2 += float(np.sum(w_t * np.sum((total * p) ** 2, axis=-1)))
        stats.weight_sum += nb
        stats.loglik_sum += float(lse.sum())
    _finish_statistics(stats, sums, coords, flat, shell, groups, psi, B, K)
    return stats, result


def _chunk_data(images, metadata, model: Class2DModel, xp):
    """The chunk's Fourier data in namespace ``xp``: X (n, M) complex64, X0 = X shifted
    by the previous origins, CTF (n, M) float32 (intact first peak applied), 1/σ² (n, M)
    float32, norm Σ|X|²/2σ² (n,) float64; and on the host the previous origins (n, 2)
    px (dy, dx) and the 0-based optics groups (n,)."""
    n, B = images.shape[0], model.box_size
    coords, flat, shell = half_plane_points(B, model.max_radius_px)
    X, ctf, groups = fourier_data(
        images, metadata, coords, flat, model.pixel_size_A, model.optics, model.do_ctf, xp
    )
    if model.ctf_intact_first_peak and model.do_ctf and "rlnDefocusU" in metadata:
        host = _intact_first_peak(to_numpy(ctf), metadata, coords, model, groups)
        ctf = xp.asarray(host.astype(np.float32))
    # 1/σ² per image and point, gathered where the model's spectra live
    rows = xp.take(model.inv_sigma2, xp.asarray(groups), axis=0)  # (n, n_shells)
    inv_s2 = xp.astype(xp.take(rows, xp.asarray(shell), axis=1), xp.float32)  # (n, M)
    norm = 0.5 * xp.sum((xp.real(X) ** 2 + xp.imag(X) ** 2) * inv_s2, axis=1, dtype=xp.float64)
    prior_px = origins_px(metadata, model.pixel_size_A, n)
    X0 = X * xp.asarray(sampling.shift_phases(coords, prior_px, B))  # (n, M)
    return X, X0, ctf, inv_s2, norm, prior_px, groups


class _RowSums:
    """Per-(class, psi) row sums of a chunk, kept in the E-step's namespace.

    data (J, M) complex128 Σ_{i,t} w · CTF·X_t/σ²; weight (J, M) float64 Σ_i w · CTF²/σ²;
    noise (G, M) float64 Σ_i Σ_{t,J} w |X_t − CTF·A_J|² per optics group (host: one
    small transfer per group and sub-batch).
    """

    def __init__(self, xp, J: int, M: int, n_groups: int):
        self.xp = xp
        self.data = xp.zeros((J, M), dtype=xp.complex128)
        self.weight = xp.zeros((J, M), dtype=xp.float64)
        self.noise = np.zeros((n_groups, M))
        self.row_weight = xp.zeros((J,), dtype=xp.float64)  # Σ_i w per row

    def add(self, W, Xs, X, ctf, cw, ctf2w, refs, power, groups) -> None:
        """One sub-batch: W (nb, T, J) float32 significant weights, Xs (nb, T, M) shifted
        images, X (nb, M) unshifted, ctf/cw/ctf2w (nb, M), refs/power (J, M), groups (nb,)."""
        xp = self.xp
        nb, T, J = W.shape
        M = Xs.shape[-1]
        W2 = xp.reshape(W, (nb * T, J))  # samples × rows
        w_img = xp.sum(W, axis=1)  # (nb, J)
        self.row_weight = self.row_weight + xp.sum(w_img, axis=0, dtype=xp.float64)
        Y = xp.reshape(Xs * cw[:, None, :], (nb * T, M))  # CTF·X_t/σ²
        self.data = self.data + xp.astype(weighted_image_sums(W2, Y), xp.complex128)
        self.weight = self.weight + xp.astype(weighted_real_sums(w_img, ctf2w), xp.float64)
        # noise: Σ w |X_t − CTF·A_J|² = |X|² − 2 CTF Re Σ_t conj(X_t) (Σ_J w A_J) + CTF² Σ w |A_J|²
        WA = xp.reshape(weighted_image_sums(W2.mT, refs), (nb, T, M))  # Σ_J w A_J
        cross = xp.sum(xp.real(xp.conj(Xs) * WA), axis=1)  # (nb, M)
        rows = (
            (xp.real(X) ** 2 + xp.imag(X) ** 2)
            - 2 * ctf * cross
            + ctf**2 * weighted_real_sums(w_img.mT, power)
        )  # (nb, M)
        for g in np.unique(groups):
            idx = xp.asarray(np.flatnonzero(groups == g))
            self.noise[g] += to_numpy(xp.sum(xp.take(rows, idx, axis=0), axis=0, dtype=xp.float64))


def _finish_statistics(stats, sums: _RowSums, coords, flat, shell, groups, psi, B: int, K: int):
    """Rows back to the class frame (host, only the rows some image used), class weights
    and noise per optics group and shell, into ``stats``."""
    P = psi.size
    data_J, weight_J = to_numpy(sums.data), to_numpy(sums.weight)  # (J, M)
    live = np.flatnonzero(weight_J.any(axis=1))
    if live.size:
        d = rotate_data_back(data_J[live], coords, flat, B, psi[live % P])
        w = rotate_weights_back(weight_J[live], coords, psi[live % P])
        np.add.at(stats.data_acc, live // P, d)
        np.add.at(stats.weight_acc, live // P, w)
    stats.class_weight += to_numpy(sums.row_weight).reshape(K, P).sum(axis=1)
    n_shells = stats.noise_power.shape[1]
    per_shell = np.bincount(shell, minlength=n_shells)[:n_shells]
    for g in np.unique(groups):
        stats.noise_power[g] += np.bincount(shell, sums.noise[g], n_shells)[:n_shells]
        stats.noise_count[g] += np.sum(groups == g) * per_shell


__all__ = [
    "Class2DModel",
    "class2d_batch_size",
    "coefficients_to_images",
    "empty_statistics",
    "expectation_2d",
    "image_coefficients",
    "rotate_data_back",
    "rotate_images",
    "rotate_weights_back",
    "rotated_references",
]
