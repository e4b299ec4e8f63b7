"""``streamem extract``: cut particles out of micrographs into a particle store.

    streamem extract MICROGRAPHS.star COORDS_DIR OUT.zarr --box 256 [--bin 2] [--invert-contrast]

COORDS_DIR holds RELION coordinate files (``<micrograph stem>_autopick.star`` as
``streamem pick`` writes, or ``_manualpick``/``_coords``), or an ``autopick.star`` /
``coordinates.star`` index (RELION 4); it may also be that STAR file itself.
``--box`` is the window in micrograph pixels, ``--bin`` shrinks it by Fourier
cropping. Particles are normalised as ``relion_preprocess`` does (ramp removed,
background outside ``--bg-radius`` at mean 0, std 1); ``--invert-contrast`` makes
the dark protein of raw micrographs white. Particles whose box crosses the
micrograph's edge are skipped and counted.
"""

from __future__ import annotations

import argparse

from streamem import validate as check
from streamem.commands.execution import add_scheduler_options, add_threads_option, scheduler_client


def register(sub) -> None:
    p = sub.add_parser(
        "extract",
        help="extract particles at picked coordinates into a particle store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("micrographs", help="micrographs STAR file (with CTF)")
    p.add_argument("coords", help="folder of coordinate STAR files, or their index STAR file")
    p.add_argument("out", help="output particle store (.zarr)")
    p.add_argument("--box", type=int, required=True, help="box size in micrograph pixels (even)")
    p.add_argument("--bin", type=float, default=1.0, help="binning factor (Fourier crop; 1)")
    p.add_argument("--invert-contrast", action="store_true", help="make dark protein white")
    p.add_argument(
        "--bg-radius",
        type=float,
        default=None,
        help="background radius in output pixels (default 0.375 x output box)",
    )
    p.add_argument(
        "--angpix",
        type=float,
        default=None,
        help="micrograph pixel size in A (default: STAR optics or MRC header)",
    )
    p.add_argument("--chunk-size", type=int, default=None, help="particles per store chunk")
    p.add_argument("--seed", type=int, default=0, help="seed of the random half sets (0)")
    add_threads_option(p, "threads (default: a few)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    add_scheduler_options(p)
    p.set_defaults(func=run)


def check_options(args) -> None:
    """Every numeric option, before any file is read (InputError naming the option).

    ``--box``: an even number of pixels >= 4 (the Fourier crop and the centre need it
    even); ``--bin`` >= 1 (Fourier cropping only shrinks), and the binned box stays even.
    """
    from streamem.errors import InputError

    if check.at_least("--box", args.box, 4) % 2:
        raise InputError(None, f"--box must be an even number of pixels >= 4, got {args.box}")
    if check.number("--bin", args.bin) < 1:
        raise InputError(None, f"--bin must be >= 1, got {args.bin}")
    check.positive("--bg-radius", args.bg_radius, "output pixels")
    check.positive("--angpix", args.angpix, "Å")
    check.at_least("--chunk-size", args.chunk_size, 1)
    check.seed("--seed", args.seed)
    check.at_least("--n-workers", args.workers, 1)


def run(args) -> int:
    from streamem.pick.extract import extract_particles

    check_options(args)
    with scheduler_client(args) as client:
        r = extract_particles(
            args.micrographs,
            args.coords,
            args.out,
            args.box,
            args.bin,
            args.invert_contrast,
            args.bg_radius,
            args.overwrite,
            args.seed,
            args.chunk_size,
            args.workers,
            args.angpix,
            client,
        )
    print(
        f"{r.n_particles} particles -> {r.store_path} "
        f"({r.n_skipped_edge} skipped: box crosses the micrograph edge)"
    )
    return 0
