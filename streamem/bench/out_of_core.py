"""``streamem bench out-of-core``: one refine3d E-step pass over a store larger than memory.

Makes a sharded store of ``--target-gb`` (default: twice this machine's RAM) of box
``--box`` images quickly, not with the simulator: a few hundred particles are simulated
once (``asym`` phantom, CTF, noise at SNR 0.05) and the big store repeats them, particle
i being base particle ``i % K`` plus fresh seeded noise (σ 0.1 of the background), with
its metadata (CTF, half set, optics); one Dask task per shard writes it. A
``--small``-particle store (default 5,000) of the same images is made the same way.
Then, on one LocalCluster (``--n-workers`` × 1 thread), refine3d's first iteration
(coarse search: HEALPix order ``--healpix-order``, default 1, then the fine pass; the
M-step) runs over every particle of the small store, then of the big one, with
:class:`streamem.bench.refine_memory.RssSampler` sampling the client's and every
worker's RSS. Reported: peak RSS per process and pass, seconds of the iteration,
particles/s and their ratio (big / small), the big pass's read rate (store bytes / E-step
seconds: the store is twice RAM, so the page cache cannot hold it), and disk used
against raw float32. No copy of the data is made; everything is written under a
temporary folder in ``--workdir`` and removed at the end. The bench refuses to start
(one line) without enough free disk there.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from streamem.errors import InputError

#: Base particles simulated once and repeated (with fresh noise) to fill the stores.
BASE_PARTICLES = 256
PERTURB_SIGMA = 0.1


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser(
        "out-of-core",
        help="one refine3d E-step pass over a store of 2x RAM: peak RSS, read rate, speed",
        description=__doc__,
    )
    p.add_argument("--target-gb", type=float, default=None, help="store size (default 2x RAM)")
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--angpix", dest="pixel_size", type=float, default=3.59, help="Å")
    p.add_argument("--small", type=int, default=5000, help="particles of the in-memory store")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--healpix-order", type=int, default=1)
    p.add_argument("--n-workers", type=int, default=2)
    p.add_argument("--workdir", default=None, help="where the stores go (default: temp dir)")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    p.set_defaults(func=run)


def plan(target_bytes: float, box: int, workdir: Path, small: int) -> dict:
    """Particles of the big store and the disk it needs; InputError if the disk is short."""
    image_bytes = 4 * box * box
    n = max(small, math.ceil(target_bytes / image_bytes))
    need = 1.1 * (n + small) * image_bytes + 2**30  # zstd barely packs noise; 1 GiB spare
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise InputError(
            workdir,
            f"needs {need / 1e9:.1f} GB of free disk for the stores, has {free / 1e9:.1f} GB",
        )
    return {"particles": n, "raw_bytes": n * image_bytes, "disk_needed": need}


def fill_task(store_path: str, base_path: str, start: int, stop: int, seed: int) -> int:
    """Task: particles ``[start, stop)`` (one shard) = base particle ``i % K`` + noise."""
    from streamem.io.store import ParticleStore

    base = ParticleStore(base_path).read_chunk(0, BASE_PARTICLES)
    k = np.arange(start, stop) % BASE_PARTICLES
    rng = np.random.default_rng([seed, start])
    noise = rng.standard_normal((stop - start, *base.images.shape[1:]), dtype=np.float32)
    images = base.images[k] + np.float32(PERTURB_SIGMA) * noise
    meta = {label: col[k] for label, col in base.metadata.items()}
    meta["rlnRandomSubset"] = (np.arange(start, stop) % 2 + 1).astype(np.int32)
    return ParticleStore(store_path).write_region(start, images=images, metadata=meta)


def make_store(path: Path, base, n: int, chunk: int, shard: int, client, seed: int = 0):
    """A store of ``n`` particles repeating ``base`` (:func:`fill_task`, one task per shard)."""
    import dask

    from streamem.dist.tasks import run_tasks
    from streamem.io.store import create_store

    root = base._root()
    fields = {k: a.dtype for k, a in root["metadata"].arrays()}
    fields = {k: (str if v.kind in "OTU" else v) for k, v in fields.items()}
    store = create_store(
        path, n, base.box_size, base.pixel_size_A, base.optics_groups, fields,
        chunk_size=chunk, shard_size=shard, provenance={"command": "bench out-of-core"},
    )  # fmt: skip
    tasks = [
        dask.delayed(fill_task, pure=True)(str(store.path), str(base.path), s, e, seed)
        for s, e in store.write_bounds()
    ]
    run_tasks(tasks, client, None)
    return store


def one_pass(store, reference, out: Path, healpix_order: int, client) -> dict:
    """refine3d's first iteration over every particle; seconds, peak RSS per process."""
    from streamem.bench.refine_memory import RssSampler, _Lines
    from streamem.em.refine import RefineOptions, refine3d

    options = RefineOptions(healpix_order=healpix_order, max_iterations=2)
    sampler = RssSampler()
    lines = _Lines(sampler)
    log = logging.getLogger("streamem")
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    sampler.start()
    t0 = time.perf_counter()
    try:
        refine3d(store, reference, out, options, client, stop_after_iteration=1)
    finally:
        seconds = time.perf_counter() - t0
        sampler.stop()
        log.removeHandler(lines)
    peaks: dict[str, int] = {}
    for row in sampler.peaks.values():
        for name, rss in row.items():
            peaks[name] = max(peaks.get(name, 0), rss)
    iteration_s = lines.rows[0]["seconds"] if lines.rows else seconds
    n = store.n_particles
    return {
        "particles": n,
        "seconds": seconds,
        "iteration_s": iteration_s,
        "particles_per_s": n / iteration_s,
        "read_MB_per_s": n * 4 * store.box_size**2 / 1e6 / iteration_s,
        "peak_rss": peaks,
    }


def run(args) -> int:
    import psutil

    from streamem.core.filters import lowpass
    from streamem.dist.cluster import client_for
    from streamem.io.mrc import read_map
    from streamem.io.store import store_size_bytes
    from streamem.simulate.particles import simulate_particles, truth_volume_paths

    ram = psutil.virtual_memory().total
    target = args.target_gb * 1e9 if args.target_gb else 2 * ram
    workdir = Path(args.workdir or tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)  # where the user asked (a temp folder inside)
    sizes = plan(target, args.box, workdir, args.small)
    report: dict = {"ram_bytes": ram, "box": args.box, **sizes}
    with tempfile.TemporaryDirectory(prefix="streamem-out-of-core-", dir=workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        base = simulate_particles(
            tmp / "base.zarr", BASE_PARTICLES, box_size=args.box, pixel_size_A=args.pixel_size,
            snr=0.05, seed=1, phantom="asym", workers=2,
        )  # fmt: skip
        truth = read_map(truth_volume_paths(base.path)[0])[0]
        reference = lowpass(truth, 30.0, base.pixel_size_A)
        with client_for(n_workers=args.n_workers, threads_per_worker=1) as client:
            small = make_store(
                tmp / "small.zarr", base, args.small, args.chunk_size, args.shard_size, client
            )
            big = make_store(
                tmp / "big.zarr", base, sizes["particles"], args.chunk_size, args.shard_size, client
            )
            report["make_s"] = time.perf_counter() - t0
            report["disk_bytes"] = store_size_bytes(big.path)
            report["small"] = one_pass(small, reference, tmp / "run_small", args.healpix_order,
                                       client)  # fmt: skip
            report["big"] = one_pass(big, reference, tmp / "run_big", args.healpix_order, client)
    report["speed_ratio"] = report["big"]["particles_per_s"] / report["small"]["particles_per_s"]
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def print_report(r: dict) -> None:
    gib = 2**30
    print(
        f"big store: {r['particles']:,} particles of {r['box']} px, raw float32 "
        f"{r['raw_bytes'] / 1e9:.2f} GB ({r['raw_bytes'] / r['ram_bytes']:.2f} x RAM), on disk "
        f"{r['disk_bytes'] / 1e9:.2f} GB ({r['disk_bytes'] / r['raw_bytes']:.2f} x raw); "
        f"made in {r['make_s']:.0f} s"
    )
    print(f"{'pass':<6} {'particles':>10} {'iter s':>8} {'part/s':>8} {'MB/s':>7}  peak RSS GiB")
    for name in ("small", "big"):
        p = r[name]
        rss = "  ".join(f"{k} {v / gib:.2f}" for k, v in sorted(p["peak_rss"].items()))
        print(
            f"{name:<6} {p['particles']:>10,} {p['iteration_s']:>8.1f} "
            f"{p['particles_per_s']:>8.1f} {p['read_MB_per_s']:>7.1f}  {rss}"
        )
    worst = max(max(r[n]["peak_rss"].values()) for n in ("small", "big"))
    print(
        f"speed big/small: {r['speed_ratio']:.2f}; largest peak RSS {worst / gib:.2f} GiB "
        f"({worst / r['ram_bytes']:.1%} of RAM)"
    )
