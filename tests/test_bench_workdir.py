"""Benchmarks write only inside a fresh folder of their own under ``--workdir``."""

import json

from streamem.cli import main


def test_bench_refine_creates_its_workdir_and_removes_only_its_own_folder(tmp_path):
    workdir = tmp_path / "new" / "work"  # missing: created
    mine = tmp_path / "new" / "keep.txt"
    mine.parent.mkdir()
    mine.write_text("the user's")
    out = tmp_path / "r.json"
    argv = ["bench", "refine", "--particles", "20", "--box", "24", "--chunk-size", "10"]
    assert main([*argv, "--workdir", str(workdir), "--json", str(out)]) == 0
    assert [r["n"] for r in json.loads(out.read_text())] == [20, 200]
    assert workdir.is_dir() and list(workdir.iterdir()) == []  # its scratch folders are gone
    assert mine.read_text() == "the user's"
