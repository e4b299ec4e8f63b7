"""``streamem demo``: the main job on built-in data, end to end, with nothing to download.

Simulates particles of the built-in asymmetric phantom (CTF, shifts, noise), starts
from the truth low-passed to 30 Å, runs 3D auto-refine on a local Dask cluster (or on
``--scheduler``'s; ``--no-cluster``: threads), and compares the gold-standard
resolution with the oracle (half maps reconstructed from the true poses) and the
refined poses with the true ones.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from streamem.commands.execution import add_cluster_options, add_old_spelling, run_job

log = logging.getLogger("streamem")


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="simulate, refine and compare with the truth (built-in data)",
        description=__doc__,
    )
    p.add_argument("--out", default="streamem-demo", help="output folder (default streamem-demo)")
    p.add_argument("--n-particles", type=int, default=2000)
    p.add_argument("--box", type=int, default=40)
    angpix = p.add_argument("--angpix", dest="pixel_size", type=float, default=3.6, help="Å")
    add_old_spelling(p, angpix, "--pixel-size")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    iterations = p.add_argument(
        "--iterations", dest="max_iterations", type=int, default=10, help="refine3d's, at most"
    )
    add_old_spelling(p, iterations, "--max-iterations")
    p.add_argument("--overwrite", action="store_true")
    add_cluster_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from streamem.api import demo
    from streamem.io.atomic import check_output

    t0 = time.perf_counter()
    check_output(args.out, args.overwrite)  # before a cluster starts
    report = run_job(
        args,
        lambda client: demo(
            args.out,
            n_particles=args.n_particles,
            box_size=args.box,
            pixel_size_A=args.pixel_size,
            snr=args.snr,
            seed=args.seed,
            max_iterations=args.max_iterations,
            use_cluster=not args.no_cluster,
            overwrite=args.overwrite,
            client=client,
        ),
    )
    out = Path(args.out)
    print()
    print(
        f"gold-standard resolution   {report['resolution_A']:.2f} Å  (FSC 0.143 between half maps)"
    )
    print(
        f"oracle resolution          {report['oracle_resolution_A']:.2f} Å  (half maps from the true poses)"
    )
    print(
        f"ratio refined / oracle     {report['resolution_A'] / report['oracle_resolution_A']:.3f}"
    )
    print(
        f"median angular error       {report['median_angular_error_deg']:.2f}°  (final fine step {report['final_step_deg']:.2f}°)"
    )
    print(f"iterations                 {report['iterations']}")
    print(f"map                        {out / 'refine' / 'run_class001.mrc'}")
    print(f"FSC plot                   {out / 'refine' / 'run_fsc.png'}")
    print(f"total time                 {time.perf_counter() - t0:.0f} s")
    return 0
