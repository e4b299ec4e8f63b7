"""RELION's rules for optics values, each on a small STAR file written here
(streamem.io.relion_optics cites RELION's source for every rule)."""

from __future__ import annotations

import logging

import pytest
import starfile
from _relion_data import make_dataset

from streamem.cli import main
from streamem.errors import InputError
from streamem.io.relion import read_particles_star
from streamem.io.relion_optics import DEFAULT_AMPLITUDE_CONTRAST, detector_pixel_size_A
from streamem.io.store import ParticleStore


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def rewrite(star, edit) -> None:
    blocks = starfile.read(star, always_dict=True)
    edit(blocks)
    starfile.write(blocks, star)


def test_detector_pixel_size_is_relions_formula():
    # StarConverter::unifyPixelSize: angpix = 10000 * dstep / mag
    assert detector_pixel_size_A(14.0, 100000.0) == pytest.approx(1.4)
    assert detector_pixel_size_A(5.0, 37037.0) == pytest.approx(10000 * 5.0 / 37037.0)


def test_relion30_without_amplitude_contrast_uses_relions_default(tmp_path, caplog):
    star, _, _ = make_dataset(tmp_path, n_particles=10, version="3.0", pixel_A=1.5)
    rewrite(star, lambda b: b.__setitem__("", b[""].drop(columns=["rlnAmplitudeContrast"])))
    with caplog.at_level(logging.WARNING):
        particles, optics = read_particles_star(star)
    assert (optics["rlnAmplitudeContrast"] == DEFAULT_AMPLITUDE_CONTRAST).all()
    assert optics["rlnImagePixelSize"].to_numpy() == pytest.approx([1.5, 1.5])
    lines = warnings_of(caplog)
    q0 = [w for w in lines if "rlnAmplitudeContrast" in w]
    assert len(q0) == 1 and str(star) in q0[0] and "src/ctf.cpp" in q0[0]
    assert not any("without CTF correction" in w for w in lines)  # the CTF is corrected
    pix = [w for w in lines if "rlnDetectorPixelSize" in w]
    assert len(pix) == 1 and "1.5" in pix[0]
    # the store carries the value, so every job uses it
    assert main(["import", str(star), str(tmp_path / "p.zarr")]) == 0
    rows = ParticleStore(tmp_path / "p.zarr").optics_groups
    assert [r["rlnAmplitudeContrast"] for r in rows] == [DEFAULT_AMPLITUDE_CONTRAST] * 2


def test_relion31_optics_pixel_size_from_detector(tmp_path, caplog):
    star, _, _ = make_dataset(tmp_path, n_particles=8)

    def edit(blocks):
        optics = blocks["optics"].drop(columns=["rlnImagePixelSize"])
        optics["rlnDetectorPixelSize"] = [5.0, 5.0]
        optics["rlnMagnification"] = [40000.0, 25000.0]
        blocks["optics"] = optics

    rewrite(star, edit)
    with caplog.at_level(logging.WARNING):
        _, optics = read_particles_star(star)
    assert optics["rlnImagePixelSize"].to_numpy() == pytest.approx([1.25, 2.0])
    assert sum("rlnDetectorPixelSize" in w for w in warnings_of(caplog)) == 1


def test_ctf_premultiplied_is_refused_with_one_line(tmp_path, capsys):
    star, _, _ = make_dataset(tmp_path, n_particles=8)
    rewrite(star, lambda b: b["optics"].__setitem__("rlnCtfDataAreCtfPremultiplied", [0, 1]))
    with pytest.raises(InputError, match="optics group 2 .*Premultiplied = 1"):
        read_particles_star(star)
    assert main(["import", str(star), str(tmp_path / "p.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "premultiplied" in err[0] and not (tmp_path / "p.zarr").exists()
    rewrite(star, lambda b: b["optics"].__setitem__("rlnCtfDataAreCtfPremultiplied", [0, 0]))
    read_particles_star(star)  # 0 is plain images: accepted


def test_relion5_aberration_columns_carried_with_one_warning(tmp_path, caplog):
    star, _, _ = make_dataset(tmp_path, n_particles=8)
    extra = {
        "rlnBeamTiltX": [0.0, 0.3],
        "rlnBeamTiltY": [0.0, -0.2],
        "rlnOddZernike": ["[0,0,0,0,0,0]", "[0.47,0.41,34.3,0,0,10.7]"],
        "rlnEvenZernike": ["[0,0,0,0,0,0,0,0,0]", "[0,0,0,0,0,0,0,0,0]"],
        "rlnMagMat00": [1.0, 1.007],
        "rlnMagMat01": [0.0, 0.0077],
        "rlnMagMat10": [0.0, 0.0077],
        "rlnMagMat11": [1.0, 0.9937],
    }
    rewrite(star, lambda b: b.__setitem__("optics", b["optics"].assign(**extra)))
    with caplog.at_level(logging.WARNING):
        assert main(["import", str(star), str(tmp_path / "p.zarr")]) == 0
    lines = [w for w in warnings_of(caplog) if "ignored" in w]
    assert len(lines) == 1
    for label in ("rlnBeamTiltX", "rlnOddZernike", "rlnMagMat00", "rlnMagMat01"):
        assert label in lines[0]
    assert "rlnEvenZernike" not in lines[0]  # all zero: ignoring it changes nothing
    # carried: into the store and out again
    assert main(["export", str(tmp_path / "p.zarr"), str(tmp_path / "e.star")]) == 0
    optics = starfile.read(tmp_path / "e.star", always_dict=True)["optics"]
    for label, values in extra.items():
        got = optics[label].tolist()
        if isinstance(values[0], str):
            assert [str(v) for v in got] == values, label
        else:
            assert got == pytest.approx(values), label


def test_neutral_aberration_columns_do_not_warn(tmp_path, caplog):
    star, _, _ = make_dataset(tmp_path, n_particles=8)
    neutral = {"rlnBeamTiltX": [0.0, 0.0], "rlnMagMat00": [1.0, 1.0], "rlnMagMat01": [0.0, 0.0]}
    rewrite(star, lambda b: b.__setitem__("optics", b["optics"].assign(**neutral)))
    with caplog.at_level(logging.WARNING):
        read_particles_star(star)
    assert not [w for w in warnings_of(caplog) if "ignored" in w]
