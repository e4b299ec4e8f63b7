"""The particle store: a self-describing Zarr v3 group of images and per-particle metadata.

Layout (``FORMAT_VERSION`` 1)::

    STORE.zarr/
      images            (N, B, B) float32, chunks (C, B, B), zstd-compressed
      metadata/<label>  (N,) one array per RELION STAR label, chunks (C,)
      truth/<label>     (N,) optional ground truth from ``streamem simulate``
      attrs["streamem"] = {format, version, n_particles, box_size, pixel_size_A,
                           chunk_size, optics_groups: [RELION optics rows], provenance}

Field names are RELION's STAR labels without the leading underscore
(``rlnDefocusU`` in Å, ``rlnAngleRot`` in degrees, ``rlnOriginXAngst`` in Å, ...),
so import and export are column copies and every unknown column survives. A
chunk along N is the unit of work of every Dask job; tasks receive the store's
*path* and a (start, stop) range, never an open handle.
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

FORMAT_NAME = "streamem-particles"
FORMAT_VERSION = 1

#: Metadata labels every store has (filled with defaults where the source lacks them).
REQUIRED_FIELDS = ("rlnOpticsGroup", "rlnRandomSubset")
#: CTF labels; a store without them is imaged without CTF correction.
CTF_FIELDS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
POSE_FIELDS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


@dataclass(frozen=True)
class ParticleChunk:
    """One chunk of particles: images ``(n, B, B)`` float32 and metadata ``{label: (n,)}``."""

    start: int
    stop: int
    images: np.ndarray
    metadata: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]


def _images_codecs():
    return [zarr.codecs.ZstdCodec(level=3)]


def default_chunk_size(box_size: int, target_bytes: int = 64 * 2**20) -> int:
    """Particles per chunk so one chunk of images is about ``target_bytes`` (float32)."""
    return max(16, int(target_bytes // (4 * box_size * box_size)))


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
) -> ParticleStore:
    """Create an empty store at ``path`` (which must not exist) and return it.

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
    root = zarr.open_group(str(path), mode="w-", zarr_format=3)
    root.create_array(
        "images",
        shape=(n_particles, box_size, box_size),
        chunks=(chunk_size, box_size, box_size),
        dtype="float32",
        compressors=_images_codecs(),
        fill_value=np.nan,
    )
    all_fields = {"rlnOpticsGroup": np.int32, "rlnRandomSubset": np.int32, **dict(fields)}
    for sub, spec in (("metadata", all_fields), ("truth", truth_fields or {})):
        grp = root.require_group(sub)
        for label, dtype in spec.items():
            _create_field(grp, label, n_particles, chunk_size, dtype)
    root.attrs["streamem"] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "n_particles": int(n_particles),
        "box_size": int(box_size),
        "pixel_size_A": float(pixel_size_A),
        "chunk_size": chunk_size,
        "optics_groups": [_jsonable(g) for g in optics_groups],
        "provenance": provenance or {},
    }
    return ParticleStore(path)


def _create_field(grp, label: str, n: int, chunk_size: int, dtype) -> None:
    dt = str if dtype in (str, "str", object) or np.dtype(dtype).kind in "OUS" else np.dtype(dtype)
    fill = "" if dt is str else (0 if np.dtype(dt).kind in "iub" else np.nan)
    grp.create_array(label, shape=(n,), chunks=(chunk_size,), dtype=dt, fill_value=fill)


def _jsonable(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        out[k] = v.item() if isinstance(v, np.generic) else v
    return out


class ParticleStore:
    """A validated handle on a particle store; cheap to create, safe to pickle (a path).

    Raises InputError if ``path`` is not a streamem store or its arrays disagree.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
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

    def chunk_bounds(self) -> list[tuple[int, int]]:
        """(start, stop) of each chunk along N, in order."""
        n, c = self.n_particles, self.chunk_size
        return [(s, min(s + c, n)) for s in range(0, n, c)]

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
        """The zarr array of images (lazy)."""
        return self._root()["images"]

    def read_chunk(self, start: int, stop: int, with_truth: bool = False) -> ParticleChunk:
        """Images and metadata of particles ``[start, stop)`` — the call Dask tasks use."""
        root = self._root()
        images = np.asarray(root["images"][start:stop], dtype=np.float32)
        meta = {k: _plain(a[start:stop]) for k, a in root["metadata"].arrays()}
        truth = {}
        if with_truth and "truth" in root:
            truth = {k: _plain(a[start:stop]) for k, a in root["truth"].arrays()}
        return ParticleChunk(start, stop, images, meta, truth)

    def read_field(self, label: str, group: str = "metadata") -> np.ndarray:
        """A whole 1-D field (small: one value per particle)."""
        root = self._root()
        try:
            return _plain(root[group][label][:])
        except KeyError:
            raise InputError(self.path, f"store has no field {group}/{label}") from None

    def read_table(self, group: str = "metadata") -> dict[str, np.ndarray]:
        """Every field of ``group`` as ``{label: (N,) array}``."""
        root = self._root()
        if group not in root:
            return {}
        return {k: _plain(a[:]) for k, a in root[group].arrays()}

    # -- writing -------------------------------------------------------------------------
    def write_region(
        self,
        start: int,
        images: np.ndarray | None = None,
        metadata: Mapping[str, np.ndarray] | None = None,
        truth: Mapping[str, np.ndarray] | None = None,
    ) -> int:
        """Write particles ``[start, start + n)``; returns n. Regions should be chunk-aligned."""
        root = self._root("r+")
        n = 0
        if images is not None:
            images = np.asarray(images, dtype=np.float32)
            n = images.shape[0]
            root["images"][start : start + n] = images
        for sub, values in (("metadata", metadata), ("truth", truth)):
            for label, col in (values or {}).items():
                col = np.asarray(col)
                n = max(n, col.shape[0])
                root[sub][label][start : start + col.shape[0]] = col
        return n

    def add_field(self, label: str, dtype, group: str = "metadata") -> None:
        """Create an empty per-particle field (e.g. poses after a refinement)."""
        root = self._root("r+")
        grp = root.require_group(group)
        if label not in grp:
            _create_field(grp, label, self.n_particles, self.chunk_size, dtype)

    def set_facts(self, **updates) -> None:
        root = self._root("r+")
        facts = dict(root.attrs["streamem"])
        facts.update(updates)
        root.attrs["streamem"] = facts
        self.facts = facts

    def __repr__(self) -> str:
        return f"ParticleStore({str(self.path)!r}, N={self.n_particles}, box={self.box_size})"

    def __reduce__(self):
        return (ParticleStore, (str(self.path),))


def _plain(a) -> np.ndarray:
    """NumPy array with text as plain ``str`` objects (zarr returns StringDType)."""
    a = np.asarray(a)
    if a.dtype.kind == "T":
        return a.astype(object)
    return a


def optics_params(group: Mapping[str, Any]):
    """The CTF optics of a RELION optics row."""
    from streamem.core.ctf import OpticsParams

    return OpticsParams(
        voltage_kV=float(group.get("rlnVoltage", 300.0)),
        cs_mm=float(group.get("rlnSphericalAberration", 2.7)),
        amplitude_contrast=float(group.get("rlnAmplitudeContrast", 0.1)),
    )


def store_size_bytes(path: str | Path) -> int:
    """Bytes on disk under a store folder."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
