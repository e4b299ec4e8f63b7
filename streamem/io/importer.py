"""Import a RELION particle set (STAR + MRCS stacks), or a cryoSPARC one (``.cs`` or
``.csg`` + stacks, :mod:`streamem.io.cryosparc`), into a particle store.

Everything that can be checked is checked before anything is written: the STAR
file (:mod:`streamem.io.relion`), every stack's MRC header against its file size
(a truncated stack is caught here, not halfway through), image indices against
stack lengths, square images of one box size that matches the optics'
``rlnImageSize``, and one pixel size. Then the store is created under a
temporary name and images are streamed in by a threaded Dask job with one task
per store chunk, or per shard in a sharded store (``shard_size``; the default above
100,000 particles, :mod:`streamem.io.store`): the task memory-maps the stacks it needs, gathers its images,
rejects NaN/Inf, and writes its region. The output may be a store URL
(``s3://bucket/p.zarr``, :mod:`streamem.io.store_url`): written in place, marked last. Memory is about ``workers`` x one chunk
whatever the number of particles. The store is renamed into place only when every
chunk is written, so a failed import leaves nothing behind.

Every STAR column becomes a metadata field (numbers keep their dtype, text is
``str``), unknown ones too, and the column order is kept in the store's provenance,
so :func:`streamem.io.relion.export_store` gives the same table back.
``rlnRandomSubset`` is kept if present, else assigned at random (seeded) into two
halves of equal size (±1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd
from dask.callbacks import Callback
from mrcfile.utils import data_dtype_from_header

from streamem import __version__
from streamem.dist.tasks import run_tasks
from streamem.errors import InputError
from streamem.io.atomic import atomic_output, check_output
from streamem.io.mrc import open_mrc, open_stack_mmap
from streamem.io.relion import parse_image_names, read_particles_star
from streamem.io.relion_export import relative_to
from streamem.io.store import ParticleStore, create_store, default_chunk_size
from streamem.io.store_url import is_url, remote_output

MRC_HEADER_BYTES = 1024


@dataclass(frozen=True)
class StackHeader:
    """What an MRC(S) header says: ``n_images`` of ``ny`` x ``nx`` pixels."""

    path: Path
    n_images: int
    ny: int
    nx: int
    voxel_size_A: float


def read_stack_header(path: str | Path) -> StackHeader:
    """Read and check an MRC(S) header; raises InputError if missing, corrupt or truncated.

    The expected size is 1024 + extended header + nx·ny·nz·bytes per pixel; a file
    shorter than that is truncated. A header without ID string or machine stamp is
    read with one warning (:func:`streamem.io.mrc.open_mrc`); an unknown mode is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "image stack not found")
    try:
        with open_mrc(path, header_only=True) as mrc:
            h = mrc.header
            nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
            itemsize = data_dtype_from_header(h).itemsize  # ValueError for an unknown mode
            extended = int(h.nsymbt)
            voxel = float(mrc.voxel_size.x)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, f"not a readable MRC stack ({exc})") from None
    expected = MRC_HEADER_BYTES + extended + nx * ny * nz * itemsize
    actual = path.stat().st_size
    if actual < expected:
        raise InputError(
            path, f"truncated MRC stack: {actual} bytes, header says {expected} ({nz} images)"
        )
    if min(nx, ny, nz) < 1:
        raise InputError(path, f"MRC stack has no images ({nx} x {ny} x {nz})")
    return StackHeader(path, nz, ny, nx, voxel)


@dataclass(frozen=True)
class ImportPlan:
    """Where each particle's image is: ``stacks[stack_ids[i]]``, image ``indices[i]``."""

    stacks: list[str]
    stack_ids: np.ndarray  # (N,) int64
    indices: np.ndarray  # (N,) int64, 0-based
    box_size: int
    header_voxel_A: float


def plan_images(image_names: Any, star_path: Path) -> ImportPlan:
    """Resolve and validate every ``rlnImageName`` against its stack's header."""
    indices, paths = parse_image_names(image_names, star_path)
    stacks, stack_ids = np.unique(paths.astype(str), return_inverse=True)
    first_seen = np.argsort(np.unique(stack_ids, return_index=True)[1])
    headers: list[StackHeader] = []
    box = None
    for k in first_seen:  # STAR order, so errors name the first bad stack a user would see
        h = read_stack_header(stacks[k])
        if h.nx != h.ny:
            raise InputError(h.path, f"images are {h.nx} x {h.ny} px (x by y), not square")
        if box is None:
            box, box_stack = h.nx, h.path
        elif h.nx != box:
            raise InputError(h.path, f"box {h.nx} px differs from {box} px in {box_stack}")
        headers.append(h)
    n_in_stack = np.zeros(len(stacks), dtype=np.int64)
    for k, h in zip(first_seen, headers, strict=True):
        n_in_stack[k] = h.n_images
    past = indices >= n_in_stack[stack_ids]
    if past.any():
        i = int(np.argmax(past))
        k = stack_ids[i]
        raise InputError(
            stacks[k],
            f"image {indices[i] + 1} is past the end of the stack ({n_in_stack[k]} images)",
        )
    return ImportPlan(
        [str(s) for s in stacks],
        stack_ids.astype(np.int64),
        indices,
        int(box),
        headers[0].voxel_size_A,
    )


def metadata_columns(particles: pd.DataFrame) -> dict[str, np.ndarray]:
    """STAR columns as store fields: ints/floats/bools keep their dtype, the rest is str."""
    out = {}
    for c in particles.columns:
        col = particles[c]
        dt = col.dtype
        if pd.api.types.is_bool_dtype(dt) and not col.isna().any():
            out[c] = col.to_numpy(dtype=bool)
        elif pd.api.types.is_integer_dtype(dt) and not col.isna().any():
            out[c] = col.to_numpy(dtype=np.int64)
        elif pd.api.types.is_float_dtype(dt) and isinstance(dt, np.dtype):
            out[c] = col.to_numpy()
        elif pd.api.types.is_numeric_dtype(dt):
            out[c] = col.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            out[c] = np.array([str(v) for v in col.to_numpy(dtype=object)], dtype=object)
    return out


def balanced_subsets(n: int, seed: int = 0) -> np.ndarray:
    """Random half-set labels 1/2, ``(n,)`` int32, as equal in size as possible."""
    labels = np.resize(np.array([1, 2], dtype=np.int32), n)
    return np.random.default_rng(seed).permutation(labels)


def _store_optics(optics: pd.DataFrame, box: int, header_voxel_A: float, star: Path):
    """Optics rows for the store, their common pixel size, checked against the images."""
    optics = optics.copy()
    if "rlnImageSize" in optics.columns:
        sizes = optics["rlnImageSize"].dropna().astype(int).unique()
        if len(sizes) and (len(sizes) > 1 or sizes[0] != box):
            raise InputError(star, f"data_optics rlnImageSize {sizes[-1]} != image box {box} px")
    optics["rlnImageSize"] = box
    if "rlnImageDimensionality" not in optics.columns:
        optics["rlnImageDimensionality"] = 2
    if "rlnImagePixelSize" in optics.columns:
        pixel_sizes = optics["rlnImagePixelSize"].astype(float).unique()
        if np.isnan(pixel_sizes).any():
            raise InputError(star, "some optics groups have no rlnImagePixelSize")
        if len(pixel_sizes) > 1:
            raise InputError(
                star,
                f"optics groups have different pixel sizes {sorted(pixel_sizes)} "
                "(not supported yet)",
            )
        pixel_A = float(pixel_sizes[0])
    elif header_voxel_A > 0:
        pixel_A = header_voxel_A  # no pixel size in the STAR file: trust the MRC header
        optics["rlnImagePixelSize"] = pixel_A
    else:
        raise InputError(star, "no pixel size (rlnImagePixelSize) in the STAR file or MRC header")
    if not pixel_A > 0:
        raise InputError(star, f"pixel size {pixel_A} Å is not positive")
    rows = [
        {k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()}
        for r in optics.to_dict(orient="records")
    ]
    return rows, pixel_A


class _Progress(Callback):
    """tqdm bar over finished chunk tasks (a widget in Jupyter, text in a terminal, none
    in a log: :func:`streamem.dist.progress.chunk_bar`)."""

    def __init__(self, total: int, enabled: bool):
        super().__init__()
        from streamem.dist.progress import chunk_bar

        self.bar = chunk_bar(total, "import", enabled)

    def _posttask(self, key, result, dsk, state, worker_id):
        self.bar.update(1)

    def _finish(self, dsk, state, errored):
        self.bar.close()


def import_particles(
    star_path: str | Path,
    out_path: str | Path,
    chunk_size: int | None = None,
    overwrite: bool = False,
    require_ctf: bool = False,
    progress: bool = True,
    seed: int = 0,
    workers: int | None = None,
    client=None,
    shard_size: int | None | str = "auto",
) -> ParticleStore:
    """Import a RELION particle STAR file, or a cryoSPARC ``.cs``/``.csg`` particle file
    (:mod:`streamem.io.cryosparc`), and its stacks into a new store at ``out_path``.

    ``chunk_size`` particles per store chunk (default: ~64 MiB of images);
    ``workers`` threads (default: up to 4), or the chunk tasks run on ``client``'s
    cluster (a ``distributed.Client``; its workers must see the stacks and the output).
    ``shard_size``: particles per Zarr shard (None: unsharded; ``"auto"``: sharded above
    100,000 particles); one task writes one shard.
    Raises InputError, before writing anything, on any problem with the inputs or the
    output path. The provenance records the source relative to the store's folder.
    """
    star_path = Path(star_path)
    if chunk_size is not None and chunk_size < 1:
        raise InputError(None, f"--chunk-size must be at least 1 (got {chunk_size})")
    remote = is_url(out_path)  # s3://...: written in place (io.store_url.remote_output)
    if not remote:
        check_output(out_path, overwrite, inputs=[star_path])
    signs = None
    if star_path.suffix.lower() in (".cs", ".csg"):
        from streamem.io.cryosparc import read_cryosparc

        particles, optics, located, signs = read_cryosparc(star_path, require_ctf=require_ctf)
    else:
        particles, optics = read_particles_star(star_path, require_ctf=require_ctf)
        located = particles["rlnImageName"]
    plan = plan_images(located, star_path)
    rows, pixel_A = _store_optics(optics, plan.box_size, plan.header_voxel_A, star_path)

    columns = metadata_columns(particles)
    if "rlnRandomSubset" not in columns:
        columns["rlnRandomSubset"] = balanced_subsets(len(particles), seed)
    n = len(particles)
    chunk_size = max(1, min(int(chunk_size or default_chunk_size(plan.box_size)), n))
    provenance = {
        "command": "import",
        # relative, so a project moved with its store still points at its source
        "source": str(star_path.absolute())
        if remote
        else relative_to(star_path.absolute(), Path(out_path).absolute().parent),
        "star_columns": list(particles.columns),
        "streamem_version": __version__,
    }
    inputs = [star_path, *plan.stacks]  # the output may touch none of them
    writing = (
        remote_output(out_path, overwrite, command="import")
        if remote
        else atomic_output(out_path, overwrite, inputs=inputs, command="import")
    )
    with writing as tmp:
        store = create_store(
            tmp,
            n_particles=n,
            box_size=plan.box_size,
            pixel_size_A=pixel_A,
            optics_groups=rows,
            fields={k: (str if v.dtype == object else v.dtype) for k, v in columns.items()},
            chunk_size=chunk_size,
            provenance=provenance,
            shard_size=shard_size,
        )
        store.write_region(0, metadata=columns)
        tasks = []
        for start, stop in store.write_bounds():  # one task per shard: none shares one
            ids = plan.stack_ids[start:stop]
            used, local = np.unique(ids, return_inverse=True)
            tasks.append(
                dask.delayed(_import_chunk, pure=True)(
                    str(store.path),  # absolute (workers have their own folder) or a URL
                    start,
                    [plan.stacks[k] for k in used],
                    local.astype(np.int64),
                    plan.indices[start:stop],
                    plan.box_size,
                    None if signs is None else signs[start:stop],
                    dask_key_name=f"import-chunk-{start}",
                )
            )
        callbacks = [_Progress(len(tasks), progress)] if client is None else []
        run_tasks(tasks, client, workers, callbacks)
    return ParticleStore(out_path)


def _import_chunk(
    store_path: str,
    start: int,
    stacks: list[str],
    local_ids: np.ndarray,
    indices: np.ndarray,
    box: int,
    signs: np.ndarray | None = None,
) -> int:
    """Task: gather images ``[start, start + n)`` from memory-mapped stacks, check, write.

    ``local_ids`` (n,) index into ``stacks``; ``indices`` (n,) are 0-based image indices;
    ``signs`` (n,) ±1 multiply the images (cryoSPARC's ``blob/sign``), or None.
    Returns the bytes written (float32 images).
    """
    n = len(indices)
    images = np.empty((n, box, box), dtype=np.float32)
    for k, stack in enumerate(stacks):
        mrc = open_stack_mmap(stack, warn=False)  # the plan warned once per stack
        try:
            data = mrc.data if mrc.data.ndim == 3 else mrc.data[None]
            for row in np.flatnonzero(local_ids == k):  # one image at a time: no extra copy
                images[row] = data[indices[row]]
        finally:
            mrc.close()
    good = np.isfinite(images).all(axis=(1, 2))
    if not good.all():
        row = int(np.argmin(good))
        what = "NaN" if np.isnan(images[row]).any() else "Inf"
        raise InputError(stacks[local_ids[row]], f"image {indices[row] + 1} has {what} pixels")
    if signs is not None and (signs < 0).any():
        images *= np.asarray(signs, dtype=np.float32)[:, None, None]
    ParticleStore(store_path).write_region(start, images=images)
    return int(images.nbytes)
