"""The template scan as a few large array operations per micrograph (issue 24).

The reference scan (:func:`streamem.pick.scan._scan_loop`) rotates each template's
spectrum for every psi by bilinear interpolation, multiplies by the filter and the
micrograph and inverse-transforms, batch by batch. Profiled on a 2048-px micrograph
at 3.59 Å/px (work grid 750 px, 48 templates x 72 psi; ``streamem bench pick``):
the interpolation (4 gathers of every template at every work-grid frequency, per psi)
cost more than the inverse FFTs, and the FFTs ran on one thread. Here:

- **Filter on the micrograph.** ``conj(T̂ · f) · X̂ = conj(T̂) · (f · X̂)`` for the real
  filter f (low-pass x CTF x sign), so ``Y = f · X̂`` is formed once and the templates
  are never filtered.
- **Only the disc.** Outside the low-pass disc Y is zero: templates are interpolated
  at the M work-grid frequencies inside it (~π/4 of the half grid), from the part of
  the padded transform those frequencies reach (a few hundred KB per template, which
  stays in cache), stored frequency-major ``(M, n)`` so that each gather moves all n
  templates of one frequency at once.
- **Quarter turns for free.** With ψ' = ψ + 90°, ``T̂_ψ'(k) = T̂_ψ(A₉₀ᵀ k)`` and
  ``A₉₀ᵀ`` maps the work grid onto itself (|k| is kept, so the disc onto itself): the
  spectra at ψ + 90° are a permutation (with Hermitian conjugation where the rotated
  frequency falls in the other half plane) of those at ψ, exact, no interpolation.
  ψ + 180° needs nothing: ``conj(T̂_ψ+180) = T̂_ψ`` for real templates, so its
  correlation is the inverse transform of ``T̂_ψ · Y``. With a psi step that divides
  90° only a quarter of the angles are interpolated (half when it divides 180°).
- **One batched inverse FFT** per (template batch, angle): ``(W, W//2+1, n)`` ->
  ``(W, W, n)``, on all cores of the worker (``scipy.fft`` ``workers``; CuPy's FFT on
  a GPU), at the FFT-friendly work size of :func:`streamem.pick.micrograph.work_grid`.
- **The key without the map of C.** The scan key z = C·npix/‖A‖ with
  ``C = (cc − μ ⟨A⟩) / σ`` is ``(cc' − μ b) / σ`` with cc' = cc·npix/‖A‖ (a per-template
  factor folded into the spectra) and ``b = ⟨A⟩ npix/‖A‖``; σ > 0 is the same for all
  templates at a pixel, so the best template is the argmax of ``cc' − μ b`` and only
  the winner is divided by σ (C of the winner follows from its z).

The results equal the reference scan's to float32 rounding (tests/test_pick.py:
``test_batched_scan_matches_the_reference_loop``; the bench compares the picks).
Arrays follow the micrograph's namespace (NumPy or CuPy).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.fft

from streamem.core.backend import xp_of
from streamem.pick.bank import TemplateBank, bilinear_plan_at
from streamem.pick.micrograph import WorkGrid, grid_frequencies, lowpass_filter

TARGET_ELEMENTS = 3.0e7  # (W, W, n_batch) floats per batch: ~120 MB at float32


def fft_workers(workers: int | None = None) -> int:
    """FFT threads of the scan: ``workers``, else ``STREAMEM_PICK_FFT_WORKERS``, else all
    cores this process may use."""
    if workers:
        return max(1, int(workers))
    env = os.environ.get("STREAMEM_PICK_FFT_WORKERS")
    if env:
        return max(1, int(env))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _irfft2_batch(F, W: int, xp, workers: int):
    """Inverse real FFT over axes (0, 1) of ``(W, W//2+1, n)`` -> ``(W, W, n)`` float32."""
    if xp.__name__ == "numpy":
        return scipy.fft.irfft2(F, s=(W, W), axes=(0, 1), workers=workers)
    return xp.fft.irfft2(F, s=(W, W), axes=(0, 1)).astype(xp.float32)


class DiscPlan:
    """Where the templates' spectra are needed, and their quarter-turn map.

    All ``W·(W//2+1)`` points of the half grid, row-major (so that the interpolated
    spectra are the FFT's input without a scatter), with ``inside`` True in the
    low-pass disc (weights are zero elsewhere); ``ky``, ``kx`` float64 their S-box
    frequencies; ``perm``, ``flip`` ``(N,)``: the spectrum at ψ + 90° at point m is that
    at ψ at point ``perm[m]``, conjugated where ``flip`` (None when the shortcut is not
    exact: no low-pass disc strictly inside the grid).
    """

    def __init__(self, grid: WorkGrid, xp):
        W = grid.work_px
        Wh = W // 2 + 1
        inside = np.asarray(_to_host(lowpass_filter(grid, xp))) > 0
        ky, kx = (np.asarray(_to_host(a)) for a in grid_frequencies(grid, np))
        self.inside = inside.ravel()
        self.ky, self.kx = ky.ravel(), kx.ravel()
        self.n_points = int(self.inside.size)
        r2 = self.ky[self.inside] ** 2 + self.kx[self.inside] ** 2
        self.radius = float(np.sqrt(r2.max())) if r2.size else 0.0
        # ψ + 90°: value at k is T̂_ψ(ky' = kx, kx' = −ky); kx' < 0 lies in the other half
        # plane, where T̂(q) = conj(T̂(−q)) (real templates)
        iky, ikx = np.rint(self.ky).astype(np.int64), np.rint(self.kx).astype(np.int64)
        flip = (iky > 0) & self.inside
        src_r = np.where(flip, -ikx, ikx) % W
        src_c = np.where(flip, iky, -iky)
        ok = (src_c >= 0) & (src_c < Wh)
        perm = np.arange(self.n_points)  # outside the disc: itself (zero there)
        perm[self.inside & ok] = (src_r * Wh + src_c)[self.inside & ok]
        # exact only strictly inside the Nyquist square: there the padded transform's
        # Hermitian symmetry holds for every interpolated point (without a low-pass the
        # Nyquist row and column and the corners break it, and the reference samples
        # them as they are)
        inner = grid.cutoff_shell is not None and self.radius < W / 2 - 1
        if inner and np.all(ok[self.inside]) and np.all(self.inside[perm[self.inside]]):
            self.perm, self.flip = xp.asarray(perm), xp.asarray(flip[:, None])
        else:
            self.perm = self.flip = None

    def bilinear(self, psi_deg: float, size_px: int, P: int, lo: int, Pc: int, xp):
        """Indices ``(4, N)`` into a ``Pc x Pc`` crop (offset ``lo``) of the centred
        ``P x P`` transform, and weights ``(4, N)`` (zero outside the disc): bilinear
        interpolation at ``Aᵀk`` (:func:`streamem.pick.bank.bilinear_plan_at`)."""
        index, weight = bilinear_plan_at(
            self.ky, self.kx, psi_deg, P / size_px, P // 2 - lo, Pc, np
        )
        weight *= self.inside.astype(np.float32)
        return xp.asarray(index), xp.asarray(weight)


def _to_host(a):
    from streamem.core.backend import to_numpy

    return to_numpy(a)


def _crop(bank: TemplateBank, plan: DiscPlan, size_px: int) -> tuple[int, int]:
    """Offset and size of the square of the padded transform the disc's rotations reach."""
    P = bank.ft.shape[-1]
    half = int(math.ceil(plan.radius * P / size_px)) + 2
    lo, hi = max(0, P // 2 - half), min(P, P // 2 + half + 1)
    return lo, hi - lo


def _angle_groups(psi_list: np.ndarray, symmetric: bool) -> list[tuple[float, list]]:
    """(base angle, [(variant, psi)]) with variant 0: as is, 1: +90°, 2: +180°, 3: +270°
    (``symmetric`` False: every angle interpolated, variant 0 only)."""
    n = len(psi_list)
    turns = 1 if not symmetric else 4 if n % 4 == 0 else 2 if n % 2 == 0 else 1
    m = n // turns
    variants = {1: [0], 2: [0, 2], 4: [0, 1, 2, 3]}[turns]
    step = {1: 0, 2: 2, 4: 1}[turns]  # variant v is psi index i + (v // step) * m
    out = []
    for i in range(m):
        vs = [(v, float(psi_list[i + (v // step if step else 0) * m])) for v in variants]
        out.append((float(psi_list[i]), vs))
    return out


def scan_batched(
    prepared,
    bank: TemplateBank,
    filt,
    moments,
    psi_list,
    s_fixed,
    workers=None,
    coarse_factor: int = 1,
    separation_px: float = 0.0,
):
    """The batched scan (module docstring); returns :class:`streamem.pick.scan._Best`.

    ``coarse_factor`` > 1: scan every ``coarse_factor``-th angle of ``psi_list``, then
    score the angles between at the candidate peaks (:mod:`streamem.pick.psi_refine`,
    ``separation_px`` work pixels apart); the counts of that step are in the returned
    best's ``refined`` (when that step would cost more than the FFTs it saves, every
    angle is scanned instead and ``refined`` is None).

    On NumPy the angle groups of each template batch are split into ``workers``
    contiguous runs scanned on as many threads (one FFT thread each: NumPy and
    pocketfft release the GIL, so the interpolation and the reduction run in parallel
    too, not only the FFTs); the threads' bests are merged in angle order with the same
    strict ``>`` as one thread, so the result is the sequential scan's, bit for bit.
    Each thread holds its own buffers: the template batch is cut to keep the total
    within :data:`TARGET_ELEMENTS`.
    """
    from streamem.pick.scan import _batch_size, _Best

    grid = prepared.grid
    xp = xp_of(prepared.ft)
    W = grid.work_px
    nthreads = fft_workers(workers)
    plan = DiscPlan(grid, xp)
    groups = _angle_groups(psi_list[::coarse_factor], plan.perm is not None)
    n_runs = min(nthreads, len(groups)) if xp.__name__ == "numpy" else 1
    scan = _Scan(prepared, bank, filt, moments, s_fixed, plan, xp, nthreads // n_runs)
    n = bank.n_templates
    nb = _batch_size(n, W, TARGET_ELEMENTS / n_runs)
    runs = [list(r) for r in np.array_split(np.arange(len(groups)), n_runs)]
    best = _Best.empty(W, xp)
    with ThreadPoolExecutor(max_workers=n_runs) as pool:
        for start in range(0, n, nb):
            which = np.arange(start, min(n, start + nb))
            batch = scan.batch(which)
            parts = pool.map(batch.scan, [[groups[i] for i in run] for run in runs])
            for part in parts:  # in angle order: ties keep the earlier angle
                best.update(part.key, part.c, part.p, part.cls, part.psi, xp)
    if coarse_factor > 1:
        from streamem.pick.psi_refine import refine_psi

        best.refined = refine_psi(best, scan, psi_list, coarse_factor, separation_px)
        if best.refined is None:  # real-space scoring would cost more: every angle by FFT
            return scan_batched(prepared, bank, filt, moments, psi_list, s_fixed, workers)
    return best


class _Scan:
    """What every template batch and angle of one micrograph's scan shares."""

    def __init__(self, prepared, bank, filt, moments, s_fixed, plan, xp, fft_threads: int):
        grid = prepared.grid
        self.grid, self.bank, self.plan, self.xp = grid, bank, plan, xp
        self.s_fixed, self.fft_threads = s_fixed, max(1, fft_threads)
        self.mean_a, self.mean_a2, self.energy, self.npix = moments
        self.cc_scale = grid.scale**2 / self.npix
        self.lo, self.Pc = _crop(bank, plan, grid.size_px)
        self.Y = (prepared.ft * filt).astype(xp.complex64).reshape(-1, 1)  # (N, 1)
        self.Yc = xp.conj(self.Y)
        self.mu, self.sigma = prepared.local_mean, prepared.local_std
        # conj(T̂)·Y is the conjugate of T̂·conj(Y): its map is that of T̂·conj(Y) at −r,
        # so those angles are reduced against μ, σ at −r and their results flipped back
        # (one pass over the batch fewer than conjugating the spectra)
        self.mu_f, self.sigma_f = _negate_r(self.mu, xp), _negate_r(self.sigma, xp)

    def batch(self, which: np.ndarray) -> _Batch:
        """The frequency-major crop of templates ``which``, each scaled so that the
        inverse FFT gives cc' = cc · e directly."""
        xp, lo, Pc = self.xp, self.lo, self.Pc
        e = self.npix / np.sqrt(self.energy[which]) if self.s_fixed is None else np.ones(which.size)
        crop = self.bank.ft[which[0] : which[-1] + 1, lo : lo + Pc, lo : lo + Pc]
        Fc = crop.reshape(which.size, Pc * Pc).T * xp.asarray(self.cc_scale * e, dtype=xp.float32)
        Fc = xp.ascontiguousarray(Fc.astype(xp.complex64))
        consts = _batch_constants(which, e, self.mean_a, self.mean_a2, xp)
        return _Batch(self, int(which[0]), Fc, consts)


class _Batch:
    """One template batch of a :class:`_Scan`; :meth:`scan` runs some of its angles."""

    def __init__(self, scan: _Scan, start: int, Fc, consts: dict):
        self.s, self.start, self.Fc, self.consts = scan, start, Fc, consts

    def scan(self, groups):
        """The best over ``groups`` (from :func:`_angle_groups`), a new ``_Best``."""
        from streamem.pick.scan import _Best, _fom

        s, xp = self.s, self.s.xp
        W = s.grid.work_px
        Wh = W // 2 + 1
        n = self.Fc.shape[1]
        shape = (W * Wh, n)
        spectra = xp.empty(shape, dtype=xp.complex64)  # the FFT's input
        G, tmp = xp.empty(shape, dtype=xp.complex64), xp.empty(shape, dtype=xp.complex64)
        work = xp.empty((W, W, n), dtype=xp.float32)
        P = s.bank.ft.shape[-1]
        best = _Best.empty(W, xp)
        for base_psi, variants in groups:
            index, weight = s.plan.bilinear(base_psi, s.grid.size_px, P, s.lo, s.Pc, xp)
            _interpolate(self.Fc, index, weight, G, tmp, xp)
            G90 = None
            for v, psi in variants:
                if v in (1, 3):
                    if G90 is None:
                        G90 = xp.take(G, s.plan.perm, axis=0)
                        G90 = xp.where(s.plan.flip, xp.conj(G90), G90)
                    T = G90
                else:
                    T = G
                flipped = v in (0, 1)  # conj(T̂)·Y, as T̂·conj(Y) at −r
                xp.multiply(T, s.Yc if flipped else s.Y, out=spectra)
                cc = _irfft2_batch(spectra.reshape(W, Wh, n), W, xp, s.fft_threads)
                m, sd = (s.mu_f, s.sigma_f) if flipped else (s.mu, s.sigma)
                out = _reduce(cc, m, sd, self.consts, s.s_fixed, xp, _fom, work)
                if flipped:
                    out = tuple(_negate_r(a, xp) for a in out)
                key, c, p, cls = out
                best.update(key, c, p, cls + self.start, psi, xp)
                del cc
        return best


CHUNK_BYTES = 2**21  # blocks of the big passes that stay in cache (2 MB)


def _interpolate(Fc, index, weight, G, tmp, xp) -> None:
    """``G = Σ_corners weight · Fc[index]`` (bilinear), block by block of frequencies."""
    n_rows = G.shape[0]
    step = max(1, CHUNK_BYTES // (G.shape[1] * 8))
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        g, t = G[r0:r1], tmp[: r1 - r0]
        xp.take(Fc, index[0, r0:r1], axis=0, out=g)
        g *= weight[0, r0:r1, None]
        for corner in range(1, 4):
            xp.take(Fc, index[corner, r0:r1], axis=0, out=t)
            t *= weight[corner, r0:r1, None]
            g += t


def _negate_r(a, xp):
    """``a(−r)`` on the periodic grid: index ``(−i) mod W`` along both axes."""
    return xp.roll(xp.flip(a, axis=(0, 1)), 1, axis=(0, 1))


def _batch_constants(which, e, mean_a, mean_a2, xp) -> dict:
    f32 = xp.float32
    return {
        "b": xp.asarray(mean_a[which] * e, dtype=f32),  # ⟨A⟩ npix/‖A‖ (auto) or ⟨A⟩
        "e": xp.asarray(e, dtype=f32),
        "ma": xp.asarray(mean_a[which], dtype=f32),
        "ma2": xp.asarray(mean_a2[which], dtype=f32),
    }


def _reduce(cc, mu, sigma, k: dict, s_fixed, xp, fom, work):
    """Best template per pixel of one angle: (key, C, ⟨A²⟩, template index), ``(W, W)``.

    ``cc`` ``(W, W, n)`` is overwritten; ``work`` is a buffer of its shape.
    """
    if s_fixed is None:
        # cc' − μ b: same argmax as z (σ > 0); rows in blocks that stay in cache
        W, n = cc.shape[0], cc.shape[-1]
        step = max(1, CHUNK_BYTES // (cc.shape[1] * n * 4))
        j = xp.empty((W, cc.shape[1]), dtype=xp.int64)
        key = xp.empty((W, cc.shape[1]), dtype=xp.float32)
        for r0 in range(0, W, step):
            r1 = min(W, r0 + step)
            blk, wk = cc[r0:r1], work[: r1 - r0]
            xp.multiply(mu[r0:r1, :, None], k["b"], out=wk)
            blk -= wk
            jb = xp.argmax(blk, axis=-1)
            j[r0:r1] = jb
            key[r0:r1] = xp.take_along_axis(blk, jb[:, :, None], axis=-1)[:, :, 0]
        key /= sigma
        c = key / k["e"][j]
    else:
        C = (cc - mu[:, :, None] * k["ma"]) / sigma[:, :, None]
        keys = fom(C, k["ma2"], s_fixed, xp)
        j = xp.argmax(keys, axis=-1)
        key = xp.take_along_axis(keys, j[:, :, None], axis=-1)[:, :, 0]
        c = xp.take_along_axis(C, j[:, :, None], axis=-1)[:, :, 0]
    return key, c, k["ma2"][j], j.astype(xp.int32)
