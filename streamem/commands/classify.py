"""``streamem class3d STORE.zarr --ref MAP.mrc --k K --out DIR``: 3D classification (RELION's class3d).

``streamem class2d STORE.zarr --k K --out DIR``: 2D classification (RELION's class2d).
"""

from __future__ import annotations

from pathlib import Path

from streamem.commands.execution import run_job
from streamem.errors import InputError


def register(sub) -> None:
    from streamem.commands.execution import add_cluster_options, add_continue_option
    from streamem.commands.refine3d import add_memory_option, add_write_stacks_option

    p = sub.add_parser("class3d", help="3D classification into K classes", description=__doc__)
    p.add_argument("store", help="particle store (.zarr)")
    p.add_argument("--ref", help="starting map (MRC), same box and pixel size")
    p.add_argument(
        "--from-refine",
        metavar="DIR",
        default=None,
        help="start from a finished refine3d run folder: its map (instead of --ref), poses "
        "and noise model (consensus-then-classify; use with --local SIGMA or --skip-align)",
    )
    p.add_argument(
        "--solvent-mask",
        metavar="MASK.mrc",
        default=None,
        help="mask (values 0-1) applied to the references instead of the particle sphere",
    )
    p.add_argument("--out", required=True, help="run folder (must be new or empty)")
    p.add_argument("--k", type=int, default=4, help="number of classes (default 4)")
    p.add_argument("--iterations", type=int, default=25)
    p.add_argument(
        "--healpix-order", type=int, default=2, help="coarse HEALPix order (2: 15°; fine pass 7.5°)"
    )
    p.add_argument(
        "--local",
        type=float,
        default=None,
        metavar="SIGMA_DEG",
        help="local searches around the stored poses (σ in degrees)",
    )
    p.add_argument("--skip-align", action="store_true", help="keep the stored poses; classify only")
    p.add_argument(
        "--tau2-fudge", type=float, default=4.0, help="regularisation (RELION class3d: 4)"
    )
    p.add_argument(
        "--tau2-from",
        choices=("pooled", "reference", "fsc"),
        default="pooled",
        help="signal power of the classes: one for all, their maps' powers weighted by size "
        "(pooled), each class's own map's (reference, RELION) or the FSC of its random halves",
    )
    p.add_argument("--particle-diameter", type=float, default=None, help="Å (default 0.8 x box)")
    p.add_argument(
        "--ini-high", type=float, default=40.0, help="low-pass of the reference, Å (default 40)"
    )
    p.add_argument(
        "--lowres-iterations",
        type=int,
        default=None,
        help="iterations limited to --ini-high (default: a third)",
    )
    p.add_argument(
        "--strict-highres",
        type=float,
        default=None,
        help="never use data beyond this resolution, Å",
    )
    p.add_argument("--offset-range", type=float, default=5.0, help="pixels")
    p.add_argument("--offset-step", type=float, default=1.0, help="pixels (coarse)")
    p.add_argument("--sym", default="C1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-random-seeds",
        action="store_true",
        help="score every particle against every class in the first iteration "
        "(default: one random class each, as RELION, so the classes start apart)",
    )
    p.add_argument(
        "--no-cross-half",
        action="store_true",
        help="score every particle against class maps it helped build (RELION; default: "
        "each random half against the classes of the other half, so no particle meets its "
        "own noise and a random split cannot hold itself)",
    )
    p.add_argument(
        "--no-unbiased-scores",
        action="store_true",
        help="with crossed halves, score against the other half's class maps as they are "
        "(default: less the residual each map's own error adds in expectation, so a "
        "smaller class's noisier map is not held against it)",
    )
    p.add_argument(
        "--perturbation",
        type=float,
        default=0.0,
        help="add seeded low-pass noise of this rms (x the map's) to each class's start",
    )
    p.add_argument("--no-ctf", action="store_true")
    add_write_stacks_option(p)
    add_continue_option(p)
    add_memory_option(p)
    add_cluster_options(p)
    p.set_defaults(func=run_class3d)
    register_class2d(sub)


def run_class3d(args) -> int:
    from streamem.commands.refine3d import memory_per_worker
    from streamem.em.classify3d import Class3DOptions, classify3d
    from streamem.io.atomic import check_not_input
    from streamem.io.store import ParticleStore

    check_not_input(
        args.out, [args.store, args.ref, args.from_refine, args.solvent_mask]
    )  # before any work: never write into them
    # the options first (no file read), then the inputs, then the options against them
    options = Class3DOptions(
        n_classes=args.k,
        iterations=args.iterations,
        healpix_order=args.healpix_order,
        offset_range_px=args.offset_range,
        offset_step_px=args.offset_step,
        local_sigma_deg=args.local,
        skip_align=args.skip_align,
        tau2_fudge=args.tau2_fudge,
        tau2_from=args.tau2_from,
        particle_diameter_A=args.particle_diameter,
        ini_high_A=args.ini_high,
        lowres_iterations=args.lowres_iterations,
        strict_highres_A=args.strict_highres,
        symmetry=args.sym,
        seed=args.seed,
        random_seeds=not args.no_random_seeds,
        perturbation=args.perturbation,
        cross_half=not args.no_cross_half,
        unbiased_scores=not args.no_unbiased_scores,
        do_ctf=not args.no_ctf,
        memory_per_worker_bytes=memory_per_worker(args),
        from_refine=str(Path(args.from_refine).absolute()) if args.from_refine else None,
        solvent_mask=str(Path(args.solvent_mask).absolute()) if args.solvent_mask else None,
    )
    store = ParticleStore(args.store)
    if args.ref is not None and args.from_refine is not None:
        raise InputError(None, "give --ref or --from-refine, not both")
    if not args.continue_run and args.ref is None and args.from_refine is None:
        raise InputError(
            None, "--ref or --from-refine is needed to start a run (only --continue goes without)"
        )
    if not args.continue_run and args.ref is not None and not Path(args.ref).exists():
        raise InputError(args.ref, "reference map not found")
    options.check_box(store.box_size, store.pixel_size_A)
    result = run_job(
        args,
        lambda client: classify3d(
            store, args.ref, args.out, options, client, args.continue_run, args.write_stacks
        ),
    )
    for k, (f, r) in enumerate(zip(result.fractions, result.resolutions_A, strict=True)):
        print(f"class {k + 1:3d}  fraction {f:.3f}  resolution {r:6.2f} Å")
    if result.truth_accuracy is not None:
        print(result.truth_accuracy.summary())
    print(f"outputs: {result.out_dir}/run_it{result.iterations:03d}_*")
    return 0


def register_class2d(sub) -> None:
    """The ``class2d`` parser (RELION's 2D classification)."""
    from streamem.commands.execution import add_cluster_options, add_continue_option
    from streamem.commands.refine3d import add_memory_option

    p = sub.add_parser(
        "class2d",
        help="2D classification into K class averages",
        description="2D maximum-likelihood classification (RELION's class2d): K class averages "
        "over in-plane rotations and translations; writes run_itNNN_classes.mrcs, "
        "run_itNNN_model.star, run_itNNN_data.star and run_classes.png into --out.",
    )
    p.add_argument("store", help="particle store (.zarr)")
    p.add_argument("--out", required=True, help="run folder (must be new or empty)")
    p.add_argument("--k", type=int, default=50, help="number of classes (default 50)")
    p.add_argument("--iterations", type=int, default=25, help="default 25")
    p.add_argument("--psi-step", type=float, default=10.0, help="in-plane step, degrees (10)")
    p.add_argument("--offset-range", type=float, default=5.0, help="pixels (default 5)")
    p.add_argument("--offset-step", type=float, default=2.0, help="pixels (default 2)")
    p.add_argument("--tau2-fudge", type=float, default=2.0, help="regularisation (RELION: 2)")
    p.add_argument("--particle-diameter", type=float, default=None, help="Å (default 0.8 x box)")
    p.add_argument(
        "--ctf-intact-first-peak", action="store_true", help="ignore the CTF up to its first peak"
    )
    p.add_argument(
        "--center-classes", action="store_true", help="centre each average on its centre of mass"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ctf", action="store_true")
    add_continue_option(p)
    add_memory_option(p)
    add_cluster_options(p)
    p.set_defaults(func=run_class2d)


def run_class2d(args) -> int:
    from streamem.commands.refine3d import memory_per_worker
    from streamem.em.classify2d import Class2DOptions, classify2d
    from streamem.io.atomic import check_not_input
    from streamem.io.store import ParticleStore

    check_not_input(args.out, [args.store])  # before any work: never write into the store
    options = Class2DOptions(
        n_classes=args.k,
        iterations=args.iterations,
        psi_step_deg=args.psi_step,
        offset_range_px=args.offset_range,
        offset_step_px=args.offset_step,
        tau2_fudge=args.tau2_fudge,
        particle_diameter_A=args.particle_diameter,
        ctf_intact_first_peak=args.ctf_intact_first_peak,
        center_classes=args.center_classes,
        do_ctf=not args.no_ctf,
        memory_per_worker_bytes=memory_per_worker(args),
        seed=args.seed,
    )
    store = ParticleStore(args.store)
    options.check_box(store.box_size, store.pixel_size_A)
    result = run_job(
        args, lambda client: classify2d(store, args.out, options, client, args.continue_run)
    )
    order = sorted(range(len(result.fractions)), key=lambda k: -result.fractions[k])
    for k in order:
        print(
            f"class {k + 1:3d}  fraction {result.fractions[k]:.3f}  "
            f"resolution {result.resolutions_A[k]:6.1f} Å"
        )
    if result.truth_accuracy is not None:
        print(result.truth_accuracy.summary())
    print(f"outputs: {result.out_dir}/run_it{result.iterations:03d}_* and run_classes.png")
    return 0
