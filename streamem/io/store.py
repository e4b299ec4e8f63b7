"""The particle store: a self-describing Zarr v3 group of images and per-particle metadata.

Layout (``FORMAT_VERSION`` 1)::

    STORE.zarr/
      images            (N, B, B) float32, chunks (C, B, B), zstd-compressed,
                        dimension_names (particle, y, x), attrs pixel_size_A, scale
      metadata/<label>  (N,) one array per RELION STAR label, chunks (C,), dims (particle,)
      truth/<label>     (N,) optional ground truth from ``streamem simulate``
      attrs["streamem"] = {format, version, n_particles, box_size, pixel_size_A,
                           chunk_size, shard_size, optics_groups: [RELION optics rows],
                           provenance}

A store may live on object storage (``s3://bucket/p.zarr``): :mod:`streamem.io.store_url`.

Sharding. A store may keep its arrays in Zarr v3 shards (the sharding codec) of S
particles, S a multiple of C: ``images`` shards (S, B, B) of inner chunks (C, B, B),
every field plain chunks (S,) (one per shard: a field's shard would hold only S small
values, and zarr reads sub-ranges of sharded 1-D arrays several times slower), so one
file (or object) per array holds S particles and a million-particle store is a few
thousand files instead of hundreds of thousands.
``create_store(shard_size=S)`` asks for it; stores of more than
:data:`SHARD_ABOVE_PARTICLES` particles get it by default (:func:`default_shard_size`,
shards of about 256 MiB of images). The unit of *work* stays the inner chunk: jobs
read ``chunk_bounds()`` ranges, and the sharding codec reads an inner chunk alone (the
shard's index, then its bytes). The unit of *writing* is the shard
(:meth:`ParticleStore.write_bounds`): two tasks writing parts of one shard would each
rewrite the whole shard and one would silently lose the other's images (zarr-python
#3514, dask #12583), so :meth:`ParticleStore.write_region` refuses a write that does
not cover whole shards, and the writers (import, simulate, extract) run one task
per shard. Unsharded stores have ``shard_size`` None and write per chunk as before.

Named dimensions and the pixel size on ``images`` make the store open in the
ecosystem as it is: ``xarray.open_zarr(STORE)`` gives ``images`` with dims
(particle, y, x) and the pixel size in its attrs, ``xarray.open_zarr(STORE,
group="metadata")`` one variable per label along ``particle``; napari's Zarr reader
shows the stack.

Field names are RELION's STAR labels without the leading underscore
(``rlnDefocusU`` in Å, ``rlnAngleRot`` in degrees, ``rlnOriginXAngst`` in Å, ...),
so import and export are column copies and every unknown column survives. A
chunk along N is the unit of work of every Dask job; tasks receive the store's
*path* and a (start, stop) range, never an open handle.

Reads are checked. Zarr reads a chunk that is not in storage as the array's fill
value (NaN images, 0 or "" metadata), so a deleted chunk file would become a NaN
map downstream. Every read goes through :func:`read_checked`, which checks that
each chunk key covering the range exists (through the zarr store API, so any
zarr store works; a store that cannot answer is read unchecked), names a chunk
that fails to decode, and (images) counts non-finite pixels. Each problem is an
:class:`InputError` of one line: store, array, chunk key, particle range.

Stores created by this version set ``every_chunk_stored`` in their facts: every
chunk is written even where it equals the fill value (zarr skips those by
default) and chunks carry a CRC32C checksum, so a missing chunk is an error and
a flipped byte is caught. One exception: a metadata field with no chunk stored
at all was declared but never written, and reads as its fill value (so a field
whose every chunk was deleted goes unnoticed; images never do, NaN being no
valid pixel). Older version-1 stores stay readable: there a missing chunk of a
0- or ""-filled field may be legitimate (zarr skipped it) and reads as the fill.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from streamem.errors import InputError
from streamem.io.store_checks import (  # noqa: F401  (re-exported: callers import them here)
    ChunkProblem,
    chunk_pieces,
    chunk_problem,
    never_written,
    read_checked,
    stored_keys,
)
from streamem.io.store_url import StoreURL, filesystem, is_url

FORMAT_NAME = "streamem-particles"
FORMAT_VERSION = 1

#: Metadata labels every store has (filled with defaults where the source lacks them).
REQUIRED_FIELDS = ("rlnOpticsGroup", "rlnRandomSubset")
#: CTF labels; a store without them is imaged without CTF correction.
CTF_FIELDS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
POSE_FIELDS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")
#: Zarr ``dimension_names`` (xarray's dims, napari's axis labels) of images and fields.
IMAGE_DIMENSIONS = ("particle", "y", "x")
FIELD_DIMENSIONS = ("particle",)


def image_attributes(pixel_size_A: float) -> dict[str, Any]:
    """Attributes of the ``images`` array, for readers that never see the root's facts
    (xarray puts them in ``DataArray.attrs``): pixel size in Å and the axes' scale."""
    p = float(pixel_size_A)
    return {
        "pixel_size_A": p,
        "spatial_units": "angstrom",
        "scale": [1.0, p, p],  # per dimension: particle index, then y and x in Å
        "units": "normalised (background mean 0, standard deviation 1)",
    }


@dataclass(frozen=True)
class ParticleChunk:
    """One chunk of particles: images ``(n, B, B)`` float32 and metadata ``{label: (n,)}``."""

    start: int
    stop: int
    images: np.ndarray
    metadata: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]


def _compressors():
    """zstd, then a CRC32C checksum so corrupt bytes fail to decode instead of reading."""
    return [zarr.codecs.ZstdCodec(level=3), zarr.codecs.Crc32cCodec()]


#: Write chunks equal to the fill value too: a chunk absent from storage is then an error.
_WRITE_EVERY_CHUNK = {"write_empty_chunks": True}


def default_chunk_size(box_size: int, target_bytes: int = 64 * 2**20) -> int:
    """Particles per chunk so one chunk of images is about ``target_bytes`` (float32)."""
    return max(16, int(target_bytes // (4 * box_size * box_size)))


#: Stores of more particles than this are sharded by default.
SHARD_ABOVE_PARTICLES = 100_000


def default_shard_size(
    n_particles: int, box_size: int, chunk_size: int, target_bytes: int = 256 * 2**20
) -> int | None:
    """Particles per shard by default: None (unsharded) up to :data:`SHARD_ABOVE_PARTICLES`,
    else the multiple of ``chunk_size`` closest to ``target_bytes`` of float32 images
    (at least one chunk)."""
    if n_particles <= SHARD_ABOVE_PARTICLES:
        return None
    per_chunk = 4 * box_size * box_size * chunk_size
    return chunk_size * max(1, round(target_bytes / per_chunk))


def aligned_shard_size(shard_size: int | None, chunk_size: int, n_particles: int) -> int | None:
    """``shard_size`` rounded up to a multiple of ``chunk_size`` (shards hold whole inner
    chunks); None when unsharded or when one shard would be one chunk (nothing gained)."""
    if not shard_size:
        return None
    if shard_size < 0:
        raise InputError(None, f"--shard-size must be positive (got {shard_size})")
    shard = -(-int(shard_size) // chunk_size) * chunk_size
    shard = min(shard, -(-n_particles // chunk_size) * chunk_size)
    return shard if shard > chunk_size else None


def create_store(
    path: str | Path,
    n_particles: int,
    box_size: int,
    pixel_size_A: float,
    optics_groups: list[dict[str, Any]],
    fields: Mapping[str, Any],
    chunk_size: int | None = None,
    truth_fields: Mapping[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    shard_size: int | None | str = "auto",
) -> ParticleStore:
    """Create an empty store at ``path`` (which must not exist) and return it.

    ``shard_size``: particles per shard (rounded up to a multiple of the chunk size;
    None or 0: unsharded; ``"auto"``: :func:`default_shard_size`). See the module
    docstring, *Sharding*.

    ``fields`` and ``truth_fields`` map RELION labels to NumPy dtypes (``str`` for
    text). ``optics_groups`` are RELION optics rows (``rlnOpticsGroup``,
    ``rlnImagePixelSize``, ``rlnVoltage``, ``rlnSphericalAberration``,
    ``rlnAmplitudeContrast``, ...). Images are written later, chunk by chunk, with
    :meth:`ParticleStore.write_region`.
    """
    if n_particles < 1:
        raise ValueError("a store needs at least one particle")
    chunk_size = int(chunk_size or default_chunk_size(box_size))
    chunk_size = max(1, min(chunk_size, n_particles))
    if shard_size == "auto":
        shard_size = default_shard_size(n_particles, box_size, chunk_size)
    shard = aligned_shard_size(shard_size, chunk_size, n_particles)
    root = zarr.open_group(str(path), mode="w-", zarr_format=3)
    root.create_array(
        "images",
        shape=(n_particles, box_size, box_size),
        chunks=(chunk_size, box_size, box_size),
        shards=(shard, box_size, box_size) if shard else None,
        dtype="float32",
        compressors=_compressors(),
        fill_value=np.nan,
        dimension_names=IMAGE_DIMENSIONS,
        attributes=image_attributes(pixel_size_A),
    )
    all_fields = {"rlnOpticsGroup": np.int32, "rlnRandomSubset": np.int32, **dict(fields)}
    for sub, spec in (("metadata", all_fields), ("truth", truth_fields or {})):
        grp = root.require_group(sub)
        for label, dtype in spec.items():
            _create_field(grp, label, n_particles, chunk_size, dtype, shard)
    root.attrs["streamem"] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "n_particles": int(n_particles),
        "box_size": int(box_size),
        "pixel_size_A": float(pixel_size_A),
        "chunk_size": chunk_size,
        "shard_size": shard,
        "optics_groups": [_jsonable(g) for g in optics_groups],
        "provenance": provenance or {},
        "every_chunk_stored": True,
    }
    return ParticleStore(path)


def _create_field(grp, label: str, n: int, chunk_size: int, dtype, shard: int | None) -> None:
    dt = str if dtype in (str, "str", object) or np.dtype(dtype).kind in "OUS" else np.dtype(dtype)
    fill = "" if dt is str else (0 if np.dtype(dt).kind in "iub" else np.nan)
    grp.create_array(
        label,
        shape=(n,),
        # a sharded store's fields: plain chunks of a whole shard (S,), as few files as
        # shards and aligned with the writers' shards; zarr reads sub-ranges of a sharded
        # 1-D array several times slower, and a field's shard would be only S values
        chunks=(shard or chunk_size,),
        dtype=dt,
        fill_value=fill,
        compressors=_compressors(),
        dimension_names=FIELD_DIMENSIONS,
    )


def _jsonable(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        out[k] = v.item() if isinstance(v, np.generic) else v
    return out


def ranges(n: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive ranges of ``size`` along N (the last one shorter)."""
    return [(s, min(s + size, n)) for s in range(0, n, size)]


class ParticleStore:
    """A validated handle on a particle store; cheap to create, safe to pickle (a path).

    Raises InputError if ``path`` is not a streamem store or its arrays disagree.
    """

    def __init__(self, path: str | Path):
        # absolute: tasks receive this path, and a worker's working folder is not ours;
        # a URL (s3://bucket/p.zarr) stays one (io.store_url: a remote store)
        self.path = StoreURL(path) if is_url(path) else Path(path).absolute()
        if not self.path.exists():
            raise InputError(self.path, "particle store not found")
        try:
            root = zarr.open_group(str(self.path), mode="r")
        except Exception as exc:  # zarr raises several types for non-stores
            raise InputError(self.path, f"not a Zarr group ({type(exc).__name__})") from None
        facts = dict(root.attrs).get("streamem")
        if not isinstance(facts, dict) or facts.get("format") != FORMAT_NAME:
            raise InputError(self.path, "not a streamem particle store (no 'streamem' attributes)")
        if facts.get("version", 0) > FORMAT_VERSION:
            raise InputError(
                self.path, f"store format {facts['version']} is newer than this streamem"
            )
        self.facts = facts
        self._validate(root)

    def _validate(self, root) -> None:
        if "images" not in root:
            raise InputError(self.path, "store has no 'images' array")
        img = root["images"]
        n, b = self.n_particles, self.box_size
        if img.shape != (n, b, b):
            raise InputError(self.path, f"images shape {img.shape} disagrees with N={n}, box={b}")
        for sub in ("metadata", "truth"):
            if sub not in root:
                continue
            for label, arr in root[sub].arrays():
                if arr.shape != (n,):
                    raise InputError(
                        self.path, f"{sub}/{label} has shape {arr.shape}, expected ({n},)"
                    )

    # -- global facts ------------------------------------------------------------------
    @property
    def n_particles(self) -> int:
        return int(self.facts["n_particles"])

    @property
    def box_size(self) -> int:
        return int(self.facts["box_size"])

    @property
    def pixel_size_A(self) -> float:
        return float(self.facts["pixel_size_A"])

    @property
    def chunk_size(self) -> int:
        return int(self.facts["chunk_size"])

    @property
    def optics_groups(self) -> list[dict[str, Any]]:
        return list(self.facts["optics_groups"])

    @property
    def shard_size(self) -> int | None:
        """Particles per shard, or None for an unsharded store."""
        return int(self.facts["shard_size"]) if self.facts.get("shard_size") else None

    def chunk_bounds(self) -> list[tuple[int, int]]:
        """(start, stop) of each chunk along N, in order: the unit of work of reading jobs."""
        return ranges(self.n_particles, self.chunk_size)

    def write_bounds(self) -> list[tuple[int, int]]:
        """(start, stop) of each unit of writing: shards when sharded, else chunks.

        Writers run one task per range (:meth:`write_region` refuses other ranges).
        """
        return ranges(self.n_particles, self.shard_size or self.chunk_size)

    def _root(self, mode: str = "r"):
        return zarr.open_group(str(self.path), mode=mode)

    def fields(self, group: str = "metadata") -> list[str]:
        root = self._root()
        return sorted(k for k, _ in root[group].arrays()) if group in root else []

    def has_fields(self, labels, group: str = "metadata") -> bool:
        present = set(self.fields(group))
        return all(lbl in present for lbl in labels)

    # -- reading -------------------------------------------------------------------------
    def images(self):
        """The zarr array of images (lazy, *unchecked*: a missing chunk reads as NaN).

        For inspection only; computations read through :meth:`read_chunk`.
        """
        return self._root()["images"]

    def read_chunk(self, start: int, stop: int, with_truth: bool = False) -> ParticleChunk:
        """Images and metadata of particles ``[start, stop)`` — the call Dask tasks use.

        Checked (see :func:`read_checked`): a missing or corrupt chunk, or a
        non-finite pixel, raises InputError naming the chunk.
        """
        root = self._root()
        images = self._read(root["images"], "images", start, stop)
        meta = self._read_group(root, "metadata", start, stop)
        truth = self._read_group(root, "truth", start, stop) if with_truth else {}
        return ParticleChunk(start, stop, images.astype(np.float32, copy=False), meta, truth)

    def read_field(self, label: str, group: str = "metadata") -> np.ndarray:
        """A whole 1-D field (small: one value per particle), checked."""
        root = self._root()
        try:
            arr = root[group][label]
        except KeyError:
            raise InputError(self.path, f"store has no field {group}/{label}") from None
        return self._read(arr, f"{group}/{label}", 0, self.n_particles)

    def read_table(
        self, group: str = "metadata", start: int = 0, stop: int | None = None
    ) -> dict[str, np.ndarray]:
        """Every field of ``group`` as ``{label: (stop - start,) array}``, checked.

        All particles by default; a range reads only the chunks it covers (what the
        streamed STAR writers use, so the client never holds the whole table).
        """
        stop = self.n_particles if stop is None else min(int(stop), self.n_particles)
        return self._read_group(self._root(), group, int(start), stop)

    def array_names(self) -> list[str]:
        """``images`` and every ``metadata/<label>`` and ``truth/<label>`` array."""
        root = self._root()
        names = ["images"]
        for sub in ("metadata", "truth"):
            if sub in root:
                names += [f"{sub}/{k}" for k, _ in sorted(root[sub].arrays())]
        return names

    def verify_range(self, start: int, stop: int) -> list[ChunkProblem]:
        """The problems of every stored chunk (all arrays) that begins in ``[start, stop)``.

        Reads each such chunk whole; what ``streamem info --verify`` runs per task.
        """
        root = self._root()
        problems = []
        for name in self.array_names():
            arr = root[name]
            for key, c0, c1 in chunk_pieces(arr, start, stop):
                if c0 < start:
                    continue  # begins in the previous range: that task checks it
                problem = chunk_problem(
                    arr, key, c0, c1, self._missing_is_fill(arr), name == "images"
                )
                if problem:
                    problems.append(ChunkProblem(name, key, c0, c1, problem))
        return problems

    def _missing_is_fill(self, arr) -> bool:
        """Whether an absent chunk of ``arr`` legitimately reads as its fill value.

        Only in stores written before ``every_chunk_stored``, and only for 0/"" fills:
        zarr skipped chunks equal to them, while a NaN chunk was never valid data.
        """
        if self.facts.get("every_chunk_stored"):
            return False
        fill = arr.metadata.fill_value
        return not (isinstance(fill, float | np.floating) and np.isnan(fill))

    def _read(self, arr, name: str, start: int, stop: int) -> np.ndarray:
        return read_checked(
            arr,
            start,
            stop,
            where=f"{name} chunk",
            store=self.path,
            missing_is_fill=self._missing_is_fill(arr),
            finite=name == "images",
        )

    def _read_group(self, root, group: str, start: int, stop: int) -> dict[str, np.ndarray]:
        if group not in root:
            return {}
        # by label: zarr lists a group's arrays in no fixed order, and STAR columns must not move
        arrays = sorted(root[group].arrays(), key=lambda item: item[0])
        return {k: self._read(a, f"{group}/{k}", start, stop) for k, a in arrays}

    # -- writing -------------------------------------------------------------------------
    def write_region(
        self,
        start: int,
        images: np.ndarray | None = None,
        metadata: Mapping[str, np.ndarray] | None = None,
        truth: Mapping[str, np.ndarray] | None = None,
    ) -> int:
        """Write particles ``[start, start + n)``; returns n.

        Regions should be chunk-aligned; in a sharded store they must cover whole shards
        (:meth:`write_bounds`: one range, or several consecutive ones): anything else is
        refused with ValueError, because concurrent writers of one shard lose data.
        """
        root = self._root("r+")
        n = 0
        if images is not None:
            images = np.asarray(images, dtype=np.float32)
            n = images.shape[0]
            self._check_aligned(start, n)
            root["images"].with_config(_WRITE_EVERY_CHUNK)[start : start + n] = images
        for sub, values in (("metadata", metadata), ("truth", truth)):
            for label, col in (values or {}).items():
                col = np.asarray(col)
                self._check_aligned(start, col.shape[0])
                n = max(n, col.shape[0])
                arr = root[sub][label].with_config(_WRITE_EVERY_CHUNK)
                arr[start : start + col.shape[0]] = col
        return n

    def _check_aligned(self, start: int, n: int) -> None:
        shard = self.shard_size
        if shard is None:
            return
        stop = start + n
        if start % shard or (stop % shard and stop != self.n_particles):
            raise ValueError(
                f"{self.path}: write of particles {start}-{stop - 1} does not cover whole "
                f"shards of {shard} particles (write one task per shard: write_bounds())"
            )

    def add_field(self, label: str, dtype, group: str = "metadata") -> None:
        """Create a per-particle field (e.g. poses after a refinement), all fill value."""
        root = self._root("r+")
        grp = root.require_group(group)
        if label not in grp:
            _create_field(grp, label, self.n_particles, self.chunk_size, dtype, self.shard_size)
            # stored as its fill value now: written region by region later, a region not
            # yet written reads as NaN/0/"", and a chunk absent from storage stays an error
            arr = grp[label]
            arr.with_config(_WRITE_EVERY_CHUNK)[:] = arr.metadata.fill_value

    def set_facts(self, **updates) -> None:
        root = self._root("r+")
        facts = dict(root.attrs["streamem"])
        facts.update(updates)
        root.attrs["streamem"] = facts
        self.facts = facts

    def __repr__(self) -> str:
        return f"ParticleStore({str(self.path)!r}, N={self.n_particles}, box={self.box_size})"

    def _repr_html_(self) -> str:
        from streamem.display import store_html

        return store_html(self)  # streamem info's table and the first images

    def plot(self, fig=None, n_images: int = 8):
        """The first ``n_images`` images in a row of ``fig`` (default: a new pyplot figure)."""
        from streamem.display import draw_images

        if fig is None:
            import matplotlib.pyplot as plt

            fig = plt.figure(figsize=(1.0 * n_images, 1.2))
        draw_images(fig, self.read_chunk(0, min(n_images, self.n_particles)).images)
        return fig

    def __reduce__(self):
        return (ParticleStore, (str(self.path),))


def optics_params(group: Mapping[str, Any]):
    """The CTF optics of a RELION optics row."""
    from streamem.core.ctf import OpticsParams

    return OpticsParams(
        voltage_kV=float(group.get("rlnVoltage", 300.0)),
        cs_mm=float(group.get("rlnSphericalAberration", 2.7)),
        amplitude_contrast=float(group.get("rlnAmplitudeContrast", 0.1)),
    )


def store_size_bytes(path: str | Path) -> int:
    """Bytes on disk under a store folder (or in the objects under a store URL)."""
    if is_url(path):
        fs, root = filesystem(path)
        return int(fs.du(root))
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
