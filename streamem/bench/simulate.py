"""``streamem bench simulate``: particles/s and peak memory of ``simulate`` at N and 10 N.

Each size runs in its own subprocess (:func:`streamem.simulate.particles.simulate_particles`
on the default ``asym`` phantom), timed inside the child, so interpreter start-up is not
counted; the child reports its own peak RSS (``VmHWM``, reset after start-up, because
``RUSAGE_CHILDREN`` would mix the two runs). Memory must not grow with N: a task holds
one chunk, and the client only the graph (one task per chunk).

Defaults: 10,000 vs 100,000 particles of 128 x 128 px (a long run on a small machine;
``--small 2000`` gives 2k vs 20k). Stores are written under ``--workdir`` (default: a
temporary folder) and removed.
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
import json, sys, time
from streamem.bench.memory import reset_peak, status_kib
from streamem.simulate.particles import simulate_particles

out, n, box, px, chunk, workers, order = sys.argv[1:8]
reset_peak()
base_kib = status_kib("VmRSS")
t0 = time.perf_counter()
store = simulate_particles(out, int(n), box_size=int(box), pixel_size_A=float(px),
                           chunk_size=int(chunk) or None, workers=int(workers) or None)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_kib": status_kib("VmHWM"), "base_kib": base_kib,
                  "n": store.n_particles, "chunk_size": store.chunk_size}))
"""


def register_bench(bench_sub) -> None:
    from streamem.commands.execution import add_old_spelling

    p = bench_sub.add_parser(
        "simulate",
        help="simulate: particles/s and peak RSS at N vs 10 N particles",
        description=__doc__,
    )
    p.add_argument("--small", type=int, default=10_000, help="small set N (default 10000)")
    p.add_argument("--factor", type=int, default=10, help="large set = factor x N (10)")
    p.add_argument("--box", type=int, default=128, help="box in pixels (128)")
    a = p.add_argument(
        "--angpix", dest="pixel_size", type=float, default=1.5, help="pixel size in A"
    )
    add_old_spelling(p, a, "--pixel-size")
    p.add_argument(
        "--chunk-size", type=int, default=0, help="store chunk, both sizes (0: store default)"
    )
    a = p.add_argument(
        "--n-workers", dest="workers", type=int, default=0, help="threads (0: all cores)"
    )
    add_old_spelling(p, a, "--workers")
    p.add_argument("--workdir", default=None, help="where to write the stores (default: tmp)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.set_defaults(func=run)


def _child_env() -> dict:
    import streamem

    env = dict(os.environ)
    root = str(Path(streamem.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def simulate_in_child(out: Path, n: int, box: int, px: float, chunk: int, workers: int) -> dict:
    """Run one simulation in a fresh interpreter; returns its timing and peak RSS."""
    cmd = [sys.executable, "-c", _CHILD, str(out), str(n), str(box), str(px), str(chunk),
           str(workers), "3"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), check=False)
    if res.returncode != 0:
        raise RuntimeError(f"simulate subprocess failed:\n{res.stderr}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["particles_per_s"] = r["n"] / r["seconds"]
    return r


def measure(
    small: int = 10_000,
    factor: int = 10,
    box: int = 128,
    pixel_size_A: float = 1.5,
    chunk_size: int = 0,
    workers: int = 0,
    workdir: str | None = None,
) -> dict:
    from streamem.io.store import default_chunk_size

    # The same chunk for both sizes (the store's default for the box, at most an eighth
    # of the small set, so that both sets keep every worker busy with chunks in flight),
    # so that the peak-RSS ratio shows growth with N rather than a difference in chunk
    # size or in chunks at once (a one-chunk set runs one task at a time).
    chunk_size = chunk_size or min(default_chunk_size(box), max(1, small // 8))
    folder = scratch_folder("streamem-bench-simulate-", workdir)
    try:
        runs = {}
        for label, n in (("small", small), ("large", small * factor)):
            out = folder / f"{label}.zarr"
            runs[label] = simulate_in_child(out, n, box, pixel_size_A, chunk_size, workers)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"box": box, "pixel_size_A": pixel_size_A, "cpus": os.cpu_count(), **runs}


def format_table(r: dict) -> str:
    mib = 1024.0  # /proc reports KiB
    sm, lg = r["small"], r["large"]
    rows = [
        f"streamem bench simulate: {r['box']} x {r['box']} px, {r['pixel_size_A']} A/px, "
        f"{r['cpus']} CPUs",
        f"{'particles':>10s}{'seconds':>10s}{'particles/s':>13s}{'peak RSS MiB':>14s}{'chunk':>7s}",
    ]
    for d in (sm, lg):
        rows.append(
            f"{d['n']:10d}{d['seconds']:10.1f}{d['particles_per_s']:13.1f}"
            f"{d['peak_kib'] / mib:14.0f}{d['chunk_size']:7d}"
        )
    rows.append(
        f"peak RSS {lg['n']} / {sm['n']}: {lg['peak_kib'] / sm['peak_kib']:.2f}"
        f"   (interpreter + libraries alone: {sm['base_kib'] / mib:.0f} MiB)"
    )
    return "\n".join(rows)


def run(args) -> int:
    r = measure(
        args.small,
        args.factor,
        args.box,
        args.pixel_size,
        args.chunk_size,
        args.workers,
        args.workdir,
    )
    print(format_table(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0
