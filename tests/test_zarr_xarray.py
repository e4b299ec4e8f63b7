"""A freshly written store opens in xarray with named dimensions and the pixel size."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from _relion_data import make_dataset

from streamem.io.importer import import_particles
from streamem.io.store import ParticleStore

xr = pytest.importorskip("xarray")


def open_zarr(path: Path, **kwargs):
    with warnings.catch_warnings():
        # no consolidated metadata (fields are added after creation): xarray says so
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        return xr.open_zarr(path, **kwargs)


def test_xarray_opens_images_and_metadata_with_named_dimensions(tmp_path):
    star, table, _ = make_dataset(tmp_path / "proj", n_particles=12, pixel_A=1.5)
    store = import_particles(star, tmp_path / "p.zarr", chunk_size=5, progress=False)
    ds = open_zarr(store.path)
    assert ds["images"].dims == ("particle", "y", "x")
    assert ds["images"].shape == (12, 16, 16)
    assert ds["images"].attrs["pixel_size_A"] == 1.5
    assert ds["images"].attrs["scale"] == [1.0, 1.5, 1.5]
    np.testing.assert_array_equal(ds["images"].values, store.read_chunk(0, 12).images)
    meta = open_zarr(store.path, group="metadata")
    assert meta["rlnDefocusU"].dims == ("particle",)
    np.testing.assert_array_equal(meta["rlnDefocusU"].values, table["rlnDefocusU"])


def test_added_fields_are_named_and_provenance_is_relative(tmp_path):
    star, _, _ = make_dataset(tmp_path / "proj", n_particles=6, n_stacks=1)
    store = import_particles(star, tmp_path / "out" / "p.zarr", progress=False)
    store.add_field("rlnNewThing", np.float64)
    assert open_zarr(store.path, group="metadata")["rlnNewThing"].dims == ("particle",)
    source = store.facts["provenance"]["source"]
    assert not Path(source).is_absolute()
    assert (store.path.parent / source).resolve() == star.resolve()
    assert ParticleStore(store.path).n_particles == 6
