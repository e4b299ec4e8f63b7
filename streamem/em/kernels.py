"""The E-step's kernels: pure functions over arrays of any namespace (NumPy, CuPy,
array_api_strict), with batch dimensions; the GEMMs of the coarse and fine passes, the
log-likelihood and priors, normalised posteriors, weighted sums and segment sums.

For image i, orientation j, translation t and noise spectrum σ²(k), with X the image's
Fourier transform, c its CTF and A_j the reference's central slice:

    diff2[i,t,j] = Σ_k |X_i,t|²/2σ² + Σ_k c_i² |A_j|²/2σ² − Re Σ_k conj(X_i,t) c_i A_j/σ²

The first term does not depend on t (a shift is a phase), the second is a GEMM
(images × orientations) and the third a real GEMM of the real and imaginary parts side
by side (:func:`stacked_real`), ((images·translations) × 2M) @ (2M × orientations), so
the passes run at BLAS speed; the likelihood is exp(−diff2).
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
from array_api_compat import array_namespace as _compat_namespace
from array_api_compat import is_cupy_array, is_numpy_array

from streamem.core.projector import slice_power


def namespace(*arrays) -> ModuleType:
    """The array namespace of the given arrays (None and Python scalars ignored).

    NumPy arrays give ``numpy`` itself (the fastest calls and the attributes the host
    code uses); any other arrays (CuPy, array_api_strict) their standard namespace
    through ``array_api_compat``, so a kernel written against the standard runs on all.
    """
    arrays = [a for a in arrays if a is not None and not isinstance(a, (int, float, complex))]
    if all(is_numpy_array(a) or np.isscalar(a) for a in arrays):
        return np
    return _compat_namespace(*[a for a in arrays if not np.isscalar(a)])


def _cumsum(xp, x, axis: int):
    fn = getattr(xp, "cumulative_sum", None)
    return fn(x, axis=axis) if fn is not None else xp.cumsum(x, axis=axis)


def stacked_real(z):
    """The real operand of a complex GEMM: z (..., M) complex as (..., 2M) real, each
    point's real and imaginary parts side by side (Re z₀, Im z₀, Re z₁, ...).

    Σ_m Re(conj(a_m) b_m) is then the real dot product of the two operands. That
    interleaved layout is the complex array's own memory: on NumPy and CuPy a view of a
    C-contiguous array (no copy: stacking every part's slices was ~5% of a box-128 local
    E-step, scratch profile), elsewhere (the standard has no views) a stack of the parts.
    """
    real = {np.dtype(np.complex64): np.float32, np.dtype(np.complex128): np.float64}
    if (is_numpy_array(z) or is_cupy_array(z)) and z.dtype in real and z.flags.c_contiguous:
        return z.view(real[z.dtype])
    xp = namespace(z)
    parts = xp.stack([xp.real(z), xp.imag(z)], axis=-1)
    return xp.reshape(parts, (*z.shape[:-1], 2 * z.shape[-1]))


def complex_of_stacked(r):
    """The inverse of :func:`stacked_real`: (..., 2M) real → (..., M) complex."""
    kind = {np.dtype(np.float32): np.complex64, np.dtype(np.float64): np.complex128}
    if (is_numpy_array(r) or is_cupy_array(r)) and r.dtype in kind and r.flags.c_contiguous:
        return r.view(kind[r.dtype])
    xp = namespace(r)
    one_j = xp.asarray(1j, dtype=xp.complex64 if r.dtype == xp.float32 else xp.complex128)
    return xp.astype(r[..., 0::2], one_j.dtype) + xp.astype(r[..., 1::2], one_j.dtype) * one_j


def cross_terms(Xs, cw, refs):
    """Re Σ_k conj(Xs) · cw · A as one real GEMM.

    Xs: (n, T, M) complex shifted images; cw: (n, M) CTF/σ²; refs: (J, M) complex.
    Returns (n, T, J) float32.
    """
    xp = namespace(Xs, refs)
    n, T, M = Xs.shape
    Z = xp.astype(Xs * cw[:, None, :], xp.complex64, copy=False)  # conj(Z)·A = conj(Xs)·cw·A
    lhs = xp.reshape(stacked_real(Z), (n * T, 2 * M))
    rhs = stacked_real(xp.astype(refs, xp.complex64, copy=False))  # (J, 2M)
    out = xp.matmul(lhs, rhs.mT)
    return xp.reshape(out, (n, T, -1))


def ref_power_terms(ctf2w, refs):
    """Σ_k c² |A_j|² / 2σ²: (n, M) @ (M, J) → (n, J). ``ctf2w`` = c²/σ².

    refs: (J, M) the complex slices A_j, or their |A_j|² (real, from
    :func:`streamem.core.projector.slice_power`: kept with slices used more than once).
    """
    xp = namespace(ctf2w, refs)
    power = slice_power(refs) if xp.isdtype(refs.dtype, "complex floating") else refs
    power = xp.astype(power, xp.float32, copy=False)
    return 0.5 * xp.matmul(xp.astype(ctf2w, xp.float32, copy=False), power.mT)


def log_likelihood(C, S, norm, scale_free: bool = False):
    """−diff2 from the GEMM terms (module docstring): −(norm + S − C).

    With ``scale_free`` the reference's scale a is optimised per sample,
    diff2 = norm + a²S − aC, minimal at a = C/2S: log-likelihood −norm + C²/4S for
    C > 0 (else a = 0). Used for the first iteration, when the starting map is not on
    the data's greyscale (RELION's --firstiter_cc, kept probabilistic).
    """
    if not scale_free:
        return -(norm + S - C)
    xp = namespace(C, S)
    S = xp.clip(S, min=1e-30)
    return -norm + xp.where(C > 0, C * C / (4.0 * S), xp.zeros_like(C))


def coarse_log_posterior(C, S, offset_prior, scale_free: bool, row_prior=None):
    """The coarse pass's log-posterior (n, T, J) float32, built in C's memory.

    C: (n, T, J) float32 cross terms (overwritten unless ``scale_free``); S: (n, J)
    reference power terms; offset_prior: (n, T) log prior of the translations;
    row_prior: optional (n, J) log prior per image and orientation row (class
    fractions, local-search angular prior; −inf excludes a row). Single precision is
    enough: the coarse pass only ranks samples for the fine pass, and C comes from an
    SGEMM already; the in-place sums avoid three float64 temporaries of n·T·J.
    """
    xp = namespace(C, S)
    f32 = xp.float32
    if scale_free:
        logp = xp.astype(log_likelihood(C, S[:, None, :], 0.0, True), f32)
        if row_prior is not None:
            logp += xp.astype(row_prior, f32)[:, None, :]
    else:
        logp = C
        bias = S if row_prior is None else S - row_prior
        logp -= xp.astype(bias, f32)[:, None, :]
    logp += xp.astype(offset_prior, f32)[:, :, None]
    return logp


def offset_log_prior(total_shift_px, sigma_offset_A: float, pixel_size_A: float):
    """log N(total offset; 0, σ²) in 2-D, up to a constant. total_shift_px: (..., 2)."""
    xp = namespace(total_shift_px)
    s2 = (sigma_offset_A / pixel_size_A) ** 2
    return -xp.sum(total_shift_px**2, axis=-1) / (2 * s2)


def segment_sums(keys: np.ndarray, *values):
    """Sum the rows of each array in ``values`` that share a key.

    keys: (R,) int on the host; values: (R, ...) arrays (any namespace). Returns
    (unique keys (U,) on the host, then one (U, ...) array of sums per input). Rows are
    sorted by key and summed segment by segment: in the array API as a cumulative sum
    read at the segment ends (no scatter-add there); on the host each segment's first
    row plus its k-th rows, one pass per k (most segments hold one row: a
    back-projection flush's complex128 rows summed ~10x faster than by the cumulative
    sum, and in order, with no prefix sums to difference).
    """
    order = np.argsort(keys, kind="stable")
    used, starts = np.unique(keys[order], return_index=True)
    lengths = np.diff(np.append(starts, keys.size))
    ends = starts + lengths - 1
    segment = np.repeat(np.arange(used.size), lengths)  # of each sorted row
    rank = np.arange(keys.size) - starts[segment]  # its place in its segment
    out = []
    for v in values:
        xp = namespace(v)
        if xp is np:
            v = v[order]
            total = v[starts]
            for k in range(1, int(lengths.max(initial=1))):
                rows = np.flatnonzero(rank == k)
                total[segment[rows]] += v[rows]
            out.append(total)
            continue
        c = _cumsum(xp, xp.take(v, xp.asarray(order), axis=0), axis=0)
        e = xp.take(c, xp.asarray(ends), axis=0)
        out.append(xp.concat([e[:1, ...], e[1:, ...] - e[:-1, ...]], axis=0))
    return (used, *out)


def normalised_posterior(logp):
    """Row-wise posterior of log-posteriors.

    logp: (n, S) real, −inf allowed (padding, excluded samples; each row needs one
    finite value). Returns (W (n, S) in logp's dtype, rows summing to 1; lse (n,)
    float64 log Σ_s exp(logp); best (n,) int index of each row's largest sample), all
    in logp's namespace. Use float64 logp where the terms cancel (the fine pass).
    """
    xp = namespace(logp)
    top = xp.max(logp, axis=1, keepdims=True)  # (n, 1)
    top = xp.where(xp.isfinite(top), top, xp.zeros_like(top))
    e = xp.exp(logp - top)
    total = xp.sum(e, axis=1, keepdims=True)
    W = e / total
    lse = xp.astype(top[:, 0], xp.float64) + xp.log(xp.astype(total[:, 0], xp.float64))
    return W, lse, xp.argmax(logp, axis=1)


def significant_weights_rows(W, fraction: float):
    """RELION's significant weights, row by row: per row of W (n, S) (rows summing to 1,
    or any non-negative weights) the largest weights holding ``fraction`` of the row's
    mass are kept and renormalised, the rest set to 0.

    Sort, cumulative sum and prefix on the device. Returns (W' (n, S), count (n,) int:
    the significant samples per row). Row by row the same as
    :func:`streamem.em.significance.significant_weights`.
    """
    xp = namespace(W)
    n, S = W.shape
    order = xp.argsort(-W, axis=1, stable=True)  # (n, S) largest first
    cum = _cumsum(xp, xp.take_along_axis(W, order, axis=1), axis=1)  # (n, S)
    target = fraction * cum[:, -1:]
    count = xp.sum(xp.astype(cum < target, xp.int64), axis=1) + 1
    count = xp.clip(count, max=S)  # (n,)
    kept_mass = xp.take_along_axis(cum, (count - 1)[:, None], axis=1)  # (n, 1)
    rank = xp.argsort(order, axis=1, stable=True)  # position of each sample in the order
    keep = rank < count[:, None]
    out = xp.where(keep, W / kept_mass, xp.zeros_like(W))
    return out, count


def weighted_image_sums(W, Y):
    """Σ_s W[..., s, r] · Y[..., s, m] as real GEMMs on stacked real/imaginary parts.

    W: (..., S, R) real weights; Y: (..., S, M) complex (images at S samples). Returns
    (..., R, M) complex, in Y's complex dtype. One GEMM (R × S) @ (S × 2M) per batch.
    """
    xp = namespace(W, Y)
    real = xp.real(Y).dtype
    out = xp.matmul(xp.astype(W, real, copy=False).mT, stacked_real(Y))  # (..., R, 2M)
    return complex_of_stacked(out)


def weighted_real_sums(W, Y):
    """Σ_s W[..., s, r] · Y[..., s, m] for real Y: one GEMM (R × S) @ (S × M) per batch.

    W: (..., S, R) real weights; Y: (..., S, M) real. Returns (..., R, M) in the
    promoted real dtype (class2d's CTF²/σ² weight sums and Σ_j w |A_j|²).
    """
    xp = namespace(W, Y)
    return xp.matmul(W.mT, Y)
