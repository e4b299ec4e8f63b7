"""Every option validated before work starts (issue 14, part 4).

Each bad option of each command goes through the real CLI (``streamem.cli.main``):
exit 2, exactly one stderr line naming the option and the problem, no traceback, no
output path created, and the inputs (a tiny simulated store, its truth map, its RELION
export) byte-identical afterwards. The options dataclasses refuse the same values
from Python.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import shutil
from pathlib import Path

import pytest

from streamem.cli import main
from streamem.core.symmetry import symmetry_matrices
from streamem.em.classify2d import Class2DOptions
from streamem.em.classify3d import Class3DOptions
from streamem.em.refine import RefineOptions
from streamem.errors import InputError


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder with ``store.zarr`` (50 particles, box 16, 1.5 Å/px), its truth map
    (``ref.mrc``, also ``half1.mrc``/``half2.mrc``), ``relion/particles.star`` and an
    empty ``run/`` folder."""
    d = tmp_path_factory.mktemp("inputs")
    argv = ["simulate", str(d / "store.zarr"), "--n-particles", "50", "--box", "16"]
    assert main([*argv, "--workers", "1", "--relion", str(d / "relion")]) == 0
    truth = d / "store_truth_class001.mrc"
    for name in ("ref.mrc", "half1.mrc", "half2.mrc"):
        shutil.copy(truth, d / name)
    (d / "run").mkdir()
    return d


def tree_digest(root: Path) -> str:
    """One hash over every path and file's bytes under ``root``."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# Command lines with {i} for the inputs folder and {o} for the output; each case adds
# one bad option and names the text its error line must hold.
JOB = "--no-cluster"
COMMANDS = {
    "refine3d": "refine3d {i}/store.zarr --ref {i}/ref.mrc --out {o} " + JOB,
    "class3d": "class3d {i}/store.zarr --ref {i}/ref.mrc --k 2 --out {o} " + JOB,
    "class2d": "class2d {i}/store.zarr --k 2 --out {o} " + JOB,
    "reconstruct": "reconstruct {i}/store.zarr --truth --out {o} " + JOB,
    "postprocess": "postprocess {i}/half1.mrc {i}/half2.mrc --out {o}",
    "mask-create": "mask-create {i}/ref.mrc --threshold 0.1 --out {o}",
    "local-resolution": "local-resolution {i}/half1.mrc {i}/half2.mrc --out {o}",
    "pick": "pick {i}/ref.mrc --reference {i}/ref.mrc --angpix 1.5 --out {o}",
    "pick-log": "pick {i}/ref.mrc --log --angpix 1.5 --out {o}",
    "extract": "extract {i}/relion/particles.star {i}/run {o} --box 16",
    "simulate": "simulate {o} --n-particles 10 --box 16",
    "simulate-micrographs": "simulate-micrographs {o} --box 16 --size 64",
    "select": "select {i}/store.zarr {o} --run {i}/run",
    "import": "import {i}/relion/particles.star {o}",
    "export": "export {i}/store.zarr {o}",
}

CASES = [
    # refine3d: the reported ones first
    ("refine3d", "--particle-diameter=-50", "--particle-diameter must be positive (Å), got -50"),
    ("refine3d", "--particle-diameter 500", "--particle-diameter 500 Å is larger than the box"),
    ("refine3d", "--iterations 0", "--iterations must be >= 2"),
    ("refine3d", "--iterations 1", "--iterations must be >= 2"),
    ("refine3d", "--offset-step 0", "--offset-step must be positive"),
    ("refine3d", "--offset-range=-1", "--offset-range must be >= 0"),
    ("refine3d", "--healpix-order=-1", "--healpix-order must be a HEALPix order in 0..7"),
    ("refine3d", "--healpix-order 9", "--healpix-order must be a HEALPix order in 0..7"),
    ("refine3d", "--ini-high 0", "--ini-high must be positive"),
    ("refine3d", "--ini-high nan", "--ini-high must be a finite number"),
    ("refine3d", "--sym X5", "--sym: unknown symmetry group 'X5'"),
    ("refine3d", "--sym C0", "--sym: unknown symmetry group 'C0'"),
    ("refine3d", "--sym D1", "--sym: unknown symmetry group 'D1'"),
    ("refine3d", "--tau2-fudge 0", "--tau2-fudge must be positive"),
    ("refine3d", "--auto-local-healpix-order=-1", "--auto-local-healpix-order must be >= 0"),
    ("refine3d", "--healpix-order two", "argument --healpix-order: invalid int value"),
    ("class3d", "--k 0", "--k must be >= 1"),
    ("class3d", "--iterations 0", "--iterations must be >= 1"),
    ("class3d", "--healpix-order 8", "--healpix-order must be a HEALPix order"),
    ("class3d", "--local 0", "--local must be positive"),
    ("class3d", "--strict-highres=-4", "--strict-highres must be positive"),
    ("class3d", "--lowres-iterations=-1", "--lowres-iterations must be >= 0"),
    ("class3d", "--perturbation=-0.1", "--perturbation must be >= 0"),
    ("class3d", "--seed=-1", "--seed must be >= 0"),
    ("class3d", "--sym X5", "--sym: unknown symmetry group 'X5'"),
    ("class3d", "--offset-step inf", "--offset-step must be a finite number"),
    ("class3d", "--particle-diameter 100", "--particle-diameter 100 Å is larger than the box"),
    ("class2d", "--k 0", "--k must be >= 1"),
    ("class2d", "--psi-step 0", "--psi-step must be in (0, 360]"),
    ("class2d", "--offset-step 0", "--offset-step must be positive"),
    ("class2d", "--tau2-fudge=-2", "--tau2-fudge must be positive"),
    ("class2d", "--particle-diameter 1000", "--particle-diameter 1000 Å is larger than the box"),
    ("class2d", "--seed=-1", "--seed must be >= 0"),
    ("reconstruct", "--maxres=-5", "--maxres must be positive (Å), got -5"),
    ("reconstruct", "--sym X5", "--sym: unknown symmetry group 'X5'"),
    ("reconstruct", "--subset 3", "argument --subset: invalid choice"),
    ("postprocess", "--randomize-at-fsc 0", "--randomize-at-fsc must be in (0, 1]"),
    ("postprocess", "--autob-highres 20", "--autob-highres (20 Å) must be finer (smaller)"),
    ("postprocess", "--autob-lowres 0", "--autob-lowres must be positive"),
    ("postprocess", "--bfactor nan", "--bfactor must be a finite number"),
    ("postprocess", "--mtf-angpix 0", "--mtf-angpix must be positive"),
    ("mask-create", "--soft-edge=-1", "--soft-edge must be >= 0"),
    ("mask-create", "--lowpass 0", "--lowpass must be positive"),
    ("mask-create", "--angpix 0", "--angpix must be positive"),
    ("local-resolution", "--sampling 0", "--sampling must be positive"),
    ("local-resolution", "--maskrad=-1", "--maskrad must be positive"),
    ("pick", "--psi-step 0", "--psi-step must be in (0, 360]"),
    ("pick", "--healpix-order=-1", "--healpix-order must be a HEALPix order"),
    ("pick", "--sym X5", "--sym: unknown symmetry group 'X5'"),
    ("pick", "--n-workers 0", "--n-workers must be >= 1"),
    ("pick", "--lowpass=-1", "--lowpass must be >= 0"),
    ("pick", "--template-scale 0", "--template-scale must be positive"),
    (
        "pick-log",
        "--log-diameter-min 200 --log-diameter-max 100",
        "--log-diameter-min (200 Å) is larger than --log-diameter-max (100 Å)",
    ),
    ("extract", "--box 15", "--box must be an even number of pixels >= 4"),
    ("extract", "--bin 0.5", "--bin must be >= 1"),
    ("extract", "--chunk-size 0", "--chunk-size must be >= 1"),
    ("extract", "--bg-radius 0", "--bg-radius must be positive"),
    ("simulate", "--n-particles 0", "--n-particles must be >= 1"),
    ("simulate", "--box 4", "--box must be >= 8"),
    ("simulate", "--angpix 0", "--angpix must be positive"),
    ("simulate", "--snr 0", "--snr must be positive"),
    ("simulate", "--chunk-size 0", "--chunk-size must be >= 1"),
    ("simulate", "--junk 1.5", "--junk must be in [0, 1]"),
    ("simulate", "--amplitude-contrast 1", "--amplitude-contrast must be in [0, 1)"),
    ("simulate", "--defocus=-5,100", "--defocus must be >= 0"),
    ("simulate-micrographs", "--n-micrographs 0", "--n-micrographs must be >= 1"),
    ("simulate-micrographs", "--size 8", "--size 8 px is smaller than --box 16"),
    ("select", "--min-size=-1", "--min-size must be >= 0"),
    ("select", "--max-resolution 0", "--max-resolution must be positive"),
    ("select", "--classes 0,2", "--classes must be class numbers >= 1"),
    ("import", "--chunk-size 0", "--chunk-size must be >= 1"),
    ("import", "--seed=-3", "--seed must be >= 0"),
    ("export", "--images-per-stack 0", "--images-per-stack must be >= 1"),
]


@pytest.mark.parametrize("command, bad, expected", CASES, ids=[f"{c}:{b}" for c, b, _ in CASES])
def test_bad_option_is_one_line_before_any_work(inputs, tmp_path, capsys, command, bad, expected):
    out = tmp_path / ("out.mrc" if command in ("reconstruct", "mask-create") else "out")
    before = tree_digest(inputs)
    argv = COMMANDS[command].format(i=inputs, o=out).split() + bad.split()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    name = "pick" if command == "pick-log" else command
    assert lines[0].startswith(f"streamem {name}: error: "), err
    assert expected in lines[0], err
    assert "Traceback" not in err
    assert not out.exists(), f"{out} was created"
    assert list(tmp_path.iterdir()) == [], "something was written next to the output"
    assert tree_digest(inputs) == before, "an input changed"


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: RefineOptions(particle_diameter_A=-50), "--particle-diameter must be positive"),
        (lambda: RefineOptions(max_iterations=0), "--iterations must be >= 2"),
        (lambda: RefineOptions(offset_step_px=0), "--offset-step must be positive"),
        (lambda: RefineOptions(healpix_order=-1), "--healpix-order must be a HEALPix order"),
        (lambda: RefineOptions(healpix_order=2.5), "--healpix-order must be an integer"),
        (lambda: RefineOptions(ini_high_A=0), "--ini-high must be positive"),
        (lambda: RefineOptions(ini_high_A=math.nan), "--ini-high must be a finite number"),
        (lambda: RefineOptions(symmetry="X5"), "unknown symmetry group 'X5'"),
        (lambda: RefineOptions(padding_factor=0), "padding_factor must be >= 1"),
        (lambda: RefineOptions(split_every=1), "split_every must be >= 2"),
        (lambda: Class3DOptions(strict_highres_A=0), "--strict-highres must be positive"),
        (lambda: Class3DOptions(local_sigma_deg=-1), "--local must be positive"),
        (lambda: Class3DOptions(symmetry="D0"), "unknown symmetry group 'D0'"),
        (lambda: Class2DOptions(particle_diameter_A=0), "--particle-diameter must be positive"),
        (lambda: Class2DOptions(adaptive_fraction=0), "adaptive_fraction must be in (0, 1]"),
    ],
)
def test_options_dataclasses_refuse_bad_values(make, expected):
    with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_options_box_check_from_python():
    RefineOptions(particle_diameter_A=24.0).check_box(16, 1.5)  # exactly the box: fine
    with pytest.raises(InputError, match="larger than the box"):
        RefineOptions(particle_diameter_A=24.1).check_box(16, 1.5)
    with pytest.raises(InputError, match="larger than the box"):
        Class3DOptions(particle_diameter_A=30).check_box(16, 1.5)


def test_symmetry_name_error_is_input_and_value_error_and_pickles():
    with pytest.raises(ValueError) as info:
        symmetry_matrices("X5")
    assert isinstance(info.value, InputError)
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is type(info.value)
    assert again.one_line() == info.value.one_line()
    assert symmetry_matrices("c01").shape == (1, 3, 3)  # spelling normalised, not refused
    assert symmetry_matrices("D60").shape == (120, 3, 3)
