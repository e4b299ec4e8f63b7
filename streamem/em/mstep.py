"""The maximisation step: reconstructions, noise spectra, priors, FSC (pure numerics).

Frames: the particle box has B pixels; an iteration works in a Fourier-cropped box
of ``work_box`` b ≤ B pixels that holds the current resolution radius (RELION's
``current_size``). A frequency index k means the same spatial frequency in both
frames (1/(B·p) per index), and all Fourier values are in the full box's
unnormalised DFT units, so ``to_work_frame`` crops a map's DFT without rescaling
and ``to_full_frame`` zero-pads it back.

Regularisation (RELION's ``updateSSNRarrays`` for gold-standard refinement): from
the FSC between the unregularised half maps, SSNR(k) = FSC/(1 − FSC) and
τ²(k) = τ²_fudge · SSNR(k) / ⟨W⟩(k), with ⟨W⟩(k) the mean back-projected weight
(Σ CTF²/σ²) in shell k; the regularised map is Σ CTF·X/σ² / (W + 1/τ²), a Wiener
filter. The noise model is σ²(k) = ⟨|X − CTF·A|²⟩/2 per optics group and shell
(per complex component), and the offset prior σ² = ⟨|origin|²⟩/2 (2-D).
"""

from __future__ import annotations

import numpy as np

from streamem.core.backend import fftshift, ifftshift, irfftn, rfftn
from streamem.core.backprojector import reconstruct
from streamem.core.fsc import fsc as fourier_shell_correlation


def _crop_or_pad_rfft(F: np.ndarray, n_out: int) -> np.ndarray:
    """Crop or zero-pad a 3-D rfft (n, n, n//2+1) to (m, m, m//2+1), keeping |k| < min/2."""
    n = F.shape[0]
    m = n_out
    out = np.zeros((m, m, m // 2 + 1), dtype=F.dtype)
    h = min(n, m) // 2  # frequencies -h+1 .. h-1 are copied; the Nyquist plane is dropped
    idx_in = np.r_[0:h, n - h + 1 : n]
    idx_out = np.r_[0:h, m - h + 1 : m]
    out[np.ix_(idx_out, idx_out, np.arange(h))] = F[np.ix_(idx_in, idx_in, np.arange(h))]
    return out


def to_work_frame(volume: np.ndarray, work_box: int) -> np.ndarray:
    """Fourier-crop a centred (B, B, B) map to (b, b, b), keeping full-box DFT values."""
    B = volume.shape[0]
    if work_box == B:
        return volume.astype(np.float32)
    F = rfftn(ifftshift(volume.astype(np.float64), axes=(0, 1, 2)), axes=(0, 1, 2))
    small = irfftn(_crop_or_pad_rfft(F, work_box), s=(work_box,) * 3, axes=(0, 1, 2))
    return fftshift(small, axes=(0, 1, 2)).astype(np.float32)


def to_full_frame(volume: np.ndarray, box_size: int) -> np.ndarray:
    """Inverse of :func:`to_work_frame`: zero-pad the DFT of a (b, b, b) map to B."""
    b = volume.shape[0]
    if b == box_size:
        return volume.astype(np.float32)
    F = rfftn(ifftshift(volume.astype(np.float64), axes=(0, 1, 2)), axes=(0, 1, 2))
    big = irfftn(_crop_or_pad_rfft(F, box_size), s=(box_size,) * 3, axes=(0, 1, 2))
    return fftshift(big, axes=(0, 1, 2)).astype(np.float32)


def mean_weight_per_shell(weight_acc: np.ndarray, padding_factor: int, n_shells: int) -> np.ndarray:
    """⟨W⟩(k) for shells k = 0..n_shells−1 of an accumulator on the padded grid.

    The accumulator holds frequency k at padded index k·padding_factor; shell k is
    the set of voxels with round(radius / padding_factor) = k.
    """
    r = _padded_radius(weight_acc.shape) / padding_factor
    shell = np.rint(r).astype(np.int64).ravel()
    keep = shell < n_shells
    sums = np.bincount(shell[keep], weights=weight_acc.ravel()[keep], minlength=n_shells)
    counts = np.bincount(shell[keep], minlength=n_shells)
    return sums / np.maximum(counts, 1)


def _padded_radius(shape) -> np.ndarray:
    """Radius (in padded-grid pixels) of every voxel of an accumulator.

    Works for the rfft half-cube (P, P, P//2+1) and the centred full cube (P, P, P).
    """
    P = shape[0]
    if shape[2] == P // 2 + 1 and shape[2] != P:
        kz = np.fft.fftfreq(P) * P
        ky = kz
        kx = np.arange(P // 2 + 1)
    else:
        kz = ky = kx = np.arange(P) - P // 2
    return np.sqrt(kz[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx[None, None, :] ** 2)


def tau2_from_fsc(
    fsc_halves: np.ndarray, mean_weight: np.ndarray, tau2_fudge: float = 1.0
) -> np.ndarray:
    """RELION's τ²(k) = fudge · SSNR(k) / ⟨W⟩(k), SSNR = FSC/(1 − FSC), zero where FSC ≤ 0."""
    f = np.clip(np.asarray(fsc_halves, np.float64), 0.0, 0.999)
    ssnr = f / (1.0 - f)
    with np.errstate(divide="ignore", invalid="ignore"):
        tau2 = np.where(mean_weight > 0, tau2_fudge * ssnr / mean_weight, 0.0)
    return tau2


def reconstruct_halves(
    data_acc: np.ndarray,
    weight_acc: np.ndarray,
    work_box: int,
    padding_factor: int,
    tau2_fudge: float,
    symmetry_matrices: np.ndarray | None,
    n_shells_full: int,
):
    """Regularised half maps from per-half accumulators.

    data_acc, weight_acc: (2, *padded grid) accumulators. Returns (maps (2, b, b, b)
    float32 in the work frame, fsc of the regularised maps (b//2+1,), tau2 (2, b//2+1)).
    """
    n_shells = work_box // 2 + 1
    raw = [
        reconstruct(
            data_acc[h],
            weight_acc[h],
            work_box,
            padding_factor,
            None,
            symmetry_matrices=symmetry_matrices,
        )
        for h in range(2)
    ]
    fsc_raw = fourier_shell_correlation(raw[0], raw[1])[:n_shells]
    maps, tau2s = [], []
    for h in range(2):
        mw = mean_weight_per_shell(weight_acc[h], padding_factor, n_shells)
        tau2 = tau2_from_fsc(fsc_raw, mw, tau2_fudge)
        maps.append(
            reconstruct(
                data_acc[h],
                weight_acc[h],
                work_box,
                padding_factor,
                tau2,
                symmetry_matrices=symmetry_matrices,
            )
        )
        tau2s.append(tau2)
    _ = n_shells_full
    return np.stack(maps), fsc_raw, np.stack(tau2s)


def update_inv_sigma2(
    inv_sigma2_old: np.ndarray, noise_power: np.ndarray, noise_count: np.ndarray
) -> np.ndarray:
    """New 1/σ² per optics group and shell; shells without data keep their old value."""
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma2 = noise_power / (2.0 * noise_count)
    new = inv_sigma2_old.copy()
    ok = (noise_count > 0) & (sigma2 > 0)
    new[ok] = 1.0 / sigma2[ok]
    new[:, 0] = 0.0  # DC is never scored
    return new


def update_sigma_offset_A(offset_sq_A2: float, weight_sum: float, floor_A: float) -> float:
    """σ of the 2-D Gaussian offset prior: sqrt(Σw|o|² / (2 Σw)), at least ``floor_A``."""
    if weight_sum <= 0:
        return floor_A
    return max(float(np.sqrt(offset_sq_A2 / (2.0 * weight_sum))), floor_A)


def initial_inv_sigma2(power_sum: np.ndarray, power_count: np.ndarray) -> np.ndarray:
    """1/σ² from the mean image power per shell, σ² = ⟨|X|²⟩/2 (noise dominates at low SNR)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma2 = power_sum / (2.0 * power_count)
    inv = np.where(sigma2 > 0, 1.0 / sigma2, 0.0)
    inv[:, 0] = 0.0
    return inv


def image_power(images: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Σ|X(k)|² and counts per optics group and shell: (2, G, B//2+1) float64.

    images: (n, B, B); groups: (n,) 0-based optics group. The result is a monoid (sum).
    """
    n, B = images.shape[0], images.shape[-1]
    X = rfftn(images.astype(np.float32), axes=(-2, -1))
    ky = np.fft.fftfreq(B) * B
    kx = np.arange(B // 2 + 1)
    shell = np.rint(np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)).astype(np.int64).ravel()
    keep = shell <= B // 2
    out = np.zeros((2, n_groups, B // 2 + 1))
    power = (X.real**2 + X.imag**2).reshape(n, -1)
    for g in np.unique(groups):
        p = power[groups == g].sum(axis=0)
        out[0, g] += np.bincount(shell[keep], weights=p[keep], minlength=B // 2 + 1)
        out[1, g] += np.count_nonzero(groups == g) * np.bincount(shell[keep], minlength=B // 2 + 1)
    return out
