"""Round trips RELION STAR + MRCS -> particle store -> STAR + MRCS keep every value and pixel."""

from __future__ import annotations

import logging
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from _relion_data import image_of, make_dataset

from streamem.cli import main
from streamem.io.importer import balanced_subsets, import_particles
from streamem.io.relion import parse_image_names, read_particles_star, write_star
from streamem.io.relion_export import export_store
from streamem.io.store import ParticleStore, create_store


def read_exported(star: Path):
    blocks = starfile.read(star, always_dict=True)
    return blocks["particles"], blocks["optics"]


def exported_images(star: Path, names) -> np.ndarray:
    """Images named by an exported STAR file, read back with mrcfile (independent of us)."""
    out = []
    for name in names:
        idx, rel = name.split("@")
        with mrcfile.open(star.parent / rel, permissive=False) as mrc:
            assert mrc.header.mode == 2
            assert mrc.voxel_size.x == pytest.approx(1.5)
            out.append(np.array(mrc.data[int(idx) - 1]))
    return np.stack(out)


def assert_same_column(a: pd.Series, b: pd.Series, label: str) -> None:
    if pd.api.types.is_numeric_dtype(a.dtype):
        assert a.dtype.kind == b.dtype.kind, label
        np.testing.assert_array_equal(a.to_numpy(), b.to_numpy(), err_msg=label)
    else:
        assert [str(v) for v in a] == [str(v) for v in b], label


def test_roundtrip_relion31_keeps_every_value_and_pixel(tmp_path, monkeypatch):
    project = tmp_path / "project"
    star, table, stacks = make_dataset(project, n_particles=30, n_stacks=3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # stacks must be found next to the STAR file, not in cwd

    assert main(["import", str(star), str(tmp_path / "p.zarr"), "--chunk-size", "7"]) == 0
    store = ParticleStore(tmp_path / "p.zarr")
    assert (store.n_particles, store.box_size, store.pixel_size_A) == (30, 16, 1.5)
    assert len(store.chunk_bounds()) == 5

    out = tmp_path / "out" / "exp.star"
    assert main(["export", str(tmp_path / "p.zarr"), str(out)]) == 0
    exp, exp_optics = read_exported(out)
    orig = starfile.read(star, always_dict=True)
    src, src_optics = orig["particles"], orig["optics"]

    for label in src.columns:
        if label != "rlnImageName":
            assert_same_column(src[label], exp[label], label)
    for label in src_optics.columns:
        assert_same_column(src_optics[label], exp_optics[label], label)
    assert list(exp["rlnImageOriginalName"]) == list(src["rlnImageName"])
    assert exp["rlnMyCustomThing"].dtype == np.float64
    assert exp["rlnMyCustomText"].iloc[1] == "note 1"  # text with a space survives

    got = exported_images(out, exp["rlnImageName"])
    want = np.stack([image_of(stacks, project, n) for n in src["rlnImageName"]])
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # bit for bit


def test_roundtrip_relion30_converts_origins_and_optics(tmp_path):
    star, table, stacks = make_dataset(tmp_path / "p30", n_particles=20, version="3.0")
    # hand-computed case: 2.0 px at 15 µm / 100000x = 1.5 Å/px is 3.0 Å
    table.loc[0, "rlnOriginX"] = 2.0
    table.loc[0, "rlnOriginY"] = -1.0
    starfile.write({"": table}, star)

    particles, optics = read_particles_star(star)
    assert "rlnOriginX" not in particles.columns and "rlnVoltage" not in particles.columns
    assert particles.loc[0, "rlnOriginXAngst"] == 3.0
    assert particles.loc[0, "rlnOriginYAngst"] == -1.5
    assert sorted(optics["rlnVoltage"]) == [200.0, 300.0]
    np.testing.assert_allclose(optics["rlnImagePixelSize"], 1.5, rtol=1e-12)

    import_particles(star, tmp_path / "p.zarr", progress=False)
    out = tmp_path / "exp.star"
    export_store(tmp_path / "p.zarr", out)
    exp, exp_optics = read_exported(out)
    src = starfile.read(star)
    np.testing.assert_allclose(exp["rlnOriginXAngst"], src["rlnOriginX"] * 1.5, rtol=1e-12)
    np.testing.assert_allclose(exp["rlnOriginYAngst"], src["rlnOriginY"] * 1.5, rtol=1e-12)
    assert exp.loc[0, "rlnOriginXAngst"] == 3.0
    voltage_of_group = dict(
        zip(exp_optics["rlnOpticsGroup"], exp_optics["rlnVoltage"], strict=True)
    )
    np.testing.assert_array_equal(exp["rlnOpticsGroup"].map(voltage_of_group), src["rlnVoltage"])
    for label in ("rlnDefocusU", "rlnMyCustomThing", "rlnMyCustomText", "rlnMicrographName"):
        assert_same_column(src[label], exp[label], label)
    assert exp_optics["rlnImageSize"].tolist() == [16, 16]
    subsets = exp["rlnRandomSubset"].to_numpy()  # not in a 3.0 file: assigned, balanced
    assert set(subsets) == {1, 2} and abs((subsets == 1).sum() - (subsets == 2).sum()) <= 1

    got = exported_images(out, exp["rlnImageName"])
    want = np.stack([image_of(stacks, star.parent, n) for n in src["rlnImageName"]])
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_stack_paths_fall_back_to_current_folder(tmp_path, monkeypatch):
    # RELION project layout: STAR in Select/job010/, names relative to the project folder
    star, _, stacks = make_dataset(tmp_path, n_particles=12, star_name="Select/job010/p.star")
    monkeypatch.chdir(tmp_path)
    idx, paths = parse_image_names(starfile.read(star)["particles"]["rlnImageName"], star)
    assert all(Path(p).is_file() for p in paths) and idx.min() >= 0
    store = import_particles(star, tmp_path / "p.zarr", progress=False)
    names = store.read_field("rlnImageName")
    want = np.stack([image_of(stacks, tmp_path, n) for n in names])
    np.testing.assert_array_equal(store.read_chunk(0, 12).images, want)


def test_import_does_not_depend_on_chunking_or_workers(tmp_path):
    star, _, _ = make_dataset(tmp_path / "proj", n_particles=17)
    stores = [
        import_particles(star, tmp_path / f"p{c}_{w}.zarr", chunk_size=c, workers=w, progress=False)
        for c, w in ((1, 1), (5, 2), (17, 3))
    ]
    ref = stores[0].read_chunk(0, 17)
    for store in stores[1:]:
        chunk = store.read_chunk(0, 17)
        np.testing.assert_array_equal(chunk.images, ref.images)
        assert chunk.metadata.keys() == ref.metadata.keys()
        for label, values in ref.metadata.items():
            np.testing.assert_array_equal(chunk.metadata[label], values, err_msg=label)


def test_parse_image_names_counts_from_one(tmp_path):
    (tmp_path / "s.mrcs").touch()
    idx, paths = parse_image_names(["000001@s.mrcs", "12@s.mrcs", "s.mrcs"], tmp_path / "a.star")
    assert idx.tolist() == [0, 11, 0]
    assert set(paths) == {str(tmp_path / "s.mrcs")}


def test_export_stacks_dir_elsewhere_and_images_per_stack(tmp_path):
    star, _, stacks = make_dataset(tmp_path / "proj", n_particles=10)
    import_particles(star, tmp_path / "p.zarr", chunk_size=3, progress=False)
    out = tmp_path / "out" / "e.star"
    rc = main(
        ["export", str(tmp_path / "p.zarr"), str(out), "--stacks-dir", str(tmp_path / "stk")]
        + ["--images-per-stack", "4"]
    )
    assert rc == 0
    exp, _ = read_exported(out)
    assert exp["rlnImageName"].iloc[0] == "000001@../stk/particles_000001.mrcs"
    assert sorted(p.name for p in (tmp_path / "stk").glob("*.mrcs")) == [
        f"particles_00000{k}.mrcs" for k in (1, 2, 3)
    ]
    got = exported_images(out, exp["rlnImageName"])
    want = np.stack([image_of(stacks, star.parent, n) for n in exp["rlnImageOriginalName"]])
    np.testing.assert_array_equal(got, want)


def test_export_of_simulated_store_has_no_truth_and_new_names(tmp_path):
    n = 9
    store = create_store(
        tmp_path / "s.zarr",
        n,
        16,
        2.0,
        [{"rlnOpticsGroup": 1, "rlnVoltage": 300.0}],
        fields={"rlnDefocusU": np.float32},
        chunk_size=4,
        truth_fields={"rlnAngleRot": np.float64},
    )
    images = np.random.default_rng(1).normal(size=(n, 16, 16)).astype(np.float32)
    store.write_region(
        0,
        images=images,
        metadata={"rlnDefocusU": np.linspace(1e4, 2e4, n, dtype=np.float32)},
        truth={"rlnAngleRot": np.arange(n, dtype=float)},
    )
    store.write_region(0, metadata={"rlnRandomSubset": balanced_subsets(n)})
    star = export_store(tmp_path / "s.zarr", tmp_path / "sim.star")
    exp, optics = read_exported(star)
    assert "rlnAngleRot" not in exp.columns and "rlnImageOriginalName" not in exp.columns
    assert optics.loc[0, "rlnImagePixelSize"] == 2.0 and optics.loc[0, "rlnImageSize"] == 16
    np.testing.assert_array_equal(
        exp["rlnDefocusU"].astype(np.float32), np.linspace(1e4, 2e4, n, dtype=np.float32)
    )
    with mrcfile.open(tmp_path / "sim_stacks" / "particles_000001.mrcs") as mrc:
        assert mrc.voxel_size.x == pytest.approx(2.0) and mrc.is_image_stack()
    stacks = sorted((tmp_path / "sim_stacks").glob("*.mrcs"))
    got = np.concatenate([mrcfile.read(p).reshape(-1, 16, 16) for p in stacks])
    np.testing.assert_array_equal(got, images)


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    star, _, _ = make_dataset(tmp_path / "proj", n_particles=10)
    import_particles(star, tmp_path / "p.zarr", chunk_size=3, progress=False)
    import streamem.io.relion_export as relion

    real = relion._write_stack

    def flaky(store_path, start, stop, out, pixel):
        if start >= 6:
            raise OSError("disk full")
        return real(store_path, start, stop, out, pixel)

    monkeypatch.setattr(relion, "_write_stack", flaky)
    with pytest.raises(OSError):
        export_store(tmp_path / "p.zarr", tmp_path / "out" / "e.star")
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_ctf_logs_a_warning(tmp_path, caplog):
    star, table, _ = make_dataset(tmp_path, n_particles=8)
    blocks = starfile.read(star, always_dict=True)
    blocks["particles"] = blocks["particles"].drop(columns=["rlnDefocusU", "rlnDefocusV"])
    starfile.write(blocks, star)
    with caplog.at_level(logging.WARNING):
        read_particles_star(star)
    assert "rlnDefocusU" in caplog.text and "CTF" in caplog.text


def test_write_star_keeps_floats_exactly(tmp_path):
    values = np.array([1e-7, 0.1, 2.5e10, -123456.789012345, np.pi])
    write_star(
        tmp_path / "x.star",
        {"general": {"rlnTiny": 1e-9, "rlnText": "a b"}, "table": pd.DataFrame({"rlnV": values})},
    )
    blocks = starfile.read(tmp_path / "x.star", always_dict=True)
    np.testing.assert_array_equal(blocks["table"]["rlnV"], values)
    assert blocks["general"] == {"rlnTiny": 1e-9, "rlnText": "a b"}
