"""``streamem pick``: RELION-2's template picker, or a Laplacian-of-Gaussian picker.

    streamem pick MICROGRAPHS.star --templates CLASSES.mrcs --out DIR
    streamem pick MICROGRAPHS.star --reference MAP.mrc --particle-diameter 150 --out DIR
    streamem pick mic_*.mrc --log --log-diameter-min 120 --log-diameter-max 180 --angpix 1.1 --out DIR
    streamem pick MICROGRAPHS.star --log --particle-diameter 150 --out DIR

LoG diameters default to 0.8-1.2x ``--particle-diameter``, or of the size of
``--reference``/``--templates`` given with ``--log`` (the range used is logged).

Templates are white (protein brighter than the background); raw micrographs have dark
protein, so the templates are inverted unless ``--no-invert`` (micrographs already
inverted, e.g. by ``relion_preprocess --invert_contrast``). Micrographs and templates
are low-pass filtered to ``--lowpass`` Å and downscaled to that filter's Nyquist
before the FFTs (RELION-2's speed-up); ``--lowpass 0`` matches at full resolution.
"""

from __future__ import annotations

import argparse
import logging

from streamem import validate as check
from streamem.commands.execution import (
    add_gpu_option,
    add_scheduler_options,
    add_threads_option,
    check_execution,
    scheduler_client,
)
from streamem.errors import InputError

log = logging.getLogger("streamem")


def register(sub) -> None:
    p = sub.add_parser(
        "pick",
        help="auto-pick particles (templates with RELION's FOM, or LoG blobs)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("micrographs", nargs="+", help="micrographs STAR file (with CTF) or MRC files")
    p.add_argument("--out", required=True, help="output folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--templates", help="2-D templates (class averages), an MRC stack")
    src.add_argument(
        "--reference", "--ref", dest="reference", help="3-D map: templates are its projections"
    )
    p.add_argument(
        "--log",
        action="store_true",
        help="Laplacian-of-Gaussian blob picking (with --templates/--reference: their "
        "size sets the default diameters)",
    )
    p.add_argument(
        "--angpix",
        type=float,
        default=None,
        help="micrograph pixel size in A (default: STAR optics or MRC header)",
    )
    p.add_argument(
        "--angpix-ref",
        type=float,
        default=None,
        help="template/map pixel size in A (default: its MRC header)",
    )
    p.add_argument(
        "--lowpass",
        type=float,
        default=20.0,
        help="low-pass filter in A, and downscaling to its Nyquist (default 20; 0: none)",
    )
    p.add_argument(
        "--particle-diameter",
        type=float,
        default=None,
        help="particle diameter in A (default: from the templates)",
    )
    p.add_argument("--psi-step", type=float, default=10.0, help="in-plane step, degrees (10)")
    p.add_argument(
        "--exhaustive-psi",
        action="store_true",
        help="score every --psi-step angle at every pixel (slower; default: a coarse psi "
        "pass, then the fine angles at the candidate peaks, where the particle is small "
        "enough for --psi-step to be finer than it needs)",
    )
    p.add_argument(
        "--healpix-order",
        type=int,
        default=1,
        help="projection directions of --reference (HEALPix order, 1 = 30 deg)",
    )
    p.add_argument("--sym", default="C1", help="symmetry of --reference (default C1)")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="FOM threshold (template default 0.5; LoG default 3.0 robust sigmas)",
    )
    p.add_argument(
        "--min-distance",
        type=float,
        default=None,
        help="minimum distance between picks in A (default: particle diameter; "
        "LoG: --log-diameter-min)",
    )
    p.add_argument(
        "--skip-side", type=float, default=0.0, help="extra pixels to stay away from the edges (0)"
    )
    inv = p.add_mutually_exclusive_group()
    inv.add_argument(
        "--invert",
        dest="invert",
        action="store_true",
        default=True,
        help="micrographs have dark protein (default)",
    )
    inv.add_argument(
        "--no-invert", dest="invert", action="store_false", help="micrographs have white protein"
    )
    p.add_argument(
        "--template-scale",
        default="auto",
        help="grey-scale factor of the templates: 'auto' (estimated per "
        "micrograph) or a number (1 = RELION: templates in noise units)",
    )
    p.add_argument("--no-ctf", action="store_true", help="do not CTF-modulate the templates")
    p.add_argument(
        "--ctf-intact-first-peak", action="store_true", help="ignore the CTF up to its first peak"
    )
    p.add_argument(
        "--max-stddev-noise",
        type=float,
        default=None,
        help="reject picks whose background std exceeds this (RELION's option)",
    )
    p.add_argument(
        "--max-background-structure",
        type=float,
        default=2.0,
        help="reject picks whose background holds this many times the "
        "micrograph's median low-resolution contrast (carbon edges, ice; default 2.0, "
        "calibrated with the threshold on simulations); 0: off",
    )
    p.add_argument(
        "--log-diameter-min",
        type=float,
        default=None,
        help="LoG: smallest diameter A (default 0.8 x --particle-diameter or the reference's)",
    )
    p.add_argument(
        "--log-diameter-max",
        type=float,
        default=None,
        help="LoG: largest diameter A (default 1.2 x --particle-diameter or the reference's)",
    )
    p.add_argument("--write-fom-maps", action="store_true", help="write FOM maps (MRC)")
    add_threads_option(p, "threads (default: a few)")
    p.add_argument("--seed", type=int, default=0, help="seed for the noise padding (0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_scheduler_options(p)
    add_gpu_option(p)
    p.set_defaults(func=run)


def _scale(text: str) -> float | None:
    if str(text).lower() == "auto":
        return None
    try:
        v = float(text)
    except ValueError:
        raise InputError(
            None, f"--template-scale must be 'auto' or a number, got {text!r}"
        ) from None
    if not v > 0:
        raise InputError(None, f"--template-scale must be positive, got {v}")
    return v


def check_options(args) -> None:
    """Every option value, before any micrograph is read (InputError naming the option).

    ``--lowpass 0`` means no filter; ``--threshold`` may be any finite number (a FOM or
    robust sigmas); ``--max-background-structure 0`` switches that test off.
    """
    check.positive("--angpix", args.angpix, "Å")
    check.positive("--angpix-ref", args.angpix_ref, "Å")
    check.non_negative("--lowpass", args.lowpass, "Å")
    check.positive("--particle-diameter", args.particle_diameter, "Å")
    if check.number("--psi-step", args.psi_step) is not None and not 0 < args.psi_step <= 360:
        raise InputError(None, f"--psi-step must be in (0, 360] degrees, got {args.psi_step}")
    check.healpix_order("--healpix-order", args.healpix_order)
    check.symmetry("--sym", args.sym)
    check.number("--threshold", args.threshold)
    check.positive("--min-distance", args.min_distance, "Å")
    check.non_negative("--skip-side", args.skip_side, "pixels")
    _scale(args.template_scale)
    check.positive("--max-stddev-noise", args.max_stddev_noise)
    check.non_negative("--max-background-structure", args.max_background_structure)
    check.positive("--log-diameter-min", args.log_diameter_min, "Å")
    check.positive("--log-diameter-max", args.log_diameter_max, "Å")
    if (
        args.log_diameter_min is not None
        and args.log_diameter_max is not None
        and args.log_diameter_min > args.log_diameter_max
    ):
        raise InputError(
            None,
            f"--log-diameter-min ({args.log_diameter_min:g} Å) is larger than "
            f"--log-diameter-max ({args.log_diameter_max:g} Å): need min <= max",
        )
    check.at_least("--n-workers", args.workers, 1)
    check.seed("--seed", args.seed)


def _threshold(args) -> dict:
    return {} if args.threshold is None else {"threshold": args.threshold}


def _log_diameters(args, source, pixel_size_A: float) -> tuple[float, float]:
    """The LoG range: the options, else 0.8-1.2x the particle diameter (``--particle-diameter``
    or the size of ``--reference``/``--templates``); logged with where it came from."""
    from streamem.pick.job import load_templates
    from streamem.pick.log import default_log_diameters_A
    from streamem.pick.template import estimate_particle_diameter_A

    d_min, d_max = args.log_diameter_min, args.log_diameter_max
    if d_min is not None and d_max is not None:
        log.info("LoG diameters %.1f-%.1f A (--log-diameter-min/max)", d_min, d_max)
        return d_min, d_max
    if args.particle_diameter is not None:
        diameter, origin = args.particle_diameter, "--particle-diameter"
    elif source is not None:
        # healpix order 0 (12 directions) is plenty to measure a size
        t = load_templates(source, pixel_size_A, args.angpix_ref, 0, args.sym)
        diameter, origin = estimate_particle_diameter_A(t, pixel_size_A), f"the size of {source}"
    else:
        raise InputError(
            None,
            "--log needs --particle-diameter, --log-diameter-min and --log-diameter-max, "
            "or --reference/--templates to measure the particle's size",
        )
    lo, hi = default_log_diameters_A(diameter)
    d_min = lo if d_min is None else d_min
    d_max = hi if d_max is None else d_max
    if d_min > d_max:
        raise InputError(
            None, f"LoG diameters {d_min:g}-{d_max:g} A: need min <= max (set both options)"
        )
    log.info("LoG diameters %.1f-%.1f A (0.8-1.2x %.1f A from %s)", d_min, d_max, diameter, origin)
    return d_min, d_max


def run(args) -> int:
    from streamem.io.atomic import check_output
    from streamem.pick.job import load_templates, micrograph_inputs, pick_micrographs
    from streamem.pick.log import LogPickParams
    from streamem.pick.template import TemplatePickParams, estimate_particle_diameter_A

    check_options(args)
    check_execution(args)  # --gpu without CuPy or a GPU: refused before any output
    given = [*args.micrographs, args.templates, args.reference]
    check_output(args.out, args.overwrite, inputs=given)
    lowpass = args.lowpass if args.lowpass and args.lowpass > 0 else None
    for name in ("psi_step", "particle_diameter", "min_distance", "angpix_ref"):
        v = getattr(args, name)
        if v is not None and not v > 0:
            raise InputError(None, f"--{name.replace('_', '-')} must be positive, got {v}")
    mics = micrograph_inputs(args.micrographs, args.angpix, use_ctf=not args.no_ctf)
    pixel = mics[0].pixel_size_A
    templates = None
    source = args.templates or args.reference
    if args.log:
        d_min, d_max = _log_diameters(args, source, pixel)
        try:
            params = LogPickParams(
                d_min,
                d_max,
                lowpass,
                **_threshold(args),
                min_distance_A=args.min_distance,
                skip_side_px=args.skip_side,
                invert=args.invert,
                max_background_structure=args.max_background_structure,
            )
        except ValueError as exc:
            raise InputError(None, str(exc)) from None
    else:
        if source is None:
            raise InputError(None, "give --templates, --reference or --log")
        templates = load_templates(source, pixel, args.angpix_ref, args.healpix_order, args.sym)
        diameter = args.particle_diameter or estimate_particle_diameter_A(templates, pixel)
        log.info(
            "%d templates of %d px; particle diameter %.1f A",
            len(templates),
            templates.shape[-1],
            diameter,
        )
        try:
            params = TemplatePickParams(
                diameter,
                lowpass,
                args.psi_step,
                **_threshold(args),
                min_distance_A=args.min_distance,
                skip_side_px=args.skip_side,
                invert=args.invert,
                template_scale=_scale(args.template_scale),
                ctf_intact_first_peak=args.ctf_intact_first_peak,
                max_stddev_noise=args.max_stddev_noise,
                max_background_structure=args.max_background_structure,
                coarse_psi=not args.exhaustive_psi,
            )
        except ValueError as exc:
            raise InputError(source, str(exc)) from None
        if 2 * (diameter / (2 * pixel)) >= templates.shape[-1]:
            raise InputError(
                source,
                f"particle diameter {diameter:.1f} A does not fit in the "
                f"{templates.shape[-1]} px templates",
            )
    with scheduler_client(args) as client:
        result = pick_micrographs(
            mics,
            args.out,
            params,
            templates,
            write_fom_maps=args.write_fom_maps,
            overwrite=args.overwrite,
            workers=args.workers,
            client=client,
            seed=args.seed,
            inputs=given,
        )
    print(f"{result.n_picks} particles on {len(result.summary)} micrographs -> {result.out_dir}")
    return 0
