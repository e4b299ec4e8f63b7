"""``streamem reconstruct STORE.zarr --out map.mrc``: a map from known poses (as relion_reconstruct)."""

from __future__ import annotations

from streamem import validate as check
from streamem.commands.execution import add_cluster_options, run_job


def register(sub) -> None:
    p = sub.add_parser(
        "reconstruct", help="reconstruct a map from known poses", description=__doc__
    )
    p.add_argument("store", help="particle store (.zarr)")
    p.add_argument("--out", required=True, help="output map (.mrc)")
    p.add_argument("--subset", type=int, choices=(1, 2), default=None, help="one half set only")
    p.add_argument("--sym", default="C1")
    p.add_argument("--no-ctf", action="store_true")
    p.add_argument("--maxres", type=float, default=None, help="Å")
    p.add_argument("--poses", default=None, help="RELION STAR with poses (rows in store order)")
    p.add_argument("--truth", action="store_true", help="use the simulated ground-truth poses")
    p.add_argument("--overwrite", action="store_true")
    add_cluster_options(p)
    p.set_defaults(func=run)


def check_options(args) -> None:
    """Every option value, before any file is read (InputError naming the option)."""
    check.symmetry("--sym", args.sym)
    check.positive("--maxres", args.maxres, "Å")


def run(args) -> int:
    check_options(args)
    from streamem.core.symmetry import symmetry_matrices
    from streamem.em.backproject_job import reconstruct_map
    from streamem.io.atomic import check_output
    from streamem.io.mrc import write_map
    from streamem.io.store import ParticleStore

    inputs = [args.store, args.poses]
    check_output(args.out, args.overwrite, inputs)
    store = ParticleStore(args.store)
    volume = run_job(
        args,
        lambda client: reconstruct_map(
            store,
            pose_source="truth" if args.truth else ("star" if args.poses else "metadata"),
            star_path=args.poses,
            subset=args.subset,
            symmetry_matrices=symmetry_matrices(args.sym),
            max_resolution_A=args.maxres,
            do_ctf=not args.no_ctf,
            client=client,
        ),
    )
    write_map(args.out, volume, store.pixel_size_A, overwrite=args.overwrite, inputs=inputs)
    print(f"wrote {args.out} ({store.box_size}^3, {store.pixel_size_A:.3f} Å/px)")
    return 0
