"""Per-iteration results of a run folder: ``particles.zarr`` and RELION's data.star.

``particles.zarr/itNNN/<label>`` holds each particle's pose, origin, class and scores of
iteration NNN (:data:`RESULT_FIELDS`), written region by region by the E-step tasks
(one chunk each, so no two tasks write the same Zarr chunk) and read back by the next
iteration's tasks, the outputs and ``streamem select``. ``run_itNNN_data.star`` is the
store's particle table with those results, in RELION 3.1's form (optics + particles),
streamed a block of rows at a time from the store and the results Zarr
(:func:`write_data_star`), so the client's memory does not grow with N; its
``rlnImageName`` names images RELION opens from the run folder
(:mod:`streamem.io.run_images`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from streamem.io.relion import STAR_ROWS_PER_BLOCK, write_star_streamed
from streamem.io.run_images import RunImageNames
from streamem.io.store import ParticleStore

#: label -> dtype of the per-particle results (floats start as NaN, classes as 0).
RESULT_FIELDS = {
    "rlnAngleRot": np.float64,
    "rlnAngleTilt": np.float64,
    "rlnAnglePsi": np.float64,
    "rlnOriginXAngst": np.float64,
    "rlnOriginYAngst": np.float64,
    "rlnMaxValueProbDistribution": np.float64,
    "rlnNrOfSignificantSamples": np.float64,
    "rlnLogLikeliContribution": np.float64,
    "rlnClassNumber": np.int32,
}


def create_results_arrays(results_path: Path, iteration: int, n: int, chunk: int) -> int:
    """Create (or keep) iteration ``iteration``'s arrays: (n,) each, Zarr chunks of ``chunk``.

    Returns the arrays' chunk length: ``chunk``, or that of arrays kept from an earlier
    attempt at the iteration. Concurrent writers must each write whole chunks of it (a
    partial chunk is read, modified and rewritten), so callers cut their tasks by it.
    """
    root = zarr.open_group(str(results_path), mode="a")
    grp = root.require_group(f"it{iteration:03d}")
    chunk = next((grp[label].chunks[0] for label in RESULT_FIELDS if label in grp), chunk)
    for label, dtype in RESULT_FIELDS.items():
        if label not in grp:
            grp.create_array(
                label,
                shape=(n,),
                chunks=(chunk,),
                dtype=dtype,
                fill_value=np.nan if np.dtype(dtype).kind == "f" else 0,
            )
    return int(chunk)


def write_results(results_path: str, iteration: int, start: int, columns: dict) -> None:
    """Write one chunk's per-particle results (called inside the E-step task)."""
    grp = zarr.open_group(str(results_path), mode="r+")[f"it{iteration:03d}"]
    for label, values in columns.items():
        grp[label][start : start + len(values)] = np.asarray(values).astype(grp[label].dtype)


def read_results(
    results_path: str, iteration: int, start: int | None = None, stop: int | None = None
) -> dict:
    """label -> (stop - start,) array of iteration ``iteration``'s results (all by default)."""
    grp = zarr.open_group(str(results_path), mode="r")[f"it{iteration:03d}"]
    arrays = dict(grp.arrays())
    # RESULT_FIELDS' order (a store lists its arrays in no fixed order): stable STAR columns
    order = [label for label in RESULT_FIELDS if label in arrays] + sorted(
        set(arrays) - set(RESULT_FIELDS)
    )
    sl = slice(start, stop)
    return {label: np.asarray(arrays[label][sl]) for label in order}


@dataclass(frozen=True)
class StoredResults:
    """Iteration ``iteration``'s results in ``results_path``, read a range at a time."""

    results_path: str | Path
    iteration: int

    def read(self, start: int, stop: int) -> dict:
        return read_results(str(self.results_path), self.iteration, start, stop)


def write_data_star(
    path: Path,
    store: ParticleStore,
    results: Mapping[str, np.ndarray] | StoredResults,
    rows_per_block: int = STAR_ROWS_PER_BLOCK,
) -> None:
    """Particles with this iteration's poses, RELION 3.1 (optics + particles).

    Streamed: the store's metadata and the results (a ``{label: (N,) array}`` mapping, or
    :class:`StoredResults` read from the results Zarr) are read ``rows_per_block``
    particles at a time and written as they come, so the client's memory does not grow
    with N. Columns: the store's fields, then the results' labels not among them (a
    result replaces a store field of the same label in place), then ``rlnImageName`` if
    the store has none; image names are relative to ``path``'s folder
    (:class:`streamem.io.run_images.RunImageNames`).
    """
    n = store.n_particles
    images = RunImageNames(store, Path(path).absolute().parent)
    blocks = (
        _data_block(store, results, start, min(start + rows_per_block, n), images)
        for start in range(0, n, rows_per_block)
    )
    optics = pd.DataFrame(store.optics_groups)
    write_star_streamed(path, {"optics": optics, "particles": blocks})


def _data_block(
    store: ParticleStore, results, start: int, stop: int, images: RunImageNames
) -> pd.DataFrame:
    table = store.read_table("metadata", start, stop)
    if isinstance(results, StoredResults):
        table.update(results.read(start, stop))
    else:
        table.update({label: np.asarray(col)[start:stop] for label, col in results.items()})
    # images RELION opens from the run folder (io.run_images: the rule)
    table["rlnImageName"] = images.names(start, stop, table.get("rlnImageName"))
    return pd.DataFrame(table, index=pd.RangeIndex(start, stop))
