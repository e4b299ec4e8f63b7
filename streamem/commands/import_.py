"""``streamem import particles.star|particles.cs OUT.zarr``: a particle set into a store.

RELION 3.0 and 3.1+ STAR files; ``NNNNNN@stack.mrcs`` names resolved next to the
STAR file first, then in the current folder. Every STAR column is kept. cryoSPARC
particle files (``.cs``, or a ``.csg`` group) with ``blob/path`` resolved next to the
file, then in the folders above it (the project), then in the current folder; poses,
shifts, CTF, half sets and classes converted to RELION's conventions. The store is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import time

from streamem import validate as check
from streamem.commands.execution import (
    add_scheduler_options,
    add_shard_size_option,
    add_threads_option,
    scheduler_client,
)
from streamem.io.importer import import_particles


def register(sub) -> None:
    p = sub.add_parser(
        "import",
        help="import a RELION STAR or cryoSPARC .cs/.csg particle set + stacks",
        description=__doc__,
    )
    p.add_argument(
        "star", help="RELION particle STAR file (3.0 or 3.1+), or cryoSPARC .cs / .csg file"
    )
    p.add_argument("out", help="output particle store (.zarr folder)")
    p.add_argument(
        "--chunk-size", type=int, default=None, help="particles per store chunk (default ~64 MiB)"
    )
    add_shard_size_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument(
        "--require-ctf", action="store_true", help="fail if the STAR file has no CTF parameters"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for rlnRandomSubset when absent")
    add_threads_option(p, "I/O threads (default <= 4)")
    add_scheduler_options(p)
    p.set_defaults(func=run)


def check_options(args) -> None:
    """Every numeric option, before any file is read (InputError naming the option)."""
    check.at_least("--chunk-size", args.chunk_size, 1)
    check.at_least("--shard-size", args.shard_size, 0)
    check.seed("--seed", args.seed)
    check.at_least("--n-workers", args.workers, 1)


def run(args) -> int:
    check_options(args)
    t0 = time.perf_counter()
    with scheduler_client(args) as client:
        store = import_particles(
            args.star,
            args.out,
            chunk_size=args.chunk_size,
            overwrite=args.overwrite,
            require_ctf=args.require_ctf,
            seed=args.seed,
            workers=args.workers,
            client=client,
            shard_size="auto" if args.shard_size is None else args.shard_size,
        )
    seconds = time.perf_counter() - t0
    mb = store.n_particles * store.box_size**2 * 4 / 1e6
    print(
        f"imported {store.n_particles} particles of {store.box_size} x {store.box_size} px "
        f"({store.pixel_size_A:.4g} A/px) into {store.path}: {mb:.1f} MB in {seconds:.2f} s "
        f"({mb / max(seconds, 1e-9):.1f} MB/s)"
    )
    return 0
