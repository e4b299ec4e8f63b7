"""A ChimeraX command script (``.cxc``) that opens a run's maps, mask and angdist.

``chimerax run_chimerax.cxc`` (or ``open run_chimerax.cxc`` inside ChimeraX) opens, in
this order, each map as its own model (#1, #2, ...), at the level given (a surface for
the main maps, a mesh for the others, which start hidden), then the ``.bild`` files.
Paths are relative to the run folder (so the folder can move): ChimeraX resolves
them from its current folder, so the script is opened from the run folder, as its
first comment line says.

:func:`map_level` picks "a sensible threshold": the value above which lie as many voxels
as a protein of the particle's diameter would fill (a sphere of that diameter at
``PROTEIN_FRACTION`` of its volume), so the surface shows the molecule and not noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: share of the particle's sphere that a map's surface encloses (proteins fill ~1/3 to
#: 1/2 of their bounding sphere; the low end keeps the surface off the noise)
PROTEIN_FRACTION = 0.3


@dataclass(frozen=True)
class ShownMap:
    """One map of the script: ``name`` (path relative to the script's folder), ``level``
    (the map's units), ``style`` ("surface" or "mesh"), ``shown`` at start."""

    name: str
    level: float
    style: str = "surface"
    shown: bool = True


def map_level(volume: np.ndarray, diameter_A: float, pixel_size_A: float) -> float:
    """The threshold enclosing ``PROTEIN_FRACTION`` of a sphere of ``diameter_A``.

    volume: (B, B, B) map. The number of voxels kept is that sphere's share of the box
    (at least one voxel); the level is the map's value at that rank (its top quantile).
    """
    v = np.asarray(volume, np.float64).ravel()
    sphere_voxels = math.pi / 6 * (diameter_A / pixel_size_A) ** 3
    keep = int(np.clip(round(PROTEIN_FRACTION * sphere_voxels), 1, v.size))
    return float(np.partition(v, v.size - keep)[v.size - keep])


def chimerax_script(maps: Sequence[ShownMap], bild_names: Sequence[str] = ()) -> str:
    """The ``.cxc`` text: open each map with its level and style (hidden ones hidden),
    then each ``.bild`` (paths relative to the run folder, from where it is opened)."""
    lines = [
        "# ChimeraX script written by streamem: open it from the run folder",
        "# (cd RUN_FOLDER; chimerax run_chimerax.cxc), the paths are relative to it",
    ]
    for model, m in enumerate(maps, start=1):
        if m.style not in ("surface", "mesh"):
            raise ValueError(f"style {m.style!r}: surface or mesh")
        lines.append(f"open {_quoted(m.name)}")
        lines.append(f"volume #{model} level {m.level:.6g} style {m.style}")
        if not m.shown:
            lines.append(f"hide #{model} models")
    for name in bild_names:
        lines.append(f"open {_quoted(name)}")
    lines.append("view")
    return "\n".join(lines) + "\n"


def _quoted(name: str) -> str:
    return f'"{name}"' if any(c.isspace() for c in name) else name
