"""Where progress bars go: a widget in Jupyter, a bar in a terminal, nothing in a log.

Decision: one choice, :func:`progress_mode`, for every bar streamem draws (the Dask
task bars of :func:`streamem.dist.iteration.compute` and the tqdm chunk bars of
import and info). A bar in a log file or a CI log is thousands of carriage returns,
so a bar is drawn only where someone watches: in a Jupyter kernel (a widget when
ipywidgets is installed, else text in the cell) or when the stream is a terminal.
``CI`` (set by CI services) or ``STREAMEM_PROGRESS=0`` switch bars off everywhere;
``STREAMEM_PROGRESS=1`` forces text bars (e.g. under ``script`` or a pager).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Literal

Mode = Literal["widget", "notebook-text", "terminal"] | None


def in_jupyter() -> bool:
    """Whether this process is a Jupyter kernel (IPython's ZMQ shell)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def progress_mode(stream: Any = None, environ: dict | None = None) -> Mode:
    """How to draw a progress bar now: ``"widget"`` (Jupyter with ipywidgets),
    ``"notebook-text"`` (Jupyter without it), ``"terminal"`` (``stream``, default
    ``sys.stderr``, is a TTY), or None (no bar: a log, a pipe, CI)."""
    environ = os.environ if environ is None else environ
    forced = environ.get("STREAMEM_PROGRESS", "").strip().lower()
    if forced in ("0", "no", "false", "off"):
        return None
    if forced in ("1", "yes", "true", "on"):
        return "terminal"
    if environ.get("CI", "").strip().lower() not in ("", "0", "false"):
        return None
    if in_jupyter():
        return "widget" if importlib.util.find_spec("ipywidgets") else "notebook-text"
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "terminal" if isatty is not None and isatty() else None


def chunk_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar of ``total`` tasks (chunks, or parts of chunks): a widget in Jupyter,
    text in a terminal, disabled where :func:`progress_mode` is None or not ``enabled``."""
    mode = progress_mode() if enabled else None
    if mode == "widget":
        from tqdm.notebook import tqdm
    else:
        from tqdm import tqdm
    return tqdm(total=total, unit="task", desc=desc, disable=mode is None, file=sys.stderr)
