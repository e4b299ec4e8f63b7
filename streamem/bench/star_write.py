"""``streamem bench star-write``: the client's peak RSS writing ``run_data.star`` for N particles.

Builds a store's metadata for ``--particles`` N (default 1,000,000: RELION-like image and
micrograph names, coordinates, CTF, optics group, half set; images declared, not written,
since the STAR writer never reads them) and an iteration's results in a results Zarr
(:data:`streamem.io.results.RESULT_FIELDS`), then writes ``run_data.star`` in a child
process exactly as the run loop does (:func:`streamem.io.results.write_data_star` from
:class:`~streamem.io.results.StoredResults`). The child reports its RSS after imports
and its peak RSS while writing (``VmHWM``, reset after start-up: see
:mod:`streamem.bench.memory`), and the seconds. ``--one-block`` also writes the same
file as one block of N rows (the table held whole, as before streaming), for the ratio.
Everything is written under a temporary folder (``--workdir`` to choose where) that is
removed at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_CHILD = """
import json, sys, time
from pathlib import Path
from streamem.bench.memory import reset_peak, status_kib
from streamem.io.results import StoredResults, write_data_star
from streamem.io.store import ParticleStore
store_path, results_path, out, rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = ParticleStore(store_path)
reset_peak()
base_kib = status_kib("VmRSS")
t0 = time.perf_counter()
kw = {"rows_per_block": rows} if rows else {}
write_data_star(Path(out), store, StoredResults(results_path, 1), **kw)
print(json.dumps({"seconds": time.perf_counter() - t0, "base_kib": base_kib,
                  "peak_kib": status_kib("VmHWM"), "bytes": Path(out).stat().st_size}))
"""


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser(
        "star-write",
        help="peak RSS of the client writing run_data.star for N particles (streamed)",
        description=__doc__,
    )
    p.add_argument("--particles", type=int, default=1_000_000)
    p.add_argument("--chunk-size", type=int, default=1024, help="store and results chunk")
    p.add_argument("--one-block", action="store_true", help="also write it as one block of N rows")
    p.add_argument("--workdir", default=None, help="folder for the temporary store")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    p.set_defaults(func=run)


def make_metadata(store_path: Path, results_path: Path, n: int, chunk: int, seed: int = 0):
    """A store of ``n`` particles' metadata (box 16, images not written; sharded by default
    above 100,000) and iteration 1's results, written one shard (or chunk) at a time."""
    from streamem.io.results import RESULT_FIELDS, create_results_arrays, write_results
    from streamem.io.store import create_store

    fields = {
        "rlnImageName": str,
        "rlnMicrographName": str,
        "rlnCoordinateX": np.float64,
        "rlnCoordinateY": np.float64,
        "rlnDefocusU": np.float64,
        "rlnDefocusV": np.float64,
        "rlnDefocusAngle": np.float64,
        "rlnCtfBfactor": np.float64,
        "rlnCtfScalefactor": np.float64,
        "rlnGroupNumber": np.int64,
    }
    optics = [{"rlnOpticsGroup": 1, "rlnImagePixelSize": 1.06, "rlnVoltage": 300.0}]
    store = create_store(store_path, n, 16, 1.06, optics, fields, chunk_size=chunk)
    create_results_arrays(results_path, 1, n, chunk)
    rng = np.random.default_rng(seed)
    per_mic = 200
    for s, e in store.write_bounds():  # shards of a large store: whole ones per write
        i = np.arange(s, e)
        k = len(i)
        mic = i // per_mic
        meta = {
            "rlnOpticsGroup": np.ones(k, np.int32),
            "rlnRandomSubset": (i % 2 + 1).astype(np.int32),
            "rlnImageName": np.array(
                [f"{j % per_mic + 1:06d}@Extract/job012/Movies/mic_{m:05d}.mrcs"
                 for j, m in zip(i, mic, strict=True)], dtype=object),
            "rlnMicrographName": np.array(
                [f"MotionCorr/job003/Movies/mic_{m:05d}.mrc" for m in mic], dtype=object),
            "rlnCoordinateX": rng.uniform(0, 4096, k),
            "rlnCoordinateY": rng.uniform(0, 4096, k),
            "rlnDefocusU": rng.uniform(5e3, 3e4, k),
            "rlnDefocusV": rng.uniform(5e3, 3e4, k),
            "rlnDefocusAngle": rng.uniform(-180, 180, k),
            "rlnCtfBfactor": np.zeros(k),
            "rlnCtfScalefactor": np.ones(k),
            "rlnGroupNumber": (mic + 1).astype(np.int64),
        }  # fmt: skip
        store.write_region(s, metadata=meta)
        results = {label: rng.uniform(-180, 180, k) for label in RESULT_FIELDS}
        results["rlnClassNumber"] = np.ones(k, np.int32)
        write_results(str(results_path), 1, s, results)
    return store


def write_in_child(store_path: Path, results_path: Path, out: Path, rows: int = 0) -> dict:
    """Write ``out`` in a fresh interpreter; its peak RSS, base RSS and seconds."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(store_path), str(results_path), str(out), str(rows)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the STAR-writing child failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> int:
    n = int(args.particles)
    report: dict = {"particles": n, "chunk_size": args.chunk_size}
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)  # where the user asked
    with tempfile.TemporaryDirectory(prefix="streamem-star-write-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_metadata(tmp / "p.zarr", tmp / "particles.zarr", n, args.chunk_size)
        report["make_s"] = time.perf_counter() - t0
        report["streamed"] = write_in_child(tmp / "p.zarr", tmp / "particles.zarr", tmp / "a.star")
        if args.one_block:
            report["one_block"] = write_in_child(
                tmp / "p.zarr", tmp / "particles.zarr", tmp / "b.star", rows=n
            )
            same = (tmp / "a.star").read_text().splitlines()[1:] == (
                tmp / "b.star"
            ).read_text().splitlines()[1:]
            report["same_text"] = same
    print(f"run_data.star for {n:,} particles (metadata made in {report['make_s']:.0f} s)")
    print(f"{'writer':<22} {'s':>7} {'RSS before MiB':>15} {'peak RSS MiB':>13} {'file MiB':>9}")
    for name in ("streamed", "one_block"):
        r = report.get(name)
        if r:
            print(
                f"{name:<22} {r['seconds']:>7.1f} {r['base_kib'] / 1024:>15.0f} "
                f"{r['peak_kib'] / 1024:>13.0f} {r['bytes'] / 2**20:>9.0f}"
            )
    if "same_text" in report:
        print(f"same text: {report['same_text']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0
