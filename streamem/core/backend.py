"""Array-namespace helpers and FFTs for NumPy, CuPy and array-API arrays.

The device follows the data: every function looks at the type of its input
(``array_api_compat.array_namespace``) and never copies between host and device
(except :func:`to_numpy` and :func:`asarray_like`, whose job that is).

``xp_of`` returns the array's own module: ``numpy``, ``cupy`` or a strict array-API
namespace such as ``array_api_strict`` (the tests' stand-in for a GPU library that
has only what the standard promises). Core numerics write standard calls
(``xp.reshape``, ``xp.where``, full indices with ``...``) and go through the shims
below for what the standard lacks; each shim keeps NumPy's and CuPy's fast native
path (``np.add.at``, ``np.bincount``, fancy assignment) and falls back to standard
operations (sort, cumulative sums, ``searchsorted``, ``where``) elsewhere.

NumPy FFTs go through ``scipy.fft`` with ``workers`` (multithreaded pocketfft);
CuPy FFTs through ``cupy.fft``, whose plans CuPy caches; other namespaces through
their ``xp.fft`` extension.
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


# Not arrays for xp_of: None, Python and NumPy scalars, lists and tuples.
_NOT_ARRAYS = (type(None), bool, int, float, complex, str, np.generic, list, tuple)


def _is_array(a) -> bool:
    return not isinstance(a, _NOT_ARRAYS)


def xp_of(*arrays) -> ModuleType:
    """The array module of the given arrays: ``numpy``, ``cupy`` or e.g. ``array_api_strict``.

    ``None``, Python scalars and lists are ignored; no arrays gives ``numpy``. Arrays
    of different libraries raise ``TypeError`` (no silent host/device mixing), except
    that NumPy arrays may ride along with CuPy ones (CuPy converts them, as before).
    """
    # isinstance first: this runs per kernel call, and array_api_compat's checks
    # cost ~30 µs each (measured: 5% of project_points at box 128 without this).
    others = [a for a in arrays if not isinstance(a, np.ndarray) and _is_array(a)]
    if not others:
        return np
    if any(is_cupy_array(a) for a in others):
        import cupy

        return cupy
    if any(isinstance(a, np.ndarray) for a in arrays):
        raise TypeError(f"NumPy arrays mixed with {type(others[0]).__module__} arrays")
    ns = _array_namespace(*others)  # raises on mixed or unknown types
    # array_api_compat wraps NumPy/CuPy; a strict namespace is returned as itself.
    return np if ns.__name__.startswith("array_api_compat.numpy") else ns


def is_numpy_namespace(xp) -> bool:
    return xp is np


def has_numpy_api(xp) -> bool:
    """NumPy or CuPy: the NumPy API beyond the standard (fancy assignment, ``ufunc.at``,
    in-place ops that cast, ``.view``, ``.flags``), used for the fast paths."""
    return xp is np or xp.__name__ == "cupy"


# --------------------------------------------------------------------------------------
# Host/device transfers


def to_numpy(x) -> np.ndarray:
    """A host copy of ``x`` (no copy for NumPy input; strict arrays via ``__array__``)."""
    if isinstance(x, np.ndarray):
        return x
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def asarray_like(x, like, dtype=None):
    """``x`` in the namespace and on the device of ``like`` (no copy if already there).

    The one explicit host/device move: NumPy -> CuPy or strict uploads, CuPy or
    strict -> NumPy downloads (through :func:`to_numpy`).
    """
    xp = xp_of(like)
    if xp is np:
        out = to_numpy(x)
        return out if dtype is None else out.astype(dtype, copy=False)
    if xp.__name__ == "cupy":
        return xp.asarray(x, dtype=dtype)
    if _is_array(x) and xp_of(x) is not xp:
        x = to_numpy(x)
    return xp.asarray(x, dtype=dtype, device=like.device)


# --------------------------------------------------------------------------------------
# Element-wise shims


def astype(x, dtype, copy: bool = True):
    """``x`` as ``dtype``: method on NumPy/CuPy, function in the standard (no method)."""
    if isinstance(x, np.ndarray) or is_cupy_array(x):
        return x.astype(dtype, copy=copy)
    return xp_of(x).astype(x, dtype, copy=copy)


def copy(x):
    """A copy of ``x`` (``x.copy()`` is not in the standard; ``asarray(copy=)`` not in CuPy 13)."""
    if isinstance(x, np.ndarray) or is_cupy_array(x):
        return x.copy()
    return xp_of(x).asarray(x, copy=True)


def is_complex(x) -> bool:
    """Complex dtype? (``np.iscomplexobj`` is not in the standard; ``isdtype`` not in CuPy 13.)"""
    return np.dtype(str(x.dtype).split(".")[-1]).kind == "c"


def real(x):
    """Real part (``x.real`` is not in the standard; real input is returned as is)."""
    return xp_of(x).real(x) if is_complex(x) else x


def imag(x):
    """Imaginary part (``x.imag`` is not in the standard); zeros for real input."""
    xp = xp_of(x)
    return xp.imag(x) if is_complex(x) else xp.zeros_like(x)


def conj(x):
    """Complex conjugate (standard ``xp.conj`` rejects real input; identity for it)."""
    return xp_of(x).conj(x) if is_complex(x) else x


def make_complex(re, im):
    """``re + 1j * im`` in the complex dtype of ``re`` (no ``complex`` constructor in the standard)."""
    xp = xp_of(re, im)
    ctype = xp.complex64 if re.dtype == xp.float32 else xp.complex128
    if xp is np:
        out = np.empty(re.shape, dtype=ctype)
        out.real = re
        out.imag = im
        return out
    return astype(re, ctype) + astype(im, ctype) * 1j


def atan2(y, x):
    """Four-quadrant arctangent (``np.arctan2``/``cupy.arctan2``; ``atan2`` in the standard)."""
    xp = xp_of(y, x)
    return xp.atan2(y, x) if hasattr(xp, "atan2") else xp.arctan2(y, x)


def sinc(x):
    """Normalised ``sin(pi x) / (pi x)`` (not in the standard)."""
    xp = xp_of(x)
    if hasattr(xp, "sinc"):
        return xp.sinc(x)
    t = np.pi * xp.where(x == 0, 1.0, x)
    return xp.where(x == 0, 1.0, xp.sin(t) / t)


def logsumexp(x, axis=None):
    """``log(sum(exp(x)))`` along ``axis``, stable, ``-inf`` rows give ``-inf``
    (``scipy.special.logsumexp`` is NumPy only)."""
    xp = xp_of(x)
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)
    s = xp.sum(xp.exp(x - m), axis=axis, keepdims=True)
    out = xp.where(s > 0, xp.log(xp.where(s > 0, s, 1.0)) + m, -xp.inf)
    return xp.squeeze(out, axis=axis) if axis is not None else xp.reshape(out, ())


def cumulative_sum(x, axis: int = 0, include_initial: bool = False):
    """Standard ``cumulative_sum`` (NumPy and CuPy 13 spell it ``cumsum``)."""
    xp = xp_of(x)
    if hasattr(xp, "cumulative_sum"):
        return xp.cumulative_sum(x, axis=axis, include_initial=include_initial)
    c = xp.cumsum(x, axis=axis)
    if not include_initial:
        return c
    shape = list(x.shape)
    shape[axis] = 1
    return xp.concatenate([xp.zeros(shape, dtype=c.dtype), c], axis=axis)


def flatnonzero(mask):
    """Indices (int64) of the true entries of a boolean array, flattened (not in the standard)."""
    xp = xp_of(mask)
    if xp is np:
        return np.flatnonzero(mask)
    return astype(xp.nonzero(xp.reshape(mask, (-1,)))[0], xp.int64, copy=False)


# --------------------------------------------------------------------------------------
# Gathers and scatters


def take_rows(x, index):
    """``x[index]`` along axis 0 for an integer ``index`` of any shape ->
    ``index.shape + x.shape[1:]`` (standard ``take`` wants 1-D indices)."""
    xp = xp_of(x)
    if has_numpy_api(xp):
        return x[index]
    flat = xp.take(x, xp.reshape(index, (-1,)), axis=0)
    return xp.reshape(flat, tuple(index.shape) + tuple(x.shape[1:]))


def _sorted_segments(index, size: int):
    """Order, sorted keys and per-key ``[lo, hi)`` bounds of an int index over ``0..size-1``."""
    xp = xp_of(index)
    index = xp.reshape(index, (-1,))
    order = xp.argsort(index)
    keys = xp.take(index, order)
    slots = xp.arange(size, dtype=keys.dtype)
    lo = xp.searchsorted(keys, slots, side="left")
    hi = xp.searchsorted(keys, slots, side="right")
    return order, keys, lo, hi


def bincount(index, weights=None, minlength: int = 0):
    """Sum of real ``weights`` (or counts) per non-negative int ``index`` (``np.bincount``),
    length ``max(minlength, max(index) + 1)``; float64 with weights, int64 without.

    The standard has no scatter: elsewhere a stable sort, a cumulative sum and two
    ``searchsorted`` give the segment sums without writing by index.
    """
    xp = xp_of(index, weights)
    if has_numpy_api(xp):
        return xp.bincount(xp.reshape(index, (-1,)), weights=weights, minlength=minlength)
    flat_index = xp.reshape(index, (-1,))
    n = int(xp.max(flat_index)) + 1 if flat_index.shape[0] else 0
    size = max(int(minlength), n)
    order, _, lo, hi = _sorted_segments(flat_index, size)
    if weights is None:
        return astype(hi - lo, xp.int64)
    w = xp.take(astype(xp.reshape(weights, (-1,)), xp.float64), order)
    cs = cumulative_sum(w, include_initial=True)
    return xp.take(cs, hi) - xp.take(cs, lo)


def add_at(acc, index, values):
    """``acc[index] += values`` on a 1-D ``acc`` with repeated indices summed; returns ``acc``.

    In place on NumPy (``np.add.at``, fast for 1-D operands of one dtype: measured
    ~15 ns per element, ~5x faster than ``bincount`` into a fresh array at box 128)
    and CuPy (``add.at`` or ``cupyx.scatter_add``, atomic adds). The standard has
    neither, so elsewhere the result is ``acc`` plus :func:`bincount`'s segment sums
    (real and imaginary parts apart), written back with ``acc[...] = ...``. Callers
    use the return value.
    """
    xp = xp_of(acc)
    index = xp.reshape(index, (-1,))
    # in acc's precision: CuPy's atomic adds take one dtype (float32 ones are native)
    values = astype(xp.reshape(values, (-1,)), acc.dtype, copy=False)
    if xp is np:
        np.add.at(acc, index, values)
        return acc
    if xp.__name__ == "cupy":
        try:
            xp.add.at(acc, index, values)
        except (AttributeError, NotImplementedError):  # CuPy before ufunc.at
            import cupyx

            cupyx.scatter_add(acc, index, values)
        return acc
    n = acc.shape[0]
    add = bincount(index, real(values), n)
    if is_complex(acc):
        add = make_complex(add, bincount(index, imag(values), n))
    acc[...] = acc + astype(add, acc.dtype)
    return acc


def scatter_unique(index, values, size: int):
    """Values ``batch + (M,)`` placed at distinct ``index`` ``(M,)`` of a zeroed last axis of
    length ``size`` -> ``batch + (size,)`` (``out[..., index] = values``, not in the standard)."""
    xp = xp_of(values)
    batch = tuple(values.shape[:-1])
    if has_numpy_api(xp):
        out = xp.zeros(batch + (size,), dtype=values.dtype)
        out[..., index] = values
        return out
    if index.shape[0] == 0:
        return xp.zeros(batch + (size,), dtype=values.dtype)
    order, keys, lo, hi = _sorted_segments(index, size)
    src = xp.take(order, xp.clip(lo, 0, keys.shape[0] - 1))  # lo == hi: slot not in index
    gathered = xp.take(values, src, axis=values.ndim - 1)
    return xp.where(hi > lo, gathered, xp.zeros((), dtype=values.dtype))


# --------------------------------------------------------------------------------------
# FFTs (scipy.fft with threads on NumPy, cupy.fft, or the namespace's fft extension)


def _fft_module(x):
    if isinstance(x, np.ndarray):
        import scipy.fft

        return scipy.fft, {"workers": FFT_WORKERS}
    if is_cupy_array(x):
        import cupy.fft

        return cupy.fft, {}
    return xp_of(x).fft, {}


def rfftn(x, axes):
    """Real-to-complex FFT over ``axes`` (non-centred layout)."""
    mod, kw = _fft_module(x)
    return mod.rfftn(x, axes=tuple(axes), **kw)


def irfftn(x, s, axes):
    """Inverse of :func:`rfftn`; ``s`` is the real-space shape over ``axes``."""
    mod, kw = _fft_module(x)
    return mod.irfftn(x, s=tuple(s), axes=tuple(axes), **kw)


def fftshift(x, axes):
    """Centre the zero frequency over ``axes`` (``xp.fft.fftshift``)."""
    return xp_of(x).fft.fftshift(x, axes=axes)


def ifftshift(x, axes):
    """Inverse of :func:`fftshift`."""
    return xp_of(x).fft.ifftshift(x, axes=axes)
