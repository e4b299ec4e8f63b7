"""One spelling per option, defaults in every --help, old spellings still parse
(issue 18 item 6)."""

import argparse
import re

import pytest

from streamem.cli import build_parser, main, show_default
from streamem.commands.execution import OLD_SPELLINGS


def _commands(parser=None, name=""):
    """(name, parser) of every command and sub-command, ``bench`` ones included."""
    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _commands(sub, f"{name} {sub_name}".strip())
    if name:
        yield name, parser


def _options(parser):
    """The options ``--help`` shows (not positionals, --help, hidden aliases)."""
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        yield action


def _flat(text: str) -> str:
    return " ".join(text.split())


COMMANDS = list(_commands())


def test_every_command_is_seen():
    names = {name for name, _ in COMMANDS}
    assert {"refine3d", "class3d", "class2d", "simulate", "import", "export", "pick"} <= names
    assert "bench refine-memory" in names


@pytest.mark.parametrize("name,parser", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_help_shows_every_default(name, parser):
    """Every option with a default other than None/False shows it in --help; every option
    whose default is None says in its help what it is (what happens without it)."""
    text = _flat(parser.format_help())
    missing = []
    for action in _options(parser):
        assert action.option_strings[0] in text  # the command's own --help shows it
        # its help as --help shows it, unwrapped (format_help gave help-less options one)
        entry = _flat(parser._get_formatter()._expand_help(action)) if action.help else ""
        default = action.default
        if default is None:
            if action.nargs != 0 and not (action.help or "").strip():
                missing.append(f"{action.option_strings[0]}: no help")
            continue
        if default is False or (isinstance(default, list | tuple | str) and not default):
            continue
        shown = re.escape(show_default(default))
        if not re.search(rf"default:?\s+{shown}(?![\w.])|\({shown}\)", entry):
            missing.append(f"{action.option_strings[0]}: {show_default(default)!r} not shown")
    assert not missing, f"streamem {name}: {missing}"


def test_help_of_a_real_command_lists_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["refine3d", "--help"])
    text = _flat(capsys.readouterr().out)
    assert "--iterations" in text and "(default: 25)" in text  # had no default shown
    assert "--tau2-fudge TAU2_FUDGE (default: 1)" in text  # an option without help text
    assert "--max-iterations" not in text  # the old spelling is hidden


@pytest.mark.parametrize("name,parser", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_one_spelling(name, parser):
    """No command, bench included, shows an old spelling; each old spelling of a
    command maps to the new one."""
    shown = {s for a in _options(parser) for s in a.option_strings}
    assert not shown & set(OLD_SPELLINGS), (name, shown & set(OLD_SPELLINGS))
    hidden = {
        s: a for a in parser._actions if a.help == argparse.SUPPRESS for s in a.option_strings
    }
    for old, action in hidden.items():
        if old in OLD_SPELLINGS:
            assert OLD_SPELLINGS[old] in shown, (name, old)
            new = next(a for a in _options(parser) if OLD_SPELLINGS[old] in a.option_strings)
            assert new.dest == action.dest


def _argv(parser, extra):
    """The least argv that parses: a value for each positional and required option."""
    argv = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        if not action.option_strings:
            argv.append("X")
        elif action.required:  # a number where the option takes one (extract --box)
            argv += [action.option_strings[0], "8" if action.type in (int, float) else "X"]
    return argv + extra


OLD_AND_NEW = [
    ("simulate", "--pixel-size", "--angpix", "2.5", "pixel_size", 2.5),
    ("demo", "--pixel-size", "--angpix", "2.5", "pixel_size", 2.5),
    ("refine3d", "--max-iterations", "--iterations", "7", "max_iterations", 7),
    ("demo", "--max-iterations", "--iterations", "7", "max_iterations", 7),
    ("import", "-j", "--n-workers", "3", "workers", 3),
    ("import", "--workers", "--n-workers", "3", "workers", 3),
    ("export", "-j", "--n-workers", "3", "workers", 3),
    ("simulate", "--workers", "--n-workers", "3", "workers", 3),
    ("pick", "--workers", "--n-workers", "3", "workers", 3),
    ("extract", "--workers", "--n-workers", "3", "workers", 3),
    ("ctf", "--workers", "--n-workers", "3", "workers", 3),
]


@pytest.mark.parametrize("command,old,new,value,dest,expected", OLD_AND_NEW)
def test_old_spellings_still_parse(command, old, new, value, dest, expected, capsys):
    parser = dict(COMMANDS)[command]
    with_new = parser.parse_args(_argv(parser, [new, value]))
    capsys.readouterr()
    with_old = parser.parse_args(_argv(parser, [old, value]))
    assert getattr(with_new, dest) == getattr(with_old, dest) == expected
    assert vars(with_new) == vars(with_old)
    assert capsys.readouterr().err == ""  # silently: a bad value stays one error line
    without = parser.parse_args(_argv(parser, []))
    (shown,) = [a for a in parser._actions if new in a.option_strings]
    assert getattr(without, dest) == shown.default  # the hidden alias sets no default
