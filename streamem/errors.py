"""The one exception type for bad user input.

Every problem with something the user gave us (a file, an option) is raised as
:class:`InputError` naming the file and the problem. The CLI prints it as one
line on stderr and exits with status 2, without a traceback.

It is raised inside Dask tasks too (a corrupt store chunk, say): ``__reduce__``
rebuilds it from ``(path, problem)``, so it crosses a distributed cluster's
pickling intact and the client re-raises the same one-line error.
"""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad user input: ``path`` (may be None) and a one-line ``problem``."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.path}: {self.problem}" if self.path else self.problem

    def __reduce__(self):
        # Exception pickles as cls(*self.args); args holds the joined line, not (path, problem)
        return (type(self), (self.path, self.problem))
