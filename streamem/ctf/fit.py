"""CTF fit of an amplitude spectrum: 1-D exhaustive search, 2-D grid, local refinement.

The steps follow CTFFIND4 (Rohou & Grigorieff 2015), with RELION's CTF
(:mod:`streamem.core.ctf`; defocus in Å, positive underfocus, angle in degrees):

1. **Band and detrending.** Pixels of the spectrum (rfft half-plane of a tile) with
   ``1/res_min <= k <= min(1/res_max, Nyquist)``. The smooth part (background and the
   mean of the envelope) is removed by projecting out Legendre polynomials in ``k`` of
   degree :data:`DETREND_DEGREE`; the residual is divided by a smooth local RMS
   (exp of a quadratic fitted to its log energy), so every ring counts about the same
   (CTFFIND4's normalisation). The same projection is applied to every model
   ``CTF²``, so the score is the correlation of two detrended curves: a smooth
   background cannot shift the fit, whatever its level.
2. **1-D exhaustive search** of the mean defocus (and, with ``phase_shift``, the phase
   shift, 0-180° by 10°) on the rotational average, in steps that change the phase at
   the band's high limit by π/8.
3. **2-D grid** of the astigmatism around the 1-D defocus. The defocus is written
   ``Δf(θ) = m + c·cos 2θ + s·sin 2θ`` (``m`` the mean, ``(c, s)`` half the
   astigmatism times ``(cos 2φ, sin 2φ)``): the same Δf(θ) as RELION's
   ``U cos²(θ−φ) + V sin²(θ−φ)`` with ``U = m + h, V = m − h, h = √(c² + s²),
   φ = atan2(s, c) / 2``, but smooth and without the U/V, φ/φ+90° ambiguity, so the
   grid is square and the refinement has no boundaries. U ≥ V by construction.
4. **Local refinement** of ``(m, c, s[, phase])`` by Nelder-Mead on the 2-D score.
5. **Fit resolution** (``rlnCtfMaxResolution``): the detrended, whitened spectrum
   from the band's low limit to Nyquist is averaged along the fitted CTF's iso-phase
   curves (equiphase averaging, EPA: bins of 1/8 of a Thon ring period); the
   correlation of that average with the fitted ``CTF²`` in windows of two periods, from
   low to high frequency; the fit resolution is the frequency of the last window
   before it drops below ``fit_threshold``. No window above it, or a fit no better
   than the best fit to pure noise (:data:`MIN_SIGNIFICANCE`): the fit failed,
   :data:`FAILED_RESOLUTION_A`. The figure of merit (``rlnCtfFigureOfMerit``) is the
   2-D score at the optimum (a correlation in [-1, 1]; noise gives about 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamem.core.ctf import OpticsParams, electron_wavelength_A, rfft_frequencies

#: Degree of the Legendre polynomials in k removed as background (data and models).
DETREND_DEGREE = 4
#: rlnCtfMaxResolution of a fit with no Thon rings (RELION's convention for "none": large).
FAILED_RESOLUTION_A = 999.0
#: Fewest radial pixels a fitting band may span (a few Thon rings).
MIN_BAND_PX = 12
#: Smallest significance ``FOM · sqrt(band pixels)`` of a fit that counts: a pure-noise
#: spectrum's best fit reaches 4-5.5 (the correlation of noise with a model has standard
#: deviation 1/sqrt(n), and the search takes the best of many models); weaker fits are
#: flagged as failed.
MIN_SIGNIFICANCE = 6.5
#: EPA bins per Thon-ring period, and periods per correlation window.
EPA_BINS_PER_PERIOD = 8
EPA_WINDOW_PERIODS = 2


@dataclass(frozen=True)
class CtfSearch:
    """What to fit and where (units in the names; RELION/CTFFIND defaults)."""

    res_min_A: float = 30.0
    res_max_A: float = 5.0
    defocus_min_A: float = 2000.0
    defocus_max_A: float = 50000.0
    astigmatism_max_A: float = 3000.0
    phase_shift: bool = False
    fit_threshold: float = 0.3

    def __post_init__(self):
        if not self.res_min_A > self.res_max_A > 0:
            raise ValueError(
                f"need res-min > res-max > 0 Å, got {self.res_min_A:g} and {self.res_max_A:g}"
            )
        if not 0 < self.defocus_min_A < self.defocus_max_A:
            raise ValueError(
                "need 0 < defocus-min < defocus-max Å, got "
                f"{self.defocus_min_A:g} and {self.defocus_max_A:g}"
            )
        if not self.astigmatism_max_A >= 0:
            raise ValueError(f"astigmatism-max must be >= 0 Å, got {self.astigmatism_max_A:g}")
        if not -1 < self.fit_threshold < 1:
            raise ValueError(f"fit threshold must be in (-1, 1), got {self.fit_threshold:g}")


@dataclass(frozen=True)
class CtfFit:
    """A fitted CTF in RELION's terms (U >= V, angle in [0, 180) degrees)."""

    defocus_u_A: float
    defocus_v_A: float
    defocus_angle_deg: float
    phase_shift_deg: float
    figure_of_merit: float
    max_resolution_A: float

    @property
    def astigmatism_A(self) -> float:
        return self.defocus_u_A - self.defocus_v_A

    @property
    def failed(self) -> bool:
        return self.max_resolution_A >= FAILED_RESOLUTION_A


@dataclass(frozen=True)
class FitDiagnostics:
    """Curves for the diagnostic plot: EPA of the spectrum and the fit, 1-D over k (1/Å)."""

    k_per_A: np.ndarray  # (n,) bin centres
    measured: np.ndarray  # (n,) EPA of the detrended, whitened spectrum
    fitted: np.ndarray  # (n,) detrended CTF², scaled to the measured curve
    window_k_per_A: np.ndarray  # (w,) window centres
    window_correlation: np.ndarray  # (w,)


class FitError(ValueError):
    """A spectrum that cannot be fitted with these settings (the message says why)."""


# -- geometry and detrending -------------------------------------------------------------


@dataclass(frozen=True)
class _Pixels:
    """Spectrum pixels of one band: frequencies and the detrending projector."""

    k2: np.ndarray  # (n,) |k|² in 1/Å²
    cos2: np.ndarray  # (n,) cos 2θ
    sin2: np.ndarray  # (n,) sin 2θ
    basis: np.ndarray  # (n, d) orthonormal columns (Legendre in k, orthonormalised)
    data: np.ndarray  # (n,) detrended, whitened spectrum, orthogonal to ``basis``, unit norm
    radius_bin: np.ndarray  # (n,) int, 1-px rings


def _orthonormal_basis(k: np.ndarray, k_lo: float, k_hi: float) -> np.ndarray:
    """Legendre polynomials in k over [k_lo, k_hi], orthonormalised on the samples ``k``."""
    t = (2.0 * k - (k_lo + k_hi)) / max(k_hi - k_lo, 1e-12)
    raw = np.polynomial.legendre.legvander(t, DETREND_DEGREE)  # (n, d)
    q, _ = np.linalg.qr(raw)
    return q


def _project_out(basis: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``v`` minus its projection on the orthonormal columns of ``basis`` (last axis)."""
    return v - (v @ basis) @ basis.T


def _whiten(resid: np.ndarray, rbin: np.ndarray) -> np.ndarray:
    """``resid`` divided by a smooth RMS over radius (exp of a quadratic in the bin index).

    The RMS is per 1-px ring, fitted in log over rings, so it follows the envelope's
    decay but not single rings (it must not flatten the Thon rings it weights).
    """
    bins, inv = np.unique(rbin, return_inverse=True)
    energy = np.bincount(inv, resid * resid) / np.bincount(inv)
    good = energy > 0
    if good.sum() < 3:
        return resid
    coef = np.polyfit(bins[good].astype(np.float64), np.log(energy[good]), 2)
    rms = np.exp(0.5 * np.polyval(coef, bins.astype(np.float64)))
    return resid / rms[inv]


def _band_pixels(spectrum: np.ndarray, pixel_size_A: float, k_lo: float, k_hi: float) -> _Pixels:
    """The band's pixels of a ``(T, T // 2 + 1)`` spectrum, detrended and whitened."""
    t = spectrum.shape[0]
    ky, kx = rfft_frequencies(t, pixel_size_A)
    k = np.hypot(ky, kx)
    sel = (k >= k_lo) & (k <= k_hi)
    kk = k[sel]
    theta2 = 2.0 * np.arctan2(ky[sel], kx[sel])
    basis = _orthonormal_basis(kk, k_lo, k_hi)
    rbin = np.rint(kk * t * pixel_size_A).astype(np.int64)
    resid = _project_out(basis, spectrum[sel].astype(np.float64))
    data = _project_out(basis, _whiten(resid, rbin))
    norm = float(np.linalg.norm(data))
    if not norm > 0:
        raise FitError("the spectrum is flat in the fitting band")
    return _Pixels(kk * kk, np.cos(theta2), np.sin(theta2), basis, data / norm, rbin)


def fitting_band(tile_px: int, pixel_size_A: float, search: CtfSearch) -> tuple[float, float]:
    """``(k_lo, k_hi)`` in 1/Å: the band, its high limit capped at Nyquist (FitError if empty)."""
    nyquist = 1.0 / (2.0 * pixel_size_A)
    k_lo, k_hi = 1.0 / search.res_min_A, min(1.0 / search.res_max_A, nyquist)
    if (k_hi - k_lo) * tile_px * pixel_size_A < MIN_BAND_PX:
        raise FitError(
            f"the band {search.res_min_A:g}-{max(search.res_max_A, 2 * pixel_size_A):g} Å "
            f"spans under {MIN_BAND_PX} px of a {tile_px} px tile at {pixel_size_A:g} Å/px "
            "(check --angpix, --res-min, --tile)"
        )
    return k_lo, k_hi


# -- models and scores ------------------------------------------------------------------


def _gamma_terms(k2: np.ndarray, optics: OpticsParams):
    """Per-pixel ``(πλk², Cs term − amplitude-contrast phase)``: γ = −a·Δf + b − phase."""
    lam = electron_wavelength_A(optics.voltage_kV)
    q0 = optics.amplitude_contrast
    a = np.pi * lam * k2
    b = 0.5 * np.pi * optics.cs_mm * 1e7 * lam**3 * k2 * k2 - np.arctan(q0 / np.sqrt(1 - q0 * q0))
    return a, b


def _scores(models: np.ndarray, data: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Correlations ``(m,)`` of detrended models ``(m, n)`` with ``data`` (detrended, unit)."""
    # einsum's own loops, not BLAS: OpenBLAS threads on these thin products run several
    # times slower than one thread when the cores are busy (Dask threads, other jobs)
    proj = np.einsum("mn,nd->md", models, basis)  # (m, d)
    norm2 = np.einsum("ij,ij->i", models, models) - np.einsum("ij,ij->i", proj, proj)
    # data is orthogonal to the basis, so <data, Q·model> = <data, model>
    return np.einsum("mn,n->m", models, data) / np.sqrt(np.maximum(norm2, 1e-300))


def _ctf2(a, b, defocus, phase_rad):
    """CTF² = sin²(γ) for γ = −a·defocus + b − phase (broadcasting)."""
    return np.sin(-a * defocus + b - phase_rad) ** 2


def _score_2d(px: _Pixels, a, b, params: np.ndarray) -> np.ndarray:
    """Scores of parameter rows ``(m, 4)`` = (mean, c, s, phase rad) on the band pixels."""
    p = np.atleast_2d(params)
    defocus = p[:, :1] + p[:, 1:2] * px.cos2 + p[:, 2:3] * px.sin2  # (m, n)
    return _scores(_ctf2(a, b, defocus, p[:, 3:4]), px.data, px.basis)


def _rotational_average(px: _Pixels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean k² per ring, detrended unit data per ring, orthonormal ring basis)."""
    bins, inv = np.unique(px.radius_bin, return_inverse=True)
    count = np.bincount(inv).astype(np.float64)
    k2 = np.bincount(inv, px.k2) / count
    d1 = np.bincount(inv, px.data) / count
    k = np.sqrt(k2)
    basis = _orthonormal_basis(k, k[0], k[-1])
    d1 = _project_out(basis, d1)
    return k2, d1 / max(float(np.linalg.norm(d1)), 1e-300), basis


def search_1d(
    px: _Pixels, optics: OpticsParams, search: CtfSearch, n_candidates: int = 3
) -> list[tuple[float, float]]:
    """Exhaustive search on the rotational average: the best local maxima, best first.

    Returns up to ``n_candidates`` (mean defocus Å, phase shift rad); the 2-D steps try
    each, so a ring-count ambiguity of the rotational average is decided in 2-D.
    """
    k2, d1, basis = _rotational_average(px)
    a, b = _gamma_terms(k2, optics)
    step = 1.0 / (8.0 * electron_wavelength_A(optics.voltage_kV) * k2.max())
    defoci = np.arange(search.defocus_min_A, search.defocus_max_A + step, step)
    phases = np.deg2rad(np.arange(0.0, 180.0, 10.0)) if search.phase_shift else np.zeros(1)
    # (n_phase, n_defocus) scores; local maxima along defocus, then the best overall
    scores = np.stack([_scores(_ctf2(a, b, defoci[:, None], ph), d1, basis) for ph in phases])
    best = scores.max(axis=0)
    which = scores.argmax(axis=0)
    peak = np.r_[True, best[1:] > best[:-1]] & np.r_[best[:-1] >= best[1:], True]
    idx = np.nonzero(peak)[0]
    idx = idx[np.argsort(best[idx])[::-1][:n_candidates]]
    return [(float(defoci[i]), float(phases[which[i]])) for i in idx]


def _subsample(px: _Pixels, step: int) -> _Pixels:
    """Every ``step``-th band pixel, re-detrended (for the coarse 2-D grid: 4x faster)."""
    sl = slice(None, None, step)
    basis, _ = np.linalg.qr(px.basis[sl])
    data = _project_out(basis, px.data[sl])
    data = data / max(float(np.linalg.norm(data)), 1e-300)
    return _Pixels(px.k2[sl], px.cos2[sl], px.sin2[sl], basis, data, px.radius_bin[sl])


def _grid_2d(px, mean_A: float, phase: float, step_A: float, search: CtfSearch, optics):
    """Best (mean, c, s, phase) on a grid: mean ±1 step, (c, s) in the astigmatism disc.

    Scored on every 4th band pixel: the grid only has to land in the right basin.
    """
    px = _subsample(px, 4)
    a, b = _gamma_terms(px.k2, optics)
    h = 0.5 * search.astigmatism_max_A
    n = int(np.ceil(h / step_A))
    cs = np.arange(-n, n + 1) * step_A
    c, s = np.meshgrid(cs, cs, indexing="ij")
    keep = np.hypot(c, s) <= h + 1e-9
    rows = []
    for m in (mean_A - step_A, mean_A, mean_A + step_A):
        rows.append(np.stack([np.full(keep.sum(), m), c[keep], s[keep],
                              np.full(keep.sum(), phase)], axis=1))  # fmt: skip
    grid = np.concatenate(rows)  # (m, 4)
    scores = np.concatenate([_score_2d(px, a, b, g) for g in np.array_split(grid, 8)])
    return grid[int(np.argmax(scores))]


def _refine(px, a, b, start: np.ndarray, step_A: float, fit_phase: bool) -> np.ndarray:
    """Nelder-Mead on (mean, c, s[, phase]) from ``start``; returns the 4 parameters."""
    from scipy.optimize import minimize

    free = 4 if fit_phase else 3

    def cost(x):
        p = start.copy()
        p[:free] = x
        return -float(_score_2d(px, a, b, p)[0])

    scale = np.array([step_A, step_A, step_A, np.deg2rad(10.0)])[:free] * 0.5
    simplex = np.vstack([start[:free], start[:free] + np.diag(scale)])
    res = minimize(
        cost,
        start[:free],
        method="Nelder-Mead",
        options={"initial_simplex": simplex, "xatol": 0.5, "fatol": 1e-7, "maxiter": 600},
    )
    out = start.copy()
    out[:free] = res.x
    return out


def fit_ctf(
    spectrum: np.ndarray, pixel_size_A: float, optics: OpticsParams, search: CtfSearch
) -> tuple[CtfFit, FitDiagnostics]:
    """Fit RELION's CTF to an amplitude spectrum ``(T, T // 2 + 1)`` (module docstring).

    ``pixel_size_A``: the micrograph's (the tile's) pixel size. Raises :class:`FitError`
    when the band is too narrow for the tile or the spectrum is flat in it.
    """
    t = spectrum.shape[0]
    k_lo, k_hi = fitting_band(t, pixel_size_A, search)
    px = _band_pixels(spectrum, pixel_size_A, k_lo, k_hi)
    a, b = _gamma_terms(px.k2, optics)
    step = 1.0 / (4.0 * electron_wavelength_A(optics.voltage_kV) * k_hi * k_hi)
    fom, best = -np.inf, None
    for mean, phase in search_1d(px, optics, search):
        start = _grid_2d(px, mean, phase, step, search, optics)
        x = _refine(px, a, b, start, step, search.phase_shift)
        score = float(_score_2d(px, a, b, x)[0])
        if score > fom:
            fom, best = score, x
    m, c, s, ph = (float(v) for v in best)
    h = float(np.hypot(c, s))
    angle = float((0.5 * np.degrees(np.arctan2(s, c))) % 180.0)
    phase_deg = float(np.degrees(ph)) % 180.0 if search.phase_shift else 0.0
    diag = fit_resolution(spectrum, pixel_size_A, optics, m, c, s, ph, k_lo, search.fit_threshold)
    res = diag[0] if fom * np.sqrt(px.data.size) >= MIN_SIGNIFICANCE else FAILED_RESOLUTION_A
    fit = CtfFit(m + h, m - h, angle, phase_deg, fom, res)
    return fit, diag[1]


def fit_resolution(
    spectrum: np.ndarray,
    pixel_size_A: float,
    optics: OpticsParams,
    mean_A: float,
    c_A: float,
    s_A: float,
    phase_rad: float,
    k_lo: float,
    threshold: float,
) -> tuple[float, FitDiagnostics]:
    """Fit resolution (Å) by equiphase averaging to Nyquist (module docstring, step 5)."""
    px = _band_pixels(spectrum, pixel_size_A, k_lo, 1.0 / (2.0 * pixel_size_A))
    a, b = _gamma_terms(px.k2, optics)
    defocus = mean_A + c_A * px.cos2 + s_A * px.sin2
    # periods of sin²(γ) passed since k = 0 (γ's defocus and Cs part), monotone below
    # the Cs turn-over; 8 bins per period
    q0 = optics.amplitude_contrast
    periods = (a * defocus - b - np.arctan(q0 / np.sqrt(1 - q0 * q0))) / np.pi
    epa_bin = np.floor(periods * EPA_BINS_PER_PERIOD).astype(np.int64)
    bins, inv = np.unique(epa_bin, return_inverse=True)
    count = np.bincount(inv).astype(np.float64)
    measured = np.bincount(inv, px.data) / count
    model = np.bincount(inv, _ctf2(a, b, defocus, phase_rad)) / count
    k_bin = np.bincount(inv, np.sqrt(px.k2)) / count
    w = EPA_BINS_PER_PERIOD * EPA_WINDOW_PERIODS
    starts = np.arange(0, max(len(bins) - w + 1, 0), EPA_BINS_PER_PERIOD)
    corr = np.array([_pearson(measured[i : i + w], model[i : i + w]) for i in starts])
    if len(corr) >= 3:
        # running mean over 3 windows (1 period apart): one noisy window does not end it
        corr = np.convolve(np.pad(corr, 1, mode="edge"), np.ones(3) / 3.0, mode="valid")
    centres = np.array([k_bin[i : i + w].mean() for i in starts])
    below = np.nonzero(corr < threshold)[0] if len(corr) else np.zeros(0, dtype=np.int64)
    first_bad = int(below[0]) if len(below) else len(corr)
    if first_bad == 0:
        res = FAILED_RESOLUTION_A
    else:
        # the last good window's high edge
        i = starts[first_bad - 1]
        res = float(1.0 / k_bin[min(i + w, len(k_bin)) - 1])
        res = max(res, 2.0 * pixel_size_A)
    m0 = model - model.mean()
    scale = float(np.dot(measured, m0) / max(np.dot(m0, m0), 1e-300))
    return res, FitDiagnostics(k_bin, measured, scale * m0, centres, corr)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    den = float(np.sqrt(np.dot(x, x) * np.dot(y, y)))
    return float(np.dot(x, y) / den) if den > 0 else 0.0


def ctf2_half_plane(
    tile_px: int, pixel_size_A: float, optics: OpticsParams, fit: CtfFit
) -> np.ndarray:
    """The fitted CTF² on a tile's rfft half-plane ``(T, T // 2 + 1)`` (for display)."""
    from streamem.core.ctf import ctf_rfft

    ctf = ctf_rfft(
        tile_px,
        pixel_size_A,
        fit.defocus_u_A,
        fit.defocus_v_A,
        fit.defocus_angle_deg,
        optics,
        fit.phase_shift_deg,
        dtype=np.float64,
    )
    return np.asarray(ctf) ** 2
