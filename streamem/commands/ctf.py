"""``streamem ctf``: CTF estimation as CTFFIND4 does it (Rohou & Grigorieff 2015).

    streamem ctf micrographs.star --out CtfFind/job003
    streamem ctf Movies/*.mrc --angpix 1.06 --voltage 300 --cs 2.7 --q0 0.1 --out ctf

Per micrograph: the averaged amplitude spectrum of overlapping ``--tile`` px tiles,
the smooth background projected out, an exhaustive 1-D search of the defocus on the
rotational average, a 2-D grid of the astigmatism and a local refinement of defocus
U, V, angle (and ``--phase-shift``) over ``--res-min`` .. ``--res-max`` Å (capped at
Nyquist); the fit resolution and a figure of merit. Writes ``micrographs_ctf.star``
(RELION's labels; ``pick`` and ``extract`` read it), a PNG per micrograph and a
summary PNG. Micrographs that cannot be fitted are left out with one warning line
each; ones without Thon rings are flagged (``rlnCtfMaxResolution`` 999).
"""

from __future__ import annotations

import argparse

from streamem import validate as check
from streamem.commands.execution import add_scheduler_options, add_threads_option, scheduler_client
from streamem.errors import InputError


def register(sub) -> None:
    p = sub.add_parser(
        "ctf",
        help="estimate each micrograph's CTF (defocus, astigmatism, fit resolution)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("micrographs", nargs="+", help="micrographs STAR file (no CTF) or MRC files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--angpix",
        type=float,
        default=None,
        help="pixel size in A (default: STAR optics or MRC header)",
    )
    p.add_argument("--voltage", type=float, default=300.0, help="kV, for MRC input (300)")
    p.add_argument("--cs", type=float, default=2.7, help="spherical aberration mm, MRC input (2.7)")
    p.add_argument("--q0", type=float, default=0.1, help="amplitude contrast, MRC input (0.1)")
    p.add_argument("--tile", type=int, default=512, help="spectrum tile size in px (512)")
    p.add_argument("--res-min", type=float, default=30.0, help="fit from this resolution, A (30)")
    p.add_argument(
        "--res-max",
        type=float,
        default=5.0,
        help="fit to this resolution, A (5; capped at Nyquist)",
    )
    p.add_argument("--defocus-min", type=float, default=2000.0, help="search from, A (2000)")
    p.add_argument("--defocus-max", type=float, default=50000.0, help="search to, A (50000)")
    p.add_argument(
        "--astigmatism-max", type=float, default=3000.0, help="largest U - V searched, A (3000)"
    )
    p.add_argument(
        "--phase-shift", action="store_true", help="also fit a phase shift (phase plate)"
    )
    p.add_argument(
        "--fit-threshold",
        type=float,
        default=0.3,
        help="fit resolution: where the fit's correlation with the spectrum falls below this (0.3)",
    )
    p.add_argument("--no-plots", action="store_true", help="no PNGs")
    add_threads_option(p, "threads (default: a few)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_scheduler_options(p)
    p.set_defaults(func=run)


def check_options(args) -> None:
    """Every option value, before any micrograph is read (InputError naming the option)."""
    from streamem.ctf.spectrum import MIN_TILE_PX

    check.positive("--angpix", args.angpix, "Å")
    check.positive("--voltage", args.voltage, "kV")
    check.non_negative("--cs", args.cs, "mm")
    check.fraction("--q0", args.q0, open_high=True)
    if check.integer("--tile", args.tile) < MIN_TILE_PX or args.tile % 2:
        raise InputError(
            None, f"--tile must be an even number of px >= {MIN_TILE_PX}, got {args.tile}"
        )
    check.positive("--res-min", args.res_min, "Å")
    check.positive("--res-max", args.res_max, "Å")
    check.positive("--defocus-min", args.defocus_min, "Å")
    check.positive("--defocus-max", args.defocus_max, "Å")
    check.non_negative("--astigmatism-max", args.astigmatism_max, "Å")
    check.number("--fit-threshold", args.fit_threshold)
    check.at_least("--n-workers", args.workers, 1)


def run(args) -> int:
    from streamem.core.ctf import OpticsParams
    from streamem.ctf.fit import CtfSearch
    from streamem.ctf.job import ctf_inputs, estimate_ctf
    from streamem.io.atomic import check_output

    check_options(args)
    try:
        search = CtfSearch(
            res_min_A=args.res_min,
            res_max_A=args.res_max,
            defocus_min_A=args.defocus_min,
            defocus_max_A=args.defocus_max,
            astigmatism_max_A=args.astigmatism_max,
            phase_shift=args.phase_shift,
            fit_threshold=args.fit_threshold,
        )
        optics = OpticsParams(args.voltage, args.cs, args.q0)
    except ValueError as exc:
        raise InputError(None, str(exc)) from None
    check_output(args.out, args.overwrite, inputs=args.micrographs)
    inputs = ctf_inputs(args.micrographs, args.angpix, optics)
    with scheduler_client(args) as client:
        result = estimate_ctf(
            inputs,
            args.out,
            tile_px=args.tile,
            search=search,
            plots=not args.no_plots,
            overwrite=args.overwrite,
            workers=args.workers,
            client=client,
        )
    n = len(result.micrographs)
    print(
        f"CTF of {n} micrographs ({result.n_flagged} flagged, {len(result.rejected)} left out), "
        f"{result.seconds_per_micrograph:.2f} s each -> {result.star}"
    )
    return 0
