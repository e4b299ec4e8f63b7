"""``streamem refine3d STORE.zarr --ref MAP.mrc --out DIR``: 3D auto-refine (RELION's relion_refine --auto_refine)."""

from __future__ import annotations

from pathlib import Path

from streamem.commands.execution import (
    add_cluster_options,
    add_continue_option,
    add_old_spelling,
    run_job,
)
from streamem.errors import InputError


def register(sub) -> None:
    p = sub.add_parser(
        "refine3d", help="3D auto-refine with gold-standard half sets", description=__doc__
    )
    p.add_argument("store", help="particle store (.zarr)")
    p.add_argument("--ref", required=True, help="starting map (MRC), same box and pixel size")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--particle-diameter", type=float, default=None, help="Å (default 0.8 x box)")
    p.add_argument(
        "--ini-high", type=float, default=30.0, help="low-pass of the reference, Å (default 30)"
    )
    p.add_argument("--sym", default="C1", help="point group (C1, Cn, Dn, T, O, I)")
    p.add_argument("--tau2-fudge", type=float, default=1.0)
    p.add_argument(
        "--healpix-order",
        type=int,
        default=2,
        help="initial coarse HEALPix order (2: 15° coarse, 7.5° fine)",
    )
    p.add_argument("--offset-range", type=float, default=6.0, help="pixels")
    p.add_argument("--offset-step", type=float, default=2.0, help="pixels (coarse)")
    p.add_argument(
        "--auto-local-healpix-order",
        type=int,
        default=3,
        help="coarse order from which searches are local (RELION: 4)",
    )
    p.add_argument(
        "--no-local-prepass",
        dest="local_prepass",
        action="store_false",
        help="local searches after the first local order score every grid point within "
        "3σ of the previous pose, as RELION (default: the children of the significant "
        "orientations of a pass one order coarser: about 3x faster E-steps, see bench estep-chunk --local)",
    )
    iterations = p.add_argument(
        "--iterations",
        dest="max_iterations",
        type=int,
        default=25,
        help="at most this many (the last joins the halves; it stops sooner once converged)",
    )
    add_old_spelling(p, iterations, "--max-iterations")
    p.add_argument("--no-ctf", action="store_true")
    p.add_argument(
        "--solvent-mask",
        default=None,
        metavar="MASK.mrc",
        help="mask (values in [0, 1], the store's box) for solvent flattening and the masked "
        "FSC of run_fsc.png (RELION's --solvent_mask; default: a soft sphere of "
        "--particle-diameter)",
    )
    add_write_stacks_option(p)
    add_continue_option(p)
    add_memory_option(p)
    add_cluster_options(p)
    p.set_defaults(func=run)


def add_memory_option(p) -> None:
    """``--memory-per-worker``: the E-step's memory budget (refine3d, class3d, class2d)."""
    p.add_argument(
        "--memory-per-worker",
        default=None,
        metavar="SIZE",
        help="memory each worker may use (e.g. 4GiB); the E-step sizes its sub-batches "
        "to it over the worker's threads (default: the Dask worker's memory limit, or "
        "the available memory with --no-cluster)",
    )


def add_write_stacks_option(p) -> None:
    """``--write-stacks``: MRCS stacks in RUN/Particles for a store without (refine3d, class3d)."""
    p.add_argument(
        "--write-stacks",
        action="store_true",
        help="a store without stacks (simulated, extracted) is first written as MRCS stacks "
        "into RUN/Particles, so the run's STAR files name images RELION opens",
    )


def memory_per_worker(args) -> int | None:
    """``--memory-per-worker`` in bytes (None when not given); InputError if not a size."""
    from streamem.em.memory import parse_bytes

    return None if args.memory_per_worker is None else parse_bytes(args.memory_per_worker)


def run(args) -> int:
    from streamem.em.refine import RefineOptions, refine3d
    from streamem.io.atomic import check_not_input
    from streamem.io.store import ParticleStore

    # before any work: never write into them
    check_not_input(args.out, [args.store, args.ref, args.solvent_mask])
    # options first (no file touched), then the inputs, then the options against the store
    options = RefineOptions(
        particle_diameter_A=args.particle_diameter,
        ini_high_A=args.ini_high,
        symmetry=args.sym,
        tau2_fudge=args.tau2_fudge,
        healpix_order=args.healpix_order,
        offset_range_px=args.offset_range,
        offset_step_px=args.offset_step,
        local_from_order=args.auto_local_healpix_order,
        local_prepass=args.local_prepass,
        max_iterations=args.max_iterations,
        do_ctf=not args.no_ctf,
        memory_per_worker_bytes=memory_per_worker(args),
        solvent_mask=str(Path(args.solvent_mask).absolute()) if args.solvent_mask else None,
    )
    store = ParticleStore(args.store)
    if not Path(args.ref).exists():
        raise InputError(args.ref, "reference map not found")
    options.check_box(store.box_size, store.pixel_size_A)
    result = run_job(
        args,
        lambda client: refine3d(
            store,
            args.ref,
            args.out,
            options,
            client,
            args.continue_run,
            progress=True,
            write_stacks=args.write_stacks,
        ),
    )
    print(f"final resolution {result.resolution_A:.2f} Å after {result.iterations} iterations")
    print(f"map: {result.out_dir / 'run_class001.mrc'}  FSC plot: {result.out_dir / 'run_fsc.png'}")
    return 0
