"""``streamem bench classify``: class3d seconds per iteration against K (1, 2, 4, 8).

One simulated store, one process, the same settings for every K; each K runs
``--iterations`` global-search iterations on Dask's threaded scheduler and the mean
wall time of the iterations after the first (the first fits the reference's scale) is
reported, with the ratio time(K=8)/time(K=1) measured in the same run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser("classify", help="class3d seconds per iteration for K = 1, 2, 4, 8")
    p.add_argument("--n-particles", type=int, default=400)
    p.add_argument("--box", type=int, default=32)
    p.add_argument("--healpix-order", type=int, default=2)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--k", default="1,2,4,8", help="comma-separated class counts")
    p.set_defaults(func=run)


def measure(n_particles=400, box=32, healpix_order=2, iterations=3, ks=(1, 2, 4, 8)) -> dict:
    import numpy as np

    from streamem.em.classify3d import Class3DOptions, classify3d
    from streamem.io.mrc import read_map
    from streamem.simulate.particles import simulate_particles, truth_volume_paths

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = simulate_particles(
            root / "p.zarr", n_particles, box_size=box, pixel_size_A=4.0, snr=0.2, seed=0
        )
        ref, _ = read_map(truth_volume_paths(store.path)[0])
        for k in ks:
            options = Class3DOptions(
                n_classes=k, iterations=iterations, lowres_iterations=0, healpix_order=healpix_order,
                offset_range_px=2.0, offset_step_px=1.0, ini_high_A=20.0,
            )  # fmt: skip
            result = classify3d(store, ref, root / f"run{k}", options)
            out[k] = float(np.mean(result.seconds[1:] or result.seconds))
    return out


def run(args) -> int:
    ks = tuple(int(k) for k in args.k.split(","))
    times = measure(args.n_particles, args.box, args.healpix_order, args.iterations, ks)
    for k, t in times.items():
        print(f"K={k:2d}  {t:7.2f} s/iteration")
    if 1 in times and 8 in times:
        print(f"time(K=8)/time(K=1) = {times[8] / times[1]:.2f}")
    return 0
