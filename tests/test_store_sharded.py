"""Sharded stores: Zarr v3 shards of whole chunks, written one Dask task per shard.

Import with ``shard_size`` puts S particles in one file per array; every image reads
back identical (by inner chunk, the unit of work, and whole), a write that does not
cover whole shards is refused, and a missing shard is a one-line error.
"""

from __future__ import annotations

import dask
import numpy as np
import pytest
from _relion_data import image_of, make_dataset

from streamem.errors import InputError
from streamem.io.importer import import_particles
from streamem.io.store import (
    ParticleStore,
    aligned_shard_size,
    create_store,
    default_shard_size,
)

N, BOX, CHUNK, SHARD = 300, 16, 20, 60


def _chunk_files(store: ParticleStore, array: str) -> list:
    """The chunk (or shard) files of ``array`` (``images``), or of every array of a group."""
    return sorted(p for p in (store.path / array).rglob("c/**/*") if p.is_file())


def test_import_sharded_reads_every_image_back(tmp_path):
    star, table, stacks = make_dataset(tmp_path / "relion", n_particles=N, box=BOX, n_stacks=4)
    sharded = import_particles(
        star, tmp_path / "s.zarr", chunk_size=CHUNK, shard_size=SHARD, workers=2, progress=False
    )
    plain = import_particles(
        star, tmp_path / "p.zarr", chunk_size=CHUNK, shard_size=None, workers=2, progress=False
    )
    assert sharded.shard_size == SHARD and plain.shard_size is None
    images = sharded.images()
    assert images.shards == (SHARD, BOX, BOX) and images.chunks == (CHUNK, BOX, BOX)
    assert sharded.chunk_bounds() == plain.chunk_bounds()  # the unit of work: inner chunks
    assert sharded.write_bounds() == [(s, s + SHARD) for s in range(0, N, SHARD)]

    # files on disk: one per shard and array instead of one per chunk
    assert len(_chunk_files(sharded, "images")) == N // SHARD
    assert len(_chunk_files(plain, "images")) == N // CHUNK
    n_fields = len(sharded.fields())
    assert len(_chunk_files(sharded, "metadata")) == n_fields * N // SHARD
    total_sharded = sum(1 for p in sharded.path.rglob("*") if p.is_file())
    total_plain = sum(1 for p in plain.path.rglob("*") if p.is_file())
    assert total_sharded < total_plain / 2

    expected = np.stack([image_of(stacks, star.parent, name) for name in table["rlnImageName"]])
    for start, stop in sharded.chunk_bounds():
        np.testing.assert_array_equal(sharded.read_chunk(start, stop).images, expected[start:stop])
    np.testing.assert_array_equal(sharded.read_chunk(0, N).images, expected)
    for label in ("rlnDefocusU", "rlnImageName", "rlnOpticsGroup"):
        np.testing.assert_array_equal(sharded.read_field(label), plain.read_field(label))


def _empty_sharded(path, n=N):
    return create_store(path, n, BOX, 1.0, [{"rlnOpticsGroup": 1}], {}, CHUNK, shard_size=SHARD)


def test_dask_writes_one_task_per_shard_and_misaligned_writes_are_refused(tmp_path):
    n = N - 7  # a last, partial shard
    store = _empty_sharded(tmp_path / "d.zarr", n)
    rng = np.random.default_rng(3)
    images = rng.standard_normal((n, BOX, BOX)).astype(np.float32)

    def write(start, stop):
        return ParticleStore(store.path).write_region(start, images=images[start:stop])

    tasks = [dask.delayed(write)(s, e) for s, e in store.write_bounds()]
    assert sum(dask.compute(*tasks, scheduler="threads", num_workers=4)) == n
    np.testing.assert_array_equal(store.read_chunk(0, n).images, images)

    for start, stop in [(0, CHUNK), (CHUNK, SHARD + CHUNK), (SHARD, n - 1)]:
        with pytest.raises(ValueError, match="whole shards"):
            store.write_region(start, images=images[start:stop])
    with pytest.raises(ValueError, match="whole shards"):
        store.write_region(CHUNK, metadata={"rlnRandomSubset": np.ones(CHUNK, np.int32)})
    store.write_region(0, images=images)  # several whole shards at once: fine


def test_a_missing_shard_is_one_line(tmp_path):
    store = _empty_sharded(tmp_path / "m.zarr")
    store.write_region(0, images=np.zeros((N, BOX, BOX), np.float32))
    _chunk_files(store, "images")[1].unlink()  # particles 60-119
    with pytest.raises(InputError, match=r"images chunk c/1/0/0 \(particles 60-119\) is missing"):
        store.read_chunk(80, 100)
    assert store.read_chunk(0, 20).images.shape == (20, BOX, BOX)


def test_default_shards_for_large_stores():
    assert default_shard_size(100_000, 128, 1024) is None
    shard = default_shard_size(1_000_000, 128, 1024)
    assert shard % 1024 == 0
    assert 200 * 2**20 <= shard * 128 * 128 * 4 <= 320 * 2**20
    # a million particles: a few hundred shard files per array, not a thousand chunks
    assert -(-1_000_000 // shard) < 300
    assert aligned_shard_size(50, CHUNK, N) == SHARD  # rounded up to whole chunks
    assert aligned_shard_size(CHUNK, CHUNK, N) is None  # one chunk per shard: unsharded
    assert aligned_shard_size(0, CHUNK, N) is None
