"""The Zarr particle store: create, open, read and write chunks, and refuse what is not one."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import zarr

from streamem.errors import InputError
from streamem.io.store import FORMAT_VERSION, ParticleStore, create_store

OPTICS = [{"rlnOpticsGroup": 1, "rlnVoltage": 300.0, "rlnImagePixelSize": 1.2}]


def make_store(path, n=10, box=8, chunk_size=4):
    return create_store(
        path,
        n,
        box,
        1.2,
        OPTICS,
        fields={"rlnDefocusU": np.float64, "rlnMicrographName": str, "rlnClassNumber": np.int64},
        chunk_size=chunk_size,
        truth_fields={"rlnAngleRot": np.float64},
        provenance={"test": True},
    )


def test_create_write_read_by_chunk(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    rng = np.random.default_rng(0)
    images = rng.normal(size=(10, 8, 8)).astype(np.float32)
    defocus = rng.uniform(1e4, 3e4, 10)
    names = np.array([f"mic {i % 3}.mrc" for i in range(10)], dtype=object)
    rot = rng.uniform(-180, 180, 10)
    for start, stop in store.chunk_bounds():  # region by region, as tasks do
        sl = slice(start, stop)
        n = store.write_region(
            start,
            images=images[sl],
            metadata={"rlnDefocusU": defocus[sl], "rlnMicrographName": names[sl]},
            truth={"rlnAngleRot": rot[sl]},
        )
        assert n == stop - start

    again = ParticleStore(tmp_path / "s.zarr")
    assert (again.n_particles, again.box_size, again.pixel_size_A) == (10, 8, 1.2)
    assert again.optics_groups == OPTICS
    assert again.facts["provenance"] == {"test": True}
    chunk = again.read_chunk(4, 8, with_truth=True)
    assert (chunk.start, chunk.stop) == (4, 8)
    np.testing.assert_array_equal(chunk.images, images[4:8])
    assert chunk.images.dtype == np.float32
    np.testing.assert_array_equal(chunk.metadata["rlnDefocusU"], defocus[4:8])
    assert list(chunk.metadata["rlnMicrographName"]) == list(names[4:8])
    np.testing.assert_array_equal(chunk.truth["rlnAngleRot"], rot[4:8])
    assert again.read_chunk(0, 4).truth == {}
    assert set(again.fields()) == {
        "rlnDefocusU",
        "rlnMicrographName",
        "rlnClassNumber",
        "rlnOpticsGroup",
        "rlnRandomSubset",
    }
    assert again.has_fields(["rlnDefocusU"]) and not again.has_fields(["rlnAngleRot"])
    assert again.fields("truth") == ["rlnAngleRot"]
    np.testing.assert_array_equal(again.read_field("rlnAngleRot", "truth"), rot)
    with pytest.raises(InputError, match="no field"):
        again.read_field("rlnNothing")
    assert pickle.loads(pickle.dumps(again)).path == again.path  # tasks get a path


def test_images_chunked_along_n_only(tmp_path):
    store = make_store(tmp_path / "s.zarr", n=10, box=8, chunk_size=4)
    assert store.images().chunks == (4, 8, 8)
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert root["metadata"]["rlnDefocusU"].chunks == (4,)


def test_add_field(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    store.add_field("rlnAnglePsi", np.float32)
    store.write_region(8, metadata={"rlnAnglePsi": np.array([1.5, 2.5], np.float32)})
    psi = ParticleStore(store.path).read_field("rlnAnglePsi")
    assert psi.dtype == np.float32 and psi.shape == (10,)
    np.testing.assert_array_equal(psi[8:], [1.5, 2.5])


@pytest.mark.parametrize(
    "n, chunk, bounds",
    [
        (10, 4, [(0, 4), (4, 8), (8, 10)]),
        (8, 4, [(0, 4), (4, 8)]),
        (3, 10, [(0, 3)]),  # chunk larger than N is clipped to N
        (5, 1, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),
    ],
)
def test_chunk_bounds(tmp_path, n, chunk, bounds):
    store = make_store(tmp_path / "s.zarr", n=n, chunk_size=chunk)
    assert store.chunk_bounds() == bounds


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="not found"):
        ParticleStore(tmp_path / "nothing.zarr")


def test_plain_folder_is_not_a_store(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("hello")
    with pytest.raises(InputError, match="plain"):
        ParticleStore(tmp_path / "plain")


def test_zarr_group_without_streamem_attributes(tmp_path):
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3).attrs["x"] = 1
    with pytest.raises(InputError, match="not a streamem particle store"):
        ParticleStore(tmp_path / "g.zarr")


def test_metadata_of_wrong_length(tmp_path):
    make_store(tmp_path / "s.zarr", n=10)
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    root["metadata"].create_array("rlnBad", shape=(7,), dtype="float64")
    with pytest.raises(InputError, match=r"metadata/rlnBad has shape \(7,\), expected \(10,\)"):
        ParticleStore(tmp_path / "s.zarr")


def test_images_disagree_with_facts(tmp_path):
    make_store(tmp_path / "s.zarr", n=10, box=8)
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    facts = dict(root.attrs["streamem"])
    facts["box_size"] = 12
    root.attrs["streamem"] = facts
    with pytest.raises(InputError, match="images shape"):
        ParticleStore(tmp_path / "s.zarr")


def test_newer_format_version(tmp_path):
    make_store(tmp_path / "s.zarr")
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    facts = dict(root.attrs["streamem"])
    facts["version"] = FORMAT_VERSION + 1
    root.attrs["streamem"] = facts
    with pytest.raises(InputError, match="newer than this streamem"):
        ParticleStore(tmp_path / "s.zarr")


def test_create_refuses_existing_path(tmp_path):
    make_store(tmp_path / "s.zarr")
    with pytest.raises(Exception):  # noqa: B017 - zarr's own error type for mode="w-"
        make_store(tmp_path / "s.zarr")
