"""Amplitude corrections of a map in Fourier space: Guinier plot and B-factor fit,
B-factor sharpening, MTF division and FSC weighting (RELION's ``postprocessing.cpp``).

All functions take a map's rfft-grid transform ``(B, B, B // 2 + 1)`` (complex, the
non-centred layout of :mod:`streamem.core.fourier`) and return a new one; shell k is
spatial frequency ``s = k / (B * pixel_size_A)`` in 1/Å.

B-factor convention (RELION's): an amplitude envelope ``exp(-B s² / 4)``, so a map
whose amplitudes fall as ``exp(-B_decay s² / 4)`` has a Guinier plot
``ln|F| = -B_decay / 4 · s² + c``. RELION fits the straight line and reports
``4 · slope = -B_decay`` (negative) as the B-factor *used for sharpening*, and
:func:`apply_bfactor` with that value multiplies by ``exp(+B_decay s² / 4)``,
undoing the decay. :class:`GuinierFit` keeps RELION's sign in ``bfactor_A2`` and
gives the decay as ``decay_bfactor_A2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamem.core.backend import to_numpy, xp_of
from streamem.core.fourier import radial_average, rfft_multiplicity, rfft_radius, shell_index


@dataclass(frozen=True)
class GuinierFit:
    """Straight line ``ln|F| = slope · s² + intercept`` fitted over a resolution range.

    ``bfactor_A2 = 4 · slope`` (RELION's ``rlnBfactorUsedForSharpening``, negative for
    a decaying map); ``correlation`` is Pearson's r of the fitted points.
    """

    slope_A2: float
    intercept: float
    correlation: float
    min_resolution_A: float
    max_resolution_A: float
    n_points: int

    @property
    def bfactor_A2(self) -> float:
        return 4.0 * self.slope_A2

    @property
    def decay_bfactor_A2(self) -> float:
        """The amplitude decay B (positive for a blurred map): ``-4 · slope``."""
        return -4.0 * self.slope_A2


def _box(F) -> int:
    return int(F.shape[0])


def shell_frequency_squared(box_size: int, pixel_size_A: float) -> np.ndarray:
    """``s² = (k / (B · pixel_size_A))²`` (1/Å²) for shells ``0 .. B // 2``."""
    k = np.arange(box_size // 2 + 1, dtype=np.float64)
    return (k / (box_size * pixel_size_A)) ** 2


def guinier_curve(F, pixel_size_A: float) -> np.ndarray:
    """``ln`` of the mean amplitude per shell ``0 .. B // 2`` (float64 NumPy).

    Shells with no amplitude give ``-inf`` (RELION writes -99 there). The mean is over
    the full Fourier grid (rfft points weighted by their multiplicity). Plot against
    :func:`shell_frequency_squared`.
    """
    xp = xp_of(F)
    B = _box(F)
    n = B // 2 + 1
    shells = shell_index(B, 3, xp)
    mean_amp = to_numpy(radial_average(xp.abs(F), shells, n, rfft_multiplicity(B, 3, xp)))
    with np.errstate(divide="ignore"):
        return np.where(mean_amp > 0, np.log(np.where(mean_amp > 0, mean_amp, 1.0)), -np.inf)


def fit_guinier(
    ln_amplitude,
    box_size: int,
    pixel_size_A: float,
    min_resolution_A: float = 10.0,
    max_resolution_A: float | None = None,
) -> GuinierFit:
    """Least-squares line through the Guinier plot between two resolutions.

    Uses the shells with ``max_resolution_A <= B·p/k <= min_resolution_A`` and a finite
    value; ``max_resolution_A=None`` means Nyquist. Raises ValueError if fewer than 3
    shells qualify.
    """
    y = np.asarray(ln_amplitude, dtype=np.float64)
    s2 = shell_frequency_squared(box_size, pixel_size_A)
    k = np.arange(y.shape[0], dtype=np.float64)
    with np.errstate(divide="ignore"):
        res = np.where(k > 0, box_size * pixel_size_A / np.where(k > 0, k, 1.0), np.inf)
    lo = 2.0 * pixel_size_A if max_resolution_A is None else max(max_resolution_A, 0.0)
    use = (res <= min_resolution_A) & (res >= lo - 1e-9) & np.isfinite(y)
    if int(use.sum()) < 3:
        raise ValueError(
            f"Guinier fit between {min_resolution_A:.2f} and {lo:.2f} Å has "
            f"{int(use.sum())} shells (need >= 3)"
        )
    x, yy = s2[use], y[use]
    slope, intercept = np.polyfit(x, yy, 1)
    corr = float(np.corrcoef(x, yy)[0, 1]) if np.ptp(yy) > 0 else 1.0
    return GuinierFit(
        slope_A2=float(slope),
        intercept=float(intercept),
        correlation=corr,
        min_resolution_A=float(min_resolution_A),
        max_resolution_A=float(lo),
        n_points=int(use.sum()),
    )


def _frequency_A(F, pixel_size_A: float):
    """|s| (1/Å) on the rfft grid of F."""
    B = _box(F)
    return rfft_radius(B, 3, xp_of(F)) / (B * pixel_size_A)


def apply_bfactor(F, bfactor_A2: float, pixel_size_A: float):
    """Multiply by ``exp(-bfactor_A2 · s² / 4)`` up to Nyquist and zero beyond (RELION's
    ``applyBFactorToMap``); a negative B sharpens."""
    xp = xp_of(F)
    s = _frequency_A(F, pixel_size_A)
    nyquist = 1.0 / (2.0 * pixel_size_A)
    env = xp.where(s <= nyquist + 1e-12, xp.exp(-(bfactor_A2 / 4.0) * s * s), 0.0)
    return F * env


def mtf_on_grid(F, pixel_size_A: float, mtf_frequency_A, mtf_value):
    """The MTF at each rfft-grid point, linearly interpolated in |s| (1/Å) and held
    constant beyond the table's ends.

    ``mtf_frequency_A`` (1/Å, increasing) and ``mtf_value`` (> 0) are the curve; a
    detector table in ``rlnResolutionInversePixel`` is in 1/pixel of the micrograph
    and becomes 1/Å on division by the micrograph pixel size.
    """
    xp = xp_of(F)
    f = np.asarray(mtf_frequency_A, dtype=np.float64)
    v = np.asarray(mtf_value, dtype=np.float64)
    if f.ndim != 1 or f.shape != v.shape or f.size < 2:
        raise ValueError("MTF needs two 1-D arrays of equal length >= 2")
    if np.any(np.diff(f) <= 0):
        raise ValueError("MTF frequencies must increase")
    if np.any(v <= 1e-10):
        raise ValueError("MTF values must be positive")
    s = _frequency_A(F, pixel_size_A)
    return xp.interp(s, xp.asarray(f), xp.asarray(v))


def divide_by_mtf(F, pixel_size_A: float, mtf_frequency_A, mtf_value):
    """Divide by the detector MTF up to Nyquist (RELION's ``divideByMtf``)."""
    xp = xp_of(F)
    s = _frequency_A(F, pixel_size_A)
    mtf = mtf_on_grid(F, pixel_size_A, mtf_frequency_A, mtf_value)
    return xp.where(s < 1.0 / (2.0 * pixel_size_A), F / mtf, F)


def fsc_weights(fsc_curve) -> np.ndarray:
    """Per-shell weights ``sqrt(2 FSC / (1 + FSC))`` (Rosenthal & Henderson 2003).

    The weight is 0 where the FSC is <= 0 and at every shell from the first whose FSC
    falls below 1e-4 onwards (RELION's ``applyFscWeighting``).
    """
    c = np.asarray(to_numpy(fsc_curve), dtype=np.float64)
    w = np.sqrt(np.clip(2.0 * c / (1.0 + np.clip(c, 0.0, None)), 0.0, None))
    low = np.flatnonzero(c < 1e-4)
    if low.size:
        w[low[0] :] = 0.0
    return w


def apply_shell_weights(F, weights):
    """Multiply each rfft-grid point by ``weights[round(|k|)]``; shells past the end get 0."""
    xp = xp_of(F)
    B = _box(F)
    w = np.asarray(to_numpy(weights), dtype=np.float64)
    table = xp.asarray(np.concatenate([w, np.zeros(B)]))  # shells up to B/2·sqrt(3)
    return F * table[shell_index(B, 3, xp)]
