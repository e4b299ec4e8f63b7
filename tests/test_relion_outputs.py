"""Outputs RELION and ChimeraX open (issue 18 item 4, issue 20 item 5): truth.star,
the angdist .bild (RELION's format), the ChimeraX script, run_data.star image names,
the angular-distribution, class-slice and class-size PNGs, and a refinement's
run_data.star read back by ``streamem reconstruct --poses``."""

from pathlib import Path

import numpy as np
import pytest
import starfile

from streamem.cli import main
from streamem.core.fsc import fsc
from streamem.em.angdist import class_direction_counts, direction_counts, pixel_directions
from streamem.em.classify3d import Class3DOptions, classify3d
from streamem.em.refine import RefineOptions, refine3d
from streamem.io.bild import angdist_bild, read_bild
from streamem.io.chimerax import ShownMap, chimerax_script, map_level
from streamem.io.importer import import_particles
from streamem.io.mrc import read_map
from streamem.io.relion import parse_image_names
from streamem.simulate.particles import simulate_particles, truth_volume_paths

BOX, PIXEL, N = 24, 5.0, 160


# -- pure functions -------------------------------------------------------------------


def test_direction_counts_bin_known_poses():
    rot, tilt = pixel_directions(3)
    # 5 particles on pixel 10's centre, 2 on pixel 500's, one NaN pose left out
    r = np.r_[np.full(5, rot[10]), np.full(2, rot[500]), np.nan]
    t = np.r_[np.full(5, tilt[10]), np.full(2, tilt[500]), 40.0]
    counts = direction_counts(r, t, order=3)
    assert counts.shape == (768,) and counts.sum() == 7
    assert counts[10] == 5 and counts[500] == 2
    # rot is periodic: -rot and 360 - rot are the same direction
    assert np.array_equal(direction_counts(r - 360, t, 3), counts)
    per_class = class_direction_counts(r, t, np.r_[np.ones(5), np.full(3, 2)], 2, order=3)
    assert per_class[0, 10] == 5 and per_class[1, 500] == 2 and per_class[0].sum() == 5


def test_angdist_bild_is_relions_format():
    rot, tilt = pixel_directions(2)
    counts = np.zeros(192, np.int64)
    counts[[3, 100, 150]] = [10, 5, 1]
    box, pixel = 32, 2.5
    radius_A = box * pixel / 2  # RELION: R = offset = ori_size * pixel_size / 2
    text = angdist_bild(counts, box, pixel)
    assert [line.split()[0] for line in text.splitlines()] == [".color", ".cylinder"] * 3
    path = Path(pytest.importorskip("tempfile").mkdtemp()) / "a.bild"
    path.write_text(text)
    bild = read_bild(path)
    centre = box * pixel / 2
    vec = bild["ends"] - bild["starts"]
    lengths = np.linalg.norm(vec, axis=1)
    # cylinders start at R from the map's centre, in Å
    assert np.allclose(np.linalg.norm(bild["starts"] - centre, axis=1), radius_A, atol=1e-2)
    # along the pixel's direction (cos rot sin tilt, sin rot sin tilt, cos tilt)
    r, t = np.deg2rad(rot[[3, 100, 150]]), np.deg2rad(tilt[[3, 100, 150]])
    expected = np.stack([np.cos(r) * np.sin(t), np.sin(r) * np.sin(t), np.cos(t)], 1)
    assert np.allclose(vec / lengths[:, None], expected, atol=1e-3)
    # lengths proportional to the counts, the longest 0.3 R
    assert np.allclose(lengths / lengths[0], [1.0, 0.5, 0.1], atol=1e-3)
    assert lengths[0] == pytest.approx(0.3 * radius_A, abs=1e-2)
    # colour from blue (few) to red (many): (c, 0, 1 - c), c larger for more
    c = bild["colors"]
    assert np.allclose(c[:, 1], 0) and np.allclose(c[:, 0] + c[:, 2], 1, atol=1e-3)
    assert c[0, 0] >= c[1, 0] > c[2, 0]  # 10 and 5 both clip at +5 sigma
    # RELION's colour scale: (count - mean) / std over all 192 directions, clipped to
    # [-1, 5], mapped to [0, 1]
    z = np.clip((np.array([10, 5, 1]) - counts.mean()) / counts.std(), -1, 5)
    assert np.allclose(c[:, 0], z / 6 + 1 / 6, atol=1e-3)
    assert np.allclose(bild["widths"], 0.5 * np.pi * radius_A * 15.0 / 360, atol=1e-2)


def test_map_level_and_chimerax_script():
    z, y, x = np.mgrid[:32, :32, :32] - 16
    ball = (np.sqrt(x**2 + y**2 + z**2) < 8).astype(np.float32)
    vol = ball + 0.01 * np.random.default_rng(0).standard_normal(ball.shape)
    level = map_level(vol, diameter_A=20 * 2.0, pixel_size_A=2.0)
    kept = int((vol >= level).sum())
    assert kept == round(0.3 * np.pi / 6 * 20**3)  # the sphere's share ...
    assert 0.5 < level < 1.1  # ... which lies inside the ball, above the noise
    text = chimerax_script(
        [ShownMap("run_class001.mrc", 0.5), ShownMap("half 1.mrc", 0.4, "mesh", False)],
        ["run_class001_angdist.bild"],
    )
    lines = text.splitlines()
    assert "open run_class001.mrc" in lines and "volume #1 level 0.5 style surface" in lines
    assert 'open "half 1.mrc"' in lines and "volume #2 level 0.4 style mesh" in lines
    assert "hide #2 models" in lines and "open run_class001_angdist.bild" in lines


# -- simulate --relion, import, refine3d, class3d --------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("relion_outputs")
    sim = simulate_particles(
        root / "sim.zarr", N, box_size=BOX, pixel_size_A=PIXEL, snr=1.0, seed=3,
        chunk_size=80, max_shift_A=3.0, phantom=["asym", "asym-B"], relion_dir=root / "relion",
    )  # fmt: skip
    store = import_particles(
        root / "relion" / "particles.star", root / "imported.zarr", progress=False
    )
    truth, _ = read_map(truth_volume_paths(sim.path)[0])
    return root, sim, store, truth


def test_truth_star_has_the_true_poses_origins_ctf_and_classes(project):
    root, sim, _, _ = project
    truth = starfile.read(root / "relion" / "truth.star", always_dict=True)
    particles = starfile.read(root / "relion" / "particles.star", always_dict=True)
    t, p = truth["particles"], particles["particles"]
    assert len(t) == N and list(t["rlnImageName"]) == list(p["rlnImageName"])
    expected = sim.read_table("truth")
    for label in (
        "rlnAngleRot",
        "rlnAngleTilt",
        "rlnAnglePsi",
        "rlnOriginXAngst",
        "rlnOriginYAngst",
    ):
        assert np.allclose(t[label].to_numpy(float), expected[label], atol=1e-9), label
    assert np.array_equal(t["rlnClassNumber"].to_numpy(int), expected["rlnClassNumber"])
    assert set(t["rlnClassNumber"]) == {1, 2}
    for label in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnRandomSubset"):
        assert np.allclose(t[label].to_numpy(float), p[label].to_numpy(float)), label
    assert "rlnAmplitudeContrast" in truth["optics"].columns


@pytest.fixture(scope="module")
def refined(project):
    root, _, store, truth = project
    options = RefineOptions(
        max_iterations=2, healpix_order=1, offset_range_px=2.0, offset_step_px=1.0
    )
    return refine3d(store, truth, root / "refine", options)


def test_refine3d_writes_what_viewers_open(refined):
    out = refined.out_dir
    for name in (
        "run_class001_angdist.bild",
        "run_angdist.png",
        "run_chimerax.cxc",
        "run_mask.mrc",
    ):
        assert (out / name).is_file(), name
    bild = read_bild(out / "run_class001_angdist.bild")
    # one cylinder per direction pixel with particles; the longest for the fullest
    poses = refined.poses
    counts = direction_counts(poses["rlnAngleRot"], poses["rlnAngleTilt"])
    assert len(bild["widths"]) == int((counts > 0).sum())
    assert counts.sum() == N
    lines = (out / "run_chimerax.cxc").read_text().splitlines()
    opened = [line.split(" ", 1)[1] for line in lines if line.startswith("open ")]
    assert opened[:3] == [
        "run_class001.mrc", "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc",
    ]  # fmt: skip
    assert "run_mask.mrc" in opened and "run_class001_angdist.bild" in opened
    assert all((out / name).is_file() for name in opened)
    level = float(lines[lines.index("open run_class001.mrc") + 1].split()[3])
    final, _ = read_map(out / "run_class001.mrc")
    assert final.min() < level < final.max()
    with open(out / "run_angdist.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_run_data_star_names_the_original_stacks_relative_to_the_run(project, refined):
    root, _, store, _ = project
    out = refined.out_dir
    for name in ("run_data.star", "run_it001_data.star"):
        names = starfile.read(out / name, always_dict=True)["particles"]["rlnImageName"]
        stack = names.iloc[0].split("@", 1)[1]
        assert not Path(stack).is_absolute() and stack.startswith("../relion/"), stack
        indices, stacks = parse_image_names(names, out / name)
        original = starfile.read(root / "relion" / "particles.star")["particles"]["rlnImageName"]
        o_idx, o_stacks = parse_image_names(original, root / "relion" / "particles.star")
        assert np.array_equal(indices, o_idx)
        assert [Path(s).resolve() for s in stacks] == [Path(s).resolve() for s in o_stacks]


def test_reconstruct_from_run_data_star_gives_the_same_map(project, refined, tmp_path):
    _, _, store, _ = project
    out = refined.out_dir
    from_star = tmp_path / "from_star.mrc"
    args = ["reconstruct", str(store.path), "--poses", str(out / "run_data.star")]
    assert main([*args, "--out", str(from_star), "--no-cluster"]) == 0
    # the same reconstruction from the refinement's own results (particles.zarr)
    from streamem.em.backproject_job import accumulate_from_poses, reconstruct

    acc = accumulate_from_poses(store, "star", refined.poses, padding_factor=2)
    direct = reconstruct(acc.data[0] + acc.data[1], acc.weight[0] + acc.weight[1], BOX, 2, None)
    vol, _ = read_map(from_star)
    curve = fsc(vol, direct)
    assert curve[1 : BOX // 2].min() > 0.999, curve


def test_class3d_writes_angdist_per_class_and_pictures(project):
    root, _, store, truth = project
    options = Class3DOptions(n_classes=2, iterations=2, healpix_order=1, offset_range_px=2.0)
    result = classify3d(store, truth, root / "class3d", options)
    out = result.out_dir
    for name in (
        "run_class001_angdist.bild", "run_class002_angdist.bild", "run_angdist.png",
        "run_chimerax.cxc", "run_class_slices.png", "run_class_sizes.png",
    ):  # fmt: skip
        assert (out / name).is_file(), name
    cylinders = [len(read_bild(out / f"run_class00{k}_angdist.bild")["widths"]) for k in (1, 2)]
    classes = result.class_numbers
    assert all(c > 0 for c in cylinders[: len(set(classes))])
    lines = (out / "run_chimerax.cxc").read_text().splitlines()
    assert "open run_it002_class001.mrc" in lines and "open run_it002_class002.mrc" in lines


def test_write_stacks_and_solvent_mask_for_a_store_without_stacks(project, tmp_path):
    """refine3d --write-stacks --solvent-mask on a simulated store (no stacks): the run's
    STAR files name RUN/Particles stacks holding the store's images; the mask is used
    (run_mask.mrc is it) and run_fsc.png is written with the masked FSC."""
    import mrcfile

    from streamem.core.masks import soft_sphere

    _, sim, _, truth = project
    mask_path = tmp_path / "mask.mrc"
    mask = np.asarray(soft_sphere(BOX, 0.35 * BOX, 2.0), np.float32)
    from streamem.io.mrc import write_map

    write_map(mask_path, mask, PIXEL)
    ref = tmp_path / "ref.mrc"
    write_map(ref, truth, PIXEL)
    out = tmp_path / "run"
    args = ["refine3d", str(sim.path), "--ref", str(ref), "--out", str(out), "--no-cluster"]
    args += ["--max-iterations", "2", "--healpix-order", "1", "--offset-range", "2"]
    args += ["--offset-step", "1", "--write-stacks", "--solvent-mask", str(mask_path)]
    assert main(args) == 0
    used, _ = read_map(out / "run_mask.mrc")
    assert np.allclose(used, mask, atol=1e-6)
    names = starfile.read(out / "run_data.star", always_dict=True)["particles"]["rlnImageName"]
    assert names.iloc[0].split("@")[1].startswith("Particles/particles_")
    indices, stacks = parse_image_names(names, out / "run_data.star")
    images = sim.read_chunk(0, N).images
    for i in (0, N // 2, N - 1):
        with mrcfile.mmap(stacks[i], mode="r") as mrc:
            assert np.array_equal(mrc.data[indices[i]], images[i])
    assert (out / "run_fsc.png").is_file()
