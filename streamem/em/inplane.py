"""class2d's E-step: in-plane rotations as the orientation set, on the E-step's kernels.

Frames and units. A class is kept as a real (B, B) image centred at B//2; the E-step
and the statistics use its rfft coefficients at the half-plane points of
:func:`streamem.em.estep.half_plane_points` (full-box DFT units, as the images).

In-plane rotation (RELION's convention, pinned by a test against the projector): an
image at pose (0, 0, psi) is the class rotated by psi, i.e. its coefficient at k is the
class's at ``M k`` with ``M = [[c, −s], [s, c]]`` (x, y order), and in real space
``out(x) = in(M x)`` about the centre (:func:`rotate_images`). References are rotated
in real space (cubic spline, ``scipy.ndimage.map_coordinates``) and re-transformed.

E-step (per chunk, image batches bounded in memory): the K·P rotated references
(class-major, row k·P + p) against every image × translation in one GEMM
(:func:`streamem.em.estep.cross_terms`, :func:`~streamem.em.estep.ref_power_terms`),
log-posterior = −diff2 + log π_k + Gaussian offset prior (translations searched around
the particle's previous origin, as refine3d). No fine pass: the grid is the psi step ×
the offset step (adaptive oversampling is left for later). Posterior weights keep the
samples holding ``adaptive_fraction`` of the mass (:func:`significant_weights`).

Statistics: per (class, psi) row J, Σ_{i,t} w · CTF·X_t/σ² is a GEMM
(J, n·T) @ (n·T, M), and Σ_i w · CTF²/σ² a GEMM (J, n) @ (n, M); the rows are rotated
back to the class frame by −psi once per chunk and summed over psi: the data sums in
real space (inverse FT, cubic rotation, FT), the CTF² weights by bilinear interpolation
on the centred Fourier grid (they are real and even in k). Noise sums per optics group
and shell, class weights, offsets as refine3d.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import logsumexp

from streamem.core import sampling
from streamem.core.backend import fftshift, ifftshift, irfftn, rfftn
from streamem.core.ctf import OpticsParams, ctf_phase_from_frequencies
from streamem.em import memory
from streamem.em.fourier_points import half_plane_points, prepare_images
from streamem.em.kernels import cross_terms, log_likelihood, offset_log_prior, ref_power_terms
from streamem.em.significance import significant_weights
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
    resident += model.class_images.nbytes
    budget = memory.workspace_budget_bytes(thread_bytes, resident)
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

    images: (n, B, B) float32 centred at B//2; metadata: RELION labels → (n,) arrays
    (CTF, rlnOpticsGroup, previous rlnOriginX/YAngst). Returns the chunk's statistics
    (data_acc, weight_acc (K, M)) and per-particle results (rlnClassNumber from 1,
    rlnAnglePsi, origins in Å; rot = tilt = 0).
    """
    n, B = images.shape[0], model.box_size
    p = model.pixel_size_A
    K, psi = model.n_classes, np.asarray(model.psi_deg, np.float64)
    P = psi.size
    coords, flat, shell = half_plane_points(B, model.max_radius_px)
    M = coords.shape[0]
    prep = prepare_images(images, metadata, model, coords, flat, shell)
    groups = np.asarray(metadata.get("rlnOpticsGroup", np.ones(n)), np.int64) - 1
    ctf = prep.ctf
    if model.ctf_intact_first_peak and model.do_ctf and "rlnDefocusU" in metadata:
        ctf = _intact_first_peak(ctf, metadata, coords, model, groups).astype(np.float32)
    cw = ctf * prep.inv_sigma2  # (n, M) CTF/σ²
    ctf2w = ctf * cw  # (n, M) CTF²/σ²
    refs = rotated_references(model.class_images, psi, flat)  # (J = K·P, M)
    power = (refs.real**2 + refs.imag**2).astype(np.float32)  # (J, M)
    shifts = np.asarray(sampling.translation_grid(model.offset_range_px, model.offset_step_px))
    T = shifts.shape[0]
    phases = np.asarray(sampling.shift_phases(coords, shifts, B))  # (T, M)
    X0 = prep.X * np.asarray(sampling.shift_phases(coords, prep.prior_offset_px, B))  # (n, M)
    log_pi = np.repeat(np.asarray(model.log_class_prior, np.float64), P)  # (J,)

    stats = empty_statistics(K, M, len(model.optics), model.n_shells)
    result = ChunkResult(*(np.zeros(n) for _ in range(9)))
    data_J = np.zeros((K * P, M), np.complex128)
    weight_J = np.zeros((K * P, M))
    noise_rows = np.zeros((n, M))
    batch = class2d_batch_size(model, n, M, K * P, T)
    for b0 in range(0, n, batch):
        sl = slice(b0, min(n, b0 + batch))
        nb = sl.stop - sl.start
        Xs = X0[sl, None, :] * phases[None]  # (nb, T, M)
        C = cross_terms(Xs, cw[sl], refs)  # (nb, T, J)
        S = ref_power_terms(ctf2w[sl], refs)  # (nb, J)
        total = prep.prior_offset_px[sl, None, :] + shifts[None]  # (nb, T, 2)
        logp = log_likelihood(C, S[:, None, :], prep.norm[sl, None, None], model.scale_free)
        logp = logp + offset_log_prior(total, model.sigma_offset_A, p)[:, :, None] + log_pi
        lse = logsumexp(logp.reshape(nb, -1), axis=1)  # (nb,)
        W = np.exp(logp - lse[:, None, None])  # (nb, T, J)
        for i in range(nb):
            gi = sl.start + i
            t, j = np.unravel_index(np.argmax(W[i]), W[i].shape)
            result.class_number[gi] = j // P + 1
            result.psi[gi] = psi[j % P]
            result.origin_y_A[gi], result.origin_x_A[gi] = total[i, t] * p
            result.max_prob[gi] = W[i, t, j]
            W[i], result.n_significant[gi] = significant_weights(W[i], model.adaptive_fraction)
        result.loglik[sl] = lse
        W = W.astype(np.float32)
        w_img = W.sum(axis=1)  # (nb, J)
        # Σ_{i,t} w · CTF·X_t/σ² per row: (J, nb·T) @ (nb·T, M)
        # (real GEMMs on 2-D operands: NumPy's stacked or complex-cast matmuls are far slower)
        Y = (Xs * cw[sl, None, :]).reshape(nb * T, M)
        Wt = np.ascontiguousarray(W.reshape(nb * T, -1).T)  # (J, nb·T)
        data_J += Wt @ Y.real + 1j * (Wt @ Y.imag)
        weight_J += w_img.T @ ctf2w[sl]
        # noise: Σ w |X_t − CTF·A_J|² = |X|² − 2 CTF Re Σ_t conj(X_t) (Σ_J w A_J) + CTF² Σ w |A_J|²
        W2 = W.reshape(nb * T, -1)
        WA = (W2 @ refs.real + 1j * (W2 @ refs.imag)).reshape(nb, T, M)
        cross = np.sum((np.conj(Xs) * WA).real, axis=1)  # (nb, M)
        noise_rows[sl] = (
            (prep.X[sl].real ** 2 + prep.X[sl].imag ** 2)
            - 2 * ctf[sl] * cross
            + ctf[sl] ** 2 * (w_img @ power)
        )
        stats.offset_sq_A2 += float(np.sum(W * np.sum((total * p) ** 2, axis=-1)[:, :, None]))
        stats.class_weight += w_img.reshape(nb, K, P).sum(axis=(0, 2))
        stats.weight_sum += nb
        stats.loglik_sum += float(lse.sum())
    # back to the class frame, only the rows some image used
    live = np.flatnonzero(weight_J.any(axis=1))
    if live.size:
        d = rotate_data_back(data_J[live], coords, flat, B, psi[live % P])
        w = rotate_weights_back(weight_J[live], coords, psi[live % P])
        np.add.at(stats.data_acc, live // P, d)
        np.add.at(stats.weight_acc, live // P, w)
    n_shells = model.n_shells
    for g in np.unique(groups):
        rows = groups == g
        stats.noise_power[g] += np.bincount(shell, noise_rows[rows].sum(axis=0), n_shells)[
            :n_shells
        ]
        stats.noise_count[g] += rows.sum() * np.bincount(shell, minlength=n_shells)[:n_shells]
    return stats, result


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
