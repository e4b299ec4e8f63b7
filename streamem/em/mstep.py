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

Namespaces: the reconstructions run where the accumulators are (NumPy, CuPy, or any
array-API namespace: tests/test_xp_mstep.py runs them under array_api_strict); the
maps come back in that namespace, the short per-shell curves (FSC, τ², SSNR) on the
host as NumPy, and the noise updates follow their inputs.
"""

from __future__ import annotations

import numpy as np

from streamem.core.backend import (
    asarray_like,
    astype,
    bincount,
    fftshift,
    flatnonzero,
    ifftshift,
    imag,
    irfftn,
    is_complex,
    real,
    rfftn,
    to_numpy,
    xp_of,
)
from streamem.core.backprojector import reconstruct, reconstruction_noise_spectrum
from streamem.core.filters import resize_rfft
from streamem.core.fourier import radial_average, shell_index
from streamem.core.fsc import fsc as fourier_shell_correlation


def _double(acc):
    """An accumulator in double precision (complex128/float64) for the reconstruction;
    the reduction hands single-precision sums (no copy if already double)."""
    xp = xp_of(acc)
    return astype(acc, xp.complex128 if is_complex(acc) else xp.float64, copy=False)


def _crop_or_pad_rfft(F, n_out: int):
    """Crop or zero-pad a 3-D rfft (n, n, n//2+1) to (m, m, m//2+1), keeping |k| < min/2
    on every axis (the Nyquist plane is dropped)."""
    return resize_rfft(F, n_out, 3, drop_nyquist=True)


def _refit_frame(volume, n_out: int):
    xp = xp_of(volume)
    F = rfftn(ifftshift(astype(volume, xp.float64), axes=(0, 1, 2)), axes=(0, 1, 2))
    out = irfftn(_crop_or_pad_rfft(F, n_out), s=(n_out,) * 3, axes=(0, 1, 2))
    return astype(fftshift(out, axes=(0, 1, 2)), xp.float32)


def to_work_frame(volume, work_box: int):
    """Fourier-crop a centred (B, B, B) map to (b, b, b), keeping full-box DFT values."""
    if work_box == volume.shape[0]:
        return astype(volume, xp_of(volume).float32)
    return _refit_frame(volume, work_box)


def to_full_frame(volume, box_size: int):
    """Inverse of :func:`to_work_frame`: zero-pad the DFT of a (b, b, b) map to B."""
    if volume.shape[0] == box_size:
        return astype(volume, xp_of(volume).float32)
    return _refit_frame(volume, box_size)


def tau2_from_fsc(fsc_halves: np.ndarray, noise_spectrum: np.ndarray) -> np.ndarray:
    """RELION's τ²(k) = SSNR(k) · σ²_rec(k), SSNR = FSC/(1 − FSC), zero where FSC ≤ 0.

    ``noise_spectrum`` is the reconstruction's noise power per shell
    (:func:`streamem.core.backprojector.reconstruction_noise_spectrum`).
    """
    f = np.clip(np.asarray(to_numpy(fsc_halves), np.float64), 0.0, 0.999)
    noise = np.asarray(to_numpy(noise_spectrum), np.float64)  # per-shell: on the host
    n = min(len(f), len(noise))
    return f[:n] / (1.0 - f[:n]) * noise[:n]


def tau2_from_map(volume: np.ndarray) -> np.ndarray:
    """RELION's data-vs-prior τ²(k) for classification: the map's own power per shell.

    volume: (B, B, B) real map on the data's scale. Returns (B//2 + 1,) float64, the mean
    |F(k)|² / 2 over shell k of ``rfftn(ifftshift(volume))`` (unnormalised): per complex
    component, as the noise model's σ² (RELION's ``spectrum * normfft / 2``). The map
    may live in any namespace; the spectrum comes back to the host.
    """
    xp = xp_of(volume)
    B = volume.shape[0]
    F = rfftn(ifftshift(astype(volume, xp.float64), axes=(0, 1, 2)), axes=(0, 1, 2))
    power = real(F) ** 2 + imag(F) ** 2
    return 0.5 * to_numpy(radial_average(power, shell_index(B, 3, xp), B // 2 + 1))


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
    noise = reconstruction_noise(weight_acc, work_box, padding_factor, symmetry_matrices)
    tau2 = tau2_fudge * tau2_from_map(volume)[: len(noise)]
    out = np.zeros(len(noise))
    ok = noise[: len(tau2)] > 0
    out[: len(tau2)][ok] = tau2[ok] / noise[: len(tau2)][ok]
    return out


def reconstruction_noise(weight_acc, work_box: int, padding_factor: int, symmetry_matrices):
    """σ²_rec per shell (work_box//2 + 1,) float64 on the host, from one accumulator's
    weights (:func:`streamem.core.backprojector.reconstruction_noise_spectrum`)."""
    spectrum = reconstruction_noise_spectrum(
        _double(weight_acc), work_box, padding_factor, symmetry_matrices
    )
    return np.asarray(to_numpy(spectrum), np.float64)


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
    tau2: np.ndarray | None = None,
    fsc_halves: np.ndarray | None = None,
):
    """Regularised half maps from per-half accumulators (RELION's gold-standard M-step).

    data_acc, weight_acc: (2, *grid) accumulators. The half maps are first
    reconstructed unregularised; their FSC gives τ² (:func:`tau2_from_fsc`) for the
    regularised reconstruction, unless ``tau2`` (per shell, e.g. :func:`tau2_from_map`)
    is given. ``fsc_halves``: that FSC if already computed. Returns (maps (2, b, b, b)
    float32 in the work frame, FSC of the unregularised halves (b//2+1,)).
    """
    fsc_raw = (
        unregularised_half_fsc(data_acc, weight_acc, work_box, padding_factor, symmetry_matrices)
        if fsc_halves is None
        else fsc_halves
    )
    maps = []
    for h in range(2):
        weight = _double(weight_acc[h, ...])
        if tau2 is None:
            noise = reconstruction_noise_spectrum(
                weight, work_box, padding_factor, symmetry_matrices
            )
        maps.append(
            reconstruct(
                _double(data_acc[h, ...]),
                weight,
                work_box,
                padding_factor,
                tau2_from_fsc(fsc_raw, noise) if tau2 is None else tau2,
                symmetry_matrices=symmetry_matrices,
                tau2_fudge=tau2_fudge,
            )
        )
    return xp_of(data_acc).stack(maps), fsc_raw


def unregularised_half_fsc(data_acc, weight_acc, work_box, padding_factor, symmetry_matrices):
    """FSC (work_box//2 + 1,) between the unregularised maps of two half accumulators
    (2, *grid); shells where a map has no power give 0."""
    raw = [
        reconstruct(
            _double(data_acc[h, ...]),
            _double(weight_acc[h, ...]),
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
    data = _double(data_acc[0, ...]) + data_acc[1, ...]
    weight = _double(weight_acc[0, ...]) + weight_acc[1, ...]
    if tau2 is None:
        f = np.clip(np.asarray(to_numpy(fsc_halves)), 0, 0.999)
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
    """New 1/σ² per optics group and shell; shells without data keep their old value.

    (G, shells) arrays of one namespace; the result has ``inv_sigma2_old``'s dtype.
    """
    xp = xp_of(inv_sigma2_old, noise_power, noise_count)
    count = astype(noise_count, xp.float64)
    sigma2 = astype(noise_power, xp.float64) / (2.0 * xp.where(count > 0, count, 1.0))
    ok = (count > 0) & (sigma2 > 0)
    new = xp.where(ok, 1.0 / xp.where(ok, sigma2, 1.0), astype(inv_sigma2_old, xp.float64))
    new = astype(new, inv_sigma2_old.dtype)
    new[:, 0] = 0.0  # DC is never scored
    return new


def update_sigma_offset_A(offset_sq_A2: float, weight_sum: float, floor_A: float) -> float:
    """σ of the 2-D Gaussian offset prior: sqrt(Σw|o|² / (2 Σw)), at least ``floor_A``."""
    if weight_sum <= 0:
        return floor_A
    return max(float(np.sqrt(offset_sq_A2 / (2.0 * weight_sum))), floor_A)


def initial_inv_sigma2(power_sum: np.ndarray, power_count: np.ndarray) -> np.ndarray:
    """1/σ² from the mean image power per shell, σ² = ⟨|X|²⟩/2 (noise dominates at low SNR)."""
    xp = xp_of(power_sum, power_count)
    count = astype(power_count, xp.float64)
    sigma2 = astype(power_sum, xp.float64) / (2.0 * xp.where(count > 0, count, 1.0))
    ok = (count > 0) & (sigma2 > 0)
    inv = xp.where(ok, 1.0 / xp.where(ok, sigma2, 1.0), 0.0)
    inv[:, 0] = 0.0
    return inv


def image_power(images: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Σ|X(k)|² and counts per optics group and shell: (2, G, B//2+1) float64.

    images: (n, B, B); groups: (n,) 0-based optics group (host metadata). The result is
    a monoid (sum), in the namespace of ``images``.
    """
    xp = xp_of(images)
    n, B = images.shape[0], images.shape[-1]
    n_sh = B // 2 + 1
    X = rfftn(astype(images, xp.float32), axes=(-2, -1))
    shell = xp.reshape(shell_index(B, 2, xp), (-1,))
    keep = flatnonzero(shell <= B // 2)
    shell = xp.take(shell, keep)
    power = xp.take(xp.reshape(real(X) ** 2 + imag(X) ** 2, (n, -1)), keep, axis=1)
    per_shell = astype(bincount(shell, minlength=n_sh), xp.float64)
    groups = np.asarray(to_numpy(groups))
    sums = [xp.zeros(n_sh, dtype=xp.float64) for _ in range(n_groups)]
    counts = [xp.zeros(n_sh, dtype=xp.float64) for _ in range(n_groups)]
    for g in np.unique(groups):
        rows = asarray_like(np.flatnonzero(groups == g), images)
        p = xp.sum(xp.take(power, rows, axis=0), axis=0)
        sums[g] = bincount(shell, weights=p, minlength=n_sh)
        counts[g] = float(rows.shape[0]) * per_shell
    return xp.stack([xp.stack(sums), xp.stack(counts)])
