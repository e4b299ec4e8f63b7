"""Array-namespace helpers and FFTs for NumPy and CuPy arrays.

The device follows the data: every function looks at the type of its input
(``array_api_compat.array_namespace``) and never copies between host and device.
NumPy FFTs go through ``scipy.fft`` with ``workers`` (multithreaded pocketfft);
CuPy FFTs through ``cupy.fft``, whose plans CuPy caches.
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np
from array_api_compat import array_namespace as _array_namespace
from array_api_compat import is_cupy_array

# Threads per FFT call on the CPU. Dask already runs one task per core, so the
# default is 1; a standalone call (bench, reconstruct on the client) may raise it.
FFT_WORKERS = int(os.environ.get("STREAMEM_FFT_WORKERS", "1"))


def xp_of(*arrays) -> ModuleType:
    """The array module (``numpy`` or ``cupy``) of the given arrays."""
    arrays = [a for a in arrays if a is not None and not np.isscalar(a)]
    if not arrays:
        return np
    if any(is_cupy_array(a) for a in arrays):
        import cupy

        return cupy
    _array_namespace(*arrays)  # raises on mixed or unknown types
    return np


def _fft_module(x):
    if is_cupy_array(x):
        import cupy.fft

        return cupy.fft, {}
    import scipy.fft

    return scipy.fft, {"workers": FFT_WORKERS}


def rfftn(x, axes):
    """Real-to-complex FFT over ``axes`` (non-centred layout)."""
    mod, kw = _fft_module(x)
    return mod.rfftn(x, axes=axes, **kw)


def irfftn(x, s, axes):
    """Inverse of :func:`rfftn`; ``s`` is the real-space shape over ``axes``."""
    mod, kw = _fft_module(x)
    return mod.irfftn(x, s=s, axes=axes, **kw)


def fftshift(x, axes):
    return xp_of(x).fft.fftshift(x, axes=axes)


def ifftshift(x, axes):
    return xp_of(x).fft.ifftshift(x, axes=axes)


def to_numpy(x) -> np.ndarray:
    """A host copy of ``x`` (no copy for NumPy input)."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)
