"""What the driver publishes to the streamem dashboard page after each iteration.

:func:`iteration_payload` reduces one iteration of the run loop (the job's state dict,
its E-step model and statistics, the per-phase seconds) to a small dict that msgpack
carries to the scheduler's event log (:mod:`streamem.dist.dashboard`): only Python
numbers, strings, lists and dicts, a few tens of kB per iteration.

Decisions: the page must not make the scheduler compute (its event loop serves every
client and worker), so images are encoded HERE, once per iteration, as grayscale PNGs
(``matplotlib.image.imsave``, Agg, no pyplot) in base64, each at most
:data:`MAX_IMAGE_PX` pixels a side (block means of the central sections, so a big box
is averaged down, not aliased); curves travel as numbers and the page draws them as
inline SVG. The job's state is read by its documented keys (:class:`streamem.em.engine.Job`:
``resolution_A``, ``fsc``, ``halves``/``maps``/``class_images``, ``fractions``,
``changes``), and the model by duck typing (``grid``, ``work_box``, ``psi_deg``), so
``dist/`` keeps not importing ``em/``. The angular distribution is binned from the
iteration's poses in ``particles.zarr``, at most :data:`MAX_POSE_ROWS` of them (the
first ones: a display, not a statistic; the page says how many).
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

#: Largest side (pixels) of an image sent to the page.
MAX_IMAGE_PX = 128
#: Largest side of one class average of class2d (many classes: a gallery).
MAX_CLASS_PX = 64
#: Poses read for the angular distribution.
MAX_POSE_ROWS = 20_000
#: (tilt, rot) bins of the angular distribution: 10° each.
ANGDIST_BINS = (18, 36)


def png_base64(image: np.ndarray, cmap: str = "gray") -> str:
    """A 2-D array as a PNG (min..max to the colour map, [y, x] with y up as the other
    plots draw it), base64 text."""
    from matplotlib.image import imsave

    image = np.asarray(image, np.float64)
    finite = np.isfinite(image)
    low, high = (image[finite].min(), image[finite].max()) if finite.any() else (0.0, 1.0)
    image = np.where(finite, image, low)
    buffer = io.BytesIO()
    imsave(
        buffer,
        image,
        cmap=cmap,
        vmin=low,
        vmax=high if high > low else low + 1,
        format="png",
        origin="lower",
    )
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def downsample(image: np.ndarray, max_px: int = MAX_IMAGE_PX) -> np.ndarray:
    """``image`` (H, W) as block means of s x s pixels, s the least making both sides
    at most ``max_px`` (edges that do not fill a block are dropped)."""
    image = np.asarray(image, np.float32)
    s = max(1, math.ceil(max(image.shape) / max_px))
    if s == 1:
        return image
    h, w = image.shape[0] // s, image.shape[1] // s
    return image[: h * s, : w * s].reshape(h, s, w, s).mean(axis=(1, 3))


def central_sections(volume: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The z, y and x sections through the centre (index B // 2) of a [z, y, x] map."""
    c = volume.shape[0] // 2
    return [("z", volume[c]), ("y", volume[:, c]), ("x", volume[:, :, c])]


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _curve(values) -> list[float | None]:
    return [_number(v) for v in np.asarray(values, np.float64).ravel()]


def iteration_row(
    iteration: int,
    state: dict,
    model,
    stats,
    phase_seconds: dict,
    changed: float,
    seconds: float,
) -> dict:
    """One row of the page's table: resolution (Å), angular step (degrees; ``local`` for
    local searches), pose change (degrees) and offset change (pixels), the fraction of
    particles that changed class (classifications), class sizes (fractions), work box
    (pixels), seconds, and the per-phase seconds (summed over threads)."""
    grid = getattr(model, "grid", None)
    step = getattr(grid, "fine_angular_step_deg", None)
    psi = getattr(model, "psi_deg", None)
    if step is None and psi is not None and len(psi):
        step = 360.0 / len(psi)  # class2d: the in-plane step
    n = getattr(stats, "n_with_previous", 0.0)
    if not n:  # no previous poses (the first iteration): no change to show
        pose_change = offset_change = None
    elif "changes" in state:  # refine3d: its M-step's own averages
        pose_change, offset_change = state["changes"]
    else:
        p = getattr(model, "pixel_size_A", None)
        pose_change = getattr(stats, "pose_change_deg_sum", math.nan) / n
        offset_change = getattr(stats, "offset_change_A_sum", math.nan) / n / p if p else None
    fractions = state.get("fractions")
    return {
        "iteration": int(iteration),
        "resolution_A": _number(state.get("resolution_A")),
        "angular_step_deg": _number(step),
        "local": bool(getattr(grid, "local_sigma_deg", None)),
        "pose_change_deg": _number(pose_change),
        "offset_change_px": _number(offset_change),
        "classes_changed": _number(changed) if fractions is not None else None,
        "class_sizes": _curve(fractions) if fractions is not None else [1.0],
        "box": int(getattr(model, "work_box", 0) or getattr(model, "box_size", 0) or 0),
        "seconds": _number(seconds),
        "phase_seconds": {str(k): _number(v) for k, v in (phase_seconds or {}).items()},
    }


def _fsc(state: dict, box_size: int, pixel_size_A: float) -> dict | None:
    """Per-class FSC curves against spatial frequency (1/Å); None without an FSC."""
    fsc = state.get("fsc")
    if fsc is None:
        return None
    curves = np.atleast_2d(np.asarray(fsc, np.float64))
    shells = np.arange(curves.shape[1])
    label = "gold-standard" if curves.shape[0] == 1 else "class {}"
    return {
        "frequency_per_A": _curve(shells / (box_size * pixel_size_A)),
        "curves": {label.format(k + 1): _curve(c) for k, c in enumerate(curves)},
    }


def _section_images(name: str, volumes) -> list[dict]:
    """PNGs of the z, y and x central sections of the mean of ``volumes`` (each (B, B, B);
    the sections are averaged, no mean map is made)."""
    cuts = [central_sections(np.asarray(volume)) for volume in volumes]
    return [
        {"label": f"{name} {axis}",
         "png": png_base64(downsample(np.mean([c[j][1] for c in cuts], axis=0)))}
        for j, axis in enumerate("zyx")
    ]  # fmt: skip


def _images(state: dict) -> list[dict]:
    """Labelled PNGs: three central sections per 3-D map (refine3d: of the mean of the
    halves; class3d: of each class) or the class averages (class2d)."""
    if state.get("halves") is not None:
        return _section_images("map", state["halves"])
    if state.get("maps") is not None:
        return [image for k, volume in enumerate(state["maps"])
                for image in _section_images(f"class {k + 1}", [volume])]  # fmt: skip
    if state.get("class_images") is None:
        return []
    fractions = state.get("fractions")
    return [
        {"label": f"class {k + 1}" + (f" {100 * float(fractions[k]):.1f}%"
                                      if fractions is not None else ""),
         "png": png_base64(downsample(image, MAX_CLASS_PX))}
        for k, image in enumerate(state["class_images"])
    ]  # fmt: skip


def _angular_distribution(results_path: Path, iteration: int, n_particles: int) -> dict | None:
    """Counts of (tilt, rot) in 10° bins of the iteration's first poses (rot wrapped to
    [-180, 180)), as a PNG; None when the results have no 3-D poses (class2d)."""
    from streamem.io.results import read_results

    n = min(n_particles, MAX_POSE_ROWS)
    try:
        poses = read_results(str(results_path), iteration, 0, n)
    except (KeyError, FileNotFoundError):
        return None
    if "rlnAngleRot" not in poses or "rlnAngleTilt" not in poses:
        return None
    tilt = np.asarray(poses["rlnAngleTilt"], np.float64)
    rot = np.mod(np.asarray(poses["rlnAngleRot"], np.float64) + 180.0, 360.0) - 180.0
    ok = np.isfinite(tilt) & np.isfinite(rot)  # particles without a pose are left out
    counts, _, _ = np.histogram2d(
        np.clip(tilt[ok], 0.0, 180.0),
        rot[ok],
        bins=ANGDIST_BINS,
        range=((0, 180), (-180, 180)),
    )
    # rows: tilt 0..180 top to bottom, as RELION's plots and streamem.display draw it
    image = np.kron(counts[::-1], np.ones((4, 4)))
    return {
        "png": png_base64(image, cmap="viridis"),
        "n_poses": int(counts.sum()),
        "n_particles": int(n_particles),
        "max_count": int(counts.max()),
    }


def iteration_payload(
    job_kind: str,
    *,
    ctx,
    iteration: int,
    state: dict,
    model,
    stats,
    phase_seconds: dict,
    changed: float,
    seconds: float,
) -> dict:
    """The page's view of one finished iteration (module docstring).

    ctx: the run's :class:`streamem.em.engine.RunContext` (out_dir, results_path,
    box_size, pixel_size_A, store); the rest as :func:`iteration_row` takes them.
    Keys: run (the run folder), job, iteration, pixel_size_A, box_size, n_particles,
    row, fsc (or None), images (label, png), angdist (or None).
    """
    n_particles = int(ctx.store.n_particles)
    return {
        "run": str(Path(ctx.out_dir).absolute()),
        "job": job_kind,
        "iteration": int(iteration),
        "pixel_size_A": float(ctx.pixel_size_A),
        "box_size": int(ctx.box_size),
        "n_particles": n_particles,
        "row": iteration_row(iteration, state, model, stats, phase_seconds, changed, seconds),
        "fsc": _fsc(state, ctx.box_size, ctx.pixel_size_A),
        "images": _images(state),
        "angdist": _angular_distribution(ctx.results_path, iteration, n_particles),
    }
