"""The CTF job: one Dask task per micrograph, a RELION micrographs STAR with CTF out.

Inputs are a RELION micrographs STAR file (optics from its ``data_optics``; pixel size
``rlnMicrographPixelSize``, else ``--angpix``, else the MRC header) or MRC files
(``--angpix``, else the header's voxel size, else an FEI/EPU extended header's pixel
size; voltage, Cs and Q0 from the options). Per micrograph:
:func:`streamem.ctf.spectrum.amplitude_spectrum`, then
:func:`streamem.ctf.fit.fit_ctf` (pure functions over arrays).

Outputs in ``out_dir`` (written under a temporary name, renamed when complete):

- ``micrographs_ctf.star``: ``data_optics`` (the input's, or one group built from the
  options) and ``data_micrographs`` with the input's columns and ``rlnDefocusU``,
  ``rlnDefocusV`` (Å, U >= V), ``rlnCtfAstigmatism``, ``rlnDefocusAngle`` (degrees,
  [0, 180)), ``rlnCtfFigureOfMerit``, ``rlnCtfMaxResolution`` (Å), ``rlnPhaseShift``
  (degrees, with ``--phase-shift``). ``pick`` and ``extract`` read it as it is.
  ``rlnMicrographName`` is kept when it still finds the file from the output folder
  or the current folder (RELION's project-relative names), else made absolute.
- ``<stem>_ctf.png`` per micrograph (unless ``plots=False``) and ``ctf_summary.png``.

Bad micrographs do not stop the run. A micrograph with no spectrum to fit (unreadable,
NaN/Inf pixels, all pixels equal, smaller than one tile, a band too narrow for its pixel
size) is left out of the STAR file with one warning line naming the file and the reason
(RELION's CtfFind job leaves out the micrographs CTFFIND fails on). A micrograph that
can be fitted but shows no Thon rings (blank: noise only) stays in, flagged:
``rlnCtfMaxResolution`` = :data:`streamem.ctf.fit.FAILED_RESOLUTION_A` (999 Å) and a
figure of merit near 0, so a selection on either drops it. If no micrograph can be
fitted at all, the job fails with the first reason (InputError, nothing written).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import pandas as pd

from streamem.core.ctf import OpticsParams
from streamem.ctf.fit import FAILED_RESOLUTION_A, CtfSearch, FitError, ctf2_half_plane, fit_ctf
from streamem.ctf.spectrum import SpectrumError, amplitude_spectrum
from streamem.errors import InputError

log = logging.getLogger("streamem")

MRC_SUFFIXES = (".mrc", ".mrcs", ".map")
#: Columns the job writes (replacing any the input had).
CTF_LABELS = (
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnCtfAstigmatism",
    "rlnDefocusAngle",
    "rlnCtfFigureOfMerit",
    "rlnCtfMaxResolution",
    "rlnPhaseShift",
)


@dataclass(frozen=True)
class CtfMicrograph:
    """One micrograph to fit: its name (as given), absolute path, pixel size, optics."""

    name: str
    path: str
    pixel_size_A: float
    optics_group: int
    optics: OpticsParams

    @property
    def stem(self) -> str:
        return Path(self.name).stem


@dataclass(frozen=True)
class CtfInputs:
    """The micrographs, the optics table to write, and the input's other columns."""

    micrographs: list[CtfMicrograph]
    optics: pd.DataFrame
    columns: pd.DataFrame  # one row per micrograph: input columns to carry (may be empty)
    star: Path | None


def _positive(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None


def ctf_inputs(
    inputs: Sequence[str], angpix: float | None, default_optics: OpticsParams
) -> CtfInputs:
    """Micrographs from one STAR file or from MRC files/patterns (module docstring)."""
    from streamem.io.micrograph_read import expand_micrograph_paths, micrograph_pixel_size_A

    if not inputs:
        raise InputError(None, "no micrographs given")
    if len(inputs) == 1 and str(inputs[0]).endswith(".star"):
        return _star_inputs(Path(inputs[0]), angpix, default_optics)
    mics = []
    for p in expand_micrograph_paths(inputs):
        if not str(p).lower().endswith(MRC_SUFFIXES):
            raise InputError(p, "micrographs must be MRC files (or one STAR file)")
        pixel = angpix or micrograph_pixel_size_A(p)
        if pixel is None:
            raise InputError(p, "no pixel size in the MRC header; use --angpix")
        mics.append(CtfMicrograph(str(p), str(Path(p).absolute()), float(pixel), 1, default_optics))
    pixels = sorted({round(m.pixel_size_A, 6) for m in mics})
    # one optics group per pixel size (RELION needs one pixel size per group)
    group = {p: i + 1 for i, p in enumerate(pixels)}
    mics = [
        CtfMicrograph(m.name, m.path, m.pixel_size_A, group[round(m.pixel_size_A, 6)], m.optics)
        for m in mics
    ]
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in group.values()],
            "rlnOpticsGroup": list(group.values()),
            "rlnMicrographOriginalPixelSize": pixels,
            "rlnVoltage": default_optics.voltage_kV,
            "rlnSphericalAberration": default_optics.cs_mm,
            "rlnAmplitudeContrast": default_optics.amplitude_contrast,
            "rlnMicrographPixelSize": pixels,
        }
    )
    return CtfInputs(mics, optics, pd.DataFrame(index=range(len(mics))), None)


def _star_inputs(star: Path, angpix: float | None, default_optics: OpticsParams) -> CtfInputs:
    from streamem.io.micrograph_read import micrograph_pixel_size_A
    from streamem.io.relion import read_micrographs_star

    table, optics = read_micrographs_star(star)
    optics = optics.copy()
    defaults = {
        "rlnVoltage": default_optics.voltage_kV,
        "rlnSphericalAberration": default_optics.cs_mm,
        "rlnAmplitudeContrast": default_optics.amplitude_contrast,
    }
    for label, value in defaults.items():
        if label not in optics.columns:
            optics[label] = value
    if "rlnOpticsGroupName" not in optics.columns:
        optics.insert(
            0, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in optics["rlnOpticsGroup"]]
        )
    by_group = {int(r["rlnOpticsGroup"]): r for r in optics.to_dict(orient="records")}
    mics, group_pixel = [], {}
    for row in table.to_dict(orient="records"):
        g = int(row["rlnOpticsGroup"])
        if g not in by_group:
            raise InputError(star, f"micrograph {row['rlnMicrographName']} has no optics group {g}")
        group = by_group[g]
        pixel = angpix or _positive(group.get("rlnMicrographPixelSize"))
        if pixel is None:
            pixel = micrograph_pixel_size_A(row["rlnMicrographPath"])
        if pixel is None:
            raise InputError(star, "no pixel size (rlnMicrographPixelSize); use --angpix")
        group_pixel.setdefault(g, pixel)
        try:
            optics_g = OpticsParams(
                float(group["rlnVoltage"]),
                float(group["rlnSphericalAberration"]),
                float(group["rlnAmplitudeContrast"]),
            )
        except (TypeError, ValueError) as exc:
            raise InputError(star, f"optics group {g}: {exc}") from None
        mics.append(
            CtfMicrograph(
                str(row["rlnMicrographName"]), str(row["rlnMicrographPath"]), float(pixel), g,
                optics_g,
            )
        )  # fmt: skip
    optics["rlnMicrographPixelSize"] = [
        group_pixel.get(int(g), np.nan) for g in optics["rlnOpticsGroup"]
    ]
    keep = [c for c in table.columns if c not in (*CTF_LABELS, "rlnMicrographPath")]
    return CtfInputs(mics, optics, table[keep].reset_index(drop=True), star)


# -- the task ----------------------------------------------------------------------------


def _fit_one(
    mic: CtfMicrograph, tile_px: int, search: CtfSearch, tmp: str | None, plot: bool
) -> dict:
    """Task: the CTF of one micrograph; returns its row, or ``{"error": reason}``."""
    from streamem.ctf.plots import display_spectrum, plot_micrograph_fit
    from streamem.io.micrograph_read import read_micrograph

    start = time.perf_counter()
    try:
        image, _ = read_micrograph(mic.path, warn=False)
        spectrum = amplitude_spectrum(image, tile_px)
        fit, diag = fit_ctf(spectrum, mic.pixel_size_A, mic.optics, search)
    except InputError as exc:
        return {"error": exc.problem}
    except (SpectrumError, FitError) as exc:
        return {"error": str(exc)}
    seconds = time.perf_counter() - start
    if plot and tmp is not None:
        display = display_spectrum(
            spectrum, ctf2_half_plane(tile_px, mic.pixel_size_A, mic.optics, fit)
        )
        plot_micrograph_fit(
            Path(tmp) / f"{mic.stem}_ctf.png", mic.name, fit, diag, display, mic.pixel_size_A
        )
    return {
        "rlnDefocusU": fit.defocus_u_A,
        "rlnDefocusV": fit.defocus_v_A,
        "rlnCtfAstigmatism": fit.astigmatism_A,
        "rlnDefocusAngle": fit.defocus_angle_deg,
        "rlnCtfFigureOfMerit": fit.figure_of_merit,
        "rlnCtfMaxResolution": fit.max_resolution_A,
        "rlnPhaseShift": fit.phase_shift_deg,
        "seconds": seconds,
    }


# -- the job -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CtfResult:
    """What the CTF job wrote: the STAR file, its table, and the left-out micrographs."""

    out_dir: Path
    star: Path
    micrographs: pd.DataFrame  # the data_micrographs table written
    rejected: dict[str, str]  # micrograph name -> reason it was left out
    seconds_per_micrograph: float  # mean fit time of the fitted ones (one task, one core)

    @property
    def n_flagged(self) -> int:
        return int((self.micrographs["rlnCtfMaxResolution"] >= FAILED_RESOLUTION_A).sum())


def _star_name(mic: CtfMicrograph, out_dir: Path) -> str:
    """The name to write: kept if it finds the file from ``out_dir`` or the cwd."""
    name = mic.name
    target = Path(mic.path)
    if Path(name).is_absolute():
        return name
    for base in (out_dir.absolute(), Path.cwd()):
        cand = base / name
        if cand.exists() and os.path.samefile(cand, target):
            return name
    return str(target.absolute())


def estimate_ctf(
    inputs: CtfInputs,
    out_dir: str | Path,
    tile_px: int = 512,
    search: CtfSearch | None = None,
    plots: bool = True,
    overwrite: bool = False,
    workers: int | None = None,
    client=None,
) -> CtfResult:
    """Fit every micrograph's CTF (one Dask task each) and write the outputs (module doc).

    ``client``: a ``distributed.Client`` whose workers see the micrographs and
    ``out_dir``'s folder; default: dask's threaded scheduler with ``workers`` threads.
    """
    from streamem.ctf.plots import plot_summary
    from streamem.dist.tasks import run_tasks
    from streamem.io.atomic import atomic_output, check_output
    from streamem.io.relion import write_star

    search = search or CtfSearch()
    out_dir = Path(out_dir)
    mics = inputs.micrographs
    read = [*(m.path for m in mics), *([inputs.star] if inputs.star else [])]
    check_output(out_dir, overwrite, read)
    if not mics:
        raise InputError(None, "no micrographs to fit")
    stems = [m.stem for m in mics]
    dup = {s for s in stems if stems.count(s) > 1}
    if dup:
        raise InputError(None, f"two micrographs share the name {sorted(dup)[0]!r}")
    with atomic_output(out_dir, overwrite, read, "ctf") as tmp:
        tmp.mkdir(parents=True)
        folder = str(tmp.absolute())
        tasks = [dask.delayed(_fit_one, pure=True)(m, tile_px, search, folder, plots) for m in mics]
        results = run_tasks(tasks, client, workers)
        rejected = {m.name: r["error"] for m, r in zip(mics, results, strict=True) if "error" in r}
        for m, r in zip(mics, results, strict=True):
            if "error" in r:
                log.warning("%s: %s; left out of micrographs_ctf.star", m.path, r["error"])
        kept = [i for i, r in enumerate(results) if "error" not in r]
        if not kept:
            first = mics[0]
            raise InputError(first.path, f"{results[0]['error']} (no micrograph could be fitted)")
        table = inputs.columns.iloc[kept].reset_index(drop=True).copy()
        table["rlnMicrographName"] = [_star_name(mics[i], out_dir) for i in kept]
        table["rlnOpticsGroup"] = [mics[i].optics_group for i in kept]
        labels = CTF_LABELS if search.phase_shift else CTF_LABELS[:-1]
        for label in labels:
            table[label] = [float(results[i][label]) for i in kept]
        for i in kept:
            if results[i]["rlnCtfMaxResolution"] >= FAILED_RESOLUTION_A:
                log.warning(
                    "%s: no Thon rings match the fit (FOM %.3f); flagged with "
                    "rlnCtfMaxResolution %g",
                    mics[i].path,
                    results[i]["rlnCtfFigureOfMerit"],
                    FAILED_RESOLUTION_A,
                )
        star = tmp / "micrographs_ctf.star"
        write_star(star, {"optics": inputs.optics, "micrographs": table})
        if plots:
            plot_summary(
                tmp / "ctf_summary.png",
                table["rlnDefocusU"],
                table["rlnDefocusV"],
                table["rlnCtfMaxResolution"],
                FAILED_RESOLUTION_A,
            )
    seconds = float(np.mean([results[i]["seconds"] for i in kept]))
    log.info(
        "CTF of %d micrographs (%d left out, %d flagged), %.2f s per micrograph -> %s",
        len(kept),
        len(rejected),
        sum(results[i]["rlnCtfMaxResolution"] >= FAILED_RESOLUTION_A for i in kept),
        seconds,
        out_dir,
    )
    return CtfResult(out_dir, out_dir / "micrographs_ctf.star", table, rejected, seconds)
