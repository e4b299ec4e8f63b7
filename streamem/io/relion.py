"""The RELION adapter: STAR tables and ``NNNNNN@stack.mrcs`` names, read and written.

This is the one place where RELION's file conventions are converted (see
``shared/CONVENTIONS.md``):

- RELION 3.1+ particle files have ``data_optics`` and ``data_particles``; particles
  refer to their optics row by ``rlnOpticsGroup``.
- RELION 3.0 files have a single ``data_`` block with the optics on every row; they
  are converted to 3.1 as RELION does, and RELION's defaults fill missing optics
  values (:mod:`streamem.io.relion_optics`, which cites RELION's source for each rule).
- Image names count from 1 (``000001@stack.mrcs`` is the first image); we use 0-based
  indices internally. A relative stack path is looked up next to the STAR file first,
  then in the current folder (RELION runs from its project folder).
- RELION's numeric labels (:data:`INT_LABELS`, :data:`FLOAT_LABELS`: CTF, poses,
  origins, optics, picking) are read as int64/float64 in every block, optics too; a
  value that is not a number is refused with the file, the 1-based data row and the
  label, because starfile would otherwise read the whole column as text.
- Every other column is kept as it is, unknown ones too.

Writing a store out as STAR + MRCS stacks is :mod:`streamem.io.relion_export`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile

from streamem.errors import InputError
from streamem.io.relion_optics import (
    OPTICS_CTF_LABELS,
    PIXEL_LABELS_30,
    apply_optics_rules,
    convert_relion30,
)
from streamem.io.store import CTF_FIELDS

log = logging.getLogger(__name__)

#: Labels that hold text even when every value looks like a number.
STRING_LABELS = (
    "rlnImageName",
    "rlnImageOriginalName",
    "rlnMicrographName",
    "rlnMicrographMovieName",
    "rlnOpticsGroupName",
    "rlnGroupName",
    "rlnCtfImage",
    "rlnReconstructImageName",
    "rlnOriginalParticleName",
)

#: RELION labels that hold integers (RELION's EMDL_INT and EMDL_BOOL labels we meet).
INT_LABELS = frozenset(
    {
        "rlnOpticsGroup",
        "rlnRandomSubset",
        "rlnClassNumber",
        "rlnGroupNumber",
        "rlnImageSize",
        "rlnImageDimensionality",
        "rlnNrOfSignificantSamples",
        "rlnNrOfFrames",
        "rlnHelicalTubeID",
        "rlnBeamTiltClass",
        "rlnOriginalImageSize",
        "rlnCtfDataAreCtfPremultiplied",
        "rlnMicrographFrameNumber",
    }
)
#: RELION labels that hold real numbers (EMDL_DOUBLE): CTF, poses, optics, picking.
FLOAT_LABELS = frozenset(
    {
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnCtfAstigmatism",
        "rlnPhaseShift",
        "rlnCtfBfactor",
        "rlnCtfScalefactor",
        "rlnCtfMaxResolution",
        "rlnCtfFigureOfMerit",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
        "rlnImagePixelSize",
        "rlnDetectorPixelSize",
        "rlnMagnification",
        "rlnMicrographPixelSize",
        "rlnMicrographOriginalPixelSize",
        "rlnBeamTiltX",
        "rlnBeamTiltY",
        "rlnMagMat00",
        "rlnMagMat01",
        "rlnMagMat10",
        "rlnMagMat11",
        "rlnAngleRot",
        "rlnAngleTilt",
        "rlnAnglePsi",
        "rlnAngleRotPrior",
        "rlnAngleTiltPrior",
        "rlnAnglePsiPrior",
        "rlnAnglePsiFlipRatio",
        "rlnOriginX",
        "rlnOriginY",
        "rlnOriginZ",
        "rlnOriginXAngst",
        "rlnOriginYAngst",
        "rlnOriginZAngst",
        "rlnOriginXPrior",
        "rlnOriginYPrior",
        "rlnOriginXPriorAngst",
        "rlnOriginYPriorAngst",
        "rlnCoordinateX",
        "rlnCoordinateY",
        "rlnCoordinateZ",
        "rlnAutopickFigureOfMerit",
        "rlnMaxValueProbDistribution",
        "rlnLogLikeliContribution",
        "rlnNormCorrection",
        "rlnParticleSelectZScore",
        "rlnHelicalTrackLength",
        "rlnHelicalTrackLengthAngst",
    }
)


def coerce_numeric_labels(table: pd.DataFrame, path: Path, block: str = "") -> pd.DataFrame:
    """RELION's numeric labels as numbers: int64 for :data:`INT_LABELS`, float64 for
    :data:`FLOAT_LABELS`; other columns are returned as they are.

    starfile reads a column with one bad value as text, so ``'abc'`` in rlnDefocusU
    would otherwise be imported as a text field. A value that is not a number (or, for
    an integer label, not a whole number) raises InputError naming ``path``, the
    1-based data row (with its rlnImageName when there is one) and the label.
    ``block`` names the data block in the message (e.g. ``"data_optics "``).
    """
    out = table
    for label in table.columns:
        if label in INT_LABELS:
            kind = int
        elif label in FLOAT_LABELS:
            kind = float
        else:
            continue
        values = _numeric_column(table[label], kind)
        if isinstance(values, int):  # the first bad row
            row = values
            raw = table[label].iloc[row]
            what = "a whole number" if kind is int else "a number"
            name = ""
            if "rlnImageName" in table.columns:
                name = f" ({table['rlnImageName'].iloc[row]})"
            raise InputError(
                path, f"{block}row {row + 1}{name}, {label}: {str(raw)!r} is not {what}"
            )
        if out is table:
            out = table.copy()
        out[label] = values
    return out


def _numeric_column(col: pd.Series, kind: type) -> pd.Series | int:
    """``col`` as float64 or int64, or the 0-based index of its first bad value."""
    if pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
        values = col.astype(np.float64)  # the common case: starfile already parsed numbers
        bad = np.zeros(len(col), dtype=bool)
    else:
        text = col.astype(str).str.strip()
        values = pd.to_numeric(text, errors="coerce").astype(np.float64)
        # "nan" is a number to RELION's parser (and ours); "abc", "" and "1,5" are not
        bad = (values.isna() & (text.str.lower() != "nan")).to_numpy()
    if kind is int:
        v = values.to_numpy()
        bad = bad | ~np.isfinite(v) | (v != np.round(v))
    if bad.any():
        return int(np.argmax(bad))
    if kind is int:
        return values.astype(np.int64)
    return values


# -- reading ---------------------------------------------------------------------------


def read_particles_star(
    path: str | Path, require_ctf: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a RELION particle STAR file (3.0 or 3.1+) as (particles, optics) tables.

    particles: one row per particle, columns are STAR labels without ``_``; always has
    ``rlnImageName`` and ``rlnOpticsGroup`` (int). optics: one row per optics group
    with ``rlnOpticsGroup`` and whatever else is known (``rlnImagePixelSize`` Å,
    ``rlnVoltage`` kV, ``rlnSphericalAberration`` mm, ``rlnAmplitudeContrast``,
    ``rlnImageSize`` px). RELION 3.0 files are converted as the module docstring says.

    Missing CTF columns log a warning, or raise InputError if ``require_ctf``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "STAR file not found")
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=list(STRING_LABELS))
    except Exception as exc:  # starfile/pandas raise many types on malformed text
        raise InputError(path, f"not a readable STAR file ({type(exc).__name__}: {exc})") from None
    blocks = {
        name: coerce_numeric_labels(_as_frame(block), path, _block_prefix(name, "particles"))
        for name, block in blocks.items()
    }

    if "particles" in blocks:
        particles = blocks["particles"]
        optics = blocks.get("optics")
    else:
        with_names = [b for b in blocks.values() if "rlnImageName" in b.columns]
        if with_names:
            particles = with_names[0]
        elif len(blocks) == 1:
            particles = next(iter(blocks.values()))
        else:
            raise InputError(path, "no data_particles block and no block with rlnImageName")
        optics = None
    if "rlnImageName" not in particles.columns:
        raise InputError(path, "no rlnImageName column")
    if len(particles) == 0:
        raise InputError(path, "no particles")
    particles = particles.reset_index(drop=True)

    if optics is None:
        particles, optics = convert_relion30(particles, path)
    else:
        particles, optics = _check_optics31(particles, optics.reset_index(drop=True), path)
    has_defocus = all(c in particles.columns for c in CTF_FIELDS)
    optics = apply_optics_rules(optics, path, has_defocus)

    missing = [c for c in CTF_FIELDS if c not in particles.columns]
    missing += [c for c in OPTICS_CTF_LABELS if c not in optics.columns]
    if missing:
        msg = f"no CTF columns ({', '.join(missing)})"
        if require_ctf:
            raise InputError(path, msg)
        log.warning("%s: %s; particles will be processed without CTF correction", path, msg)
    return particles, optics


def _block_prefix(name: str, main: str) -> str:
    """How an error names a block: nothing for the main one, ``data_optics `` for others."""
    return "" if name in (main, "") else f"data_{name} "


def _as_frame(block: Any) -> pd.DataFrame:
    """starfile returns a dict for a block without ``loop_``: one row."""
    if isinstance(block, pd.DataFrame):
        return block
    return pd.DataFrame({k: [v] for k, v in dict(block).items()})


def _check_optics31(
    particles: pd.DataFrame, optics: pd.DataFrame, path: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    if "rlnOpticsGroup" not in optics.columns:
        raise InputError(path, "data_optics has no rlnOpticsGroup column")
    if optics["rlnOpticsGroup"].duplicated().any():
        raise InputError(path, "data_optics lists an rlnOpticsGroup twice")
    if "rlnOpticsGroup" not in particles.columns:
        if len(optics) != 1:
            raise InputError(path, "particles have no rlnOpticsGroup but there are several")
        particles = particles.assign(rlnOpticsGroup=int(optics["rlnOpticsGroup"].iloc[0]))
    unknown = set(particles["rlnOpticsGroup"].unique()) - set(optics["rlnOpticsGroup"])
    if unknown:
        raise InputError(path, f"rlnOpticsGroup {sorted(unknown)[0]} is not in data_optics")
    return particles, optics


def parse_image_names(
    names: Sequence[str] | pd.Series, star_path: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``NNNNNN@stack.mrcs`` names into (indices, stack paths).

    Returns indices ``(N,)`` int64, 0-based (RELION counts from 1), and stack paths
    ``(N,)`` object array of ``str``. A name without ``@`` is a single-image file
    (index 0). Relative stack paths are resolved next to ``star_path`` first, then in
    the current folder; a stack found in neither keeps the path next to the STAR file
    (the importer reports it missing).
    """
    s = pd.Series(np.asarray(names, dtype=object)).astype(str)
    parts = s.str.partition("@")
    has_at = parts[1] == "@"
    index_text = parts[0].where(has_at, "1")
    stack_text = parts[2].where(has_at, parts[0])
    one_based = pd.to_numeric(index_text, errors="coerce")
    bad = one_based.isna() | (one_based < 1) | (one_based != one_based.round()) | (stack_text == "")
    if bad.any():
        first = s[bad.to_numpy()].iloc[0]
        raise InputError(star_path, f"bad rlnImageName '{first}' (expected NNNNNN@stack.mrcs)")
    indices = one_based.to_numpy(dtype=np.int64) - 1

    star_dir = Path(star_path).absolute().parent if star_path is not None else Path.cwd()
    resolved = {name: str(_resolve_stack(name, star_dir)) for name in stack_text.unique()}
    stacks = stack_text.map(resolved).to_numpy(dtype=object)
    return indices, stacks


def _resolve_stack(name: str, star_dir: Path) -> Path:
    p = Path(name)
    if p.is_absolute():
        return p
    for base in (star_dir, Path.cwd()):
        if (base / p).exists():
            return base / p
    return star_dir / p


# -- writing ---------------------------------------------------------------------------


def format_floats(df: pd.DataFrame) -> pd.DataFrame:
    """Floats as their shortest round-tripping text (``str`` of the NumPy scalar).

    starfile's fixed ``%.6f`` would turn 1e-7 into 0 and lose digits of large values.
    """
    out = df.copy()
    for c in out.columns:
        col = out[c]
        if pd.api.types.is_float_dtype(col.dtype):
            values = col.to_numpy()
            out[c] = pd.Series([str(v) for v in values], index=out.index, dtype=object)
    return out


def write_star(path: str | Path, blocks: dict[str, pd.DataFrame | dict[str, Any]]) -> None:
    """Write STAR data blocks (``{"optics": df, "particles": df}``) with exact floats.

    A DataFrame becomes a ``loop_`` block, a dict a block of ``_label value`` pairs.
    """
    out: dict[str, Any] = {}
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame):
            out[name] = format_floats(block)
        else:
            out[name] = {
                k: str(v) if isinstance(v, float | np.floating) else v for k, v in block.items()
            }
    starfile.write(out, path)


#: Rows formatted at a time by :func:`write_star_streamed` (bounded client memory).
STAR_ROWS_PER_BLOCK = 16384


def write_star_streamed(
    path: str | Path,
    blocks: dict[str, pd.DataFrame | dict[str, Any] | Iterable[pd.DataFrame]],
) -> None:
    """:func:`write_star` with loop blocks given as an iterable of row blocks.

    A block that is neither a DataFrame nor a dict is an iterable of DataFrames with the
    same columns (consecutive rows of one loop), formatted and written one at a time, so
    memory is one row block however long the loop. The text is :func:`write_star`'s for
    the concatenated table, line for line (starfile's own block writers and
    ``to_csv`` settings; only the ``# Created by`` time stamp differs between runs).
    """
    from starfile.writer import loop_block, package_info, simple_block

    with open(path, "w") as f:
        f.write(f"{package_info()}\n\n\n")
        for name, block in blocks.items():
            if isinstance(block, dict):
                values = {
                    k: str(v) if isinstance(v, float | np.floating) else v for k, v in block.items()
                }
                f.writelines(f"{line}\n" for line in simple_block(name, values))
                continue
            parts = [block] if isinstance(block, pd.DataFrame) else block
            header = None
            for part in parts:
                lines = list(loop_block(name, format_floats(part)))
                n_head = 3 + len(part.columns)  # data_NAME, "", loop_, one line per label
                if header is None:
                    header = lines[:n_head]
                    f.writelines(f"{line}\n" for line in header)
                f.writelines(f"{line}\n" for line in lines[n_head:-2])  # rows, not the ""s
            if header is None:
                raise ValueError(f"loop block {name!r} has no row blocks (not even an empty one)")
            f.write("\n\n")


# -- micrographs and coordinates (pick, extract) ----------------------------------------

#: Optics labels of micrographs (RELION 3.1 data_optics of a micrographs STAR).
MICROGRAPH_OPTICS_LABELS = (*OPTICS_CTF_LABELS, "rlnMicrographPixelSize")


def read_micrographs_star(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a RELION micrographs STAR file (3.1 or 3.0) as (micrographs, optics).

    micrographs: one row per micrograph with ``rlnMicrographName`` (as written),
    ``rlnMicrographPath`` (resolved like image stacks: next to the STAR file, then the
    current folder), ``rlnOpticsGroup`` (int) and every other column (CTF: ``rlnDefocusU``
    ...). optics: ``rlnOpticsGroup`` and what is known of ``rlnVoltage``,
    ``rlnSphericalAberration``, ``rlnAmplitudeContrast``, ``rlnMicrographPixelSize`` (Å;
    RELION 3.0: from ``rlnDetectorPixelSize`` µm · 1e4 / ``rlnMagnification``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "STAR file not found")
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=list(STRING_LABELS))
    except Exception as exc:  # starfile/pandas raise many types on malformed text
        raise InputError(path, f"not a readable STAR file ({type(exc).__name__}: {exc})") from None
    blocks = {
        name: coerce_numeric_labels(_as_frame(block), path, _block_prefix(name, "micrographs"))
        for name, block in blocks.items()
    }
    if "micrographs" in blocks:
        mics, optics = blocks["micrographs"], blocks.get("optics")
    else:
        named = [b for b in blocks.values() if "rlnMicrographName" in b.columns]
        if not named:
            raise InputError(path, "no data_micrographs block and no rlnMicrographName column")
        mics, optics = named[0], None
    if "rlnMicrographName" not in mics.columns:
        raise InputError(path, "no rlnMicrographName column")
    if len(mics) == 0:
        raise InputError(path, "no micrographs")
    mics = mics.reset_index(drop=True).copy()
    if optics is not None:
        mics, optics = _check_optics31(mics, optics.reset_index(drop=True), path)
    else:
        cols = mics.columns
        keys = pd.DataFrame({c: mics[c] for c in OPTICS_CTF_LABELS if c in cols})
        if "rlnMicrographPixelSize" in cols:
            keys["rlnMicrographPixelSize"] = mics["rlnMicrographPixelSize"].astype(float)
        elif "rlnDetectorPixelSize" in cols and "rlnMagnification" in cols:
            keys["rlnMicrographPixelSize"] = (
                mics["rlnDetectorPixelSize"].astype(float) * 1e4 / mics["rlnMagnification"]
            )
        if keys.shape[1]:
            group = keys.groupby(list(keys.columns), sort=False, dropna=False).ngroup() + 1
        else:
            group = pd.Series(1, index=mics.index)
        optics = keys.assign(rlnOpticsGroup=group.to_numpy()).drop_duplicates("rlnOpticsGroup")
        optics = optics.reset_index(drop=True)
        drop = [*OPTICS_CTF_LABELS, "rlnMicrographPixelSize", *PIXEL_LABELS_30]
        mics = mics.drop(columns=[c for c in drop if c in cols])
        mics["rlnOpticsGroup"] = group.astype(np.int64).to_numpy()
    mics["rlnOpticsGroup"] = mics["rlnOpticsGroup"].astype(np.int64)
    optics["rlnOpticsGroup"] = optics["rlnOpticsGroup"].astype(np.int64)
    star_dir = path.absolute().parent
    mics["rlnMicrographPath"] = [
        str(_resolve_stack(str(n), star_dir)) for n in mics["rlnMicrographName"]
    ]
    return mics, optics


def read_coordinates_star(path: str | Path) -> pd.DataFrame:
    """A RELION coordinate STAR file: ``rlnCoordinateX/Y`` (pixels, float) and other columns.

    A file with no particles (an empty loop, or only a header) gives an empty table.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "coordinate file not found")
    if path.stat().st_size == 0:
        return pd.DataFrame({"rlnCoordinateX": [], "rlnCoordinateY": []})
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:
        raise InputError(path, f"not a readable STAR file ({type(exc).__name__}: {exc})") from None
    frames = [_as_frame(b) for b in blocks.values()]
    frames = [f for f in frames if "rlnCoordinateX" in f.columns or len(f.columns) == 0]
    if not frames:
        raise InputError(path, "no rlnCoordinateX/rlnCoordinateY columns")
    table = frames[0].reset_index(drop=True)
    if len(table.columns) == 0:
        return pd.DataFrame({"rlnCoordinateX": [], "rlnCoordinateY": []})
    if "rlnCoordinateY" not in table.columns:
        raise InputError(path, "no rlnCoordinateY column")
    for c in ("rlnCoordinateX", "rlnCoordinateY"):
        values = pd.to_numeric(table[c], errors="coerce")
        if values.isna().any() or not np.isfinite(values.to_numpy(dtype=float)).all():
            raise InputError(path, f"{c} has values that are not finite numbers")
        table[c] = values.astype(float)
    return table
