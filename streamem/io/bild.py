"""RELION's angular-distribution ``.bild`` file (ChimeraX/Chimera BILD), written and read.

RELION writes ``run_classNNN_angdist.bild`` (``MlModel::write`` calls
``HealpixSampling::writeBildFileOrientationalDistribution(pdf, fn, R, offset)`` with
``R = offset = ori_size · pixel_size / 2``, Rmax_frac 0.3, width_frac 0.5; checked
against RELION's ``src/healpix_sampling.cpp``) as one cylinder per viewing direction
that holds particles, pointing outward; we write the same:

- per HEALPix direction with ``count > 0``: ``.color c 0 1-c`` and
  ``.cylinder x1 y1 z1 x2 y2 z2 width`` (no other lines);
- c = clip((count − mean) / std, −1, 5) / 6 + 1/6 with the mean and standard
  deviation over *all* directions, empty ones included (RELION's ``computeStats`` of
  the whole pdf; 1/6 where the std is 0);
- the cylinder runs along v = (cos rot · sin tilt, sin rot · sin tilt, cos tilt) from
  R·v to (R + 0.3·R·count/max count)·v, plus the map's centre (R on each axis), with
  R half the box in Å: coordinates are in Å in the map's frame, as ChimeraX places a
  map whose origin is 0;
- width = 0.5 · π · R · step / 360 Å, step the HEALPix pixel size in degrees (60/2**order).

:func:`read_bild` parses such a file back into (colours, starts, ends, widths) arrays.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from streamem.em.angdist import pixel_directions, unit_directions

LENGTH_FRACTION = 0.3  # RELION's Rmax_frac: the longest cylinder is 0.3 R
WIDTH_FRACTION = 0.5  # RELION's width_frac


def angdist_bild(counts: np.ndarray, box_size: int, pixel_size_A: float) -> str:
    """The text of RELION's angdist ``.bild`` for ``counts`` ((12 * 4**order,)
    particles per nested HEALPix pixel, :func:`streamem.em.angdist.direction_counts`).

    The run folder's writer (:func:`streamem.em.runfiles.write_run_text`) puts it on disk atomically.
    """
    counts = np.asarray(counts, np.float64)
    order = int(round(math.log(counts.size / 12, 4)))
    rot, tilt = pixel_directions(order)
    v = unit_directions(rot, tilt)  # (P, 3)
    radius_A = centre_A = box_size * pixel_size_A / 2.0
    lines = []
    used = counts > 0
    if used.any():
        mean, std, top = counts.mean(), counts.std(), counts.max()
        width = WIDTH_FRACTION * math.pi * radius_A * (60.0 / 2**order) / 360.0
        for p in np.flatnonzero(used):
            z = (counts[p] - mean) / std if std > 0 else 0.0
            c = min(max(z, -1.0), 5.0) / 6.0 + 1.0 / 6.0
            start = radius_A * v[p] + centre_A
            end = (radius_A + LENGTH_FRACTION * radius_A * counts[p] / top) * v[p] + centre_A
            lines.append(f".color {c:.4f} 0 {1 - c:.4f}")
            lines.append(
                ".cylinder " + " ".join(f"{x:.3f}" for x in (*start, *end)) + f" {width:.3f}"
            )
    return "".join(line + "\n" for line in lines)


def read_bild(path: str | Path) -> dict[str, np.ndarray]:
    """The cylinders of a ``.bild`` file: ``colors`` (M, 3) (the colour in force at each
    cylinder), ``starts`` and ``ends`` (M, 3) Å, ``widths`` (M,) Å."""
    color = (1.0, 1.0, 1.0)
    colors, starts, ends, widths = [], [], [], []
    for line in Path(path).read_text().splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == ".color":
            color = tuple(float(w) for w in words[1:4])
        elif words[0] == ".cylinder":
            x = [float(w) for w in words[1:8]]
            colors.append(color)
            starts.append(x[0:3])
            ends.append(x[3:6])
            widths.append(x[6])
    return {
        "colors": np.array(colors, np.float64).reshape(-1, 3),
        "starts": np.array(starts, np.float64).reshape(-1, 3),
        "ends": np.array(ends, np.float64).reshape(-1, 3),
        "widths": np.array(widths, np.float64),
    }
