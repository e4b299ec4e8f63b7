"""The ``streamem`` command line: one subcommand per module in ``streamem.commands``.

Each command module has ``register(subparsers)`` which adds its parser and sets
``func`` to a function taking the parsed args and returning an exit code. Bad
input (:class:`~streamem.errors.InputError`, and argparse's own errors such as a
missing option or ``--k abc``) is printed as one line on stderr with exit status 2
and no traceback. Option values are checked before any work starts: in the options
dataclasses and, for commands without one, right after parsing
(:mod:`streamem.validate`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from streamem import __version__
from streamem.errors import InputError

#: Command modules in the order ``--help`` lists them.
COMMAND_MODULES = [
    "demo",
    "simulate",
    "import_",
    "export",
    "info",
    "reconstruct",
    "refine3d",
    "classify",
    "select",
    "ctf",
    "pick",
    "extract",
    "postprocess",
    "cluster",
    "bench",
]


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``streamem CMD: error: ...``, exit 2).

    argparse prints the usage before the error; the project's standard for bad input
    is one line, and ``--help`` still shows the usage. Subparsers inherit the class.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="streamem",
        description="Streaming cryo-EM single-particle analysis on Dask and Zarr.",
    )
    parser.add_argument("--version", action="version", version=f"streamem {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"streamem.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"streamem.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("distributed", "bokeh", "tornado"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"streamem {args.command}: error: {exc.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"streamem {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
