"""RELION's contrast transfer function (``src/ctf.h``) on a Fourier grid.

For spatial frequency k (1/Å) at angle θ from +x towards +y:

    Δf(θ) = U cos²(θ − φ) + V sin²(θ − φ)                    (Å, positive = underfocus)
    γ     = −π λ Δf k² + (π/2) Cs λ³ k⁴ − atan(Q0/√(1−Q0²)) − phase_shift
    CTF   = −sin(γ) · exp(−B k²/4)

λ = 12.2643247 / √(V (1 + 0.978466e-6 V)) Å with V in volts; Cs in Å (mm · 1e7).
With this sign the CTF is positive at low frequency ("white" particles).

Functions take any leading batch dims of per-image parameters and return CTFs on
the rfft grid of an image, shape ``batch + (B, B // 2 + 1)``, in the array
namespace of ``like`` (NumPy by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamem.core.backend import asarray_like, astype, atan2, xp_of


def electron_wavelength_A(voltage_kV: float) -> float:
    """Relativistic electron wavelength in Å for an accelerating voltage in kV."""
    volts = voltage_kV * 1e3
    return float(12.2643247 / np.sqrt(volts * (1.0 + 0.978466e-6 * volts)))


@dataclass(frozen=True)
class OpticsParams:
    """Microscope optics shared by an optics group (RELION's ``data_optics``)."""

    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1

    def __post_init__(self):
        if self.voltage_kV <= 0:
            raise ValueError(f"voltage_kV must be positive, got {self.voltage_kV}")
        if not 0 <= self.amplitude_contrast < 1:
            raise ValueError(f"amplitude_contrast must be in [0, 1), got {self.amplitude_contrast}")


def rfft_frequencies(box_size: int, pixel_size_A: float, xp=np):
    """Frequency components (ky, kx) in 1/Å on the rfft grid of a square image.

    Returns two arrays of shape ``(B, B // 2 + 1)``.
    """
    ky = xp.fft.fftfreq(box_size, d=pixel_size_A)
    kx = xp.fft.rfftfreq(box_size, d=pixel_size_A)
    return xp.meshgrid(ky, kx, indexing="ij")


def ctf_phase_from_frequencies(
    ky, kx, defocus_u_A, defocus_v_A, defocus_angle_deg, optics: OpticsParams, phase_shift_deg=0.0
):
    """RELION's phase γ (radians) at frequencies ``(ky, kx)``; ``CTF = −sin(γ)·envelope``.

    Shapes as in :func:`ctf_from_frequencies`. ``|γ| < π/2`` is the region before the
    first CTF peak (used by pickers that ignore the CTF up to its first peak).
    """
    xp = xp_of(kx)

    def per_image(v):
        # per-image parameters (host metadata) go to the frequencies' namespace/device
        v = asarray_like(v, kx, xp.float64)
        return xp.reshape(v, tuple(v.shape) + (1,) * kx.ndim)

    U, V, phi = per_image(defocus_u_A), per_image(defocus_v_A), per_image(defocus_angle_deg)
    phase = per_image(phase_shift_deg)
    lam = electron_wavelength_A(optics.voltage_kV)
    cs_A = optics.cs_mm * 1e7
    k2 = kx * kx + ky * ky
    theta = atan2(ky, kx)
    angle = theta - phi * (np.pi / 180.0)
    defocus = U * xp.cos(angle) ** 2 + V * xp.sin(angle) ** 2
    q0 = optics.amplitude_contrast
    return (
        -np.pi * lam * defocus * k2
        + 0.5 * np.pi * cs_A * lam**3 * k2 * k2
        - float(np.arctan(q0 / np.sqrt(1.0 - q0 * q0)))  # a Python float: NumPy scalars
        # would turn another namespace's array into a NumPy one
        - phase * (np.pi / 180.0)
    )


def ctf_from_frequencies(
    ky,
    kx,
    defocus_u_A,
    defocus_v_A,
    defocus_angle_deg,
    optics: OpticsParams,
    phase_shift_deg=0.0,
    bfactor_A2=0.0,
):
    """RELION's CTF at frequencies ``(ky, kx)`` (1/Å, any shape G).

    Per-image parameters have a batch shape S (or are scalars); the result has shape
    ``S + G`` in the array namespace of ``kx``.
    """
    xp = xp_of(kx)
    gamma = ctf_phase_from_frequencies(
        ky, kx, defocus_u_A, defocus_v_A, defocus_angle_deg, optics, phase_shift_deg
    )
    B = asarray_like(bfactor_A2, kx, xp.float64)
    B = xp.reshape(B, tuple(B.shape) + (1,) * kx.ndim)
    return -xp.sin(gamma) * xp.exp(-B * (kx * kx + ky * ky) / 4.0)


def ctf_rfft(
    box_size: int,
    pixel_size_A: float,
    defocus_u_A,
    defocus_v_A,
    defocus_angle_deg,
    optics: OpticsParams,
    phase_shift_deg=0.0,
    bfactor_A2=0.0,
    xp=np,
    dtype=None,
):
    """CTFs on the rfft grid of a ``box_size`` image: ``S + (B, B // 2 + 1)``.

    ``dtype`` defaults to float32 (the E-step's precision); pass float64 for tests.
    """
    ky, kx = rfft_frequencies(box_size, pixel_size_A, xp)
    out = ctf_from_frequencies(
        ky, kx, defocus_u_A, defocus_v_A, defocus_angle_deg, optics, phase_shift_deg, bfactor_A2
    )
    return astype(out, dtype or xp.float32)


def phase_flip(ctf):
    """Sign of the CTF (phase flipping), with zeros mapped to +1."""
    xp = xp_of(ctf)
    one = xp.ones((), dtype=ctf.dtype)
    return xp.where(ctf < 0, -one, one)
