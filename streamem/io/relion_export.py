"""A particle store out as RELION 3.1: a STAR file plus MRCS stacks.

:func:`export_store` writes a RELION 3.1 STAR file and MRCS stacks of
``images_per_stack`` consecutive particles each (default: the store's chunk size, so a
stack is written by one task from one chunk, with bounded memory). Stacks are float32
(mode 2) with the pixel size in the header and go to ``<star stem>_stacks/`` unless
``stacks_dir`` is given; ``rlnImageName`` points at them relative to the STAR file's
folder, and the name the particle had before (when the store knows it) is kept as
``rlnImageOriginalName`` unless that column already exists. Floats are written with
the shortest text that reads back to the same number, so a round trip
STAR -> store -> STAR keeps every value. Ground truth fields are not exported. The STAR file is streamed a block of rows at a
time (:func:`streamem.io.relion.write_star_streamed`), so the client's memory does not
grow with N.
"""

from __future__ import annotations

import os
from pathlib import Path

import dask
import mrcfile
import numpy as np
import pandas as pd

from streamem.dist.tasks import run_tasks
from streamem.errors import InputError
from streamem.io.atomic import atomic_output, check_output
from streamem.io.relion import STAR_ROWS_PER_BLOCK, write_star_streamed
from streamem.io.store import ParticleStore


def export_store(
    store_path: str | Path,
    star_path: str | Path,
    stacks_dir: str | Path | None = None,
    overwrite: bool = False,
    images_per_stack: int | None = None,
    workers: int | None = None,
    client=None,
) -> Path:
    """Write a store as a RELION 3.1 STAR file plus MRCS stacks; returns ``star_path``.

    Stacks go to ``stacks_dir`` (default ``<star stem>_stacks`` next to the STAR file),
    ``images_per_stack`` consecutive particles each (default: the store's chunk size).
    Stacks are written by a threaded Dask job, one stack per task, so memory stays at
    about ``workers`` stacks. Both outputs are written under temporary names and
    renamed when complete.
    """
    store = ParticleStore(store_path)
    star_path = Path(star_path)
    if stacks_dir is None:
        stacks_dir = star_path.with_name(f"{star_path.stem}_stacks")
    stacks_dir = Path(stacks_dir)
    inputs = [store.path]
    check_output(star_path, overwrite, inputs)
    check_output(stacks_dir, overwrite, inputs)
    if star_path.resolve().is_relative_to(stacks_dir.resolve()):
        raise InputError(star_path, f"the STAR file may not lie inside --stacks-dir {stacks_dir}")
    bounds, stack_names = stack_layout(store, images_per_stack)
    stacks_rel = relative_to(stacks_dir.absolute(), star_path.absolute().parent)
    per_stack = bounds[0][1] - bounds[0][0]
    n, rows = store.n_particles, STAR_ROWS_PER_BLOCK
    particles = (
        _particles_block(store, s, min(s + rows, n), stacks_rel, stack_names, per_stack)
        for s in range(0, n, rows)
    )
    optics = optics_table(store)

    with atomic_output(star_path, overwrite, inputs, "export") as tmp_star:
        with atomic_output(stacks_dir, overwrite, inputs, "export") as tmp_dir:
            write_stacks(store, tmp_dir, bounds, stack_names, workers, client)
        # the stacks are in place before the STAR file that names them
        write_star_streamed(tmp_star, {"optics": optics, "particles": particles})
    return star_path


def stack_layout(
    store: ParticleStore, images_per_stack: int | None = None
) -> tuple[list[tuple[int, int]], list[str]]:
    """Particle ranges ``[(start, stop), ...]`` and file names of the stacks of an export:
    ``images_per_stack`` consecutive particles each (default: the store's chunk size)."""
    n = store.n_particles
    per_stack = max(1, int(images_per_stack or store.chunk_size))
    bounds = [(s, min(s + per_stack, n)) for s in range(0, n, per_stack)]
    width = max(6, len(str(len(bounds))))
    return bounds, [f"particles_{k + 1:0{width}d}.mrcs" for k in range(len(bounds))]


def write_stacks(
    store: ParticleStore,
    folder: Path,
    bounds: list[tuple[int, int]],
    stack_names: list[str],
    workers: int | None = None,
    client=None,
) -> None:
    """Write one float32 MRCS stack per range into a new ``folder``, one Dask task each."""
    folder.mkdir(parents=True)
    tasks = [
        dask.delayed(_write_stack, pure=True)(
            str(store.path),
            start,
            stop,
            str(Path(folder, stack).absolute()),  # workers have their own folder
            store.pixel_size_A,
        )
        for (start, stop), stack in zip(bounds, stack_names, strict=True)
    ]
    # on a client's cluster, its workers must see the store and the output
    run_tasks(tasks, client, workers)


def relative_to(target: Path, base: Path) -> str:
    """``target`` relative to ``base`` as POSIX text (absolute across Windows drives)."""
    try:
        return Path(os.path.relpath(target, base)).as_posix()
    except ValueError:  # different drives on Windows
        return target.as_posix()


def particles_table(store: ParticleStore, start: int = 0, stop: int | None = None) -> pd.DataFrame:
    """Metadata fields of particles ``[start, stop)`` (all by default) as a table, in the
    column order of the source STAR file."""
    table = store.read_table("metadata", start, stop)
    first = [c for c in store.facts.get("provenance", {}).get("star_columns", []) if c in table]
    order = first + sorted(c for c in table if c not in first)
    return pd.DataFrame({c: table[c] for c in order})


def _particles_block(
    store: ParticleStore,
    start: int,
    stop: int,
    stacks_rel: str,
    stack_names: list[str],
    per_stack: int,
) -> pd.DataFrame:
    """Rows ``[start, stop)`` of the exported particles table: the metadata with
    ``rlnImageName`` pointing into the new stacks (particle i is image ``i % per_stack``
    of stack ``i // per_stack``) and the old name kept as ``rlnImageOriginalName``."""
    particles = particles_table(store, start, stop)
    names = np.array(
        [f"{i % per_stack + 1:06d}@{stacks_rel}/{stack_names[i // per_stack]}"
         for i in range(start, stop)],
        dtype=object,
    )  # fmt: skip
    if "rlnImageName" in particles.columns and "rlnImageOriginalName" not in particles.columns:
        pos = list(particles.columns).index("rlnImageName") + 1
        particles.insert(pos, "rlnImageOriginalName", particles["rlnImageName"])
    if "rlnImageName" in particles.columns:
        particles["rlnImageName"] = names
    else:
        particles.insert(0, "rlnImageName", names)
    return particles


def optics_table(store: ParticleStore) -> pd.DataFrame:
    rows = store.optics_groups or [{"rlnOpticsGroup": 1}]
    optics = pd.DataFrame(rows)
    optics["rlnOpticsGroup"] = optics["rlnOpticsGroup"].astype(np.int64)
    if "rlnImagePixelSize" not in optics.columns:
        optics["rlnImagePixelSize"] = store.pixel_size_A
    optics["rlnImageSize"] = store.box_size
    optics["rlnImageDimensionality"] = 2
    return optics


def _write_stack(store_path: str, start: int, stop: int, out: str, pixel_size_A: float) -> int:
    """Task: particles [start, stop) of a store -> one float32 MRCS stack. Returns bytes."""
    images = ParticleStore(store_path).read_chunk(start, stop).images
    with mrcfile.new(out, overwrite=False) as mrc:
        mrc.set_data(np.ascontiguousarray(images, dtype=np.float32))
        mrc.set_image_stack()
        mrc.voxel_size = pixel_size_A
        mrc.header.origin = (0.0, 0.0, 0.0)
        mrc.update_header_stats()
    return int(images.nbytes)
