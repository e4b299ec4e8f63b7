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
import copy
import importlib
import logging
import re
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


def show_default(value) -> str:
    """A default as ``--help`` shows it: floats in their shortest form (30.0 -> 30)."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return " ".join(show_default(v) for v in value)
    return str(value)


class DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` shows every option's default: ``(default: X)`` is added to the help of
    an option whose default is not None/False/suppressed, unless its help already says
    ``default X`` or ends with ``(X)``. An option with a None default says in its own
    help what happens without it (``tests/test_cli_options.py`` checks both)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or (isinstance(default, list | tuple | str) and not default)
            or "%(default)" in text
        ):
            return text
        shown = show_default(default)
        said = rf"default:?\s+{re.escape(shown)}(?![\w.])|\({re.escape(shown)}\)\s*$"
        if re.search(said, text):  # "... (default 30)", "... (30)"
            return text
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings:  # no help: still its default
            action.help = self._get_help_string(copy.copy(action)) or None
        return super()._format_action(action)

    def _expand_help(self, action: argparse.Action) -> str:
        action = copy.copy(action)
        action.help = self._get_help_string(action)
        return super()._expand_help(action)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``streamem CMD: error: ...``, exit 2).

    argparse prints the usage before the error; the project's standard for bad input
    is one line, and ``--help`` still shows the usage. Subparsers inherit the class
    (argparse's ``add_parser`` makes them of the parent's type), and with it the
    :class:`DefaultsFormatter`, so every command's ``--help`` shows its defaults.
    """

    def __init__(self, *args, **kwargs):
        formatter = kwargs.get("formatter_class", DefaultsFormatter)
        if not issubclass(formatter, DefaultsFormatter):  # e.g. RawDescriptionHelpFormatter
            formatter = type(f"Defaults{formatter.__name__}", (DefaultsFormatter, formatter), {})
        kwargs["formatter_class"] = formatter
        super().__init__(*args, **kwargs)

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
