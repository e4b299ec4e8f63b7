"""``streamem info`` describes a store: particle count, box, pixel size, optics, fields."""

from __future__ import annotations

import re

from _relion_data import make_dataset

from streamem.cli import main
from streamem.io.importer import import_particles


def test_info_describes_imported_store(tmp_path, capsys):
    star, _, _ = make_dataset(tmp_path / "proj", n_particles=21, box=16, pixel_A=1.5)
    import_particles(star, tmp_path / "p.zarr", chunk_size=8, progress=False)
    capsys.readouterr()
    assert main(["info", str(tmp_path / "p.zarr")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"particles\s+21\b", out)
    assert re.search(r"box\s+16 x 16 px", out)
    assert re.search(r"pixel size\s+1\.5000 A", out)
    assert re.search(r"chunks\s+3 of 8 particles", out)
    assert re.search(r"CTF\s+yes", out) and re.search(r"poses\s+yes", out)
    assert "rlnVoltage=300.0" in out and "rlnVoltage=200.0" in out  # both optics groups
    assert "rlnMyCustomThing" in out  # unknown columns are fields too


def test_info_on_a_folder_that_is_not_a_store(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    assert main(["info", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "plain" in err[0] and "Traceback" not in err[0]
