"""Write-then-rename, so a failed job leaves no half-written output."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from streamem.errors import InputError


def check_output(path: str | Path, overwrite: bool = False) -> Path:
    """Validate an output path before any work starts.

    Raises InputError if it exists (without ``overwrite``) or its folder is not writable.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(path, "output exists (use --overwrite to replace it)")
    parent = path.absolute().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(path, f"{probe} is a file, not a folder")
    if not os.access(probe, os.W_OK):
        raise InputError(path, f"output folder {probe} is not writable")
    return path


@contextmanager
def atomic_output(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it to ``path``.

    On any exception the temporary is removed and ``path`` is untouched.
    """
    path = check_output(path, overwrite)
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.exists():
        _remove(path)
    os.replace(tmp, path)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()
