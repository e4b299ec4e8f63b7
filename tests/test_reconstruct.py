"""Reconstruction from known poses (issue 4's must-show checks) on simulated data."""

import numpy as np
import pytest

from streamem.cli import main
from streamem.core.euler import euler_to_matrix
from streamem.core.fsc import fsc, resolution_at
from streamem.core.projector import make_projector, project_images
from streamem.em.backproject_job import reconstruct_from_poses, reconstruct_map
from streamem.io.mrc import read_map
from streamem.simulate.particles import simulate_particles, truth_volume_paths
from streamem.simulate.phantoms import phantom
from streamem.simulate.projection import project_real_space

BOX, PIXEL = 32, 4.0


def test_fourier_projector_matches_the_independent_simulator():
    volume = phantom("asym", BOX, PIXEL)
    angles = np.array([[30.0, 60.0, 45.0], [-120.0, 100.0, -70.0], [10.0, 150.0, 200.0]])
    A = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    fourier = project_images(make_projector(volume, 2), A)
    real = project_real_space(volume, A)
    for f, r in zip(fourier, real, strict=True):
        assert np.corrcoef(f.ravel(), r.ravel())[0, 1] > 0.99


def test_noise_free_projections_reconstruct_the_truth(tmp_path):
    store = simulate_particles(
        tmp_path / "p.zarr", 5000, box_size=BOX, pixel_size_A=PIXEL, snr=1e6, seed=3, ctf=False
    )
    truth, _ = read_map(truth_volume_paths(store.path)[0])
    volume = reconstruct_map(store, pose_source="truth", do_ctf=False)
    curve = fsc(volume, truth)
    nyquist = BOX // 2
    assert curve[1 : int(0.9 * nyquist) + 1].min() > 0.9


def test_gold_standard_relation_with_ctf_and_noise(tmp_path):
    store = simulate_particles(
        tmp_path / "p.zarr", 5000, box_size=BOX, pixel_size_A=PIXEL, snr=0.1, seed=4
    )
    truth, _ = read_map(truth_volume_paths(store.path)[0])
    halves = reconstruct_from_poses(store, pose_source="truth")
    res_halves = resolution_at(fsc(halves[0], halves[1]), 0.143, BOX, PIXEL)
    full = reconstruct_map(store, pose_source="truth")
    res_truth = resolution_at(fsc(full, truth), 0.5, BOX, PIXEL)
    assert abs(res_halves - res_truth) / res_truth < 0.10, (res_halves, res_truth)


def test_reconstruct_cli_writes_a_map_with_the_voxel_size(tmp_path):
    store = simulate_particles(
        tmp_path / "p.zarr", 300, box_size=16, pixel_size_A=5.0, snr=1.0, seed=5
    )
    out = tmp_path / "map.mrc"
    assert (
        main(["reconstruct", str(store.path), "--out", str(out), "--truth", "--subset", "1"]) == 0
    )
    volume, voxel = read_map(out)
    assert volume.shape == (16, 16, 16) and voxel == pytest.approx(5.0)
    assert main(["reconstruct", str(store.path), "--out", str(out), "--truth"]) == 2  # exists
