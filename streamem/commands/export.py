"""``streamem export STORE.zarr OUT.star|OUT.cs``: a store as RELION 3.1 STAR or cryoSPARC
``.cs``, plus MRCS stacks.

Stacks (float32, pixel size in the header) go to ``--stacks-dir`` (default
``OUT_stacks/`` next to the output file); ``rlnImageName`` (or ``blob/path``) points at
them relative to the output file's folder. A ``.cs`` output converts poses, shifts,
CTF, half sets and classes to cryoSPARC's conventions (:mod:`streamem.io.cryosparc`).
Ground truth fields are not exported.
"""

from __future__ import annotations

import time
from pathlib import Path

from streamem import validate as check
from streamem.commands.execution import add_scheduler_options, add_threads_option, scheduler_client
from streamem.io.cryosparc import export_cs
from streamem.io.relion_export import export_store
from streamem.io.store import ParticleStore


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a particle store to RELION STAR or cryoSPARC .cs + MRCS",
        description=__doc__,
    )
    p.add_argument("store", help="particle store (.zarr folder)")
    p.add_argument("out", help="output STAR file, or .cs file for cryoSPARC")
    p.add_argument("--stacks-dir", default=None, help="folder for the MRCS stacks")
    p.add_argument(
        "--images-per-stack", type=int, default=None, help="default: the store's chunk size"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_threads_option(p, "I/O threads (default <= 4)")
    add_scheduler_options(p)
    p.set_defaults(func=run)


def check_options(args) -> None:
    """Every numeric option, before any file is read (InputError naming the option)."""
    check.at_least("--images-per-stack", args.images_per_stack, 1)
    check.at_least("--n-workers", args.workers, 1)


def run(args) -> int:
    check_options(args)
    t0 = time.perf_counter()
    store = ParticleStore(args.store)
    write = export_cs if Path(args.out).suffix.lower() == ".cs" else export_store
    with scheduler_client(args) as client:
        star = write(
            args.store,
            args.out,
            stacks_dir=args.stacks_dir,
            overwrite=args.overwrite,
            images_per_stack=args.images_per_stack,
            workers=args.workers,
            client=client,
        )
    seconds = time.perf_counter() - t0
    mb = store.n_particles * store.box_size**2 * 4 / 1e6
    print(
        f"exported {store.n_particles} particles to {star}: {mb:.1f} MB in {seconds:.2f} s "
        f"({mb / max(seconds, 1e-9):.1f} MB/s)"
    )
    return 0
