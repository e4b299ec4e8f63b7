"""``streamem select STORE.zarr --run DIR --classes 1,4,7 OUT.zarr``: keep the particles of chosen classes."""

from __future__ import annotations

from streamem import validate as check


def register(sub) -> None:
    p = sub.add_parser(
        "select", help="copy the particles of chosen classes into a new store", description=__doc__
    )
    p.add_argument("store", help="particle store (.zarr) the run classified")
    p.add_argument("out", help="new store (.zarr)")
    p.add_argument(
        "--run", required=True, help="class2d/class3d run folder (newest iteration is used)"
    )
    p.add_argument("--classes", default=None, help="comma-separated class numbers (default: all)")
    p.add_argument(
        "--min-size", type=int, default=None, help="keep classes with at least N particles"
    )
    p.add_argument(
        "--max-resolution",
        type=float,
        default=None,
        help="keep classes at this resolution (Å) or better",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def parse_classes(text: str | None) -> list[int] | None:
    """``"1,4,7"`` -> [1, 4, 7] (class numbers from 1); None or "" -> None (all classes)."""
    from streamem.errors import InputError

    if not text:
        return None
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise InputError(
            None, f"--classes must be comma-separated integers, got {text!r}"
        ) from None
    if not classes or min(classes) < 1:
        raise InputError(None, f"--classes must be class numbers >= 1, got {text!r}")
    return classes


def check_options(args) -> None:
    """Every numeric option, before any file is read (InputError naming the option)."""
    check.at_least("--min-size", args.min_size, 0)
    check.positive("--max-resolution", args.max_resolution, "Å")


def run(args) -> int:
    from streamem.em.select import select_particles

    check_options(args)
    classes = parse_classes(args.classes)
    out = select_particles(
        args.store, args.run, args.out, classes, args.min_size, args.max_resolution, args.overwrite
    )
    print(f"{out.n_particles} particles -> {out.path}")
    return 0
