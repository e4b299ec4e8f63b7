"""The picking job: one Dask task per micrograph, RELION coordinate files out.

Inputs are a RELION micrographs STAR file (with CTF; pixel size from
``rlnMicrographPixelSize`` of its optics group) or MRC files (no CTF; pixel size from
``angpix`` or the MRC header). Templates are a stack of 2-D images (class averages,
``.mrcs``) or projections of a map (``reference``) at the HEALPix directions of
``healpix_order`` in the asymmetric unit of ``symmetry`` (psi from the picker's
in-plane search); they are resampled in Fourier space to the micrographs' pixel size.

Outputs in ``out_dir`` (written under a temporary name and renamed when complete):

- ``<stem>_autopick.star`` per micrograph: ``rlnCoordinateX``, ``rlnCoordinateY``
  (pixels of the original micrograph, 0-based, the point that becomes the box centre
  on extraction), ``rlnAutopickFigureOfMerit``, ``rlnClassNumber`` (1-based template;
  0 for LoG), ``rlnAnglePsi`` (degrees; 0 for LoG);
- ``autopick.star``: RELION 4's ``data_coordinate_files`` (``rlnMicrographName``,
  ``rlnMicrographCoordinates``), which ``streamem extract`` reads;
- ``autopick_summary.star``: per micrograph the number of picks
  (``rlnGroupNrParticles``) and, for template picking, the template scale used;
- ``<stem>_fom.mrc`` with ``write_fom_maps``: the best figure of merit (LoG: the
  standardised response) on the work grid, pixel size in the header;
- ``<stem>_picks.png`` for the first micrograph: its low-passed image with the picks.

Tasks get paths and small parameter objects; the templates go to the workers once
(one shared Dask key). Devices: the picking kernels (:mod:`streamem.pick.template`,
:mod:`streamem.pick.log`) follow their arrays' namespace. On a GPU worker (``--gpu``:
:mod:`streamem.dist.device`) each task moves its micrograph to the device and takes
the worker's device copy of the template bank (converted once per worker); picks and
figure-of-merit maps come back to NumPy before they are written. The tasks run through
:func:`streamem.dist.tasks.run_tasks`, the one helper of the I/O jobs: dask's threaded
scheduler here, or the ``client``'s cluster (``--scheduler``, ``--gpu``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import pandas as pd

from streamem.core.backend import to_numpy
from streamem.dist.device import device_namespace, model_on_device
from streamem.errors import InputError
from streamem.pick.log import LogPickParams, pick_log
from streamem.pick.peaks import Picks
from streamem.pick.template import (
    MicrographCtf,
    TemplatePickParams,
    downscaled_image,
    pick_templates,
    prepare_templates,
    projection_templates,
)

log = logging.getLogger("streamem")

MRC_SUFFIXES = (".mrc", ".mrcs", ".map")


@dataclass(frozen=True)
class MicrographInput:
    """One micrograph to pick: its name (as in the STAR file), path, pixel size, CTF."""

    name: str
    path: str
    pixel_size_A: float
    ctf: MicrographCtf | None = None

    @property
    def stem(self) -> str:
        return Path(self.name).stem


def micrograph_inputs(
    inputs: Sequence[str], angpix: float | None = None, use_ctf: bool = True
) -> list[MicrographInput]:
    """Micrographs from one STAR file or from MRC files/patterns (module docstring)."""
    from streamem.io.micrograph_read import expand_micrograph_paths
    from streamem.io.mrc import stack_shape
    from streamem.io.relion import read_micrographs_star
    from streamem.io.store import optics_params

    if not inputs:
        raise InputError(None, "no micrographs given")
    if angpix is not None and not angpix > 0:
        raise InputError(None, f"--angpix must be positive, got {angpix}")
    out: list[MicrographInput] = []
    if len(inputs) == 1 and str(inputs[0]).endswith(".star"):
        star = Path(inputs[0])
        mics, optics = read_micrographs_star(star)
        by_group = {int(r["rlnOpticsGroup"]): r for r in optics.to_dict(orient="records")}
        has_ctf = all(c in mics.columns for c in ("rlnDefocusU", "rlnDefocusV"))
        if use_ctf and not has_ctf:
            log.warning("%s: no rlnDefocusU/V; templates will not be CTF-modulated", star)
        for row in mics.to_dict(orient="records"):
            group = by_group[int(row["rlnOpticsGroup"])]
            pixel = angpix or _positive(group.get("rlnMicrographPixelSize"))
            if pixel is None:
                pixel = _header_pixel(row["rlnMicrographPath"])
            if pixel is None:
                raise InputError(star, "no pixel size (rlnMicrographPixelSize); use --angpix")
            ctf = None
            if use_ctf and has_ctf:
                ctf = MicrographCtf(
                    float(row["rlnDefocusU"]),
                    float(row["rlnDefocusV"]),
                    float(row.get("rlnDefocusAngle", 0.0)),
                    optics_params(group),
                    float(row.get("rlnPhaseShift", 0.0) or 0.0),
                )
            out.append(
                MicrographInput(
                    str(row["rlnMicrographName"]), row["rlnMicrographPath"], float(pixel), ctf
                )
            )
    else:
        for p in expand_micrograph_paths(inputs):
            if not str(p).lower().endswith(MRC_SUFFIXES):
                raise InputError(p, "micrographs must be MRC files (or one STAR file)")
            stack_shape(p)  # validates the header against the file size
            pixel = angpix or _header_pixel(p)
            if pixel is None:
                raise InputError(p, "no pixel size in the MRC header; use --angpix")
            out.append(MicrographInput(Path(p).name, str(Path(p).absolute()), float(pixel)))
    stems = [m.stem for m in out]
    dup = {s for s in stems if stems.count(s) > 1}
    if dup:
        raise InputError(None, f"two micrographs share the name {sorted(dup)[0]!r}")
    return out


def _positive(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None


def _header_pixel(path) -> float | None:
    import warnings

    import mrcfile

    if not Path(path).is_file():
        raise InputError(path, "micrograph not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                return _positive(mrc.voxel_size.x)
    except (ValueError, OSError) as exc:
        raise InputError(path, f"not a readable MRC file ({exc})") from None


# -- templates ---------------------------------------------------------------------------


def resample_images(images: np.ndarray, from_pixel_A: float, to_pixel_A: float) -> np.ndarray:
    """Images ``(n, B, B)`` resampled (Fourier crop/pad) to about ``to_pixel_A``.

    The new box is the even size nearest ``B · from / to``; values are preserved.
    """
    from streamem.core.filters import fourier_crop, fourier_pad

    B = images.shape[-1]
    if abs(from_pixel_A - to_pixel_A) < 1e-3 * to_pixel_A:
        return images
    new = max(2, 2 * int(round(B * from_pixel_A / to_pixel_A / 2)))
    fn = fourier_crop if new < B else fourier_pad
    return np.asarray(fn(np.asarray(images, dtype=np.float32), new, ndim=2))


def load_templates(
    path: str | Path,
    pixel_size_A: float,
    angpix_ref: float | None = None,
    healpix_order: int = 1,
    symmetry: str = "C1",
) -> np.ndarray:
    """2-D templates at ``pixel_size_A`` from a stack (``.mrcs``) or a 3-D map (projections).

    A cube whose file ends in ``.mrc``/``.map`` is a map; ``.mrcs`` is always a stack.
    """
    from streamem.io.mrc import read_map

    path = Path(path)
    data, voxel = read_map(path)
    ref_pixel = angpix_ref or _positive(voxel)
    if ref_pixel is None:
        raise InputError(path, "no pixel size in the header; use --angpix-ref")
    is_map = data.ndim == 3 and len(set(data.shape)) == 1 and path.suffix != ".mrcs"
    if is_map:
        try:
            data, _ = projection_templates(data, healpix_order, symmetry)
        except ValueError as exc:
            raise InputError(path, str(exc)) from None
        data = np.asarray(data)
    elif data.ndim == 2:
        data = data[None]
    if data.shape[-1] != data.shape[-2]:
        raise InputError(path, f"templates must be square, got {data.shape[-2:]}")
    if not np.all(np.abs(data).reshape(len(data), -1).max(axis=1) > 0):
        raise InputError(path, "a template is all zeros")
    return resample_images(data, ref_pixel, pixel_size_A)


# -- the job -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PickResult:
    """What a picking job wrote: the output folder and per-micrograph counts."""

    out_dir: Path
    summary: pd.DataFrame

    @property
    def n_picks(self) -> int:
        return int(self.summary["rlnGroupNrParticles"].sum())


def coordinates_table(picks: Picks) -> pd.DataFrame:
    """RELION coordinate-file columns of :class:`Picks`."""
    return pd.DataFrame(
        {
            "rlnCoordinateX": picks.x.astype(np.float64),
            "rlnCoordinateY": picks.y.astype(np.float64),
            "rlnAutopickFigureOfMerit": picks.fom.astype(np.float64),
            "rlnClassNumber": picks.class_number.astype(np.int64),
            "rlnAnglePsi": picks.psi_deg.astype(np.float64),
        }
    )


def plot_picks(
    path: Path,
    image: np.ndarray,
    scale: float,
    picks: Picks,
    diameter_A: float,
    pixel_size_A: float,
    title: str,
) -> None:
    """PNG of a (downscaled) micrograph with circles at the picks (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    fig, ax = plt.subplots(figsize=(8, 8 * image.shape[0] / max(image.shape[1], 1)))
    lo, hi = np.percentile(image, [1, 99])
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi)
    r = 0.5 * diameter_A / pixel_size_A * scale
    for x, y in zip(picks.x * scale, picks.y * scale, strict=True):
        ax.add_patch(Circle((x, y), r, fill=False, color="lime", lw=1.0))
    ax.set_title(f"{title}: {len(picks)} picks")
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pick_one(
    mic: MicrographInput, bank, params, tmp: str, write_fom: bool, plot: bool, seed: int
) -> dict:
    """Task: pick one micrograph and write its files; returns its summary row."""
    from streamem.io.mrc import read_map, write_map
    from streamem.io.relion import write_star

    image, _ = read_map(mic.path)
    if image.ndim != 2:
        raise InputError(mic.path, f"a micrograph must be one 2-D image, got shape {image.shape}")
    # on a GPU worker the micrograph and the template bank go to the device here (the bank
    # once per worker); the kernels follow their arrays' namespace and return NumPy picks
    xp = device_namespace()
    if xp is not None:
        image = xp.asarray(image)
        bank = model_on_device(bank)
    if isinstance(params, LogPickParams):
        picks, fom, prepared = pick_log(image, mic.pixel_size_A, params, seed)
        scale_used, diameter = np.nan, 0.5 * (params.diameter_min_A + params.diameter_max_A)
    else:
        try:
            picks, res, prepared = pick_templates(
                image, mic.pixel_size_A, bank, params, mic.ctf, seed
            )
        except ValueError as exc:
            raise InputError(mic.path, str(exc)) from None
        fom, scale_used, diameter = res.fom, res.template_scale, params.particle_diameter_A
    out = Path(tmp)
    coords = f"{mic.stem}_autopick.star"
    write_star(out / coords, {"": coordinates_table(picks)})
    g = prepared.grid
    if write_fom:
        h, w = (int(round(n * g.scale)) for n in image.shape)
        write_map(out / f"{mic.stem}_fom.mrc", to_numpy(fom)[:h, :w], g.work_pixel_A)
    if plot:
        plot_picks(
            out / f"{mic.stem}_picks.png",
            downscaled_image(prepared),
            g.scale,
            picks,
            diameter,
            mic.pixel_size_A,
            mic.name,
        )
    return {
        "rlnMicrographName": mic.name,
        "rlnMicrographCoordinates": coords,
        "rlnGroupNrParticles": len(picks),
        "streamemTemplateScale": scale_used,
    }


def _share_cores(params: TemplatePickParams, client, workers, n_micrographs: int):
    """Split this machine's cores between the micrographs picked at once on local threads
    (each batched scan would otherwise run its FFTs on all cores); a cluster's workers
    (``client``) keep the default, all cores of their process."""
    import dataclasses
    import os

    from streamem.dist.tasks import default_workers

    if client is not None or params.fft_workers is not None:
        return params
    at_once = max(1, min(int(workers or default_workers()), n_micrographs))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return dataclasses.replace(params, fft_workers=max(1, (cores or 1) // at_once))


def pick_micrographs(
    micrographs: Sequence[MicrographInput],
    out_dir: str | Path,
    params: TemplatePickParams | LogPickParams,
    templates: np.ndarray | None = None,
    write_fom_maps: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    client=None,
    seed: int = 0,
    inputs: Sequence[str | Path | None] = (),
) -> PickResult:
    """Pick every micrograph (one Dask task each) and write the outputs (module docstring).

    ``templates`` (n, B, B) at the micrographs' pixel size are needed for template
    picking (``TemplatePickParams``), not for LoG. ``client``: a ``distributed.Client``
    whose cluster runs the tasks (the output folder must then be visible to its
    workers); default: dask's threaded scheduler with ``workers`` threads. ``inputs``: other paths the
    command read (STAR file, templates); the output may touch neither them nor the
    micrographs.
    """
    from streamem.dist.tasks import run_tasks
    from streamem.io.atomic import atomic_output, check_output
    from streamem.io.relion import write_star

    out_dir = Path(out_dir)
    inputs = [*inputs, *(m.path for m in micrographs)]
    check_output(out_dir, overwrite, inputs)
    if not micrographs:
        raise InputError(None, "no micrographs to pick")
    bank = None
    if isinstance(params, TemplatePickParams):
        if templates is None:
            raise InputError(None, "template picking needs templates (--templates or --reference)")
        pixels = {round(m.pixel_size_A, 4) for m in micrographs}
        if len(pixels) > 1:
            raise InputError(None, f"micrographs have different pixel sizes {sorted(pixels)}")
        bank = prepare_templates(np.asarray(templates, dtype=np.float32))
        params = _share_cores(params, client, workers, len(micrographs))
    with atomic_output(out_dir, overwrite, inputs, "pick") as tmp:
        tmp.mkdir(parents=True)
        shared = dask.delayed(bank, name=f"pick-templates-{dask.base.tokenize(templates)}")
        tasks = [
            dask.delayed(_pick_one, pure=True)(
                m, shared, params, str(tmp.absolute()), write_fom_maps, i == 0, seed + i
            )
            for i, m in enumerate(micrographs)
        ]
        rows = run_tasks(tasks, client, workers)
        summary = pd.DataFrame(rows)
        write_star(
            tmp / "autopick.star",
            {"coordinate_files": summary[["rlnMicrographName", "rlnMicrographCoordinates"]]},
        )
        table = summary
        if summary["streamemTemplateScale"].isna().all():
            table = summary.drop(columns=["streamemTemplateScale"])
        write_star(tmp / "autopick_summary.star", {"autopick_summary": table})
    log.info(
        "picked %d particles on %d micrographs -> %s",
        int(summary["rlnGroupNrParticles"].sum()),
        len(summary),
        out_dir,
    )
    return PickResult(out_dir, summary)
