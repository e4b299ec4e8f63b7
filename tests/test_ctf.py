"""RELION's CTF formula (ctf.h) at hand-computed frequencies."""

import numpy as np
import pytest

from streamem.core.ctf import OpticsParams, ctf_from_frequencies, ctf_rfft, electron_wavelength_A


def test_wavelength_300kV():
    # 12.2643247 / sqrt(3e5 * (1 + 0.978466e-6 * 3e5)) = 0.019687 A
    assert electron_wavelength_A(300) == pytest.approx(0.0196875, rel=1e-5)
    assert electron_wavelength_A(200) == pytest.approx(0.0250793, rel=1e-5)


def test_value_at_hand_computed_frequency():
    optics = OpticsParams(voltage_kV=300, cs_mm=2.7, amplitude_contrast=0.1)
    lam = 12.2643247 / np.sqrt(3e5 * (1 + 0.978466e-6 * 3e5))
    k = 0.1  # 1/A, along +x: theta = 0, angle phi = 0 -> defocus = U
    U = 20000.0
    gamma = (
        -np.pi * lam * U * k**2
        + 0.5 * np.pi * 2.7e7 * lam**3 * k**4
        - np.arctan(0.1 / np.sqrt(0.99))
    )
    got = ctf_from_frequencies(np.array(0.0), np.array(k), U, 15000.0, 0.0, optics)
    assert float(got) == pytest.approx(-np.sin(gamma), abs=1e-12)


def test_astigmatism_angle():
    optics = OpticsParams()
    k = 0.08
    # frequency along +y (theta 90) with defocus angle 90 sees defocus U
    along_y = ctf_from_frequencies(np.array(k), np.array(0.0), 21000.0, 17000.0, 90.0, optics)
    along_x_no_astig = ctf_from_frequencies(
        np.array(0.0), np.array(k), 21000.0, 21000.0, 0.0, optics
    )
    assert float(along_y) == pytest.approx(float(along_x_no_astig), abs=1e-12)


def test_positive_at_low_frequency_and_dc():
    optics = OpticsParams(amplitude_contrast=0.1)
    c = ctf_rfft(64, 1.5, 15000.0, 15000.0, 0.0, optics, dtype=np.float64)
    assert c.shape == (64, 33)
    assert c[0, 0] == pytest.approx(0.1, abs=1e-12)  # -sin(-atan(Q0/sqrt(1-Q0^2))) = Q0
    assert c[0, 1] > 0


def test_bfactor_envelope_and_batch():
    optics = OpticsParams()
    base = ctf_rfft(
        32, 2.0, [10000.0, 20000.0], [10000.0, 20000.0], [0.0, 0.0], optics, dtype=np.float64
    )
    damped = ctf_rfft(
        32,
        2.0,
        [10000.0, 20000.0],
        [10000.0, 20000.0],
        [0.0, 0.0],
        optics,
        bfactor_A2=100.0,
        dtype=np.float64,
    )
    assert base.shape == (2, 32, 17)
    k2 = (np.fft.rfftfreq(32, 2.0) ** 2)[3]
    assert damped[0, 0, 3] == pytest.approx(base[0, 0, 3] * np.exp(-100 * k2 / 4), rel=1e-12)


def test_phase_shift_90_degrees():
    optics = OpticsParams(amplitude_contrast=0.0)
    c = ctf_rfft(16, 1.0, 0.0, 0.0, 0.0, optics, phase_shift_deg=90.0, dtype=np.float64)
    assert c[0, 0] == pytest.approx(1.0)
