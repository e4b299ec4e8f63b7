"""``streamem info STORE.zarr``: what a particle store holds.

``--verify`` also reads every stored chunk (images and each metadata and truth
field) as a Dask job, one task per store chunk, and lists each bad one (missing,
corrupt, or images with NaN/Inf pixels) with its key and particle range. Exit
status: 0 when every chunk is good, 1 when any is bad, 2 for bad input (not a
store), as for every command.
"""

from __future__ import annotations

import argparse
import sys

from streamem.commands.execution import add_cluster_options, run_job
from streamem.errors import InputError
from streamem.io.store import (
    CTF_FIELDS,
    POSE_FIELDS,
    ChunkProblem,
    ParticleStore,
    store_size_bytes,
)

#: Exit status of ``info --verify`` when some chunk is bad (2 stays "bad input").
EXIT_BAD_CHUNKS = 1


def register(sub) -> None:
    p = sub.add_parser(
        "info",
        help="describe a particle store (--verify: check every chunk)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("store", help="particle store (.zarr folder)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="read and check every chunk; exit 0 if all are good, "
        f"{EXIT_BAD_CHUNKS} if any is missing, corrupt or holds NaN/Inf pixels",
    )
    add_cluster_options(p)
    p.set_defaults(func=run)


def describe(store: ParticleStore) -> str:
    """A human-readable summary of a store."""
    n, b = store.n_particles, store.box_size
    fields = store.fields()
    truth = store.fields("truth")
    size = store_size_bytes(store.path)
    raw = n * b * b * 4
    try:
        subsets = store.read_field("rlnRandomSubset")
        halves = f"1: {(subsets == 1).sum()}, 2: {(subsets == 2).sum()}"
    except InputError as exc:  # a damaged store is still described (and --verify runs)
        halves = f"unreadable ({exc.problem})"
    lines = [
        f"store        {store.path}",
        f"format       {store.facts['format']} v{store.facts['version']}",
        f"particles    {n}",
        f"box          {b} x {b} px",
        f"pixel size   {store.pixel_size_A:.4f} A",
        f"chunks       {len(store.chunk_bounds())} of {store.chunk_size} particles",
        f"on disk      {size / 2**20:.1f} MiB ({raw / max(size, 1):.2f}x compression)",
        f"half sets    {halves}",
        f"CTF          {'yes' if all(f in fields for f in CTF_FIELDS) else 'no'}",
        f"poses        {'yes' if all(f in fields for f in POSE_FIELDS) else 'no'}",
        f"classes      {'yes' if 'rlnClassNumber' in fields else 'no'}",
        f"ground truth {', '.join(truth) if truth else 'none'}",
        "optics groups:",
    ]
    for g in store.optics_groups:
        lines.append("  " + ", ".join(f"{k}={v}" for k, v in g.items()))
    lines.append(f"fields       {', '.join(fields)}")
    return "\n".join(lines)


def _verify_task(start: int, stop: int, store_path: str) -> list[ChunkProblem]:
    return ParticleStore(store_path).verify_range(start, stop)


def verify_store(store: ParticleStore, client=None, progress: bool = True) -> list[ChunkProblem]:
    """Every bad chunk of ``store``, in store order (a Dask job: one task per store chunk)."""
    from streamem.dist.graph import map_chunks

    bounds = store.chunk_bounds()
    tasks = map_chunks(_verify_task, bounds, str(store.path), name="verify")
    bar = _bar(len(tasks), progress)
    try:
        if client is None:
            import dask

            with _task_progress(bar):
                parts = dask.compute(*tasks, scheduler="threads")
        else:
            from distributed import as_completed

            futures = client.compute(tasks)
            for _ in as_completed(futures):
                bar.update(1)
            parts = client.gather(futures)
    finally:
        bar.close()
    return [p for part in parts for p in part]


def _bar(total: int, enabled: bool):
    from streamem.dist.progress import chunk_bar

    return chunk_bar(total, "verify", enabled)  # none in a log file or a test


def _task_progress(bar):
    from dask.callbacks import Callback

    class TaskProgress(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if isinstance(key, str) and key.startswith("verify-"):
                bar.update(1)

    return TaskProgress()


def report(store: ParticleStore, problems: list[ChunkProblem]) -> str:
    """One line per bad chunk, then a summary line."""
    n_chunks = len(store.chunk_bounds())
    n_arrays = len(store.array_names())
    lines = [f"{store.path}: {p.one_line()}" for p in problems]
    if problems:
        n_particles = len({i for p in problems for i in range(p.start, p.stop)})
        lines.append(
            f"verify: {len(problems)} bad chunk(s) in {store.path} "
            f"({n_particles} of {store.n_particles} particles affected)"
        )
    else:
        lines.append(
            f"verify: all good ({n_arrays} arrays x {n_chunks} chunks of {store.path} checked)"
        )
    return "\n".join(lines)


def run(args) -> int:
    store = ParticleStore(args.store)
    print(describe(store))
    if not args.verify:
        return 0
    sys.stdout.flush()
    problems = run_job(args, lambda client: verify_store(store, client))
    print(report(store, problems))
    return EXIT_BAD_CHUNKS if problems else 0
