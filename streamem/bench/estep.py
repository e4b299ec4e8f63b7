"""``streamem bench estep``: the coarse pass's FLOP rate against this machine's SGEMM rate.

Both are measured in the same run, interleaved: a plain float32 GEMM of the coarse
pass's shape ((n·T) × 2M) @ (2M × J), and the E-step's coarse pass
(:func:`streamem.em.estep.cross_terms`, :func:`ref_power_terms` and
:func:`coarse_log_posterior` on prepared images and projected references), counting
only the GEMM FLOPs 2·(n·T)·(2M)·J + 2·n·M·J. The ratio is the fraction of peak the
E-step reaches. ``--gpu`` runs both on CuPy arrays (cuBLAS, plain FP32: CuPy does
not use TF32 unless CUPY_TF32=1) through the same functions.
"""

from __future__ import annotations

import time

import numpy as np


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser(
        "estep", help="E-step coarse-pass FLOP rate vs the machine's SGEMM rate"
    )
    p.add_argument("--box", type=int, default=96)
    p.add_argument(
        "--radius", type=float, default=24.0, help="current resolution radius (Fourier px)"
    )
    p.add_argument("--n-images", type=int, default=128)
    p.add_argument("--healpix-order", type=int, default=2)
    p.add_argument("--offset-range", type=float, default=4.0)
    p.add_argument("--offset-step", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--gpu", action="store_true", help="run on CuPy arrays (needs CuPy and a GPU)")
    p.set_defaults(func=run)


def _best_time(fn, repeats: int, sync=lambda: None) -> float:
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(
    box=96,
    radius=24.0,
    n_images=128,
    healpix_order=2,
    offset_range=4.0,
    offset_step=2.0,
    repeats=3,
    xp=np,
    sync=lambda: None,
) -> dict:
    """Rates of one run; ``xp`` is NumPy or CuPy (``sync`` waits for the device)."""
    from streamem.core import sampling
    from streamem.core.projector import make_projector, project_points
    from streamem.em.fourier_points import half_plane_points
    from streamem.em.kernels import coarse_log_posterior, cross_terms, ref_power_terms

    rng = np.random.default_rng(0)
    coords, _, _ = half_plane_points(box, radius)
    M = coords.shape[0]
    rotations, _ = sampling.orientation_grid(healpix_order, "C1")
    shifts = np.asarray(sampling.translation_grid(offset_range, offset_step))
    J, T, n = rotations.shape[0], shifts.shape[0], n_images
    volume = rng.standard_normal((box, box, box)).astype(np.float32)
    t0 = time.perf_counter()
    refs = project_points(make_projector(volume, 2, max_radius_px=radius), rotations, coords)
    project_s = time.perf_counter() - t0
    X = (rng.standard_normal((n, M)) + 1j * rng.standard_normal((n, M))).astype(np.complex64)
    cw = xp.asarray(rng.random((n, M)).astype(np.float32))
    phases = np.asarray(sampling.shift_phases(coords, shifts, box))
    Xs = xp.asarray((X[:, None, :] * phases[None]).astype(np.complex64))
    refs = xp.asarray(refs)
    offset_prior = xp.asarray(-rng.random((n, T)).astype(np.float32))

    def coarse():
        C = cross_terms(Xs, cw, refs)
        S = ref_power_terms(cw, refs)
        coarse_log_posterior(C, S, offset_prior, False)

    flops = 2.0 * (n * T) * (2 * M) * J + 2.0 * n * M * J
    a = xp.asarray(rng.standard_normal((n * T, 2 * M)).astype(np.float32))
    b = xp.asarray(rng.standard_normal((2 * M, J)).astype(np.float32))
    coarse()  # warm-up (cuBLAS handles, kernel compilation)
    (a @ b).sum()
    sync()
    # interleaved best-of-N, so a busy machine slows both alike
    estep_s = gemm_s = np.inf
    for _ in range(repeats):
        estep_s = min(estep_s, _best_time(coarse, 1, sync))
        gemm_s = min(gemm_s, _best_time(lambda: a @ b, 1, sync))
    gemm_rate = 2.0 * (n * T) * (2 * M) * J / gemm_s
    return {
        "images": n,
        "translations": T,
        "orientations": J,
        "fourier_points": M,
        "gemm_gflops": gemm_rate / 1e9,
        "estep_gflops": flops / estep_s / 1e9,
        "fraction_of_gemm": flops / estep_s / gemm_rate,
        "projections_per_s": J / project_s,
    }


def run(args) -> int:
    xp, sync, label = np, (lambda: None), "SGEMM (NumPy BLAS)"
    if args.gpu:
        try:
            import cupy as cp

            cp.cuda.runtime.getDeviceCount()
        except Exception as exc:  # no CuPy, no driver, no GPU: one line
            print(f"bench estep --gpu needs CuPy and a CUDA GPU ({type(exc).__name__}: {exc})")
            return 1
        xp, sync, label = cp, cp.cuda.Stream.null.synchronize, "SGEMM (cuBLAS FP32)"
    r = measure(
        args.box,
        args.radius,
        args.n_images,
        args.healpix_order,
        args.offset_range,
        args.offset_step,
        args.repeats,
        xp,
        sync,
    )
    print(
        f"shape: {r['images']} images x {r['translations']} translations x {r['orientations']} orientations, {r['fourier_points']} Fourier points"
    )
    print(f"{label:<28}{r['gemm_gflops']:10.1f} GFLOP/s")
    print(f"{'E-step coarse pass':<28}{r['estep_gflops']:10.1f} GFLOP/s")
    print(f"{'fraction of SGEMM':<28}{r['fraction_of_gemm']:10.2f}")
    print(f"{'reference projections':<28}{r['projections_per_s']:10.0f} /s")
    return 0
