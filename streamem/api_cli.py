"""CLI verbs as Python functions: the command's own code, called with keyword arguments.

Decision: the verbs whose work is mostly option handling in ``streamem/commands/``
(import, export, reconstruct, ctf, pick, extract, postprocess, mask-create,
local-resolution, simulate-micrographs) are not re-implemented for Python. Each
API function builds the ``argparse.Namespace`` the command's parser would build
(its defaults, then the caller's keywords, converted and checked as argparse would)
and runs the command's ``func`` on it, so the options, their defaults, their checks
and the output safety rules are the CLI's by construction. The function's signature
(``inspect.signature``, Jupyter's ``?``) lists the parser's options: positionals
first, every option keyword-only, named as the CLI's ``dest`` (``--chunk-size`` ->
``chunk_size``). Execution options are the CLI's too (``scheduler=``,
``n_workers=``, ``no_cluster=``...); a ``distributed.Client`` given as ``client=`` is
turned into ``scheduler=`` plus its TLS files (:func:`_client_options`).

What the function returns is the command's output opened (a particle store) or its
path; a non-zero exit status raises :class:`~streamem.errors.InputError`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import inspect
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamem.errors import InputError

#: Parser ``dest``s that are not options of a command (argparse's own, the dispatch).
_NOT_OPTIONS = {"help", "func", "command", "version", "verbose"}


@functools.cache
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    """CLI verb -> its parser (from :func:`streamem.cli.build_parser`)."""
    from streamem.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def cli_verbs() -> list[str]:
    """Every subcommand of ``streamem``, in ``--help`` order."""
    return list(_subparsers())


def cli_actions(verb: str) -> dict[str, argparse.Action]:
    """``dest`` -> the first action that sets it, for ``streamem VERB`` (no help/dispatch)."""
    actions: dict[str, argparse.Action] = {}
    for action in _subparsers()[verb]._actions:
        if action.dest not in _NOT_OPTIONS and action.dest != argparse.SUPPRESS:
            actions.setdefault(action.dest, action)
    return actions


def _default(action: argparse.Action) -> Any:
    """The value argparse gives when the option is absent (string defaults go through
    ``type``, as argparse does)."""
    if isinstance(action.default, str) and callable(action.type):
        return action.type(action.default)
    return action.default


def _signature(verb: str) -> inspect.Signature:
    params = []
    for dest, action in cli_actions(verb).items():
        if not action.option_strings:  # a positional
            kind, default = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty
        else:
            kind = inspect.Parameter.KEYWORD_ONLY
            default = inspect.Parameter.empty if action.required else _default(action)
        params.append(inspect.Parameter(dest, kind, default=default))
    positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    keyword = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    client = inspect.Parameter("client", inspect.Parameter.KEYWORD_ONLY, default=None)
    return inspect.Signature([*positional, *keyword, client])


def _convert(verb: str, action: argparse.Action, value: Any) -> Any:
    """A Python value as argparse would have stored it: paths as strings, ``nargs``
    lists as lists, strings through ``type``, ``choices`` checked (InputError)."""
    flag = action.option_strings[0] if action.option_strings else action.dest
    if value is None or isinstance(value, bool):
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = [value] if isinstance(value, str | Path) else list(value)
        return [_convert_one(verb, action, flag, v) for v in items]
    return _convert_one(verb, action, flag, value)


def _convert_one(verb: str, action: argparse.Action, flag: str, value: Any) -> Any:
    from streamem.io.store import ParticleStore

    if isinstance(value, ParticleStore):  # a store given where the CLI takes its path
        value = value.path
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and callable(action.type) and action.type is not str:
        try:
            value = action.type(value)
        except (TypeError, ValueError):
            raise InputError(None, f"{verb} {flag}: invalid value {value!r}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise InputError(None, f"{verb} {flag}: {value!r} is not one of {choices}")
    return value


def _client_options(client, folder: Path) -> dict[str, Any]:
    """``scheduler`` and ``tls_*`` options that reach ``client``'s cluster: its address,
    and its TLS certificates written (mode 0600) into ``folder`` when it uses TLS
    (a temporary certificate holds the PEM text itself, not a file name)."""
    address = client.scheduler.address
    options: dict[str, Any] = {"scheduler": address}
    security = getattr(client, "security", None)
    if not address.startswith("tls://") or security is None:
        return options
    for option, field in (
        ("tls_ca_file", "tls_ca_file"),
        ("tls_cert", "tls_client_cert"),
        ("tls_key", "tls_client_key"),
    ):
        value = getattr(security, field, None)
        if value and "-----BEGIN " in value:
            path = folder / f"{option}.pem"
            path.touch(mode=0o600)
            path.write_text(value)
            value = str(path)
        options[option] = value
    return options


def run_verb(verb: str, /, *args: Any, **kwargs: Any) -> tuple[int, argparse.Namespace]:
    """Run ``streamem VERB`` with Python arguments; the exit status and the namespace.

    Arguments are bound to the verb's signature (a wrong name is a ``TypeError``, as
    for any function); the namespace holds the parser's defaults for the rest.
    """
    bound = _signature(verb).bind(*args, **kwargs)
    given = dict(bound.arguments)
    client = given.pop("client", None)
    actions = cli_actions(verb)
    values = {dest: copy.deepcopy(_default(a)) for dest, a in actions.items()}
    values.update({k: _convert(verb, actions[k], v) for k, v in given.items()})
    func = _subparsers()[verb].get_default("func")
    with tempfile.TemporaryDirectory(prefix="streamem-api-") as folder:
        if client is not None:
            values.update(_client_options(client, Path(folder)))
        namespace = argparse.Namespace(command=verb, func=func, verbose=False, **values)
        return int(func(namespace) or 0), namespace


def verb_function(
    verb: str, name: str, result: Callable[[argparse.Namespace], Any], returns: str
) -> Callable[..., Any]:
    """A Python function running ``streamem VERB``; it returns ``result(namespace)``
    (``returns`` describes it in the docstring). The parser is built on first use, so
    importing the API does not import every command module."""
    return _Verb(verb, name, result, returns)


class _Verb:
    """A CLI verb as a callable, with the parser's signature and help as its own."""

    def __init__(self, verb: str, name: str, result: Callable, returns: str) -> None:
        self._verb, self._result, self._returns = verb, result, returns
        self.__name__ = self.__qualname__ = name
        self.__module__ = "streamem.api"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        status, namespace = run_verb(self._verb, *args, **kwargs)
        if status != 0:
            raise InputError(None, f"streamem {self._verb} ended with exit status {status}")
        return self._result(namespace)

    @functools.cached_property
    def __signature__(self) -> inspect.Signature:  # Jupyter's ? and help() read it
        return _signature(self._verb)

    @property
    def __doc__(self) -> str:  # type: ignore[override]
        return (
            f"``streamem {self._verb}`` from Python: the same options, as keywords named like "
            f"the CLI's (``--chunk-size`` -> ``chunk_size``); ``client``: a "
            f"``distributed.Client`` whose cluster runs the work (instead of ``scheduler=``)."
            f"\n\nReturns {self._returns}.\n\nThe command's help:\n\n"
            f"{_subparsers()[self._verb].format_help()}"
        )

    def __repr__(self) -> str:
        return f"<streamem.api.{self.__name__}: streamem {self._verb}>"
