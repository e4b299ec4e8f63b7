"""``streamem bench gpu-core``: the core numerics on CuPy against NumPy, one table.

For each function (projection, back-projection, reconstruction with and without
symmetry, reconstruction noise spectrum, FSC, CTF) at box 64 and 128: the largest
difference between the CuPy and NumPy results relative to NumPy's largest value, and
the speed-up (best of three CuPy runs, after a warm-up, against one NumPy run, in the
same process). Without CuPy and a GPU it says so and exits 1; ``--xp numpy`` runs the
table with NumPy on both sides (a check of the benchmark itself).
"""

from __future__ import annotations

import time

import numpy as np


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser(
        "gpu-core", help="core numerics on CuPy vs NumPy: parity and speed-up", description=__doc__
    )
    p.add_argument("--boxes", default="64,128", help="comma-separated box sizes")
    p.add_argument("--images", type=int, default=1000, help="slices per box (default 1000)")
    p.add_argument("--xp", choices=("cupy", "numpy"), default="cupy")
    p.set_defaults(func=run)


def _array_module(name: str):
    if name == "numpy":
        return np, (lambda: None), "NumPy on both sides"
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(0)
    return cp, cp.cuda.Stream.null.synchronize, props["name"].decode()


def _best_time(fn, sync, repeats: int):
    fn()
    sync()
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return out, best


def measure(xp, sync, boxes=(64, 128), n_images: int = 1000, seed: int = 0) -> list[tuple]:
    """Rows (name, relative difference, NumPy s, ``xp`` s) for each core function."""
    from streamem.core.backprojector import (
        empty_accumulators,
        insert_points,
        reconstruct,
        reconstruction_noise_spectrum,
    )
    from streamem.core.ctf import OpticsParams, ctf_rfft
    from streamem.core.euler import euler_to_matrix
    from streamem.core.filters import lowpass
    from streamem.core.fourier import image_fourier_coords
    from streamem.core.fsc import fsc
    from streamem.core.projector import make_projector, project_points
    from streamem.core.symmetry import symmetry_matrices

    rng = np.random.default_rng(seed)
    rows = []

    def compare(name, numpy_fn, xp_fn):
        ref, t_np = _best_time(numpy_fn, lambda: None, 1)
        got, t_xp = _best_time(xp_fn, sync, 3)
        got = got.get() if hasattr(got, "get") else np.asarray(got)
        scale = max(float(np.abs(ref).max()), 1e-30)
        rows.append((name, float(np.abs(got - ref).max()) / scale, t_np, t_xp))

    def one_box(box):  # a function, so the compared lambdas bind its locals
        vol = lowpass(rng.standard_normal((box,) * 3).astype(np.float32), 6.0, 1.0)
        ang = rng.uniform([0, 0, 0], [360, 180, 360], (n_images, 3))
        A = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
        coords, _ = image_fourier_coords(box, box // 2 - 1)
        fv, fv_x = make_projector(vol), make_projector(xp.asarray(vol))
        A_x, coords_x = xp.asarray(A), xp.asarray(coords)
        compare(
            f"project {n_images}x box {box}",
            lambda: project_points(fv, A, coords),
            lambda: project_points(fv_x, A_x, coords_x),
        )
        slices = project_points(fv, A, coords)
        slices_x = xp.asarray(slices)

        def backproject(mod, rot, pts, values):
            data, weight = empty_accumulators(box, xp=mod)
            insert_points(data, weight, rot, pts, values, 1.0)
            return data, weight

        data, weight = backproject(np, A, coords, slices)
        data_x, weight_x = backproject(xp, A_x, coords_x, slices_x)
        compare(
            f"back-project {n_images}x box {box}",
            lambda: backproject(np, A, coords, slices)[1],
            lambda: backproject(xp, A_x, coords_x, slices_x)[1],
        )
        tau2 = np.full(box // 2 + 1, 1e3)
        for sym in ("C1", "D7"):
            mats = symmetry_matrices(sym)
            compare(
                f"reconstruct {sym} box {box}",
                lambda mats=mats: reconstruct(data, weight, box, 2, tau2, symmetry_matrices=mats),
                lambda mats=mats: reconstruct(
                    data_x, weight_x, box, 2, xp.asarray(tau2), symmetry_matrices=xp.asarray(mats)
                ),
            )
        compare(
            f"noise spectrum box {box}",
            lambda: reconstruction_noise_spectrum(weight, box),
            lambda: reconstruction_noise_spectrum(weight_x, box),
        )
        vol_x = xp.asarray(vol)
        compare(
            f"FSC box {box}",
            lambda: fsc(vol, 0.5 * vol + 0.1),
            lambda: fsc(vol_x, 0.5 * vol_x + 0.1),
        )
        optics = OpticsParams(300.0, 2.7, 0.1)
        du = rng.uniform(1e4, 3e4, n_images)[:, None, None]
        du_x = xp.asarray(du)
        compare(
            f"CTF {n_images}x box {box}",
            lambda: ctf_rfft(box, 1.0, du, du + 300, 30.0, optics),
            lambda: ctf_rfft(box, 1.0, du_x, du_x + 300, 30.0, optics, xp=xp),
        )

    for box in boxes:
        one_box(box)
    return rows


def run(args) -> int:
    try:
        xp, sync, device = _array_module(args.xp)
    except Exception as exc:  # no CuPy, no driver, no GPU: say so in one line
        print(f"bench gpu-core needs CuPy and a CUDA GPU ({type(exc).__name__}: {exc})")
        return 1
    boxes = tuple(int(b) for b in args.boxes.split(","))
    rows = measure(xp, sync, boxes, args.images)
    print(f"device: {device}")
    print(f"{'function':28s} {'rel. diff':>10s} {'numpy s':>9s} {'xp s':>9s} {'speed-up':>8s}")
    for name, diff, t_np, t_xp in rows:
        print(f"{name:28s} {diff:10.1e} {t_np:9.4f} {t_xp:9.4f} {t_np / t_xp:8.1f}")
    bad = [name for name, diff, _, _ in rows if not diff < 1e-3]
    print("parity: " + ("FAILED for " + ", ".join(bad) if bad else "ok (all below 1e-3)"))
    return 1 if bad else 0
