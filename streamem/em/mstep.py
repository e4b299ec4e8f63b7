"""The maximisation step: reconstructions, noise spectra, priors, FSC (pure numerics).

Frames: the particle box has B pixels; an iteration works in a Fourier-cropped box
of ``work_box`` b ≤ B pixels that holds the current resolution radius (RELION's
``current_size``). A frequency index k means the same spatial frequency in both
frames (1/(B·p) per index), and all Fourier values are in the full box's
unnormalised DFT units, so ``to_work_frame`` crops a map's DFT without rescaling
and ``to_full_frame`` zero-pads it back.

Regularisation (RELION's ``updateSSNRarrays`` for gold-standard refinement): from
the FSC between the half maps, SSNR(k) = FSC/(1 − FSC) and τ²(k) = SSNR(k)·σ²_rec(k),
with σ²_rec the inverse mean back-projected weight (Σ CTF²/σ²) in shell k; the
regularised map is Σ CTF·X/σ² / (W + 1/(fudge·τ²)), a Wiener filter. Unlike RELION,
which uses the previous iteration's FSC, the FSC of this iteration's unregularised
half maps is used (one extra reconstruction, no special first iteration). The noise model is σ²(k) = ⟨|X − CTF·A|²⟩/2 per optics group and shell
(per complex component), and the offset prior σ² = ⟨|origin|²⟩/2 (2-D).

Where it runs and what it holds: on the client (the driver), after the tree
reduction hands it one :class:`~streamem.em.statistics.SufficientStatistics` with
single-precision accumulators (refine3d at box 128: 2 × 66 MB data + 2 × 33 MB
weights). Each reconstruction takes a double-precision copy of one accumulator at a
time (:func:`_double`), so the M-step holds the reduced statistics plus one half's
double copy and the reconstruction's padded-grid FFT temporaries (~0.5 GB at box
128, bench refine-memory), never both halves in double precision at once — except
the final join, which needs their sum (one double cube more).
"""

from __future__ import annotations

import numpy as np

from streamem.core.backend import fftshift, ifftshift, irfftn, rfftn
from streamem.core.backprojector import reconstruct, reconstruction_noise_spectrum
from streamem.core.fourier import radial_average, shell_index
from streamem.core.fsc import fsc as fourier_shell_correlation


def _double(acc: np.ndarray) -> np.ndarray:
    """An accumulator in double precision (complex128/float64) for the reconstruction;
    the reduction hands single-precision sums (no copy if already double)."""
    dtype = np.complex128 if np.iscomplexobj(acc) else np.float64
    return np.asarray(acc, dtype=dtype)


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


def tau2_from_fsc(fsc_halves: np.ndarray, noise_spectrum: np.ndarray) -> np.ndarray:
    """RELION's τ²(k) = SSNR(k) · σ²_rec(k), SSNR = FSC/(1 − FSC), zero where FSC ≤ 0.

    ``noise_spectrum`` is the reconstruction's noise power per shell
    (:func:`streamem.core.backprojector.reconstruction_noise_spectrum`).
    """
    f = np.clip(np.asarray(fsc_halves, np.float64), 0.0, 0.999)
    n = min(len(f), len(noise_spectrum))
    return f[:n] / (1.0 - f[:n]) * np.asarray(noise_spectrum)[:n]


def tau2_from_map(volume: np.ndarray) -> np.ndarray:
    """RELION's data-vs-prior τ²(k) for classification: the map's own power per shell.

    volume: (B, B, B) real map on the data's scale. Returns (B//2 + 1,) float64, the mean
    |F(k)|² / 2 over shell k of ``rfftn(ifftshift(volume))`` (unnormalised): per complex
    component, as the noise model's σ² (RELION's ``spectrum * normfft / 2``).
    """
    B = volume.shape[0]
    F = rfftn(ifftshift(np.asarray(volume, np.float64), axes=(0, 1, 2)), axes=(0, 1, 2))
    return 0.5 * radial_average(F.real**2 + F.imag**2, shell_index(B, 3), B // 2 + 1)


def data_vs_prior(
    volume: np.ndarray,
    weight_acc: np.ndarray,
    work_box: int,
    padding_factor: int,
    tau2_fudge: float,
    symmetry_matrices: np.ndarray | None,
) -> np.ndarray:
    """RELION's per-shell SSNR of a classification map, τ²/σ²_rec (work_box//2 + 1,).

    τ² = tau2_fudge × :func:`tau2_from_map` (volume: the class map, (B, B, B)) and σ²_rec
    the reconstruction's noise power from its summed weights (weight_acc: one
    half-cube accumulator); needs no half maps.
    """
    noise = reconstruction_noise_spectrum(
        _double(weight_acc), work_box, padding_factor, symmetry_matrices
    )
    tau2 = tau2_fudge * tau2_from_map(volume)[: len(noise)]
    out = np.zeros(len(noise))
    ok = noise[: len(tau2)] > 0
    out[: len(tau2)][ok] = tau2[ok] / noise[: len(tau2)][ok]
    return out


def resolution_from_ssnr(ssnr: np.ndarray, box_size: int, pixel_size_A: float) -> float:
    """RELION's estimated resolution (Å): the last shell before the SSNR first drops
    below 1 (from shell 1); 999 when shell 1 already does."""
    below = np.nonzero(np.asarray(ssnr)[1:] < 1.0)[0]
    last = int(below[0]) if below.size else len(ssnr) - 1  # shells 1 .. last have SSNR ≥ 1
    return box_size * pixel_size_A / last if last > 0 else 999.0


def reconstruct_halves(
    data_acc: np.ndarray,
    weight_acc: np.ndarray,
    work_box: int,
    padding_factor: int,
    tau2_fudge: float,
    symmetry_matrices: np.ndarray | None,
):
    """Regularised half maps from per-half accumulators (RELION's gold-standard M-step).

    data_acc, weight_acc: (2, *grid) accumulators. The half maps are first
    reconstructed unregularised; their FSC gives τ² (:func:`tau2_from_fsc`) for the
    regularised reconstruction. Returns (maps (2, b, b, b) float32 in the work
    frame, FSC of the unregularised halves (b//2+1,)).
    """
    fsc_raw = unregularised_half_fsc(
        data_acc, weight_acc, work_box, padding_factor, symmetry_matrices
    )
    maps = []
    for h in range(2):
        weight = _double(weight_acc[h])
        noise = reconstruction_noise_spectrum(weight, work_box, padding_factor, symmetry_matrices)
        maps.append(
            reconstruct(
                _double(data_acc[h]),
                weight,
                work_box,
                padding_factor,
                tau2_from_fsc(fsc_raw, noise),
                symmetry_matrices=symmetry_matrices,
                tau2_fudge=tau2_fudge,
            )
        )
    return np.stack(maps), fsc_raw


def unregularised_half_fsc(data_acc, weight_acc, work_box, padding_factor, symmetry_matrices):
    """FSC (work_box//2 + 1,) between the unregularised maps of two half accumulators
    (2, *grid); shells where a map has no power give 0."""
    raw = [
        reconstruct(
            _double(data_acc[h]),
            _double(weight_acc[h]),
            work_box,
            padding_factor,
            None,
            symmetry_matrices=symmetry_matrices,
        )  # fmt: skip
        for h in range(2)
    ]
    return np.nan_to_num(fourier_shell_correlation(raw[0], raw[1])[: work_box // 2 + 1])


def reconstruct_joined(
    data_acc, weight_acc, fsc_halves, work_box, padding_factor, tau2_fudge, symmetry_matrices,
    tau2=None,
):  # fmt: skip
    """The final map from both halves' accumulators, τ² from the full-set FSC 2f/(1+f),
    or the given ``tau2`` (per shell, e.g. :func:`tau2_from_map`)."""
    data = _double(data_acc[0]) + data_acc[1]
    weight = _double(weight_acc[0]) + weight_acc[1]
    if tau2 is None:
        f = np.clip(np.asarray(fsc_halves), 0, 0.999)
        noise = reconstruction_noise_spectrum(weight, work_box, padding_factor, symmetry_matrices)
        tau2 = tau2_from_fsc(2 * f / (1 + f), noise)
    return reconstruct(
        data,
        weight,
        work_box,
        padding_factor,
        tau2,
        symmetry_matrices=symmetry_matrices,
        tau2_fudge=tau2_fudge,
    )


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
