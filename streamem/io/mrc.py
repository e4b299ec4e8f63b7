"""MRC maps and stacks through ``mrcfile``: voxel size in the header, origin 0, mode 2.

Maps are ``[z, y, x]`` and images ``[y, x]`` as mrcfile returns them.

Reading is as tolerant as RELION's and no more. Stacks written by older IMOD, EMAN2
or SPIDER conversions often lack the ``MAP `` ID string (bytes 209-212) or have a zero
machine stamp (bytes 213-216); RELION and cryoDRGN read them, and so do we, through
mrcfile's permissive mode, with one warning line naming the file (byte order is then
mrcfile's guess, native; a wrong guess shows up as a size that disagrees with the
header and is refused). Everything else mrcfile complains about is refused with one
line: an unknown mode, a data block shorter than the header's nx·ny·nz says, a header
that cannot be parsed.

Solvent masks (RELION's ``--solvent_mask``, used by refine3d and class3d) are read and
checked by :func:`read_solvent_mask`.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path

import mrcfile
import numpy as np

from streamem import __version__
from streamem.errors import InputError
from streamem.io.atomic import MRC_LABEL, atomic_output

log = logging.getLogger(__name__)

#: mrcfile's complaints that legitimate files from other packages trigger (read anyway).
TOLERATED_PROBLEMS = ("Map ID string not found", "Unrecognised machine stamp")
#: mrcfile warnings that never made a file unreadable (a few bytes of padding at the end).
_HARMLESS = ("larger than expected",)
#: ``warnings.catch_warnings`` swaps the process's warning filters, which is not
#: thread-safe: the import opens stacks from several threads (Dask's threaded
#: scheduler), and one thread's restore could let another's mrcfile warnings through;
#: every swap around mrcfile (here and in :mod:`streamem.io.micrograph_read`) takes it.
MRC_WARNINGS_LOCK = threading.Lock()


def open_mrc(path: str | Path, *, mmap: bool = False, header_only: bool = False, warn: bool = True):
    """Open an MRC file with mrcfile, strictly, or permissively for the tolerated problems.

    Returns the mrcfile object (the caller closes it). A file without the ID string
    or machine stamp is opened in permissive mode with one warning naming it (unless
    ``warn`` is False: a task re-opening a file already checked). Raises ValueError
    (mrcfile's message) for any other problem, and for a permissive open that still
    has one (an unknown mode, a short data block).
    """
    opener = mrcfile.mmap if mmap else mrcfile.open
    kwargs = {"mode": "r"} if mmap else {"mode": "r", "header_only": header_only}
    try:
        with MRC_WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return opener(path, permissive=False, **kwargs)
    except ValueError as exc:
        if not any(t in str(exc) for t in TOLERATED_PROBLEMS):
            raise
    with MRC_WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mrc = opener(path, permissive=True, **kwargs)
    messages = [str(w.message) for w in caught]
    fatal = [m for m in messages if not any(t in m for t in (*TOLERATED_PROBLEMS, *_HARMLESS))]
    if not fatal and not header_only and mrc.data is None:
        fatal = ["no data block"]
    if fatal:
        mrc.close()
        raise ValueError(fatal[0])
    if warn:
        tolerated = [m.split(" - ")[0] for m in messages if any(t in m for t in TOLERATED_PROBLEMS)]
        log.warning("%s: %s; read anyway (as RELION does)", path, "; ".join(tolerated))
    return mrc


def read_map(path: str | Path) -> tuple[np.ndarray, float]:
    """Read an MRC map or image; returns (float32 array, voxel size in Å).

    Raises InputError on a missing, truncated or corrupt file, or non-finite values.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    try:
        with open_mrc(path) as mrc:
            data = np.asarray(mrc.data, dtype=np.float32).copy()
            voxel = float(mrc.voxel_size.x)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, f"not a readable MRC file ({exc})") from None
    if not np.all(np.isfinite(data)):
        raise InputError(path, "contains NaN or Inf values")
    return data, voxel


def write_map(
    path: str | Path,
    data: np.ndarray,
    voxel_size_A: float,
    overwrite: bool = True,
    inputs: Iterable[str | Path | None] = (),
) -> Path:
    """Write a float32 MRC map (or a stack for a ``.mrcs`` path), atomically.

    The header carries the label ``written by streamem VERSION`` after mrcfile's own,
    which is how ``--overwrite`` knows the file is streamem's
    (:mod:`streamem.io.atomic`). ``inputs``: paths the command reads; ``path`` must
    not be one of them.
    """
    path = Path(path)
    data = np.ascontiguousarray(np.asarray(data, dtype=np.float32))
    with atomic_output(path, overwrite=overwrite, inputs=inputs) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            if path.suffix == ".mrcs" or data.ndim == 2:
                mrc.set_image_stack() if data.ndim == 3 else None
            mrc.voxel_size = voxel_size_A
            mrc.header.origin = (0.0, 0.0, 0.0)
            mrc.update_header_stats()
            _add_label(mrc.header, f"{MRC_LABEL} {__version__}")
    return path


def _add_label(header, text: str) -> None:
    """Append one 80-character label to an MRC header (10 at most: the last is reused)."""
    k = min(int(header.nlabl), 9)
    header.label[k] = text.encode("ascii", "replace")[:80].ljust(80)
    header.nlabl = k + 1


def open_stack_mmap(path: str | Path, warn: bool = True):
    """Memory-map an MRC(S) stack; returns the mrcfile object (caller closes).

    Raises InputError if the file is missing or shorter than its header says. A stack
    without ID string or machine stamp is read with a warning (see :func:`open_mrc`;
    ``warn=False`` in tasks that re-open a stack the plan has checked).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "image stack not found")
    try:
        mrc = open_mrc(path, mmap=True, warn=warn)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, f"truncated or corrupt MRC stack ({exc})") from None
    if mrc.data is None:
        mrc.close()
        raise InputError(path, "MRC file has no data")
    return mrc


def stack_shape(path: str | Path) -> tuple[int, int, int]:
    """(n_images, ny, nx) of an MRC(S) file, from its header; validated against file size."""
    mrc = open_stack_mmap(path)
    try:
        shape = mrc.data.shape
    finally:
        mrc.close()
    if len(shape) == 2:
        return (1, *shape)
    return tuple(int(s) for s in shape)


def read_solvent_mask(path: str | Path, box_size: int) -> np.ndarray:
    """A reference mask (B, B, B) float32 in [0, 1] from an MRC file (RELION's --solvent_mask)."""
    if not Path(path).is_file():
        raise InputError(path, "--solvent-mask: file not found")
    mask, _ = read_map(path)
    if mask.shape != (box_size,) * 3:
        raise InputError(path, f"mask is {mask.shape}, particles need ({box_size},)*3")
    if not np.isfinite(mask).all() or mask.min() < -1e-3 or mask.max() > 1 + 1e-3:
        raise InputError(path, "--solvent-mask: values must lie in [0, 1]")
    if mask.max() <= 0:
        raise InputError(path, "--solvent-mask: the mask is empty")
    return np.clip(mask, 0.0, 1.0).astype(np.float32)
