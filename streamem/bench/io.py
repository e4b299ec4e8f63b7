"""``streamem bench import``: import throughput against ``cp -r`` of the same stacks, and
peak memory of an import of a small and a large set (it must not grow with N).

One run writes K MRCS stacks holding N particles (default 20,000 of 128 x 128 px,
1.3 GB) and a STAR file for all N and one for the first ``--small`` (2,000), then:

1. ``cp -r`` of the stack folder to a fresh target (MB/s of stack bytes);
2. ``streamem import`` of the N particles in a subprocess (MB/s of image bytes,
   timed inside the child around :func:`import_particles`, so interpreter start-up
   is not counted) and its peak RSS (the child's own ``VmHWM``, reset after start-up);
3. the same for the small set.

Both copies read stacks that were just written, so both read from the page cache
(we do not drop caches: that needs root and disturbs other users of the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from streamem.bench import scratch_folder

# The child reports its own peak RSS (VmHWM), so the 2k and 20k numbers do not mix
# (RUSAGE_CHILDREN is the max over every child so far). Writing "5" to clear_refs resets
# the high-water mark after start-up: a child's ru_maxrss can start at the parent's RSS.
_CHILD = """
import json, sys, time
from streamem.bench.memory import reset_peak, status_kib
from streamem.io.importer import import_particles

star, out, chunk, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
reset_peak()
base_kib = status_kib("VmRSS")
t0 = time.perf_counter()
store = import_particles(star, out, chunk_size=chunk or None, progress=False, workers=workers or None)
seconds = time.perf_counter() - t0
peak_kib = status_kib("VmHWM")
print(json.dumps({"seconds": seconds, "peak_kib": peak_kib, "base_kib": base_kib,
                  "n": store.n_particles, "chunk_size": store.chunk_size}))
"""


def register_bench(bench_sub) -> None:
    from streamem.commands.execution import add_old_spelling

    p = bench_sub.add_parser(
        "import",
        help="import MB/s vs cp of the same stacks; peak RSS at 2k vs 20k particles",
        description=__doc__,
    )
    p.add_argument("--particles", type=int, default=20_000, help="large set (default 20000)")
    p.add_argument("--small", type=int, default=2_000, help="small set (default 2000)")
    p.add_argument("--stacks", type=int, default=10, help="number of MRCS stacks K")
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=0, help="store chunk (0: default)")
    a = p.add_argument(
        "--n-workers", dest="workers", type=int, default=0, help="import threads (0: default)"
    )
    add_old_spelling(p, a, "--workers")
    p.add_argument("--workdir", default=None, help="where to write the data (default: tmp)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.set_defaults(func=run)


def write_dataset(folder: Path, n: int, n_stacks: int, box: int, small: int, seed: int = 0):
    """K stacks of Gaussian noise and two STAR files (all n, first ``small``)."""
    import mrcfile
    import pandas as pd
    import starfile

    rng = np.random.default_rng(seed)
    stacks = folder / "Extract"
    stacks.mkdir(parents=True)
    names = []
    for k, members in enumerate(np.array_split(np.arange(n), n_stacks)):
        rel = f"Extract/stack{k + 1:04d}.mrcs"
        with mrcfile.new(folder / rel) as mrc:  # one stack in memory at a time
            mrc.set_data(rng.standard_normal((len(members), box, box), dtype=np.float32))
            mrc.set_image_stack()
            mrc.voxel_size = 1.0
        names += [f"{i + 1:06d}@{rel}" for i in range(len(members))]
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
            "rlnImagePixelSize": [1.0],
            "rlnImageSize": [box],
            "rlnImageDimensionality": [2],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": names,
            "rlnDefocusU": rng.uniform(8e3, 3e4, n).round(2),
            "rlnDefocusV": rng.uniform(8e3, 3e4, n).round(2),
            "rlnDefocusAngle": rng.uniform(-180, 180, n).round(2),
            "rlnOpticsGroup": 1,
        }
    )
    stars = {}
    for label, count in (("large", n), ("small", small)):
        stars[label] = folder / f"particles_{label}.star"
        starfile.write({"optics": optics, "particles": particles.iloc[:count]}, stars[label])
    return stacks, stars


def _child_env() -> dict:
    import streamem

    env = dict(os.environ)
    root = str(Path(streamem.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _import_in_child(star: Path, out: Path, chunk: int, workers: int) -> dict:
    cmd = [sys.executable, "-c", _CHILD, str(star), str(out), str(chunk), str(workers)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), check=False)
    if res.returncode != 0:
        raise RuntimeError(f"import subprocess failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(
    particles: int = 20_000,
    small: int = 2_000,
    stacks: int = 10,
    box: int = 128,
    chunk_size: int = 0,
    workers: int = 0,
    workdir: str | None = None,
) -> dict:
    folder = scratch_folder("streamem-bench-import-", workdir)
    try:
        stack_dir, stars = write_dataset(folder, particles, stacks, box, small)
        stack_bytes = sum(p.stat().st_size for p in stack_dir.iterdir())
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", str(stack_dir), str(folder / "copy")], check=True)
        cp_s = time.perf_counter() - t0
        shutil.rmtree(folder / "copy")
        large = _import_in_child(stars["large"], folder / "large.zarr", chunk_size, workers)
        shutil.rmtree(folder / "large.zarr")
        little = _import_in_child(stars["small"], folder / "small.zarr", chunk_size, workers)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    image_bytes = box * box * 4
    return {
        "box": box,
        "stacks": stacks,
        "stack_MB": stack_bytes / 1e6,
        "cp_MBps": stack_bytes / 1e6 / cp_s,
        "cp_s": cp_s,
        "large": {**large, "MBps": particles * image_bytes / 1e6 / large["seconds"]},
        "small": {**little, "MBps": small * image_bytes / 1e6 / little["seconds"]},
        "workers": workers or None,
        "cpus": os.cpu_count(),
    }


def format_table(r: dict) -> str:
    lg, sm = r["large"], r["small"]
    mib = 1024.0  # /proc and ru_maxrss report KiB on Linux
    rows = [
        f"streamem bench import: {lg['n']} particles of {r['box']} x {r['box']} px in "
        f"{r['stacks']} stacks ({r['stack_MB']:.0f} MB), {r['cpus']} CPUs",
        f"{'':28s}{'MB/s':>9s}{'seconds':>10s}{'peak RSS MiB':>14s}{'chunk':>7s}",
        f"{'cp -r stacks':28s}{r['cp_MBps']:9.1f}{r['cp_s']:10.2f}{'':>14s}{'':>7s}",
    ]
    for label, d in ((f"import {lg['n']} particles", lg), (f"import {sm['n']} particles", sm)):
        rows.append(
            f"{label:28s}{d['MBps']:9.1f}{d['seconds']:10.2f}{d['peak_kib'] / mib:14.0f}"
            f"{d['chunk_size']:7d}"
        )
    rows += [
        f"import / cp throughput      {lg['MBps'] / r['cp_MBps']:.2f}",
        f"peak RSS {lg['n']} / {sm['n']}      {lg['peak_kib'] / sm['peak_kib']:.2f}"
        f"   (interpreter + libraries alone: {lg['base_kib'] / mib:.0f} MiB)",
    ]
    return "\n".join(rows)


def run(args) -> int:
    r = measure(
        args.particles,
        args.small,
        args.stacks,
        args.box,
        args.chunk_size,
        args.workers,
        args.workdir,
    )
    print(format_table(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0
