"""Post-processing of two half maps, as ``relion_postprocess`` does it.

Steps (RELION 3.1+ ``postprocessing.cpp``; Chen et al. 2013, Rosenthal & Henderson 2003):

1. FSC of the unmasked half maps.
2. With a mask: FSC of the masked half maps, and of the masked half maps whose
   phases were randomised (independently for each half) from the first shell where
   the unmasked FSC falls below ``randomize_at_fsc`` (0.8) onwards. The mask-corrected
   FSC is ``(FSC_masked - FSC_rand) / (1 - FSC_rand)`` from two shells past that shell
   (RELION's margin against artefacts at the randomisation edge) and the masked FSC
   below. Why it works: masking both halves with the same mask spreads their strong,
   shared low-resolution signal into high shells, where it correlates regardless of
   the high-resolution signal; with the phases randomised beyond shell k_r only this
   spread correlates, so ``FSC_rand`` measures it, and the formula removes it (with
   ``P_s``, ``P_e``, ``P_u``: power of the real high-resolution signal, of the spread,
   and of the noise, ``FSC_masked = (P_s + P_e) / (P_s + P_e + P_u)`` and
   ``FSC_rand = P_e / (P_s + P_e + P_u)`` give ``P_s / (P_s + P_u)``).
3. The resolution where the corrected FSC first falls below 0.143, linearly
   interpolated between shells (RELION reports the last shell above; its
   ``--interpolate`` option interpolates as we do). As RELION does without
   ``--force_mask``, a masked curve that gives a worse resolution than the unmasked
   one is dropped in favour of the unmasked curve, with a warning.
4. Sharpening of the average of the half maps in Fourier space: divide by the
   detector MTF, weight each shell by ``sqrt(2 FSC / (1 + FSC))`` of the corrected
   FSC, fit the Guinier plot of the weighted map between ``fit_min_resolution_A``
   (10 Å) and the resolution, apply the B-factor ``4 · slope`` (negative: it
   sharpens) or the given one, and low-pass filter at the resolution with a
   raised-cosine edge of 2 shells. When the fit range holds fewer than 3 shells (the
   resolution is worse than ``fit_min_resolution_A``) nothing is fitted and, unless a
   B-factor is given, none is applied; a warning says so and every output is
   still made (RELION writes its outputs with a warning in this case too).

Where we differ from RELION, on purpose:

- The Guinier fit stops at the final resolution (RELION 3.1 fits to Nyquist unless
  ``--autob_highres`` is set; beyond the resolution the FSC-weighted amplitudes
  are mostly noise).
- With a mask, the Guinier plot used for the fit is that of the *masked* average
  (RELION uses the unmasked one). The corrected FSC describes the signal-to-noise
  ratio inside the mask; weighting the unmasked average by it leaves the solvent
  noise of the whole box in the amplitudes, which bends the plot upwards near the
  resolution and makes the B-factor too small. The sharpening itself is applied to
  the unmasked average, as in RELION, and the masked output is that times the mask.
  (When the unmasked FSC replaces the masked one, the fit uses the unmasked average.)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from streamem.core.backend import fftshift, ifftshift, irfftn, rfftn, xp_of
from streamem.core.filters import lowpass, phase_randomise
from streamem.core.fsc import fsc, resolution_at, shell_resolution_A
from streamem.post.guinier import (
    GuinierFit,
    apply_bfactor,
    apply_shell_weights,
    divide_by_mtf,
    fit_guinier,
    fsc_weights,
    guinier_curve,
    shell_frequency_squared,
)
from streamem.post.mask import mask_volume_fraction

_AXES = (0, 1, 2)


@dataclass(frozen=True)
class Mtf:
    """A detector MTF: ``value`` (> 0) at spatial frequency ``frequency_A`` (1/Å, increasing).

    :meth:`from_relion` converts RELION's table (``rlnResolutionInversePixel``, in
    1/pixel of the micrographs, and ``rlnMtfValue``).
    """

    frequency_A: np.ndarray
    value: np.ndarray

    @classmethod
    def from_relion(cls, inverse_pixel, value, micrograph_pixel_size_A: float) -> Mtf:
        f = np.asarray(inverse_pixel, dtype=np.float64) / float(micrograph_pixel_size_A)
        return cls(frequency_A=f, value=np.asarray(value, dtype=np.float64))


@dataclass(frozen=True)
class PostprocessResult:
    """What :func:`postprocess` found and made.

    FSC curves are float64 ``(B // 2 + 1,)`` over shells ``0 .. B // 2``; the masked
    ones are None without a mask (then ``fsc_corrected`` is the unmasked curve).
    Guinier curves are ``ln`` mean amplitude per shell against
    :attr:`frequency_squared_A2` (``-inf`` where empty): of the average map as it
    goes through the steps, and ``guinier_fitted`` the one the B-factor was fitted
    to (the masked, FSC-weighted average with a mask; None for a given B-factor). ``bfactor_A2`` is the
    B-factor applied (RELION's sign: negative sharpens); ``sharpened`` is the
    sharpened, low-passed average map ``(B, B, B)`` and ``sharpened_masked`` that
    times the mask.
    """

    box_size: int
    pixel_size_A: float
    fsc_unmasked: np.ndarray
    fsc_masked: np.ndarray | None
    fsc_random_masked: np.ndarray | None
    fsc_corrected: np.ndarray
    randomize_from_shell: int | None
    resolution_A: float
    bfactor_A2: float
    guinier_fit: GuinierFit | None
    guinier_in: np.ndarray
    guinier_invmtf: np.ndarray | None
    guinier_weighted: np.ndarray
    guinier_sharpened: np.ndarray
    guinier_fitted: np.ndarray | None
    lowpass_A: float
    mask_fraction: float | None
    sharpened: object
    sharpened_masked: object | None
    warnings: tuple[str, ...] = field(default=())

    @property
    def resolution_per_shell_A(self) -> np.ndarray:
        """Resolution (Å) of shells ``0 .. B // 2`` (shell 0: inf)."""
        return shell_resolution_A(self.box_size, self.pixel_size_A)

    @property
    def frequency_squared_A2(self) -> np.ndarray:
        """``s²`` (1/Å²) of shells ``0 .. B // 2``, the Guinier plot's x axis."""
        return shell_frequency_squared(self.box_size, self.pixel_size_A)

    @property
    def randomize_from_A(self) -> float | None:
        if self.randomize_from_shell is None:
            return None
        return self.box_size * self.pixel_size_A / self.randomize_from_shell


def randomize_shell(fsc_unmasked, randomize_at_fsc: float = 0.8) -> int:
    """First shell (> 0) where the FSC falls below ``randomize_at_fsc``.

    Raises ValueError if it never does (RELION stops there too).
    """
    c = np.asarray(fsc_unmasked, dtype=np.float64)
    below = np.flatnonzero(c[1:] < randomize_at_fsc)
    if below.size == 0:
        raise ValueError(f"the unmasked FSC never falls below {randomize_at_fsc}")
    return int(below[0]) + 1


def corrected_fsc(fsc_masked, fsc_random_masked, randomize_from_shell: int) -> np.ndarray:
    """Mask-corrected FSC (Chen et al. 2013): ``(t - n) / (1 - n)`` from shell
    ``randomize_from_shell + 2`` on, the masked FSC ``t`` below (module docstring)."""
    t = np.asarray(fsc_masked, dtype=np.float64).copy()
    n = np.asarray(fsc_random_masked, dtype=np.float64).copy()
    # RELION: "sometimes the FSC at the origin becomes -1"
    t[0] = 1.0 if t[0] <= 0 else t[0]
    n[0] = 1.0 if n[0] <= 0 else n[0]
    out = t.copy()
    k = np.arange(t.shape[0])
    use = (k >= randomize_from_shell + 2) & (n < 1.0)
    out[use] = (t[use] - n[use]) / (1.0 - n[use])
    return out


def phase_randomised_masked_fsc(
    half1, half2, mask, randomize_from_shell: int, pixel_size_A: float, rng
) -> np.ndarray:
    """FSC of the masked half maps after randomising each one's phases (independently)
    at shells ``>= randomize_from_shell``."""
    B = half1.shape[-1]
    # core's phase_randomise keeps shells with round(|k|) <= B·p/resolution
    beyond_A = B * pixel_size_A / (randomize_from_shell - 0.5)
    r1 = phase_randomise(half1, beyond_A, pixel_size_A, rng)
    r2 = phase_randomise(half2, beyond_A, pixel_size_A, rng)
    return fsc(r1 * mask, r2 * mask)


def _fft(x):
    return rfftn(ifftshift(x, _AXES), _AXES)


def _ifft(F, box_size: int):
    return fftshift(irfftn(F, (box_size,) * 3, _AXES), _AXES)


def _last_shell_above(curve, threshold: float) -> int:
    below = np.flatnonzero(np.asarray(curve)[1:] < threshold)
    return int(below[0]) if below.size else len(curve) - 1


def postprocess(
    half1,
    half2,
    pixel_size_A: float,
    mask=None,
    bfactor_A2: float | None = None,
    mtf: Mtf | None = None,
    fit_min_resolution_A: float = 10.0,
    fit_max_resolution_A: float | None = None,
    randomize_at_fsc: float = 0.8,
    randomize_at_A: float | None = None,
    fsc_weighting: bool = True,
    lowpass_A: float | None = None,
    filter_edge_width_shells: float = 2.0,
    fsc_threshold: float = 0.143,
    force_mask: bool = False,
    seed: int = 0,
) -> PostprocessResult:
    """Mask-corrected FSC, resolution and the sharpened map from two half maps.

    Parameters
    ----------
    half1, half2 : real ``(B, B, B)`` unfiltered half maps (NumPy or CuPy).
    pixel_size_A : voxel size (Å).
    mask : ``(B, B, B)`` in [0, 1], or None (then only the unmasked FSC is used).
    bfactor_A2 : B-factor to apply (negative sharpens, as RELION's ``--adhoc_bfac``);
        None fits it from the Guinier plot (``--auto_bfac``).
    mtf : detector MTF to divide by, or None.
    fit_min_resolution_A, fit_max_resolution_A : Guinier fit range; the upper end
        defaults to the final resolution.
    randomize_at_fsc, randomize_at_A : randomise phases from the first shell where
        the unmasked FSC < ``randomize_at_fsc``, or from ``randomize_at_A`` if given.
    fsc_weighting : weight shells by ``sqrt(2 FSC / (1 + FSC))``.
    lowpass_A : low-pass resolution of the output; default the final resolution.
    seed : seed of the phase randomisation.

    When the Guinier range holds fewer than 3 shells (a map at lower resolution
    than ``fit_min_resolution_A``; RELION does the same) no B-factor is fitted:
    a warning, ``bfactor_A2`` 0 and ``guinier_fit`` None; FSCs, resolution, FSC
    weighting and low-pass as usual.

    Raises ValueError on maps of different shapes, a non-cubic box, a mask outside
    [0, 1], or an unmasked FSC that never falls below ``randomize_at_fsc``.
    """
    if half1.shape != half2.shape or half1.ndim != 3 or len(set(half1.shape)) != 1:
        raise ValueError(f"half maps must be cubic and alike: {half1.shape} vs {half2.shape}")
    if mask is not None:
        if mask.shape != half1.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the maps' {half1.shape}")
        if float(mask.min()) < -1e-6 or float(mask.max()) > 1 + 1e-6:
            raise ValueError("mask values must lie in [0, 1]")
    xp = xp_of(half1, half2, mask)
    B = half1.shape[0]
    notes: list[str] = []

    fsc_unmasked = fsc(half1, half2)
    fsc_masked = fsc_rand = None
    k_rand = None
    masked_fsc_used = mask is not None
    if mask is None:
        fsc_corr = fsc_unmasked.copy()
    else:
        fsc_masked = fsc(half1 * mask, half2 * mask)
        if randomize_at_A is not None:
            k_rand = max(int(B * pixel_size_A / randomize_at_A), 1)
        else:
            k_rand = randomize_shell(fsc_unmasked, randomize_at_fsc)
        rng = np.random.default_rng(seed)
        fsc_rand = phase_randomised_masked_fsc(half1, half2, mask, k_rand, pixel_size_A, rng)
        fsc_corr = corrected_fsc(fsc_masked, fsc_rand, k_rand)
        if _last_shell_above(fsc_unmasked, fsc_threshold) > _last_shell_above(
            fsc_corr, fsc_threshold
        ):
            if force_mask:
                notes.append("the unmasked FSC extends beyond the mask-corrected FSC")
            else:
                notes.append(
                    "the unmasked FSC extends beyond the mask-corrected FSC: using the "
                    "unmasked FSC (adjust the mask, or force it)"
                )
                fsc_corr = fsc_unmasked.copy()
                masked_fsc_used = False
        elif fsc_rand[_last_shell_above(fsc_corr, fsc_threshold)] > 0.1:
            notes.append(
                "the phase-randomised FSC is above 0.10 at the resolution: use a softer mask"
            )
    resolution = resolution_at(fsc_corr, fsc_threshold, B, pixel_size_A)

    # Sharpening: the average of the halves in Fourier space.
    avg = 0.5 * (xp.asarray(half1) + xp.asarray(half2))
    F = _fft(avg)
    guinier_in = guinier_curve(F, pixel_size_A)
    guinier_invmtf = None
    if mtf is not None:
        F = divide_by_mtf(F, pixel_size_A, mtf.frequency_A, mtf.value)
        guinier_invmtf = guinier_curve(F, pixel_size_A)
    weights = fsc_weights(fsc_corr) if fsc_weighting else np.ones(B // 2 + 1)
    if fsc_weighting:
        F = apply_shell_weights(F, weights)
    guinier_weighted = guinier_curve(F, pixel_size_A)

    fit = fit_curve = None
    if bfactor_A2 is None:
        fit_curve = guinier_weighted
        if masked_fsc_used:  # the weights describe the signal-to-noise inside the mask
            Fm = _fft(avg * mask)
            if mtf is not None:
                Fm = divide_by_mtf(Fm, pixel_size_A, mtf.frequency_A, mtf.value)
            fit_curve = guinier_curve(apply_shell_weights(Fm, weights), pixel_size_A)
        hi = resolution if fit_max_resolution_A is None else fit_max_resolution_A
        try:
            fit = fit_guinier(fit_curve, B, pixel_size_A, fit_min_resolution_A, hi)
            bfactor = fit.bfactor_A2
        except ValueError as exc:
            # RELION: a map at lower resolution than the fit range is not sharpened;
            # the FSCs, the resolution and the (weighted, low-passed) maps still count
            fit, fit_curve, bfactor = None, None, 0.0
            notes.append(
                f"{exc}: no B-factor fitted and no sharpening applied (give --bfactor "
                "to sharpen, or --autob-lowres for a lower-resolution fit range)"
            )
    else:
        bfactor = float(bfactor_A2)
    if bfactor != 0.0:
        F = apply_bfactor(F, bfactor, pixel_size_A)
    guinier_sharpened = guinier_curve(F, pixel_size_A)

    applied_lowpass = resolution if lowpass_A is None else float(lowpass_A)
    sharpened = _ifft(F, B).astype(xp.float32)
    sharpened = lowpass(sharpened, applied_lowpass, pixel_size_A, filter_edge_width_shells)
    sharpened_masked = None if mask is None else (sharpened * mask).astype(xp.float32)

    for note in notes:
        warnings.warn(note, stacklevel=2)
    return PostprocessResult(
        box_size=B,
        pixel_size_A=float(pixel_size_A),
        fsc_unmasked=fsc_unmasked,
        fsc_masked=fsc_masked,
        fsc_random_masked=fsc_rand,
        fsc_corrected=fsc_corr,
        randomize_from_shell=k_rand,
        resolution_A=float(resolution),
        bfactor_A2=float(bfactor),
        guinier_fit=fit,
        guinier_in=guinier_in,
        guinier_invmtf=guinier_invmtf,
        guinier_weighted=guinier_weighted,
        guinier_sharpened=guinier_sharpened,
        guinier_fitted=fit_curve,
        lowpass_A=float(applied_lowpass),
        mask_fraction=None if mask is None else mask_volume_fraction(mask),
        sharpened=sharpened,
        sharpened_masked=sharpened_masked,
        warnings=tuple(notes),
    )


def plot_fsc(result: PostprocessResult, ax=None):
    """FSC curves against 1/resolution, as RELION's ``postprocess_fsc.eps``; returns ax."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    s = np.sqrt(result.frequency_squared_A2)
    ax.plot(s, result.fsc_corrected, "k", lw=2, label="corrected")
    ax.plot(s, result.fsc_unmasked, "g", lw=1, label="unmasked")
    if result.fsc_masked is not None:
        ax.plot(s, result.fsc_masked, "b", lw=1, label="masked")
        ax.plot(s, result.fsc_random_masked, "r", lw=1, label="phase-randomised masked")
    ax.axhline(0.143, color="0.5", ls="--", lw=0.8)
    ax.axhline(0.0, color="0.8", lw=0.5)
    ax.set_xlabel("resolution (1/Å)")
    ax.set_ylabel("Fourier shell correlation")
    ax.set_title(f"Final resolution = {result.resolution_A:.2f} Å")
    ax.set_ylim(-0.1, 1.05)
    ax.legend(fontsize=8)
    return ax


def plot_guinier(result: PostprocessResult, ax=None):
    """Guinier plots (``ln`` amplitude against s²) and the fitted line; returns ax."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    x = result.frequency_squared_A2
    curves = [
        (result.guinier_in, "k", "input"),
        (result.guinier_invmtf, "g", "divided by MTF"),
        (result.guinier_weighted, "b", "FSC-weighted"),
        (result.guinier_sharpened, "r", f"sharpened (B = {result.bfactor_A2:.0f} Å²)"),
    ]
    nyq = x <= (1.0 / (2.0 * result.pixel_size_A)) ** 2 + 1e-12
    for y, colour, label in curves:
        if y is None:
            continue
        ok = nyq & np.isfinite(y)
        ax.plot(x[ok], y[ok], colour, lw=1, label=label)
    fit = result.guinier_fit
    if fit is not None and result.guinier_fitted is not result.guinier_weighted:
        ok = nyq & np.isfinite(result.guinier_fitted)
        ax.plot(x[ok], result.guinier_fitted[ok], "c", lw=1, label="FSC-weighted, masked")
    if fit is not None:
        xs = np.array([1 / fit.min_resolution_A**2, 1 / fit.max_resolution_A**2])
        ax.plot(xs, fit.intercept + fit.slope_A2 * xs, "m--", lw=1, label="fit")
    ax.set_xlabel("resolution² (1/Å²)")
    ax.set_ylabel("ln(amplitude)")
    ax.set_title("Guinier plots")
    ax.legend(fontsize=8)
    return ax


__all__ = [
    "Mtf",
    "PostprocessResult",
    "corrected_fsc",
    "phase_randomised_masked_fsc",
    "plot_fsc",
    "plot_guinier",
    "postprocess",
    "randomize_shell",
]
