"""Particle extraction into a particle store (RELION's ``relion_preprocess --extract``).

For every coordinate (``rlnCoordinateX/Y``, 0-based pixels of the micrograph, the
point that becomes the box centre ``B // 2``):

1. a ``box`` x ``box`` window is cut with its centre pixel at the rounded
   coordinate (RELION rounds too; the sub-pixel rest is left for refinement);
   windows that do not lie wholly inside the micrograph are skipped and counted;
2. binning (``bin_factor`` F) crops the window's Fourier transform to
   ``box / F`` pixels (an even size), so the pixel size becomes ``p · box / (box / F)``;
3. RELION's normalisation: a plane ``a·x + b·y + c`` fitted by least squares to the
   background (pixels further than ``bg_radius_px`` from the centre; RELION's
   default radius is 75 % of half the box, ``0.375 · box``, in output pixels) is
   subtracted, then the background is scaled to mean 0 and standard deviation 1;
4. with ``invert_contrast`` the image is negated (raw micrographs have dark
   protein; RELION's particles are white).

The store gets per particle ``rlnMicrographName``, ``rlnCoordinateX/Y``, the CTF of
its micrograph (``rlnDefocusU/V``, ``rlnDefocusAngle`` and, when present,
``rlnPhaseShift``, ``rlnCtfBfactor``, ``rlnCtfMaxResolution``, ``rlnCtfFigureOfMerit``),
``rlnAutopickFigureOfMerit`` when the coordinate files have it, the optics group of
the micrograph and a balanced random ``rlnRandomSubset``. Optics groups are the
micrographs STAR file's, with ``rlnImagePixelSize`` (after binning) and
``rlnImageSize``.

Streaming: the client reads only the coordinate files and the micrograph headers
(to know N and the edge skips), creates the store under a temporary name, and then
one Dask task per store chunk reads the micrographs that chunk needs (particles are
ordered by micrograph) and writes its region; the store is renamed when complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import pandas as pd

from streamem.errors import InputError

log = logging.getLogger("streamem")

#: RELION's default background radius: 75 % of half the (output) box.
BG_RADIUS_FRACTION = 0.375
#: Coordinate-file suffixes tried next to a micrograph's stem (RELION pickers' names).
COORDINATE_SUFFIXES = ("_autopick.star", "_manualpick.star", "_coords.star", ".star")
#: Optional micrograph columns carried into the store.
OPTIONAL_CTF_LABELS = (
    "rlnPhaseShift",
    "rlnCtfBfactor",
    "rlnCtfMaxResolution",
    "rlnCtfFigureOfMerit",
)


# -- kernels ---------------------------------------------------------------------------


def default_bg_radius_px(box_size: int) -> float:
    """RELION's default background radius (pixels) for a box."""
    return BG_RADIUS_FRACTION * box_size


def inside_micrograph(x, y, box_size: int, shape) -> np.ndarray:
    """True where the ``box_size`` window centred at round(x, y) lies inside ``shape``."""
    h, w = shape
    x0 = np.rint(np.asarray(x)).astype(np.int64) - box_size // 2
    y0 = np.rint(np.asarray(y)).astype(np.int64) - box_size // 2
    return (x0 >= 0) & (y0 >= 0) & (x0 + box_size <= w) & (y0 + box_size <= h)


def cut_windows(mic, x, y, box_size: int):
    """Windows ``(n, B, B)`` with pixel ``B // 2`` at the rounded coordinates (must be inside)."""
    xp_ = np.rint(np.asarray(x)).astype(np.int64) - box_size // 2
    yp_ = np.rint(np.asarray(y)).astype(np.int64) - box_size // 2
    out = np.empty((len(xp_), box_size, box_size), dtype=np.float32)
    for i, (x0, y0) in enumerate(zip(xp_, yp_, strict=True)):
        out[i] = mic[y0 : y0 + box_size, x0 : x0 + box_size]
    return out


def normalise_particles(images, bg_radius_px: float, ramp: bool = True):
    """RELION's normalisation of ``(n, B, B)`` images (module docstring, step 3)."""
    x = np.asarray(images, dtype=np.float64)
    n, B, _ = x.shape
    c = np.arange(B, dtype=np.float64) - B // 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    bg = (yy**2 + xx**2) > bg_radius_px**2
    if bg.sum() < 4:
        raise ValueError(f"no background outside a radius of {bg_radius_px} px in a {B} px box")
    flat = x.reshape(n, -1)
    if ramp:
        design = np.stack([xx[bg], yy[bg], np.ones(int(bg.sum()))], axis=1)  # (m, 3)
        coef, *_ = np.linalg.lstsq(design, flat[:, bg.ravel()].T, rcond=None)  # (3, n)
        plane = np.stack([xx.ravel(), yy.ravel(), np.ones(B * B)], axis=1) @ coef  # (B², n)
        flat = flat - plane.T
    values = flat[:, bg.ravel()]
    mean = values.mean(axis=1, keepdims=True)
    std = values.std(axis=1, keepdims=True)
    std = np.where(std > 1e-30, std, 1.0)
    return ((flat - mean) / std).reshape(n, B, B).astype(np.float32)


def output_box(box_size: int, bin_factor: float) -> int:
    """The binned box: ``box / bin`` rounded to an even number of pixels."""
    return max(2, 2 * int(round(box_size / bin_factor / 2)))


def extract_images(
    mic,
    x,
    y,
    box_size: int,
    out_box: int,
    bg_radius_px: float,
    invert_contrast: bool = False,
    normalise: bool = True,
):
    """Windows -> binned -> normalised -> (inverted) particle images ``(n, out, out)`` float32."""
    from streamem.core.filters import fourier_crop

    images = cut_windows(mic, x, y, box_size)
    if out_box != box_size:
        images = np.asarray(fourier_crop(images, out_box, ndim=2), dtype=np.float32)
    if normalise:
        images = normalise_particles(images, bg_radius_px)
    if invert_contrast:
        images = -images
    return images


# -- the job ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractResult:
    """What :func:`extract_particles` wrote, and the per-micrograph counts."""

    store_path: Path
    n_particles: int
    n_skipped_edge: int
    per_micrograph: pd.DataFrame  # rlnMicrographName, n_coordinates, n_extracted, n_skipped_edge


def coordinate_files(coords: str | Path, micrograph_names) -> dict[str, Path | None]:
    """Coordinate file of each micrograph name (None: none found; RELION skips those).

    ``coords``: a folder of ``<stem>_autopick.star`` (or ``_manualpick``, ``_coords``,
    plain ``<stem>.star``) files, or a STAR file (or a folder holding ``autopick.star``
    / ``coordinates.star``) with RELION 4's ``data_coordinate_files`` table
    (``rlnMicrographName``, ``rlnMicrographCoordinates``, paths relative to it).
    """
    import starfile

    coords = Path(coords)
    index = None
    if coords.is_file():
        index = coords
    elif coords.is_dir():
        for name in ("autopick.star", "coordinates.star", "manualpick.star"):
            if (coords / name).is_file():
                index = coords / name
                break
    else:
        raise InputError(coords, "coordinates folder or STAR file not found")
    if index is not None:
        try:
            blocks = starfile.read(index, always_dict=True)
        except Exception as exc:
            raise InputError(index, f"not a readable STAR file ({exc})") from None
        table = next(
            (
                b
                for b in blocks.values()
                if isinstance(b, pd.DataFrame)
                and {"rlnMicrographName", "rlnMicrographCoordinates"} <= set(b.columns)
            ),
            None,
        )
        if table is None:
            raise InputError(index, "no rlnMicrographName/rlnMicrographCoordinates table")
        base = index.absolute().parent
        by_name = {}
        for name, path in zip(
            table["rlnMicrographName"], table["rlnMicrographCoordinates"], strict=True
        ):
            p = Path(str(path))
            p = p if p.is_absolute() else (base / p if (base / p).exists() else Path.cwd() / p)
            by_name[str(name)] = p
            by_name.setdefault(Path(str(name)).name, p)
        return {m: by_name.get(m, by_name.get(Path(m).name)) for m in micrograph_names}
    out = {}
    for m in micrograph_names:
        stem = Path(m).stem
        out[m] = next(
            (
                coords / f"{stem}{s}"
                for s in COORDINATE_SUFFIXES
                if (coords / f"{stem}{s}").is_file()
            ),
            None,
        )
    return out


def _extract_chunk(
    store_path: str,
    start: int,
    groups: list,
    box: int,
    out_box: int,
    bg_radius_px: float,
    invert: bool,
) -> int:
    """Task: particles ``[start, start + n)`` from their micrographs, into the store."""
    from streamem.io.mrc import read_map
    from streamem.io.store import ParticleStore

    parts = []
    for path, x, y in groups:
        mic, _ = read_map(path)
        if mic.ndim != 2:
            raise InputError(path, f"a micrograph must be one 2-D image, got shape {mic.shape}")
        parts.append(extract_images(mic, x, y, box, out_box, bg_radius_px, invert))
    images = np.concatenate(parts)
    return ParticleStore(store_path).write_region(start, images=images)


def extract_particles(
    micrographs_star: str | Path,
    coords: str | Path,
    out: str | Path,
    box_size: int,
    bin_factor: float = 1.0,
    invert_contrast: bool = False,
    bg_radius_px: float | None = None,
    overwrite: bool = False,
    seed: int = 0,
    chunk_size: int | None = None,
    workers: int | None = None,
    angpix: float | None = None,
    client=None,
) -> ExtractResult:
    """Extract particles of the micrographs of a STAR file into a new particle store.

    ``box_size``: window in micrograph pixels (even); ``bin_factor``: output box
    ``box / bin`` (even); ``bg_radius_px``: in output pixels (default RELION's
    ``0.375 · out_box``). Bad input raises :class:`InputError` before anything is
    written; the store appears only when complete. The chunk tasks run on ``client``'s
    cluster (a ``distributed.Client``; its workers must see the micrographs and ``out``'s
    folder), else on ``workers`` threads.
    """
    from streamem.dist.tasks import run_tasks
    from streamem.io.atomic import atomic_output, check_output
    from streamem.io.mrc import stack_shape
    from streamem.io.relion import read_coordinates_star, read_micrographs_star
    from streamem.io.store import create_store, default_chunk_size

    out = Path(out)
    check_output(out, overwrite, inputs=[micrographs_star, coords])
    if box_size < 4 or box_size % 2:
        raise InputError(None, f"--box must be an even number of pixels >= 4, got {box_size}")
    if not bin_factor >= 1:
        raise InputError(None, f"--bin must be >= 1, got {bin_factor}")
    out_box = output_box(box_size, bin_factor)
    bg_radius = default_bg_radius_px(out_box) if bg_radius_px is None else float(bg_radius_px)
    if not 0 < bg_radius < out_box / 2 * np.sqrt(2) - 1:
        raise InputError(
            None, f"--bg-radius {bg_radius} px leaves no background in a {out_box} px box"
        )
    star = Path(micrographs_star)
    mics, optics = read_micrographs_star(star)
    missing_ctf = [c for c in ("rlnDefocusU", "rlnDefocusV") if c not in mics.columns]
    if missing_ctf:
        log.warning("%s: no %s; particles will have no CTF", star, ", ".join(missing_ctf))
    pixel = _pixel_size(optics, mics, star, angpix)
    files = coordinate_files(coords, list(mics["rlnMicrographName"]))

    rows, counts = [], []
    for k, mic in mics.iterrows():
        name = str(mic["rlnMicrographName"])
        cfile = files.get(name)
        if cfile is None:
            counts.append((name, 0, 0, 0))
            continue
        table = read_coordinates_star(cfile)
        shape = stack_shape(mic["rlnMicrographPath"])
        if shape[0] != 1:
            raise InputError(mic["rlnMicrographPath"], "a micrograph must be one 2-D image")
        ok = inside_micrograph(
            table["rlnCoordinateX"], table["rlnCoordinateY"], box_size, shape[1:]
        )
        counts.append((name, len(table), int(ok.sum()), int((~ok).sum())))
        kept = table[ok].reset_index(drop=True)
        kept.insert(0, "_mic", k)
        rows.append(kept)
    per_mic = pd.DataFrame(
        counts, columns=["rlnMicrographName", "n_coordinates", "n_extracted", "n_skipped_edge"]
    )
    n_skipped = int(per_mic["n_skipped_edge"].sum())
    parts = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    n = len(parts)
    if n == 0:
        raise InputError(
            Path(coords),
            "no particles to extract (no coordinates inside the "
            f"micrographs for a {box_size} px box; {n_skipped} too close to an edge)",
        )
    metadata = _metadata(parts, mics, seed)
    fields = {k: (str if v.dtype == object else v.dtype) for k, v in metadata.items()}
    groups = _optics_rows(optics, pixel * box_size / out_box, out_box)
    chunk = int(chunk_size or default_chunk_size(out_box))
    provenance = {
        "command": "extract",
        "micrographs": str(star.absolute()),
        "coordinates": str(Path(coords).absolute()),
        "box_size_px": box_size,
        "bin_factor": bin_factor,
        "bg_radius_px": bg_radius,
        "invert_contrast": bool(invert_contrast),
        "n_skipped_edge": n_skipped,
        "seed": seed,
    }
    mic_paths = mics["rlnMicrographPath"].to_numpy()
    # the files read, not the coordinate folder: the store may be written next to them
    index = [coords] if Path(coords).is_file() else []
    inputs = [star, *index, *files.values(), *mic_paths]
    with atomic_output(out, overwrite, inputs, "extract") as tmp:
        store = create_store(
            tmp,
            n,
            out_box,
            pixel * box_size / out_box,
            groups,
            fields,
            chunk_size=chunk,
            provenance=provenance,
        )
        store.write_region(0, metadata=metadata)
        tasks = []
        mic_index = parts["_mic"].to_numpy()
        xs, ys = parts["rlnCoordinateX"].to_numpy(), parts["rlnCoordinateY"].to_numpy()
        for start, stop in store.write_bounds():  # one task per shard of a sharded store
            groups_in = []
            for k in pd.unique(mic_index[start:stop]):
                sel = np.nonzero(mic_index[start:stop] == k)[0] + start
                groups_in.append((str(mic_paths[k]), xs[sel], ys[sel]))
            tasks.append(
                dask.delayed(_extract_chunk, pure=True)(
                    str(tmp.absolute()),
                    start,
                    groups_in,
                    box_size,
                    out_box,
                    bg_radius,
                    invert_contrast,
                )
            )
        run_tasks(tasks, client, workers)
    log.info("extracted %d particles (%d skipped at the edges) -> %s", n, n_skipped, out)
    return ExtractResult(out, n, n_skipped, per_mic)


def _pixel_size(optics: pd.DataFrame, mics: pd.DataFrame, star: Path, angpix) -> float:
    if angpix is not None:
        if not angpix > 0:
            raise InputError(None, f"--angpix must be positive, got {angpix}")
        return float(angpix)
    if "rlnMicrographPixelSize" in optics.columns:
        sizes = optics["rlnMicrographPixelSize"].astype(float).unique()
        if len(sizes) > 1:
            raise InputError(star, f"optics groups have different pixel sizes {sorted(sizes)}")
        if sizes[0] > 0:
            return float(sizes[0])
    from streamem.pick.job import _header_pixel

    pixel = _header_pixel(mics["rlnMicrographPath"].iloc[0])
    if pixel is None:
        raise InputError(star, "no pixel size (rlnMicrographPixelSize); use --angpix")
    return pixel


def _metadata(parts: pd.DataFrame, mics: pd.DataFrame, seed: int) -> dict[str, np.ndarray]:
    from streamem.io.importer import balanced_subsets

    k = parts["_mic"].to_numpy()
    meta: dict[str, np.ndarray] = {
        "rlnMicrographName": mics["rlnMicrographName"].astype(str).to_numpy(dtype=object)[k],
        "rlnCoordinateX": parts["rlnCoordinateX"].to_numpy(dtype=np.float64),
        "rlnCoordinateY": parts["rlnCoordinateY"].to_numpy(dtype=np.float64),
        "rlnOpticsGroup": mics["rlnOpticsGroup"].to_numpy(dtype=np.int32)[k],
    }
    for label in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", *OPTIONAL_CTF_LABELS):
        if label in mics.columns:
            meta[label] = pd.to_numeric(mics[label], errors="coerce").to_numpy(np.float64)[k]
    if "rlnDefocusU" in meta and "rlnDefocusAngle" not in meta:
        meta["rlnDefocusAngle"] = np.zeros(len(k))
    if "rlnAutopickFigureOfMerit" in parts.columns:
        meta["rlnAutopickFigureOfMerit"] = pd.to_numeric(
            parts["rlnAutopickFigureOfMerit"], errors="coerce"
        ).to_numpy(np.float64)

    meta["rlnRandomSubset"] = balanced_subsets(len(k), seed)
    return meta


def _optics_rows(optics: pd.DataFrame, pixel_A: float, out_box: int) -> list[dict]:
    rows = []
    for r in optics.to_dict(orient="records"):
        row = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()}
        row.setdefault("rlnOpticsGroupName", f"opticsGroup{int(row['rlnOpticsGroup'])}")
        row["rlnImagePixelSize"] = float(pixel_A)
        row["rlnImageSize"] = int(out_box)
        row["rlnImageDimensionality"] = 2
        rows.append(row)
    return rows
