"""Shared fixtures: ``xp``, one test body for every array backend.

``xp`` runs a test with NumPy, with ``array_api_strict`` (a strict array-API
namespace on the CPU: a NumPy-only call in the numerics fails there before it
reaches a GPU) and with CuPy where it imports and sees a GPU (marked ``gpu``).
"""

import numpy as np
import pytest


def _cupy():
    cp = pytest.importorskip("cupy")
    try:
        cp.cuda.runtime.getDeviceCount()
    except Exception as err:  # CuPy installed but no driver or device
        pytest.skip(f"no CUDA device: {err}")
    return cp


@pytest.fixture(
    params=[
        "numpy",
        "array_api_strict",
        pytest.param("cupy", marks=pytest.mark.gpu),
    ]
)
def xp(request):
    """The array module under test (``numpy``, ``array_api_strict`` or ``cupy``)."""
    if request.param == "numpy":
        return np
    if request.param == "array_api_strict":
        return pytest.importorskip("array_api_strict")
    return _cupy()
