"""Bad input to ``streamem import``: one line on stderr naming the file, exit 2, nothing left.

Each case runs the real CLI (``streamem.cli.main``) on a small RELION set in tmp_path.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from _relion_data import make_dataset

from streamem.cli import main
from streamem.io.store import ParticleStore


@pytest.fixture
def dataset(tmp_path):
    star, table, stacks = make_dataset(tmp_path / "proj", n_particles=24, n_stacks=3)
    return star


def out_dir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir(exist_ok=True)
    return d


def run_import(capsys, star, out, *extra) -> tuple[int, list[str]]:
    rc = main(["import", str(star), str(out), *extra])
    err = capsys.readouterr().err
    return rc, err.splitlines()


def assert_clean_failure(rc, lines, *words, out: Path):
    assert rc == 2
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if ".partial" in p.name]
    assert leftovers == []


def stack(star: Path, k: int) -> Path:
    return star.parent / f"Extract/job007/Movies/mic{k:03d}.mrcs"


def set_pixel(path: Path, image: int, value: float) -> None:
    with warnings.catch_warnings(), mrcfile.open(path, mode="r+") as mrc:
        warnings.simplefilter("ignore")  # mrcfile warns about the NaN we are planting
        data = np.array(mrc.data)
        data[image, 3, 5] = value
        mrc.set_data(data)


def rewrite_particles(star: Path, edit) -> None:
    blocks = starfile.read(star, always_dict=True)
    blocks["particles"] = edit(blocks["particles"])
    starfile.write(blocks, star)


def test_missing_stack(tmp_path, capsys, dataset):
    stack(dataset, 2).unlink()
    out = out_dir(tmp_path) / "p.zarr"
    rc, lines = run_import(capsys, dataset, out)
    assert_clean_failure(rc, lines, "mic002.mrcs", "not found", out=out)


def test_truncated_stack(tmp_path, capsys, dataset):
    path = stack(dataset, 2)
    os.truncate(path, path.stat().st_size - 300)
    out = out_dir(tmp_path) / "p.zarr"
    rc, lines = run_import(capsys, dataset, out)
    assert_clean_failure(rc, lines, "mic002.mrcs", "truncated", out=out)


def test_index_past_end_of_stack(tmp_path, capsys, dataset):
    def edit(df):
        df.loc[5, "rlnImageName"] = "000099@Extract/job007/Movies/mic001.mrcs"
        return df

    rewrite_particles(dataset, edit)
    out = out_dir(tmp_path) / "p.zarr"
    rc, lines = run_import(capsys, dataset, out)
    assert_clean_failure(rc, lines, "mic001.mrcs", "image 99", "past the end", out=out)


def test_star_without_image_name(tmp_path, capsys, dataset):
    rewrite_particles(dataset, lambda df: df.drop(columns=["rlnImageName"]))
    out = out_dir(tmp_path) / "p.zarr"
    rc, lines = run_import(capsys, dataset, out)
    assert_clean_failure(rc, lines, "particles.star", "no rlnImageName", out=out)


def test_star_without_ctf_warns_and_imports(tmp_path, capsys, caplog, dataset):
    rewrite_particles(dataset, lambda df: df.drop(columns=["rlnDefocusU", "rlnDefocusV"]))
    out = out_dir(tmp_path) / "p.zarr"
    with caplog.at_level(logging.WARNING):
        rc, _ = run_import(capsys, dataset, out)
    assert rc == 0 and out.is_dir()
    assert "no CTF columns" in caplog.text and "particles.star" in caplog.text


def test_star_without_ctf_fails_with_require_ctf(tmp_path, capsys, dataset):
    rewrite_particles(dataset, lambda df: df.drop(columns=["rlnDefocusU", "rlnDefocusV"]))
    out = out_dir(tmp_path) / "p.zarr"
    rc, lines = run_import(capsys, dataset, out, "--require-ctf")
    assert_clean_failure(rc, lines, "particles.star", "no CTF columns", "rlnDefocusU", out=out)


def test_mixed_box_sizes(tmp_path, capsys):
    star, _, _ = make_dataset(tmp_path / "proj", shapes=[(16, 16), (16, 16), (18, 18)])
    out = out_dir(tmp_path) / "p.zarr"
    rc, lines = run_import(capsys, star, out)
    # whichever stack the STAR file names first is the reference
    assert_clean_failure(rc, lines, "mic003.mrcs", "differs from", "18 px", "16 px", out=out)


def test_non_square_images(tmp_path, capsys):
    star, _, _ = make_dataset(tmp_path / "proj", shapes=[(16, 16), (16, 20), (16, 16)])
    out = out_dir(tmp_path) / "p.zarr"
    rc, lines = run_import(capsys, star, out)
    assert_clean_failure(rc, lines, "mic002.mrcs", "20 x 16", "not square", out=out)


@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_pixels(tmp_path, capsys, dataset, value, word):
    set_pixel(stack(dataset, 2), 2, value)
    out = out_dir(tmp_path) / "p.zarr"
    rc, lines = run_import(capsys, dataset, out, "--chunk-size", "5")
    assert_clean_failure(rc, lines, "mic002.mrcs", "image 3", f"{word} pixels", out=out)


def test_failure_mid_import_leaves_nothing(tmp_path, capsys, monkeypatch, dataset):
    # NaN in the middle chunk (6 chunks, one worker): other chunks are written before it fails
    middle = starfile.read(dataset, always_dict=True)["particles"]["rlnImageName"].iloc[13]
    idx, rel = middle.split("@")
    set_pixel(dataset.parent / rel, int(idx) - 1, np.nan)
    written = []
    real = ParticleStore.write_region

    def spy(self, start, images=None, **kw):
        if images is not None:
            written.append(start)
        return real(self, start, images=images, **kw)

    monkeypatch.setattr(ParticleStore, "write_region", spy)
    out = out_dir(tmp_path) / "p.zarr"
    rc, lines = run_import(capsys, dataset, out, "--chunk-size", "4", "--workers", "1")
    assert_clean_failure(rc, lines, rel, f"image {int(idx)}", "NaN", out=out)
    assert len(written) >= 2  # it really failed halfway, with chunks already on disk


def test_optics_image_size_disagrees_with_stacks(tmp_path, capsys, dataset):
    blocks = starfile.read(dataset, always_dict=True)
    blocks["optics"]["rlnImageSize"] = 20
    starfile.write(blocks, dataset)
    out = out_dir(tmp_path) / "p.zarr"
    rc, lines = run_import(capsys, dataset, out)
    assert_clean_failure(rc, lines, "particles.star", "rlnImageSize 20", "16 px", out=out)


def test_optics_groups_with_different_pixel_sizes(tmp_path, capsys, dataset):
    blocks = starfile.read(dataset, always_dict=True)
    blocks["optics"]["rlnImagePixelSize"] = [1.5, 1.2]
    starfile.write(blocks, dataset)
    out = out_dir(tmp_path) / "p.zarr"
    rc, lines = run_import(capsys, dataset, out)
    assert_clean_failure(rc, lines, "particles.star", "different pixel sizes", out=out)


def test_existing_output_is_untouched(tmp_path, capsys, dataset):
    out = out_dir(tmp_path) / "p.zarr"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, lines = run_import(capsys, dataset, out)
    assert rc == 2 and len(lines) == 1
    assert "p.zarr" in lines[0] and "exists" in lines[0] and "--overwrite" in lines[0]
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert [p.name for p in out.parent.iterdir()] == ["p.zarr"]


def test_overwrite_replaces_existing_output(tmp_path, capsys, dataset):
    out = out_dir(tmp_path) / "p.zarr"
    assert run_import(capsys, dataset, out)[0] == 0  # --overwrite replaces only streamem's
    (out / "keep.txt").write_text("old")
    rc, _ = run_import(capsys, dataset, out, "--overwrite")
    assert rc == 0 and not (out / "keep.txt").exists()


def test_unwritable_output_folder(tmp_path, capsys, dataset):
    if os.geteuid() == 0:
        # root ignores permissions; a path under a regular file is unwritable for everyone
        blocker = tmp_path / "somefile"
        blocker.write_text("not a folder")
        out = blocker / "p.zarr"
        rc, lines = run_import(capsys, dataset, out)
        assert rc == 2 and len(lines) == 1 and "Traceback" not in lines[0]
        assert "somefile" in lines[0] and "not a folder" in lines[0]
        assert blocker.read_text() == "not a folder"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        try:
            out = locked / "p.zarr"
            rc, lines = run_import(capsys, dataset, out)
            assert_clean_failure(rc, lines, "locked", "not writable", out=out)
        finally:
            locked.chmod(0o700)
