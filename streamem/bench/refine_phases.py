"""``streamem bench refine-phases``: where a refine3d iteration's time goes, phase by phase.

Simulates particles of the largest built-in phantom (``asym``; defaults: 5,000
particles, box 128, 3.59 Å/px, SNR 0.05), starts from the truth low-passed to 30 Å and
runs a full refine3d (``--particle-diameter 300``, final join included) on a
LocalCluster (default 2 workers × 1 thread). Printed per iteration: the fine angular
step, whether its local search had a pre-pass, the seconds, and the seconds of each
phase: those of the E-step tasks summed over the workers (:mod:`streamem.em.phases`: read+FFT, projection, coarse GEMMs,
significance, fine pass, back-projection, reduction) and those of the run loop on the
client (M-step; writing: results, data.star, maps and model files), plus the coarse
pass's GFLOP/s per thread as a fraction of one worker thread's SGEMM rate (measured once
on a worker), and the projection's and the back-projection's seconds per Fourier point
of the slices they made and inserted (ns, all threads). ``--compare N`` also runs the
E-step of the first N particles of every iteration twice in this process on the
iteration's own model, with the per-image coarse pass (``batched=False``) and the
batched one, and prints seconds and the ratio. At the
end: the ratio of the 1.88° local iterations' seconds to the 3.75° local ones', peak RSS
per process, FSC 0.5 against the truth and the median angular error.

Until the run loop records its own phases, the client-side ones are timed by wrapping
the run loop's functions in this process (the E-step tasks record theirs themselves).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from streamem.bench.refine_memory import (
    RssSampler,
    _Lines,
    add_refine_run_arguments,
    simulate_store,
)
from streamem.em.phases import PHASES, add_seconds, ns_per_point, phase_table


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser(
        "refine-phases",
        help="refine3d on simulated data: seconds per phase and iteration",
        description=__doc__,
    )
    add_refine_run_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", type=int, default=0, metavar="N",
                   help="per iteration, old vs new E-step on the first N particles")  # fmt: skip
    p.add_argument("--store", default=None, help="reuse this simulated store")
    p.set_defaults(func=run)


class _Recorder:
    """Wraps the run loop's steps (this process only) and keeps one row per iteration."""

    def __init__(self, compare: int):
        self.rows: list[dict] = []
        self.compare = compare
        self.current: dict = {}

    def install(self):
        from streamem.em import engine
        from streamem.em.refine import Refine3DJob

        self.saved = [
            (engine, "run_estep", engine.run_estep),
            (engine, "write_data_star", engine.write_data_star),
            (Refine3DJob, "maximise", Refine3DJob.maximise),
            (Refine3DJob, "write_outputs", Refine3DJob.write_outputs),
        ]
        rec = self

        def run_estep(store, results_path, prev_iteration, iteration, model, *a, **kw):
            rec.current = {"iteration": iteration, "grid": model.grid,
                           "radius_px": model.max_radius_px}  # fmt: skip
            t0 = time.perf_counter()
            stats = rec.saved[0][2](store, results_path, prev_iteration, iteration, model, *a, **kw)
            rec.current["estep_s"] = time.perf_counter() - t0
            rec.current["phases"] = dict(stats.phase_seconds)
            rec.current["coarse_flops"] = stats.coarse_flops
            rec.current["points"] = dict(stats.phase_points)
            if rec.compare:
                rec.current["compare"] = _compare(store, results_path, prev_iteration, model,
                                                  rec.compare)  # fmt: skip
            rec.rows.append(rec.current)
            print(f"[refine-phases] it {iteration} E-step {rec.current['estep_s']:.1f} s: "
                  f"{phase_table(stats.phase_seconds, stats.coarse_flops, None, stats.phase_points)}",
                  flush=True)  # fmt: skip
            return stats

        def timed(name, fn):
            def wrapper(*a, **kw):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    phases = rec.current.setdefault("client", {})
                    phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0

            return wrapper

        engine.run_estep = run_estep
        engine.write_data_star = timed("writing", engine.write_data_star)
        Refine3DJob.maximise = timed("mstep", Refine3DJob.maximise)
        Refine3DJob.write_outputs = timed("writing", Refine3DJob.write_outputs)

    def uninstall(self):
        for owner, name, fn in self.saved:
            setattr(owner, name, fn)


def _compare(store, results_path, prev_iteration, model, n: int) -> dict:
    """Seconds of the first n particles' E-step, per-image vs batched coarse pass."""
    from dataclasses import replace

    from streamem.em.estep import expectation
    from streamem.io.results import read_results

    n = min(n, store.n_particles)
    chunk = store.read_chunk(0, n)
    meta = dict(chunk.metadata)
    meta["particle_index"] = np.arange(n)
    if prev_iteration is not None:
        meta.update(read_results(results_path, prev_iteration, 0, n))
    out = {}
    for batched in (False, True):
        t0 = time.perf_counter()
        expectation(chunk.images, meta, replace(model, coarse={}), batched=batched)
        out["new" if batched else "old"] = time.perf_counter() - t0
    return out


def refine_and_time(args, workdir: Path) -> dict:
    from streamem.api import angular_errors_deg
    from streamem.core.filters import lowpass
    from streamem.core.fsc import fsc, resolution_at
    from streamem.dist.cluster import client_for
    from streamem.em.phases import sgemm_rate_flops
    from streamem.em.refine import RefineOptions, refine3d
    from streamem.io.mrc import read_map
    from streamem.io.store import ParticleStore
    from streamem.simulate.particles import truth_volume_paths

    if args.store and Path(args.store).exists():
        store = ParticleStore(args.store)
    else:
        store = simulate_store(Path(args.store) if args.store else workdir / "p.zarr", args)
    truth = read_map(truth_volume_paths(store.path)[0])[0]
    reference = lowpass(truth, 30.0, store.pixel_size_A)
    options = RefineOptions(
        particle_diameter_A=args.particle_diameter,
        max_iterations=args.max_iterations,
        local_prepass=args.local_prepass,
    )
    recorder, sampler = _Recorder(args.compare), RssSampler()
    lines = _Lines(sampler)
    log = logging.getLogger("streamem")
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    recorder.install()
    try:
        with client_for(
            n_workers=args.n_workers, threads_per_worker=args.threads_per_worker
        ) as client:
            sgemm = client.submit(sgemm_rate_flops, pure=False).result()  # one worker thread
            sampler.start()
            t0 = time.perf_counter()
            result = refine3d(store, reference, workdir / "run", options, client)
            refine_s = time.perf_counter() - t0
            sampler.stop()
    finally:
        recorder.uninstall()
        log.removeHandler(lines)
    curve = fsc(np.asarray(result.map, np.float64), np.asarray(truth, np.float64))
    seconds = {r["iteration"]: r["seconds"] for r in lines.rows}
    return {
        "particles": store.n_particles,
        "box": store.box_size,
        "refine_s": refine_s,
        "sgemm_flops": sgemm,
        "rows": [{**r, "seconds": seconds.get(r["iteration"], np.nan)} for r in recorder.rows],
        "peaks": sampler.peaks,
        "fsc05_vs_truth_A": resolution_at(curve, 0.5, store.box_size, store.pixel_size_A),
        "median_angular_error_deg": float(np.median(angular_errors_deg(store, result.poses))),
    }


def print_report(r: dict) -> None:
    print(f"refine3d: {r['particles']} particles, box {r['box']}, {r['refine_s']:.0f} s; "
          f"SGEMM {r['sgemm_flops'] / 1e9:.1f} GFLOP/s per worker thread")  # fmt: skip
    head = f"{'it':>3} {'step':>9} {'pre':>3} {'r px':>5} {'s':>6} " + " ".join(
        f"{p[:8]:>8}" for p in PHASES
    )
    print(head + f" {'GFLOP/s':>8} {'/SGEMM':>6} {'proj ns':>7} {'bp ns':>6}"
          f" {'old s':>6} {'new s':>6} {'old/new':>7}")  # fmt: skip
    for row in r["rows"]:
        ph = add_seconds(row["phases"], row.get("client", {}))
        grid = row["grid"]
        step = f"{grid.fine_angular_step_deg:.2f}{'L' if grid.local_sigma_deg else 'G'}"
        gemm = row["phases"].get("coarse_gemm", 0.0)
        rate = row["coarse_flops"] / gemm if gemm > 0 else 0.0
        per_point = [
            ns_per_point(row["phases"], row.get("points", {}), p)
            for p in ("projection", "backprojection")
        ]
        cmp_ = row.get("compare")
        tail = (
            f" {cmp_['old']:6.1f} {cmp_['new']:6.1f} {cmp_['old'] / cmp_['new']:7.2f}"
            if cmp_
            else ""
        )
        print(
            f"{row['iteration']:>3} {step:>9} {'yes' if grid.local_prepass else '-':>3} "
            f"{row['radius_px']:5.1f} {row['seconds']:6.1f} "
            + " ".join(f"{ph.get(p, 0.0):8.1f}" for p in PHASES)
            + f" {rate / 1e9:8.2f} {rate / r['sgemm_flops']:6.2f}"
            + f" {per_point[0]:7.1f} {per_point[1]:6.1f}{tail}"
        )
    by_step: dict[str, list[float]] = {}
    for row in r["rows"][:-1]:  # the last one joins the halves at the full box: apart
        if row["grid"].local_sigma_deg:
            by_step.setdefault(f"{row['grid'].fine_angular_step_deg:.2f}", []).append(
                row["seconds"]
            )
    for fine in ("1.88", "0.94"):
        if fine in by_step and "3.75" in by_step:
            ratio = np.mean(by_step[fine]) / np.mean(by_step["3.75"])
            print(f"s per iteration at {fine}° local / at 3.75° local (final one apart): "
                  f"{ratio:.2f}")  # fmt: skip
    if r["rows"]:
        last = r["rows"][-1]
        print(f"final iteration (halves joined, radius {last['radius_px']:.0f} px): "
              f"{last['seconds']:.1f} s")  # fmt: skip
    every = [v for row in r["peaks"].values() for v in row.values()]
    if every:
        print(f"peak RSS of any process: {max(every) / 2**30:.2f} GiB")
    print(f"FSC 0.5 vs truth {r['fsc05_vs_truth_A']:.2f} Å; "
          f"median angular error {r['median_angular_error_deg']:.2f}°")  # fmt: skip


def run(args) -> int:
    with tempfile.TemporaryDirectory(prefix="streamem-refine-phases-") as tmp:
        report = refine_and_time(args, Path(tmp))
    print_report(report)
    return 0
