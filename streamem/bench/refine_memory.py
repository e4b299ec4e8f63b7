"""``streamem bench refine-memory``: refine3d at real size on a 2-worker LocalCluster.

Simulates particles of the largest built-in phantom (``asym``, 330 kDa; defaults:
5,000 particles, box 128, 3.59 Å/px, SNR 0.05), starts from the truth low-passed to
30 Å and runs a full refine3d (``--particle-diameter 300``, final join included) on a
LocalCluster of 2 workers with 1 thread each and Dask's default memory limit (the
machine's memory over the workers). A background thread samples, every 0.2 s, the RSS
of this process (the client, where the M-step runs) and of each worker's process tree
(the nanny's descendants, so a restarted worker is still counted). Printed per
iteration: seconds, resolution, work box, and the peak RSS of the client and of each
worker; at the end, Dask's memory warnings, pauses and restarts (counted by a log
handler installed in every worker and nanny), the FSC 0.5 resolution against the
truth and the median angular error. ``--chunk-size`` compares chunkings (e.g. 256
and 4,096); ``--store`` reuses a simulated store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path

from streamem.dist.allocator import CLIENT_TRIM_BYTES, MALLOC_ENV

ITERATION_LINE = re.compile(r"it\s+(\d+)\s+res\s+([\d.]+) A.*box\s+(\d+)\s+([\d.]+) s")
MEMORY_LOGGERS = ("distributed.worker.memory", "distributed.nanny.memory", "distributed.worker")


def add_refine_run_arguments(p) -> None:
    """The simulated set and cluster of the refine benches (refine-memory, refine-phases):
    5,000 particles of box 128 at 3.59 Å/px, SNR 0.05, 2 workers x 1 thread."""
    from streamem.commands.execution import add_old_spelling

    p.add_argument("--particles", type=int, default=5000)
    p.add_argument("--box", type=int, default=128)
    a = p.add_argument("--angpix", dest="pixel_size", type=float, default=3.59, help="Å")
    add_old_spelling(p, a, "--pixel-size")
    p.add_argument("--snr", type=float, default=0.05)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--particle-diameter", type=float, default=300.0, help="Å")
    a = p.add_argument(
        "--iterations", dest="max_iterations", type=int, default=25,
        help="at most this many; the last one joins the halves",
    )  # fmt: skip
    add_old_spelling(p, a, "--max-iterations")
    p.add_argument("--n-workers", type=int, default=2)
    p.add_argument("--threads-per-worker", type=int, default=1)
    p.add_argument("--no-local-prepass", dest="local_prepass", action="store_false",
                   help="refine3d's --no-local-prepass (RELION's plain local searches)")  # fmt: skip


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser(
        "refine-memory",
        help="refine3d at box 128 on 2 workers: peak RSS per process and iteration",
        description=__doc__,
    )
    add_refine_run_arguments(p)
    p.add_argument("--memory-per-worker", default=None, help="e.g. 4GiB (default: Dask's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--store", default=None, help="reuse this simulated store (simulated there if absent)"
    )
    p.add_argument("--out", default=None, help="keep the run here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    p.add_argument(
        "--allocator",
        type=int,
        default=None,
        metavar="N",
        help="instead: one E-step chunk of N images at full box in a child process per "
        "glibc malloc setting (glibc's defaults, Dask's, the workers'): seconds of the "
        "E-step in a thread and of the M-step, and peak RSS",
    )
    p.set_defaults(func=run)


#: The malloc settings compared by ``--allocator`` (environment of the child process).
ALLOCATOR_SETTINGS = {
    "glibc defaults": {},
    "Dask nanny default (trim 64 KiB)": {"MALLOC_TRIM_THRESHOLD_": "65536"},
    "thresholds 32 MiB (before)": {
        "MALLOC_TRIM_THRESHOLD_": str(32 * 2**20),
        "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    },
    "one arena, thresholds 1 GiB (workers')": MALLOC_ENV,
    "the same, trim 2 GiB (the client's)": {
        **MALLOC_ENV,
        "MALLOC_TRIM_THRESHOLD_": str(CLIENT_TRIM_BYTES),
    },
}

# The E-step runs in a thread, as in a Dask worker (a thread's arena heap is capped at
# 64 MiB, so where it runs changes what glibc does); the M-step of its accumulators in
# the main thread, as on the client.
_CHUNK_CHILD = """
import json, resource, sys, threading, time
import numpy as np
from streamem.bench.memory import reset_peak, status_kib
from streamem.core.projector import make_projector
from streamem.em import mstep
from streamem.em.estep import EStepModel, SearchGrid, expectation
from streamem.io.mrc import read_map
from streamem.io.store import ParticleStore, optics_params
from streamem.simulate.particles import truth_volume_paths
store = ParticleStore(sys.argv[1]); n = int(sys.argv[2]); diameter = float(sys.argv[3])
B, p = store.box_size, store.pixel_size_A
truth = read_map(truth_volume_paths(store.path)[0])[0]
chunk = store.read_chunk(0, n)
power = mstep.image_power(chunk.images, np.zeros(n, int), 1)
radius = B // 2 - 1
proj = make_projector(truth, 2, max_radius_px=radius)
model = EStepModel(projectors=(proj, proj), box_size=B, work_box=B, pixel_size_A=p,
    max_radius_px=radius, inv_sigma2=mstep.initial_inv_sigma2(power[0], power[1]),
    optics=tuple(optics_params(g) for g in store.optics_groups), sigma_offset_A=3 * p,
    grid=SearchGrid(healpix_order=2), particle_diameter_A=diameter, scale_free=True)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return np.array([time.perf_counter(), r.ru_utime, r.ru_stime])
# Each twice, timing the second call: a worker's later tasks and the client's later
# iterations meet the heap the first call left (and its memory shows in the RSS).
stats, times = [], []
def estep():
    for _ in range(2):
        t = cpu()
        stats.append(expectation(chunk.images, dict(chunk.metadata), model)[0])
        times.append(cpu() - t)
reset_peak()
worker = threading.Thread(target=estep)
worker.start()
worker.join()
estep_peak_kib = status_kib("VmHWM")
reset_peak()  # the M-step's own peak, as on the client
for _ in range(2):
    t = cpu()
    total = stats[-1].expanded()
    mstep.reconstruct_halves(total.data_acc, total.weight_acc, B, 2, 1.0, None)
    times.append(cpu() - t)
e, m = times[1], times[3]
print(json.dumps({"seconds": e[0], "system_s": e[2], "mstep_s": m[0], "mstep_system_s": m[2],
    "peak_kib": estep_peak_kib, "mstep_peak_kib": status_kib("VmHWM"),
    "end_kib": status_kib("VmRSS")}))
"""


def measure_allocators(store_path: str, n_images: int, diameter_A: float) -> dict:
    """Seconds (wall, and of them in the kernel) of one E-step chunk in a thread and
    of the M-step of its accumulators (the second of two calls each), and the peak RSS
    of each (the M-step's from a reset counter), per malloc setting (child processes)."""
    import subprocess
    import sys

    out = {}
    for name, extra in ALLOCATOR_SETTINGS.items():
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("MALLOC_")  # only the setting under test
        }
        env.update(extra, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        done = subprocess.run(
            [sys.executable, "-c", _CHUNK_CHILD, store_path, str(n_images), str(diameter_A)],
            capture_output=True,
            text=True,
            env=env,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


class RssSampler(threading.Thread):
    """Peak RSS (bytes) per process group and iteration, sampled every ``interval_s``.

    Groups: ``client`` (this process alone; the nannies live in it) and ``worker N``
    (the N-th child process by pid, a worker, with its descendants).
    ``iteration`` is advanced by the caller; peaks are kept per iteration.
    """

    def __init__(self, interval_s: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.interval_s = interval_s
        self.iteration = 1
        self.peaks: dict[int, dict[str, int]] = {}
        self._halt = threading.Event()

    def sample(self) -> dict[str, int]:
        me = self.psutil.Process()
        out = {"client": me.memory_info().rss}
        workers = []
        for child in me.children():
            try:
                if "resource_tracker" in " ".join(child.cmdline()):
                    continue
                workers.append((child.pid, [child, *child.children(recursive=True)]))
            except self.psutil.Error:
                continue
        for k, (_, tree) in enumerate(sorted(workers, key=lambda w: w[0])):
            out[f"worker {k}"] = sum(_rss(p) for p in tree)
        return out

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                now = self.sample()
            except self.psutil.Error:
                now = {}
            row = self.peaks.setdefault(self.iteration, {})
            for name, rss in now.items():
                row[name] = max(row.get(name, 0), rss)
            time.sleep(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _rss(process) -> int:
    try:
        return process.memory_info().rss
    except Exception:  # the process ended between listing and reading
        return 0


class _Lines(logging.Handler):
    """Collects streamem's iteration lines and advances the sampler's iteration."""

    def __init__(self, sampler: RssSampler):
        super().__init__(logging.INFO)
        self.sampler = sampler
        self.rows: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = ITERATION_LINE.search(record.getMessage())
        if m:
            self.rows.append(
                {
                    "iteration": int(m.group(1)),
                    "resolution_A": float(m.group(2)),
                    "box": int(m.group(3)),
                    "seconds": float(m.group(4)),
                }
            )
            done = int(m.group(1))
            self.sampler.iteration = done + 1
            peaks = self.sampler.peaks.get(done, {})  # printed as it goes: runs are long
            cells = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in sorted(peaks.items()))
            print(f"[refine-memory] it {done} peak RSS: {cells}", flush=True)


def install_memory_counter(dask_worker=None, dask_scheduler=None) -> None:
    """In a worker or nanny: count warnings of distributed's memory loggers."""
    counts = {"warnings": 0, "pauses": 0, "restarts": 0}

    class Counter(logging.Handler):
        def emit(self, record):
            text = record.getMessage()
            if "Pausing" in text or "paused" in text.lower():
                counts["pauses"] += 1
            elif "Restarting" in text or "restart" in text.lower():
                counts["restarts"] += 1
            elif "memory" in text.lower():
                counts["warnings"] += 1

    handler = Counter(logging.WARNING)
    for name in MEMORY_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    import builtins

    builtins._streamem_memory_counts = counts


def read_memory_counter() -> dict:
    import builtins

    return dict(getattr(builtins, "_streamem_memory_counts", {}))


def simulate_store(path: Path, args):
    from streamem.simulate.particles import simulate_particles

    return simulate_particles(
        path,
        args.particles,
        box_size=args.box,
        pixel_size_A=args.pixel_size,
        snr=args.snr,
        seed=args.seed,
        phantom="asym",
        chunk_size=args.chunk_size,
    )


def refine_and_measure(args, workdir: Path) -> dict:
    import numpy as np

    from streamem.api import angular_errors_deg
    from streamem.core.filters import lowpass
    from streamem.core.fsc import fsc, resolution_at
    from streamem.dist.cluster import client_for
    from streamem.em.refine import RefineOptions, refine3d
    from streamem.io.mrc import read_map
    from streamem.io.store import ParticleStore
    from streamem.simulate.particles import truth_volume_paths

    t0 = time.perf_counter()
    if args.store and Path(args.store).exists():
        store = ParticleStore(args.store)
    else:  # simulate (into --store where given, to reuse it)
        store = simulate_store(Path(args.store) if args.store else workdir / "p.zarr", args)
    simulate_s = time.perf_counter() - t0
    truth = read_map(truth_volume_paths(store.path)[0])[0]
    p = store.pixel_size_A
    reference = lowpass(truth, 30.0, p)
    memory = None
    if args.memory_per_worker:
        from streamem.em.memory import parse_bytes

        memory = parse_bytes(args.memory_per_worker)
    options = RefineOptions(
        particle_diameter_A=args.particle_diameter,
        max_iterations=args.max_iterations,
        local_prepass=args.local_prepass,
    )
    if memory is not None:
        options = _with_memory(options, memory)
    sampler = RssSampler()
    lines = _Lines(sampler)
    log = logging.getLogger("streamem")
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    out_dir = Path(args.out) if args.out else workdir / "run"
    with client_for(
        n_workers=args.n_workers,
        threads_per_worker=args.threads_per_worker,
        memory_limit=args.memory_per_worker or "auto",
    ) as client:
        client.run(install_memory_counter)
        client.run(install_memory_counter, nanny=True)
        sampler.start()
        t1 = time.perf_counter()
        error = None
        try:
            result = refine3d(store, reference, out_dir, options, client)
        except Exception as exc:  # report what was measured, then the failure
            error, result = f"{type(exc).__name__}: {exc}", None
        refine_s = time.perf_counter() - t1
        sampler.stop()
        counts = {"warnings": 0, "pauses": 0, "restarts": 0}
        for where in (client.run(read_memory_counter), client.run(read_memory_counter, nanny=True)):
            for c in where.values():
                for k in counts:
                    counts[k] += c.get(k, 0)
    log.removeHandler(lines)
    report = {
        "particles": store.n_particles,
        "box": store.box_size,
        "chunk_size": store.chunk_size,
        "simulate_s": simulate_s,
        "refine_s": refine_s,
        "iterations": lines.rows,
        "peaks": {str(k): v for k, v in sampler.peaks.items()},
        "dask_memory_events": counts,
        "error": error,
    }
    if result is not None:
        curve = fsc(np.asarray(result.map, np.float64), np.asarray(truth, np.float64))
        report["resolution_A"] = result.resolution_A
        report["fsc05_vs_truth_A"] = resolution_at(curve, 0.5, store.box_size, p)
        report["median_angular_error_deg"] = float(
            np.median(angular_errors_deg(store, result.poses))
        )
    return report


def _with_memory(options, memory_bytes: int):
    from dataclasses import fields, replace

    if "memory_per_worker_bytes" in {f.name for f in fields(options)}:
        return replace(options, memory_per_worker_bytes=memory_bytes)
    return options


def print_report(r: dict) -> None:
    gib = 2**30
    print(
        f"refine3d: {r['particles']} particles, box {r['box']}, chunk {r['chunk_size']} "
        f"({r['refine_s']:.0f} s; simulation {r['simulate_s']:.0f} s)"
    )
    names = sorted({n for row in r["peaks"].values() for n in row})
    head = f"{'it':>3} {'box':>4} {'res A':>7} {'s':>7} " + " ".join(
        f"{n + ' GiB':>14}" for n in names
    )
    print(head)
    by_it = {row["iteration"]: row for row in r["iterations"]}
    for it in sorted(int(k) for k in r["peaks"]):
        row = by_it.get(it, {})
        peaks = r["peaks"][str(it)]
        cells = " ".join(f"{peaks.get(n, 0) / gib:>14.2f}" for n in names)
        res = f"{row['resolution_A']:>7.2f}" if row else f"{'-':>7}"
        sec = f"{row['seconds']:>7.1f}" if row else f"{'-':>7}"
        box = f"{row['box']:>4}" if row else f"{'-':>4}"
        print(f"{it:>3} {box} {res} {sec} {cells}")
    every = [v for row in r["peaks"].values() for v in row.values()]
    if every:
        print(f"peak RSS of any process: {max(every) / gib:.2f} GiB")
    c = r["dask_memory_events"]
    print(
        f"Dask memory warnings {c['warnings']}, pauses {c['pauses']}, worker restarts {c['restarts']}"
    )
    if r.get("error"):
        print(f"run failed: {r['error']}")
    if "resolution_A" in r:
        print(
            f"final resolution {r['resolution_A']:.2f} A (FSC 0.143 half maps); "
            f"FSC 0.5 vs truth {r['fsc05_vs_truth_A']:.2f} A; "
            f"median angular error {r['median_angular_error_deg']:.2f} deg"
        )


def run(args) -> int:
    if args.allocator:
        with tempfile.TemporaryDirectory(prefix="streamem-allocator-") as tmp:
            path = args.store
            if not (path and Path(path).exists()):
                path = str(simulate_store(Path(path or Path(tmp) / "p.zarr"), args).path)
            rows = measure_allocators(path, args.allocator, args.particle_diameter)
        print(f"one E-step chunk of {args.allocator} images at full box in a thread, then the "
              "M-step of its accumulators (second calls; sys: seconds in the kernel)")  # fmt: skip
        print(f"{'malloc setting':<40} {'E-step s':>8} {'sys':>6} {'peak MiB':>8} "
              f"{'M-step s':>8} {'sys':>6} {'peak MiB':>8} {'RSS after MiB':>13}")  # fmt: skip
        for name, r in rows.items():
            print(
                f"{name:<40} {r['seconds']:>8.1f} {r['system_s']:>6.1f} "
                f"{r['peak_kib'] / 1024:>8.0f} {r['mstep_s']:>8.1f} {r['mstep_system_s']:>6.1f} "
                f"{r['mstep_peak_kib'] / 1024:>8.0f} {r['end_kib'] / 1024:>13.0f}"
            )
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0
    with tempfile.TemporaryDirectory(prefix="streamem-refine-memory-") as tmp:
        report = refine_and_measure(args, Path(tmp))
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if not report.get("error") else 1
