"""The streamed STAR writers: the same text as the one-DataFrame writer, block by block.

``write_data_star`` (run_itNNN_data.star) and ``export_store`` read the store and the
results a block of rows at a time; the text must be what writing the whole table at
once gives (the reference below is the writer as it was before streaming), and
``starfile`` must read it back with every value.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import starfile

from streamem.io.relion import write_star
from streamem.io.relion_export import export_store
from streamem.io.results import (
    RESULT_FIELDS,
    StoredResults,
    create_results_arrays,
    write_data_star,
    write_results,
)
from streamem.io.store import ParticleStore, create_store

N, BOX, CHUNK = 301, 8, 64


def _store(tmp_path) -> ParticleStore:
    rng = np.random.default_rng(5)
    fields = {
        "rlnDefocusU": np.float64,
        "rlnDefocusV": np.float64,
        "rlnDefocusAngle": np.float64,
        "rlnMicrographName": str,
        "rlnGroupNumber": np.int64,
    }
    optics = [{"rlnOpticsGroup": 1, "rlnImagePixelSize": 1.5, "rlnVoltage": 300.0}]
    store = create_store(tmp_path / "p.zarr", N, BOX, 1.5, optics, fields, chunk_size=CHUNK)
    names = np.array([f"mic {i % 7}" if i % 5 else "" for i in range(N)], dtype=object)
    meta = {
        "rlnOpticsGroup": np.ones(N, np.int32),
        "rlnRandomSubset": (np.arange(N) % 2 + 1).astype(np.int32),
        # values whose shortest text is long, tiny or huge: formatting must not round them
        "rlnDefocusU": rng.uniform(5e3, 3e4, N),
        "rlnDefocusV": rng.uniform(5e3, 3e4, N) * 1e-12,
        "rlnDefocusAngle": np.where(np.arange(N) % 11 == 0, np.nan, rng.uniform(-180, 180, N)),
        "rlnMicrographName": names,
        "rlnGroupNumber": np.arange(N, dtype=np.int64) * 1_000_003,
    }
    images = rng.standard_normal((N, BOX, BOX)).astype(np.float32)
    store.write_region(0, images=images, metadata=meta)
    return store


def _results() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(6)
    out = {label: rng.uniform(-180, 180, N) for label in RESULT_FIELDS}
    out["rlnClassNumber"] = rng.integers(1, 4, N).astype(np.int32)
    return out


def _reference_data_star(path, store: ParticleStore, results: dict) -> None:
    """The writer before streaming: the whole table as one DataFrame."""
    table = store.read_table()
    table.update(results)
    if "rlnImageName" not in table:
        table["rlnImageName"] = np.array(
            [f"{i + 1:06d}@{store.path.name}" for i in range(store.n_particles)], dtype=object
        )
    write_star(
        path, {"optics": pd.DataFrame(store.optics_groups), "particles": pd.DataFrame(table)}
    )


def _body(path) -> list[str]:
    """The file's lines without streamem's mark and starfile's ``# Created by ... at TIME``."""
    lines = path.read_text().splitlines()
    if lines[0].startswith("# written by streamem"):
        lines = lines[1:]
    assert lines[0].startswith("# Created by the starfile Python package")
    return lines[1:]


def test_streamed_data_star_is_the_one_table_text(tmp_path):
    store = _store(tmp_path)
    results = _results()
    ref = tmp_path / "ref.star"
    _reference_data_star(ref, store, results)
    # blocks of 50 rows: not aligned to the store's chunks (64), last block partial
    streamed = tmp_path / "streamed.star"
    write_data_star(streamed, store, results, rows_per_block=50)
    assert _body(streamed) == _body(ref)
    assert len(_body(ref)) > N  # one line per particle, plus headers

    # the same from the results Zarr, as the engine writes it
    res_path = tmp_path / "particles.zarr"
    create_results_arrays(res_path, 3, N, CHUNK)
    for s in range(0, N, CHUNK):
        write_results(str(res_path), 3, s, {k: v[s : s + CHUNK] for k, v in results.items()})
    from_zarr = tmp_path / "from_zarr.star"
    write_data_star(from_zarr, store, StoredResults(res_path, 3), rows_per_block=97)
    assert _body(from_zarr) == _body(ref)


def test_streamed_data_star_reads_back_with_starfile(tmp_path):
    store = _store(tmp_path)
    results = _results()
    path = tmp_path / "run_it003_data.star"
    write_data_star(path, store, results, rows_per_block=40)
    blocks = starfile.read(path, always_dict=True)
    particles = blocks["particles"]
    assert list(blocks) == ["optics", "particles"]
    assert len(particles) == N
    np.testing.assert_array_equal(particles["rlnAngleRot"].to_numpy(), results["rlnAngleRot"])
    np.testing.assert_array_equal(particles["rlnClassNumber"].to_numpy(), results["rlnClassNumber"])
    meta = store.read_table()
    np.testing.assert_array_equal(particles["rlnDefocusV"].to_numpy(), meta["rlnDefocusV"])
    np.testing.assert_array_equal(particles["rlnGroupNumber"].to_numpy(), meta["rlnGroupNumber"])
    assert particles["rlnImageName"].iloc[-1] == f"{N:06d}@p.zarr"
    assert blocks["optics"]["rlnImagePixelSize"].iloc[0] == 1.5


def test_streamed_export_is_the_one_table_text(tmp_path, monkeypatch):
    import streamem.io.relion_export as relion_export

    store = _store(tmp_path)
    whole = tmp_path / "whole" / "out.star"
    export_store(store.path, whole, images_per_stack=30, workers=1)
    monkeypatch.setattr(relion_export, "STAR_ROWS_PER_BLOCK", 45)  # 7 blocks, stacks of 30
    blocks = tmp_path / "blocks" / "out.star"
    export_store(store.path, blocks, images_per_stack=30, workers=1)
    assert _body(blocks) == _body(whole)
    table = starfile.read(blocks, always_dict=True)["particles"]
    assert len(table) == N
    assert table["rlnImageName"].iloc[30] == "000001@out_stacks/particles_000002.mrcs"
    assert table["rlnImageName"].iloc[N - 1] == f"{N - 300:06d}@out_stacks/particles_000011.mrcs"
