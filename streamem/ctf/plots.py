"""Diagnostic PNGs of the CTF job (matplotlib, Agg): one per micrograph and a summary."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from streamem.ctf.fit import CtfFit, FitDiagnostics
from streamem.ctf.spectrum import centred_full_spectrum


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def display_spectrum(half: np.ndarray, fitted_ctf2_half: np.ndarray) -> np.ndarray:
    """Centred ``(T, T)`` image: the measured spectrum left, the fitted CTF² right.

    The measured half is log amplitude, lightly smoothed, with each ring's mean and
    spread removed (so the Thon rings show at every frequency); the fit is scaled to
    the same range.
    """
    from scipy.ndimage import gaussian_filter

    t = half.shape[0]
    # a 1-px Gaussian: rings are several px wide, the pixel noise is not
    data = gaussian_filter(centred_full_spectrum(np.log(np.maximum(half, 1e-30))), 1.0)
    c = np.arange(t) - t // 2
    r = np.rint(np.hypot(*np.meshgrid(c, c, indexing="ij"))).astype(np.int64)
    mean = np.bincount(r.ravel(), data.ravel()) / np.maximum(np.bincount(r.ravel()), 1)
    resid = data - mean[r]
    sd = np.sqrt(np.bincount(r.ravel(), resid.ravel() ** 2) / np.maximum(np.bincount(r.ravel()), 1))
    resid = np.clip(resid / np.maximum(sd[r], 1e-30), -2.5, 2.5)
    fit = centred_full_spectrum(fitted_ctf2_half)
    out = resid.copy()
    out[:, t // 2 :] = 5.0 * fit[:, t // 2 :] - 2.5  # CTF² in [0, 1] -> [-2.5, 2.5]
    return out


def plot_micrograph_fit(
    path: Path,
    name: str,
    fit: CtfFit,
    diag: FitDiagnostics,
    display: np.ndarray,
    pixel_size_A: float,
) -> None:
    """PNG: EPA of the spectrum vs the fit (with the windowed correlation), and the 2-D
    spectrum (left) with the fitted CTF² (right)."""
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    ax.plot(diag.k_per_A, diag.measured, lw=0.8, color="0.3", label="spectrum (EPA)")
    ax.plot(diag.k_per_A, diag.fitted, lw=1.0, color="tab:red", label="fit CTF²")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("detrended amplitude")
    twin = ax.twinx()
    twin.plot(diag.window_k_per_A, diag.window_correlation, color="tab:blue", lw=1.2)
    twin.set_ylim(-1, 1)
    twin.set_ylabel("fit correlation", color="tab:blue")
    if not fit.failed:
        ax.axvline(1.0 / fit.max_resolution_A, color="tab:blue", ls="--", lw=0.8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(
        f"{name}: U {fit.defocus_u_A:.0f} V {fit.defocus_v_A:.0f} Å, "
        f"{fit.defocus_angle_deg:.1f}°, fit {_res(fit)}, FOM {fit.figure_of_merit:.3f}",
        fontsize=9,
    )
    nyq = 1.0 / (2.0 * pixel_size_A)
    ax2.imshow(display, cmap="gray", extent=(-nyq, nyq, nyq, -nyq))
    ax2.set_title("spectrum | fit", fontsize=9)
    ax2.set_xlabel("kx (1/Å)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _res(fit: CtfFit) -> str:
    return "failed" if fit.failed else f"{fit.max_resolution_A:.1f} Å"


def plot_summary(
    path: Path,
    defocus_u_A: Sequence[float],
    defocus_v_A: Sequence[float],
    max_resolution_A: Sequence[float],
    failed_resolution_A: float,
) -> None:
    """PNG: defocus U/V and the fit resolution over micrographs (failed fits marked)."""
    plt = _pyplot()
    u, v = np.asarray(defocus_u_A), np.asarray(defocus_v_A)
    res = np.asarray(max_resolution_A, dtype=np.float64)
    idx = np.arange(1, len(u) + 1)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a1.plot(idx, u / 1e4, "o-", ms=3, label="defocus U")
    a1.plot(idx, v / 1e4, "s-", ms=3, label="defocus V")
    a1.set_ylabel("defocus (µm)")
    a1.legend(fontsize=8)
    ok = res < failed_resolution_A
    a2.plot(idx[ok], res[ok], "o", ms=4, color="tab:green", label="fit resolution")
    if (~ok).any():
        top = float(res[ok].max()) if ok.any() else 30.0
        a2.plot(idx[~ok], np.full((~ok).sum(), top), "x", color="tab:red", label="failed")
    a2.set_ylabel("fit resolution (Å)")
    a2.set_xlabel("micrograph")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
