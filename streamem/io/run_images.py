"""The ``rlnImageName`` of a run's STAR files: images RELION can open from the run folder.

``run_data.star`` and ``run_itNNN_data.star`` lie in the run folder, so their image
paths are written relative to it (RELION looks a relative stack up next to the STAR
file first, then in its project folder; a run folder moved with its stacks keeps
working):

- **An imported store** (its metadata has ``rlnImageName``): the original stacks,
  resolved as the importer resolved them (next to the source STAR or ``.cs`` file named
  in the store's provenance, then the current folder), then made relative to the run
  folder.
- **A store without stacks** (simulated, or extracted into the store): with
  ``--write-stacks`` the job first writes MRCS stacks into ``RUN/Particles/``
  (:func:`write_run_stacks`, ``streamem export``'s layout: one stack per store chunk)
  and names them; without it, the store itself, ``NNNNNN@../p.zarr`` (relative), which
  RELION cannot read: ``streamem export`` makes MRCS stacks of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from streamem.io.atomic import atomic_output, written_by_streamem
from streamem.io.relion import parse_image_names
from streamem.io.relion_export import relative_to, stack_layout, write_stacks
from streamem.io.store import ParticleStore

#: the run folder's stacks of a store without its own (``--write-stacks``)
RUN_STACKS = "Particles"


def write_run_stacks(store: ParticleStore, run_dir: Path, client=None) -> Path:
    """Write the store's images as MRCS stacks into ``run_dir/Particles`` (a Dask job,
    one stack per store chunk; on ``client``'s cluster when given). Returns the folder."""
    folder = Path(run_dir) / RUN_STACKS
    bounds, names = stack_layout(store)
    with atomic_output(folder, overwrite=True, inputs=[store.path], command="export") as tmp:
        write_stacks(store, tmp, bounds, names, client=client)
    return folder


class RunImageNames:
    """``rlnImageName`` of particles ``[start, stop)`` for a STAR file in ``run_dir``.

    Built once per STAR file (it decides the case of the module docstring), then asked
    block by block (:meth:`names`), so a streamed writer never holds all N names.
    """

    def __init__(self, store: ParticleStore, run_dir: Path):
        self.store = store
        self.run_dir = Path(run_dir).absolute()
        provenance = store.facts.get("provenance", {})
        source = store.path.absolute().parent / provenance.get("source", "")
        # where relative stack names are looked up first (the importer's rule)
        self.source = source if provenance.get("command") == "import" and source.is_file() else None
        stacks = self.run_dir / RUN_STACKS
        self.run_stacks = stacks.is_dir() and written_by_streamem(stacks)
        self._relative: dict[str, str] = {}

    def names(self, start: int, stop: int, stored: np.ndarray | None) -> np.ndarray:
        """(stop - start,) object array of ``NNNNNN@path``; stored: the store's own
        ``rlnImageName`` of those particles, or None (a store without stacks)."""
        if stored is not None:
            indices, stacks = parse_image_names(stored, self.source or self.store.path.absolute())
            for s in pd.unique(stacks):
                if s not in self._relative:
                    self._relative[s] = relative_to(Path(s), self.run_dir)
            return np.array(
                [f"{i + 1:06d}@{self._relative[s]}" for i, s in zip(indices, stacks, strict=True)],
                dtype=object,
            )
        if self.run_stacks:
            bounds, stack_names = stack_layout(self.store)
            per = bounds[0][1] - bounds[0][0]
            return np.array(
                [
                    f"{i % per + 1:06d}@{RUN_STACKS}/{stack_names[i // per]}"
                    for i in range(start, stop)
                ],
                dtype=object,
            )
        where = relative_to(self.store.path.absolute(), self.run_dir)
        return np.array([f"{i + 1:06d}@{where}" for i in range(start, stop)], dtype=object)
