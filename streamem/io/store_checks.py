"""Checked reads of a store's Zarr arrays: a missing or corrupt chunk is an error, not NaN.

See :mod:`streamem.io.store` (the module docstring: why, and which stores set
``every_chunk_stored``). Every function takes a zarr array chunked along axis 0 only;
when the array is sharded, the unit examined is the shard (the unit of storage).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamem.errors import InputError


@dataclass(frozen=True)
class ChunkProblem:
    """A bad stored chunk: ``array`` (``images``, ``metadata/<label>``), its zarr chunk
    ``key`` (``c/3/0/0``), particles ``[start, stop)`` and the ``problem`` as a phrase
    (``is missing``, ``is corrupt (...)``, ``holds 12 NaN/Inf pixels``)."""

    array: str
    key: str
    start: int
    stop: int
    problem: str

    def one_line(self) -> str:
        return (
            f"{self.array} chunk {self.key} (particles {self.start}-{self.stop - 1}) {self.problem}"
        )


def chunk_pieces(arr, start: int, stop: int) -> Iterator[tuple[str, int, int]]:
    """``(key, c0, c1)`` of each stored chunk (or shard) of ``arr`` covering ``[start, stop)``.

    ``key`` is the chunk's storage key relative to the array (``c/3/0/0``), from the
    array's own chunk key encoding; ``[c0, c1)`` is the chunk's whole extent along
    axis 0. Arrays are chunked along axis 0 only.
    """
    n = arr.shape[0]
    step = (arr.shards or arr.chunks)[0]  # the unit of storage is the shard when sharded
    rest = (0,) * (arr.ndim - 1)
    for i in range(start // step, -(-min(stop, n) // step)):
        yield arr.metadata.encode_chunk_key((i, *rest)), i * step, min((i + 1) * step, n)


def stored_keys(arr, keys: list[str]) -> list[bool | None]:
    """Whether each chunk key of ``arr`` is in storage (None: the store cannot say)."""
    import asyncio

    from zarr.core.sync import sync

    async def exists_all():
        return await asyncio.gather(*((arr.store_path / k).exists() for k in keys))

    try:
        return list(sync(exists_all()))
    except (NotImplementedError, TypeError, AttributeError):
        return [None] * len(keys)  # a store without an existence check: read unchecked


def never_written(arr) -> bool:
    """Whether no chunk of ``arr`` is in storage: a field declared but not yet written.

    Such a field reads as its fill value (pre-filling every field at creation would
    cost a write per chunk per field). False when the store cannot list keys.
    """
    from zarr.core.sync import sync

    prefix = f"{arr.store_path.path}/" if arr.store_path.path else ""

    async def first_chunk():
        async for key in arr.store_path.store.list_prefix(prefix):
            if key[len(prefix) :] != "zarr.json":
                return key
        return None

    try:
        return sync(first_chunk()) is None
    except (NotImplementedError, TypeError, AttributeError):
        return False


def _decode_problem(exc: Exception) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    if "checksum" in first.lower():
        first = "CRC32C checksum mismatch"  # zarr's message prints both checksums as bytes
    detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    verb = "cannot be read" if isinstance(exc, OSError) else "cannot be decoded"
    return f"is corrupt ({verb}: {detail})"


def _nonfinite_problem(values: np.ndarray) -> str | None:
    if values.dtype.kind not in "fc":
        return None
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    return f"holds {bad} NaN/Inf pixels" if bad else None


def chunk_problem(
    arr, key: str, c0: int, c1: int, missing_is_fill: bool = False, finite: bool = False
) -> str | None:
    """What is wrong with the stored chunk ``key`` (particles ``[c0, c1)``), or None."""
    if (
        not missing_is_fill
        and stored_keys(arr, [key])[0] is False
        and (finite or not never_written(arr))
    ):
        return "is missing"
    try:
        values = np.asarray(arr[c0:c1])
    except MemoryError:
        raise
    except Exception as exc:  # codecs raise many types (zstd, crc32c, shape)
        return _decode_problem(exc)
    return _nonfinite_problem(values) if finite else None


def read_checked(
    arr,
    start: int,
    stop: int,
    where: str,
    store: str | Path,
    missing_is_fill: bool = False,
    finite: bool = False,
) -> np.ndarray:
    """``arr[start:stop]`` (text as ``str`` objects), refusing what zarr would paper over.

    Raises InputError ``STORE: <where> KEY (particles a-b) is missing`` for an absent
    chunk (unless ``missing_is_fill``), ``... is corrupt (...)`` for one that fails to
    decode, and, with ``finite`` (images), ``... holds N NaN/Inf pixels``. Without
    ``finite``, an array with no chunk stored at all is a field declared but never
    written and reads as its fill value. One existence check for all keys, one zarr
    read; chunks are examined one by one only on failure.
    """
    pieces = list(chunk_pieces(arr, start, stop))

    def fail(key: str, c0: int, c1: int, problem: str):
        return InputError(store, f"{where} {key} (particles {c0}-{c1 - 1}) {problem}")

    if not missing_is_fill:
        absent = [
            piece
            for piece, present in zip(pieces, stored_keys(arr, [p[0] for p in pieces]), strict=True)
            if present is False
        ]
        # images are never legitimately absent; a metadata field may be declared, unwritten
        if absent and (finite or not never_written(arr)):
            raise fail(*absent[0], "is missing")
    try:
        values = _plain(arr[start:stop])
    except MemoryError:
        raise
    except Exception as exc:
        for key, c0, c1 in pieces:  # which chunk?
            try:
                arr[max(start, c0) : min(stop, c1)]
            except Exception as one:
                raise fail(key, c0, c1, _decode_problem(one)) from None
        raise fail(pieces[0][0], start, stop, _decode_problem(exc)) from None
    if finite and _nonfinite_problem(values):
        for key, c0, c1 in pieces:
            problem = _nonfinite_problem(values[max(start, c0) - start : min(stop, c1) - start])
            if problem:
                raise fail(key, max(start, c0), min(stop, c1), problem)
    return values


def _plain(a) -> np.ndarray:
    """NumPy array with text as plain ``str`` objects (zarr returns StringDType)."""
    a = np.asarray(a)
    if a.dtype.kind == "T":
        return a.astype(object)
    return a
