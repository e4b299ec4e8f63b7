"""Outputs that never destroy inputs: checks, write-then-rename, and streamem's marks.

Every command that writes checks its outputs with :func:`check_output` before any work
starts and writes them through :func:`atomic_output`:

- **No output touches an input.** An output path that equals, contains or lies inside
  a path the command reads (``inputs=``, compared after ``Path.resolve()``, and with
  ``os.path.samefile`` where both exist) is refused, with or without ``--overwrite``.
  Commands pass what they read: files (STAR, stacks, maps, micrographs) and the
  folders they read as a whole (particle stores); an output may sit next to an input
  file, never inside a store.
- **Only streamem's outputs are replaced.** ``--overwrite`` replaces an existing path
  only if streamem wrote it (:func:`written_by_streamem`), by this rule:

  * a folder (job folder, Zarr store) holds a file ``.streamem-output`` with JSON
    ``{"tool": "streamem", "command": ..., "version": ...}``;
  * an MRC file (map or stack) carries a header label starting ``written by streamem``
    (:func:`streamem.io.mrc.write_map` writes it; the ``Created by mrcfile.py`` label
    stays first);
  * a STAR file starts with the comment line ``# written by streamem`` (RELION and
    ``starfile`` skip comment lines);
  * anything else, and any symlink, is not streamem's.

  A folder is marked only once complete (just before the final rename), so a
  half-written temporary never counts as streamem's output.
- **Replace by rename-aside.** The new output is written as ``.NAME.partial-PID-TOKEN``
  next to ``NAME``; on success the old ``NAME`` (if any) is renamed to
  ``.NAME.old-PID-TOKEN``, the new one renamed into place, and the old one deleted
  last, so at every moment one complete copy exists. Without ``--overwrite`` the final
  rename refuses to replace anything (Linux ``renameat2(RENAME_NOREPLACE)``, else a
  hard link for files): if another run created ``NAME`` meanwhile, it is kept and only
  our temporary is removed.
- **Stale temporaries are cleaned.** Before writing ``NAME``, siblings
  ``.NAME.partial-PID*`` and ``.NAME.old-PID*`` whose process no longer runs
  (``os.kill(pid, 0)`` raises ProcessLookupError) are removed; a stale ``.old`` whose
  ``NAME`` is missing (the run died between the two renames) is renamed back instead.
  The PID test assumes one machine; on a filesystem shared by hosts a live process on
  another host may look dead, which only matters for outputs written concurrently
  from two hosts.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from streamem.errors import InputError

MARKER_FILE = ".streamem-output"
STAR_MARK = "# written by streamem"
MRC_LABEL = "written by streamem"
NOT_OURS = "exists and was not written by streamem; not replacing it"
# `.NAME.partial-PID-TOKEN` / `.NAME.old-PID-TOKEN` (TOKEN: several writers in one process)
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)(?:-[0-9a-f]+)?$")

PathLike = str | Path


# -- input/output overlap -------------------------------------------------------------


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)  # hard links, case-insensitive filesystems
    except OSError:
        return False


def _inside(inner: Path, outer: Path) -> bool:
    return inner != outer and inner.is_relative_to(outer)


def check_not_input(path: PathLike, inputs: Iterable[PathLike | None] = ()) -> None:
    """Raise InputError if output ``path`` equals, contains or lies inside an input path.

    Paths are compared after resolving symlinks (``Path.resolve()``, also for paths
    that do not exist yet); ``None`` entries of ``inputs`` are skipped.
    """
    out = Path(path).resolve()
    for given in inputs:
        if given is None or str(given) == "" or "://" in str(given):
            continue  # a store URL (s3://...) is no local path: a local output is not in it
        inp = Path(given).resolve()
        if _same(out, inp):
            raise InputError(path, f"output is the input {given}; choose another output path")
        if _inside(out, inp):
            raise InputError(path, f"output lies inside the input {given}; not writing there")
        if _inside(inp, out):
            raise InputError(path, f"output contains the input {given}; not replacing it")


# -- streamem's marks -----------------------------------------------------------------


def marker_text(command: str | None) -> str:
    """The JSON written to ``.streamem-output`` in every output folder."""
    from streamem import __version__

    return json.dumps({"tool": "streamem", "command": command, "version": __version__}) + "\n"


def _folder_marked(path: Path) -> bool:
    marker = path / MARKER_FILE
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("tool") == "streamem"
    except (OSError, ValueError, AttributeError):
        return False


def _mrc_marked(path: Path) -> bool | None:
    """True/False for an MRC file (by its labels), None if the file is not MRC."""
    try:
        with open(path, "rb") as f:
            header = f.read(1024)
    except OSError:
        return False
    if len(header) < 1024 or header[208:211] != b"MAP":
        return None
    nlabl = min(max(int.from_bytes(header[220:224], "little"), 0), 10)
    labels = (header[224 + 80 * k : 304 + 80 * k] for k in range(nlabl))
    return any(label.lstrip().startswith(MRC_LABEL.encode()) for label in labels)


def _star_marked(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.readline().startswith(STAR_MARK.encode())
    except OSError:
        return False


def written_by_streamem(path: PathLike) -> bool:
    """Whether ``path`` is an output streamem wrote (module docstring: the rule)."""
    path = Path(path)
    if path.is_symlink():
        return False
    if path.is_dir():
        return _folder_marked(path)
    if not path.is_file():
        return False
    mrc = _mrc_marked(path)
    return mrc if mrc is not None else _star_marked(path)


def _mark_star(path: Path) -> None:
    """Prepend the STAR mark to a finished STAR file (streamed: no second copy in RAM)."""
    if _star_marked(path):
        return
    marked = path.with_name(path.name + ".mark")
    with open(path, "rb") as src, open(marked, "wb") as dst:
        dst.write(STAR_MARK.encode() + b"\n")
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(marked, path)


def mark_output(tmp: Path, final: Path, command: str | None) -> None:
    """Stamp a finished temporary output as streamem's (folder marker or STAR comment).

    MRC files are marked by :func:`streamem.io.mrc.write_map` as it writes them.
    """
    if tmp.is_dir():
        (tmp / MARKER_FILE).write_text(marker_text(command))
    elif tmp.is_file() and final.suffix.lower() == ".star":
        _mark_star(tmp)


# -- checks before work ---------------------------------------------------------------


def _looks_like_url(path: PathLike) -> bool:
    """``s3://b/p.zarr``, also after ``Path()`` made it ``s3:/b/p.zarr`` (a first component
    of two or more letters and a colon: a URL scheme, not a Windows drive)."""
    text = str(path)
    parts = Path(text).parts  # () for "." and ""
    first = parts[0] if parts else ""
    scheme = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]+):", first)
    return "://" in text or (scheme is not None and scheme[1].lower() != "file")


def check_output(
    path: PathLike,
    overwrite: bool = False,
    inputs: Iterable[PathLike | None] = (),
) -> Path:
    """Validate an output path before any work starts; returns it as a Path.

    Raises InputError if it touches one of ``inputs`` (:func:`check_not_input`), if it
    exists without ``overwrite``, if it exists but streamem did not write it, or if its
    folder is not writable.
    """
    if _looks_like_url(path):  # Path() folds s3://b/p.zarr into a local s3:/b/p.zarr
        raise InputError(path, "a URL output is written only by import (a particle store)")
    path = Path(path)
    check_not_input(path, inputs)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise InputError(path, "output exists (use --overwrite to replace it)")
        if not written_by_streamem(path):
            raise InputError(path, NOT_OURS)
    probe = path.absolute().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(path, f"{probe} is a file, not a folder")
    if not os.access(probe, os.W_OK):
        raise InputError(path, f"output folder {probe} is not writable")
    return path


# -- stale temporaries ----------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OverflowError:
        return False
    return True


def stale_temporaries(path: PathLike) -> list[Path]:
    """``.NAME.partial-PID*`` / ``.NAME.old-PID*`` siblings of ``path`` whose PID is dead."""
    path = Path(path).absolute()
    if not path.parent.is_dir():
        return []
    found = []
    for entry in path.parent.iterdir():
        m = _TEMP.match(entry.name)
        if m and m["name"] == path.name and not _pid_alive(int(m["pid"])):
            found.append(entry)
    return sorted(found)


def clean_stale_temporaries(path: PathLike) -> list[Path]:
    """Remove the stale temporaries of ``path`` (see the module docstring); returns them.

    A stale ``.old`` copy whose ``path`` is missing is the only copy left of the old
    output, so it is renamed back to ``path`` rather than deleted.
    """
    path = Path(path).absolute()
    cleaned = []
    for entry in stale_temporaries(path):
        kind = _TEMP.match(entry.name)["kind"]
        if kind == "old" and not (path.exists() or path.is_symlink()):
            try:
                _rename_noreplace(entry, path)
                cleaned.append(entry)
                continue
            except FileExistsError:
                pass
        _remove(entry)
        cleaned.append(entry)
    return cleaned


# -- write-then-rename ----------------------------------------------------------------


@contextmanager
def atomic_output(
    path: PathLike,
    overwrite: bool = False,
    inputs: Iterable[PathLike | None] = (),
    command: str | None = None,
) -> Iterator[Path]:
    """Yield a temporary sibling path; on success mark it and move it to ``path``.

    ``inputs``: paths the command reads (never written, replaced or contained).
    ``command``: recorded in a folder's ``.streamem-output`` marker. On any exception
    the temporary is removed and ``path`` is untouched. If ``path`` appeared while we
    worked, it is replaced only with ``overwrite`` and only if streamem wrote it.
    """
    inputs = list(inputs)
    path = _named(check_output(path, overwrite, inputs))
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.with_name(f".{path.name}.partial-{token}")
    try:
        yield tmp
        mark_output(tmp, path, command)
        _move_into_place(tmp, path, overwrite, token)
    except BaseException:
        _remove(tmp)
        raise


def _named(path: Path) -> Path:
    """``path`` with a last component to name temporaries after (``.`` -> the folder)."""
    if path.name in ("", ".", ".."):
        path = Path(os.path.abspath(path))
        if not path.name:
            raise InputError(path, "the filesystem root cannot be an output")
    return path


def _move_into_place(tmp: Path, path: Path, overwrite: bool, token: str) -> None:
    appeared = "appeared while this command ran; not replacing it"
    if not (path.exists() or path.is_symlink()):
        try:
            _rename_noreplace(tmp, path)
            return
        except FileExistsError:
            if not overwrite:
                raise InputError(path, appeared) from None
    elif not overwrite:
        raise InputError(path, appeared)
    if not written_by_streamem(path):
        raise InputError(path, NOT_OURS)
    old = path.with_name(f".{path.name}.old-{token}")
    os.rename(path, old)
    try:
        _rename_noreplace(tmp, path)
    except FileExistsError:
        # someone wrote `path` between our two renames: keep theirs, give ours up
        _remove(old)
        raise InputError(path, appeared) from None
    except BaseException:
        _restore(old, path)
        raise
    _remove(old)  # last: until here the old output exists under its .old name


def _restore(old: Path, path: Path) -> None:
    try:
        _rename_noreplace(old, path)
    except OSError:
        pass  # `path` is taken again; the stale `.old` is cleaned by the next run


@contextmanager
def output_folder_in_place(
    path: PathLike,
    overwrite: bool = False,
    inputs: Iterable[PathLike | None] = (),
    command: str | None = None,
) -> Iterator[Path]:
    """Yield ``path`` as a new, marked folder for jobs that must write in place.

    For jobs whose outputs record their own absolute paths (so they cannot be written
    under a temporary name). The checks are :func:`check_output`'s; an old output
    (streamem's, with ``overwrite``) is renamed aside first and deleted only when the
    job succeeds; on failure the new folder is removed and the old one put back.
    """
    path = _named(check_output(path, overwrite, list(inputs)))
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    old = path.with_name(f".{path.name}.old-{token}")
    if path.exists() or path.is_symlink():
        os.rename(path, old)
    try:
        path.mkdir()
    except FileExistsError:
        if old.exists():
            _restore(old, path)
        raise InputError(path, "appeared while this command ran; not replacing it") from None
    (path / MARKER_FILE).write_text(marker_text(command))
    try:
        yield path
    except BaseException:
        _remove(path)
        if old.exists():
            _restore(old, path)
        raise
    if old.exists():
        _remove(old)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.renameat2
    except (OSError, AttributeError):
        return None


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists (never replaces it)."""
    fn = _renameat2()
    if fn is not None:
        rc = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    # fallback: a hard link never replaces; folders are checked just before the rename
    if src.is_dir() and not src.is_symlink():
        if dst.exists() or dst.is_symlink():
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        os.rename(src, dst)
        return
    os.link(src, dst)
    os.unlink(src)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()
