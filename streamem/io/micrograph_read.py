"""Reading micrographs as microscopes write them, for CTF estimation.

- Data modes: whatever mrcfile reads (int8, int16, uint16, float16, float32, ...),
  returned as float32 ``(H, W)``. Non-finite pixels are *not* refused here (unlike
  :func:`streamem.io.mrc.read_map`): the CTF job reports them per micrograph, and the
  run goes on with the others.
- Files without the ID string or machine stamp: read permissively with one warning, as
  :func:`streamem.io.mrc.open_mrc` does.
- Pixel size: the header's voxel size when positive; else, for FEI/EPU files
  (``exttyp`` FEI1/FEI2), the extended header's ``Pixel size X`` (metres, per frame:
  the first frame's); else None.
"""

from __future__ import annotations

import glob
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from streamem.errors import InputError
from streamem.io.mrc import MRC_WARNINGS_LOCK, open_mrc


def _fei_pixel_A(mrc) -> float | None:
    """Pixel size in Å from an FEI1/FEI2 extended header (``Pixel size X``, metres)."""
    exttyp = bytes(mrc.header.exttyp).strip(b"\0 ")
    if exttyp not in (b"FEI1", b"FEI2"):
        return None
    try:
        with MRC_WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ext = mrc.indexed_extended_header
    except (ValueError, TypeError):
        return None
    if ext is None or len(ext) == 0 or "Pixel size X" not in (ext.dtype.names or ()):
        return None
    value = float(ext["Pixel size X"][0]) * 1e10
    return value if np.isfinite(value) and value > 0 else None


def header_pixel_size_A(mrc) -> float | None:
    """Pixel size (Å) of an open mrcfile object: voxel size, else FEI extended header."""
    voxel = float(mrc.voxel_size.x)
    if np.isfinite(voxel) and voxel > 0:
        return voxel
    return _fei_pixel_A(mrc)


def micrograph_pixel_size_A(path: str | Path) -> float | None:
    """The pixel size (Å) in an MRC file's headers, or None (InputError if unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "micrograph not found")
    try:
        with open_mrc(path, header_only=False, warn=False) as mrc:
            return header_pixel_size_A(mrc)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, f"not a readable MRC file ({exc})") from None


def read_micrograph(path: str | Path, warn: bool = True) -> tuple[np.ndarray, float | None]:
    """(image ``(H, W)`` float32, header pixel size Å or None) of a one-image MRC file.

    A stack of one image is squeezed; more images, or a volume, is an InputError, as is
    a missing or unreadable file. NaN/Inf pixels are returned as they are.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "micrograph not found")
    try:
        with open_mrc(path, warn=warn) as mrc:
            data = np.asarray(mrc.data)
            pixel = header_pixel_size_A(mrc)
            image = data.astype(np.float32, copy=True)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, f"not a readable MRC file ({exc})") from None
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 2:
        raise InputError(path, f"a micrograph must be one 2-D image, got shape {image.shape}")
    return image, pixel


def expand_micrograph_paths(inputs: Sequence[str]) -> list[str]:
    """MRC files and glob patterns as given on a command line -> existing files, in order.

    A STAR file among several inputs, a pattern that matches nothing and a file that
    does not exist each raise InputError naming it (pick and ctf take one micrographs
    STAR file, or MRC files)."""
    paths: list[str] = []
    for item in inputs:
        if str(item).endswith(".star"):
            raise InputError(item, "give one micrographs STAR file, or MRC files")
        found = sorted(glob.glob(str(item))) if any(c in str(item) for c in "*?[") else [item]
        if not found:
            raise InputError(item, "no micrograph matches this pattern")
        paths += found
    for p in paths:
        if not Path(p).is_file():
            raise InputError(p, "micrograph not found")
    return paths
