"""``streamem bench refine``: peak memory of a refine3d iteration at N and 10N particles.

For each size a child process simulates the particles (fixed chunk size), resets its
peak-RSS counter, then runs one refine3d iteration on Dask's threaded scheduler with a
single thread — the memory of one worker — and reports its own ``VmHWM``. Streaming
means the peak must not grow with N: the ratio should be close to 1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from streamem.bench import scratch_folder

_CHILD = """
import json, sys, time, dask
from streamem.bench.memory import reset_peak, status_kib
from streamem.simulate.particles import simulate_particles, truth_volume_paths
from streamem.io.mrc import read_map
from streamem.core.filters import lowpass
from streamem.em.refine import RefineOptions, refine3d
out, n, box, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
store = simulate_particles(out + "/p.zarr", n, box_size=box, pixel_size_A=3.0, snr=0.05, seed=0, chunk_size=chunk)
ref = lowpass(read_map(truth_volume_paths(store.path)[0])[0], 30.0, 3.0)
dask.config.set(scheduler="threads", num_workers=1)
reset_peak()
base = status_kib("VmRSS")
t0 = time.perf_counter()
refine3d(store, ref, out + "/run", RefineOptions(max_iterations=4), stop_after_iteration=1)
print(json.dumps({"n": n, "seconds": time.perf_counter() - t0, "peak_kib": status_kib("VmHWM"), "base_kib": base}))
"""


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser(
        "refine", help="peak RSS of a refine3d iteration at N vs 10N particles", description=__doc__
    )
    p.add_argument("--particles", type=int, default=1000, help="N (the large run has 10N)")
    p.add_argument("--box", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=250)
    p.add_argument("--workdir", default=None, help="where the stores go (default: temp dir)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.set_defaults(func=run)


def measure(n: int, box: int, chunk: int, workdir: str | None = None) -> dict:
    folder = scratch_folder("streamem-bench-refine-", workdir)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(folder), str(n), str(box), str(chunk)],
            capture_output=True,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parents[2],
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args) -> int:
    print(f"{'particles':>10} {'s/iteration':>12} {'ms/particle':>12} {'peak RSS MiB':>13}")
    rows = []
    for n in (args.particles, 10 * args.particles):  # each row as soon as it is measured
        r = measure(n, args.box, args.chunk_size, args.workdir)
        rows.append(r)
        print(
            f"{r['n']:>10} {r['seconds']:>12.1f} {1000 * r['seconds'] / r['n']:>12.2f} "
            f"{r['peak_kib'] / 1024:>13.1f}",
            flush=True,
        )
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"peak RSS ratio 10N/N: {rows[1]['peak_kib'] / rows[0]['peak_kib']:.3f}")
    return 0
