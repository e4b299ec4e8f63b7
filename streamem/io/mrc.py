"""MRC maps and stacks through ``mrcfile``: voxel size in the header, origin 0, mode 2.

Maps are ``[z, y, x]`` and images ``[y, x]`` as mrcfile returns them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import mrcfile
import numpy as np

from streamem import __version__
from streamem.errors import InputError
from streamem.io.atomic import MRC_LABEL, atomic_output


def read_map(path: str | Path) -> tuple[np.ndarray, float]:
    """Read an MRC map or image; returns (float32 array, voxel size in Å).

    Raises InputError on a missing, truncated or corrupt file, or non-finite values.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, permissive=False, mode="r") as mrc:
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


def open_stack_mmap(path: str | Path):
    """Memory-map an MRC(S) stack; returns the mrcfile object (caller closes).

    Raises InputError if the file is missing or shorter than its header says.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "image stack not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mrc = mrcfile.mmap(path, mode="r", permissive=False)
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
