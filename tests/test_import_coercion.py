"""``streamem import`` reads RELION's numeric labels as numbers and refuses text in them.

A non-numeric value in a numeric label (rlnDefocusU, rlnAnglePsi, the optics'
rlnVoltage ...) is one line on stderr naming the STAR file, the row and the label,
exit 2, and no store. Numeric text such as ``1.5e4`` is a number; integer labels
(rlnClassNumber, rlnOpticsGroup, rlnRandomSubset) are integers in the store.
Each case runs the real CLI on a small RELION set written in tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import starfile
from _relion_data import make_dataset

from streamem.cli import main
from streamem.io.relion import read_particles_star
from streamem.io.store import ParticleStore


@pytest.fixture
def dataset(tmp_path):
    star, _, _ = make_dataset(tmp_path / "proj", n_particles=12, n_stacks=2)
    return star


def rewrite(star: Path, block: str, label: str, row: int, text: str) -> str:
    """Put ``text`` (as written, unquoted) into ``block``'s ``label`` at 0-based ``row``.

    Returns that row's rlnImageName (particles) or "" (optics). starfile would quote
    or type the value, so the STAR text itself is edited.
    """
    blocks = starfile.read(star, always_dict=True)
    table = blocks[block].copy()
    table[label] = table[label].astype(object)
    marker = "@@MARK@@"
    table.loc[row, label] = marker
    blocks[block] = table
    starfile.write(blocks, star)
    star.write_text(star.read_text().replace(marker, text))
    return str(table["rlnImageName"].iloc[row]) if "rlnImageName" in table else ""


def import_fails(capsys, star: Path, out: Path) -> str:
    rc = main(["import", str(star), str(out)])
    lines = capsys.readouterr().err.splitlines()
    assert rc == 2
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if ".partial" in p.name] == []
    return lines[0]


@pytest.mark.parametrize(
    ("label", "row", "text"),
    [("rlnDefocusU", 6, "abc"), ("rlnAnglePsi", 0, "12..5"), ("rlnClassNumber", 11, "two")],
)
def test_text_in_a_numeric_particle_label_is_refused(capsys, dataset, label, row, text):
    name = rewrite(dataset, "particles", label, row, text)
    line = import_fails(capsys, dataset, dataset.parent / "out.zarr")
    assert f"particles.star: row {row + 1} ({name}), {label}: '{text}' is not" in line


def test_a_fraction_in_an_integer_label_is_refused(capsys, dataset):
    rewrite(dataset, "particles", "rlnRandomSubset", 3, "1.5")
    line = import_fails(capsys, dataset, dataset.parent / "out.zarr")
    assert "row 4 (" in line and "rlnRandomSubset: '1.5' is not a whole number" in line


def test_text_in_the_optics_voltage_is_refused(capsys, dataset):
    rewrite(dataset, "optics", "rlnVoltage", 1, "300kV")
    line = import_fails(capsys, dataset, dataset.parent / "out.zarr")
    assert "particles.star: data_optics row 2, rlnVoltage: '300kV' is not a number" in line


def test_numeric_text_is_a_number_and_integer_labels_are_ints(dataset):
    rewrite(dataset, "particles", "rlnDefocusU", 2, "1.5e4")
    rewrite(dataset, "particles", "rlnClassNumber", 5, "3.0")  # a whole number, written as float
    rewrite(dataset, "optics", "rlnVoltage", 0, "3E2")
    out = dataset.parent / "out.zarr"
    assert main(["import", str(dataset), str(out)]) == 0
    store = ParticleStore(out)
    defocus = store.read_field("rlnDefocusU")
    assert defocus.dtype == np.float64 and defocus[2] == 15000.0
    for label in ("rlnClassNumber", "rlnOpticsGroup", "rlnRandomSubset"):
        assert store.read_field(label).dtype == np.int64, label
    assert store.read_field("rlnClassNumber")[5] == 3
    assert [g["rlnVoltage"] for g in store.optics_groups] == [300.0, 200.0]
    assert store.read_field("rlnMyCustomText").dtype == object  # unknown labels as they were


def test_relion30_file_coerces_before_building_optics(tmp_path):
    star, _, _ = make_dataset(tmp_path / "p30", n_particles=8, n_stacks=1, version="3.0")
    rewrite(star, next(iter(starfile.read(star, always_dict=True))), "rlnVoltage", 4, "3e2")
    particles, optics = read_particles_star(star)
    assert particles["rlnOpticsGroup"].dtype == np.int64
    assert optics["rlnVoltage"].dtype == np.float64
    assert sorted(optics["rlnVoltage"]) == [200.0, 300.0]  # "3e2" joined the 300 kV group
