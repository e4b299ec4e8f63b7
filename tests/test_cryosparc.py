"""cryoSPARC .cs/.csg in and out: conventions pinned by hand cases and by an independent
rotation formula; a round trip STAR -> store -> .cs -> store -> STAR keeps every value."""

from __future__ import annotations

import logging
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from _relion_data import make_dataset, write_stack

from streamem.cli import main
from streamem.core.euler import angular_distance_deg, euler_to_matrix
from streamem.errors import InputError
from streamem.io.cryosparc import euler_to_pose, pose_to_euler, read_cryosparc
from streamem.io.store import ParticleStore


def rodrigues(r: np.ndarray) -> np.ndarray:
    """Rotation matrix of an axis-angle vector, written out (independent of scipy)."""
    theta = np.linalg.norm(r)
    if theta < 1e-16:
        return np.eye(3)
    x, y, z = r / theta
    K = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + np.sin(theta) * K + (1 - np.cos(theta)) * K @ K


def test_pose_hand_cases():
    # about z by 0.3 rad: R = Rz, RELION's A = Rzᵀ = the matrix of rot + psi = 0.3 rad
    rot, tilt, psi = pose_to_euler([[0.0, 0.0, 0.3]])
    assert (rot[0], tilt[0], psi[0]) == pytest.approx((0.0, 0.0, np.rad2deg(0.3)))
    # about y by 0.5 rad: Ryᵀ = [[cb, 0, -sb], [0, 1, 0], [sb, 0, cb]] = RELION's tilt 0.5 rad
    rot, tilt, psi = pose_to_euler([[0.0, 0.5, 0.0]])
    assert (rot[0], tilt[0], psi[0]) == pytest.approx((0.0, np.rad2deg(0.5), 0.0), abs=1e-9)
    A = euler_to_matrix(0.0, np.rad2deg(0.5), 0.0)
    np.testing.assert_allclose(A, rodrigues(np.array([0.0, 0.5, 0.0])).T, atol=1e-12)


def test_pose_is_transpose_of_rodrigues_both_ways():
    rng = np.random.default_rng(1)
    axes = rng.normal(size=(200, 3))
    r = axes / np.linalg.norm(axes, axis=1, keepdims=True) * rng.uniform(0, np.pi, (200, 1))
    rot, tilt, psi = pose_to_euler(r)
    A = euler_to_matrix(rot, tilt, psi)
    expected = np.stack([rodrigues(v).T for v in r])  # pyem: rot2euler(expmap(pose))
    np.testing.assert_allclose(A, expected, atol=1e-12)
    back = euler_to_pose(rot, tilt, psi)
    np.testing.assert_allclose(
        np.stack([rodrigues(v) for v in back]), np.stack([rodrigues(v) for v in r]), atol=1e-12
    )
    assert (tilt >= 0).all() and (tilt <= 180).all()


def hand_made_project(root: Path, sign: float = 1.0):
    """A cryoSPARC-like project: PROJECT/J2/extract/mic.mrc (6 images), PROJECT/J5/J5.cs."""
    images = np.random.default_rng(2).normal(size=(6, 10, 10)).astype(np.float32)
    write_stack(root / "J2" / "extract" / "mic_particles.mrc", images, 2.0)
    n = 4
    dtype = [
        ("uid", "<u8"),
        ("blob/path", "S40"),
        ("blob/idx", "<u4"),
        ("blob/psize_A", "<f4"),
        ("blob/sign", "<f4"),
        ("ctf/accel_kv", "<f4"),
        ("ctf/cs_mm", "<f4"),
        ("ctf/amp_contrast", "<f4"),
        ("ctf/df1_A", "<f4"),
        ("ctf/df2_A", "<f4"),
        ("ctf/df_angle_rad", "<f4"),
        ("ctf/exp_group_id", "<u4"),
        ("alignments3D/pose", "<f4", (3,)),
        ("alignments3D/shift", "<f4", (2,)),
        ("alignments3D/split", "<u4"),
        ("alignments3D/class", "<u4"),
    ]
    cs = np.zeros(n, dtype=dtype)
    cs["uid"] = [11, 12, 13, 14]
    cs["blob/path"] = [b"J2/extract/mic_particles.mrc"] * 3 + [b">J2/extract/mic_particles.mrc"]
    cs["blob/idx"] = [5, 0, 2, 3]
    cs["blob/psize_A"] = 2.0
    cs["blob/sign"] = sign
    cs["ctf/accel_kv"] = 300.0
    cs["ctf/cs_mm"] = 2.7
    cs["ctf/amp_contrast"] = 0.07
    cs["ctf/df1_A"] = [12345.67, 15000.0, 20000.5, 9000.0]
    cs["ctf/df2_A"] = [12000.0, 14000.0, 19000.25, 8800.0]
    cs["ctf/df_angle_rad"] = [np.pi / 2, 0.0, -np.pi / 4, 1.0]
    cs["ctf/exp_group_id"] = 0
    cs["alignments3D/pose"] = [[0, 0, 0.3], [0, 0.5, 0], [0.1, -0.2, 0.3], [1.0, 1.0, 1.0]]
    cs["alignments3D/shift"] = [[1.5, -2.0], [0, 0], [0.25, 0.5], [-3, 3]]
    cs["alignments3D/split"] = [0, 1, 1, 0]
    cs["alignments3D/class"] = [0, 2, 1, 0]
    job = root / "J5"
    job.mkdir(parents=True)
    with open(job / "J5_particles.cs", "wb") as f:
        np.save(f, cs)  # written by NumPy, independently of cryosparc-tools
    return job / "J5_particles.cs", cs, images


def test_import_hand_made_cs(tmp_path, monkeypatch):
    cs_path, cs, images = hand_made_project(tmp_path / "project")
    monkeypatch.chdir(tmp_path)  # blob paths must be found in the project, not in cwd
    particles, optics, _, signs = read_cryosparc(cs_path)
    assert particles["rlnImageName"].tolist()[:2] == [
        "000006@J2/extract/mic_particles.mrc",
        "000001@J2/extract/mic_particles.mrc",
    ]
    assert particles["rlnAngleTilt"][0] == pytest.approx(0.0)
    assert particles["rlnAnglePsi"][0] == pytest.approx(np.rad2deg(0.3), rel=1e-6)
    assert particles["rlnAngleTilt"][1] == pytest.approx(np.rad2deg(0.5), rel=1e-6)
    np.testing.assert_allclose(particles["rlnOriginXAngst"], cs["alignments3D/shift"][:, 0] * 2)
    np.testing.assert_allclose(particles["rlnOriginYAngst"], cs["alignments3D/shift"][:, 1] * 2)
    np.testing.assert_allclose(particles["rlnDefocusAngle"], [90, 0, -45, np.rad2deg(1.0)], 1e-6)
    assert particles["rlnDefocusU"].tolist() == [12345.67, 15000.0, 20000.5, 9000.0]  # exact
    assert particles["rlnRandomSubset"].tolist() == [1, 2, 2, 1]
    assert particles["rlnClassNumber"].tolist() == [1, 3, 2, 1]
    assert optics["rlnOpticsGroup"].tolist() == [1] and optics["rlnAmplitudeContrast"][0] == 0.07
    assert (signs == 1).all()

    out = tmp_path / "p.zarr"
    assert main(["import", str(cs_path), str(out)]) == 0
    store = ParticleStore(out)
    assert store.pixel_size_A == 2.0 and store.box_size == 10
    got = store.read_chunk(0, 4).images
    np.testing.assert_array_equal(got, images[[5, 0, 2, 3]])
    assert not Path(store.facts["provenance"]["source"]).is_absolute()


def test_import_negative_sign_flips_images_with_a_warning(tmp_path, caplog):
    cs_path, _, images = hand_made_project(tmp_path / "project", sign=-1.0)
    with caplog.at_level(logging.WARNING):
        assert main(["import", str(cs_path), str(tmp_path / "p.zarr")]) == 0
    assert sum("blob/sign" in r.getMessage() for r in caplog.records) == 1
    got = ParticleStore(tmp_path / "p.zarr").read_chunk(0, 4).images
    np.testing.assert_array_equal(got, -images[[5, 0, 2, 3]])


def test_import_csg_joins_metafiles(tmp_path):
    cs_path, cs, images = hand_made_project(tmp_path / "project")
    job = cs_path.parent
    names = cs.dtype.names
    blob = [n for n in names if n == "uid" or not n.startswith("alignments3D")]
    align = [n for n in names if n == "uid" or n.startswith("alignments3D")]
    with open(job / "J5_passthrough_particles.cs", "wb") as f:
        np.save(f, cs[blob])
    with open(job / "J5_particles_aligned.cs", "wb") as f:
        np.save(f, cs[align][::-1])  # other row order: joined on uid
    (job / "J5_particles.csg").write_text(
        "created: 2024-01-01 00:00:00\n"
        "group: {name: particles, type: particle}\n"
        "results:\n"
        "  blob: {metafile: '>J5_passthrough_particles.cs', num_items: 4, type: particle.blob}\n"
        "  ctf: {metafile: '>J5_passthrough_particles.cs', num_items: 4, type: particle.ctf}\n"
        "  alignments3D: {metafile: '>J5_particles_aligned.cs', num_items: 4}\n"
        "version: v4.4.0\n"
    )
    direct, _, _, _ = read_cryosparc(cs_path)
    grouped, _, _, _ = read_cryosparc(job / "J5_particles.csg")
    by_name = grouped.set_index("rlnImageName").loc[direct["rlnImageName"]].reset_index()
    for label in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnDefocusU", "rlnClassNumber"):
        np.testing.assert_allclose(by_name[label], direct[label], err_msg=label)
    (job / "bad.csg").write_text("results:\n  blob: {metafile: '>missing.cs'}\n")
    with pytest.raises(InputError, match="missing.cs"):
        read_cryosparc(job / "bad.csg")


def test_roundtrip_star_store_cs_store_star(tmp_path):
    star, table, stacks = make_dataset(tmp_path / "proj", n_particles=60, n_stacks=3)
    assert main(["import", str(star), str(tmp_path / "a.zarr"), "--chunk-size", "16"]) == 0
    cs_path = tmp_path / "cs" / "particles.cs"
    assert main(["export", str(tmp_path / "a.zarr"), str(cs_path)]) == 0

    cs = np.load(cs_path)  # plain NumPy: what cryoSPARC reads
    assert cs.dtype["alignments3D/pose"].shape == (3,) and cs.dtype["blob/idx"].kind == "u"
    assert set(np.unique(cs["alignments3D/split"])) == {0, 1}
    np.testing.assert_array_equal(cs["alignments3D/split"], table["rlnRandomSubset"] - 1)
    np.testing.assert_array_equal(cs["alignments3D/class"], table["rlnClassNumber"] - 1)
    np.testing.assert_allclose(
        cs["ctf/df_angle_rad"], np.deg2rad(table["rlnDefocusAngle"]), rtol=1e-6
    )
    np.testing.assert_allclose(
        cs["alignments3D/shift"][:, 0], table["rlnOriginXAngst"] / 1.5, rtol=1e-6, atol=1e-7
    )
    first = cs_path.parent / cs["blob/path"][0].decode()
    with mrcfile.open(first) as mrc:
        assert mrc.voxel_size.x == pytest.approx(1.5)

    assert main(["import", str(cs_path), str(tmp_path / "b.zarr")]) == 0
    back = tmp_path / "back" / "p.star"
    assert main(["export", str(tmp_path / "b.zarr"), str(back)]) == 0
    a = starfile.read(star, always_dict=True)["particles"]
    b = starfile.read(back, always_dict=True)["particles"]
    A = euler_to_matrix(a["rlnAngleRot"], a["rlnAngleTilt"], a["rlnAnglePsi"])
    B = euler_to_matrix(b["rlnAngleRot"], b["rlnAngleTilt"], b["rlnAnglePsi"])
    worst_deg = angular_distance_deg(A, B).max()
    worst_shift_A = max(np.abs(b[k] - a[k]).max() for k in ("rlnOriginXAngst", "rlnOriginYAngst"))
    print(f"STAR -> store -> .cs -> store -> STAR: worst pose {worst_deg:.2e} deg, "
          f"worst shift {worst_shift_A:.2e} A")  # fmt: skip
    assert worst_deg < 1e-4
    ordinary = (a["rlnAngleTilt"] > 5) & (a["rlnAngleTilt"] < 175)  # away from gimbal lock
    for label in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        diff = (a[label] - b[label] + 180) % 360 - 180
        assert np.abs(diff[ordinary]).max() < 1e-4, label
    for label in ("rlnOriginXAngst", "rlnOriginYAngst"):
        np.testing.assert_allclose(b[label], a[label], atol=1e-5)
    for label in ("rlnDefocusU", "rlnDefocusV", "rlnRandomSubset", "rlnClassNumber"):
        np.testing.assert_array_equal(b[label], a[label], err_msg=label)
    np.testing.assert_allclose(b["rlnDefocusAngle"], a["rlnDefocusAngle"], atol=1e-4)
    optics_a = starfile.read(star, always_dict=True)["optics"]
    optics_b = starfile.read(back, always_dict=True)["optics"]
    for label in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        assert optics_b[label].tolist() == optics_a[label].tolist(), label
    np.testing.assert_array_equal(b["rlnOpticsGroup"], a["rlnOpticsGroup"])
    images_a = ParticleStore(tmp_path / "a.zarr").read_chunk(0, 60).images
    images_b = ParticleStore(tmp_path / "b.zarr").read_chunk(0, 60).images
    np.testing.assert_array_equal(images_b, images_a)


def test_garbage_cs_refused_with_one_line(tmp_path, capsys):
    star, _, _ = make_dataset(tmp_path / "proj", n_particles=6, n_stacks=1)
    main(["import", str(star), str(tmp_path / "a.zarr")])
    bad = tmp_path / "bad.cs"
    bad.write_text("not numpy")
    assert main(["import", str(bad), str(tmp_path / "b.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.cs" in err[0] and "cryoSPARC" in err[0]
