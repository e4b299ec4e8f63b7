"""The refine3d E-step where the reference lives: the same chunk with NumPy and with
CuPy references gives the same poses and statistics (GPU test; skips without CuPy),
and the segment sums that replace a sparse product on both."""

import numpy as np
import pytest
from test_backprojector import random_rotations
from test_projector import smooth_volume

from streamem.core.ctf import OpticsParams
from streamem.core.euler import matrix_to_euler
from streamem.core.projector import make_projector, project_images
from streamem.em.estep import EStepModel, SearchGrid, expectation
from streamem.em.kernels import segment_sums

BOX, N = 32, 60


@pytest.mark.parametrize("strict", [False, True], ids=["numpy", "array-api"])
def test_segment_sums_match_add_at(strict):
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 7, 50)
    vals = rng.standard_normal((50, 3)) + 1j * rng.standard_normal((50, 3))
    wgts = rng.random((50, 3))
    if strict:
        xp = pytest.importorskip("array_api_strict")
        used, v, w = segment_sums(keys, xp.asarray(vals), xp.asarray(wgts))
        v, w = np.asarray(v), np.asarray(w)
    else:
        used, v, w = segment_sums(keys, vals, wgts)
    np.testing.assert_array_equal(used, np.unique(keys))
    ref_v = np.zeros((7, 3), complex)
    ref_w = np.zeros((7, 3))
    np.add.at(ref_v, keys, vals)
    np.add.at(ref_w, keys, wgts)
    np.testing.assert_allclose(v, ref_v[used], atol=1e-12)
    np.testing.assert_allclose(w, ref_w[used], atol=1e-12)


def _chunk(seed=0):
    rng = np.random.default_rng(seed)
    vol = smooth_volume(BOX, seed=seed).astype(np.float32)
    rot = random_rotations(N, rng)
    images = project_images(make_projector(vol), rot)
    images = images + rng.normal(0, images.std(), images.shape).astype(np.float32)
    rot_deg, tilt_deg, psi_deg = matrix_to_euler(rot)
    metadata = {
        "rlnRandomSubset": np.arange(N) % 2 + 1,
        "rlnAngleRot": rot_deg,
        "rlnAngleTilt": tilt_deg,
        "rlnAnglePsi": psi_deg,
    }
    return vol, images.astype(np.float32), metadata


def _model(projector, local_sigma_deg):
    return EStepModel(
        projectors=(projector, projector),
        box_size=BOX,
        work_box=BOX,
        pixel_size_A=3.0,
        max_radius_px=BOX // 2 - 1,
        inv_sigma2=np.ones((1, BOX // 2 + 1)),
        optics=(OpticsParams(300.0, 2.7, 0.1),),
        sigma_offset_A=3.0,
        grid=SearchGrid(
            healpix_order=2, offset_range_px=2, offset_step_px=1, local_sigma_deg=local_sigma_deg
        ),
        do_ctf=False,
        scale_free=True,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("local_sigma_deg", [None, 10.0])
def test_expectation_on_cupy_matches_numpy(local_sigma_deg):
    cp = pytest.importorskip("cupy")
    vol, images, metadata = _chunk()
    stats_np, res_np = expectation(images, metadata, _model(make_projector(vol), local_sigma_deg))
    stats_cp, res_cp = expectation(
        images, metadata, _model(make_projector(cp.asarray(vol)), local_sigma_deg)
    )
    same = (res_np.rot == res_cp.rot) & (res_np.tilt == res_cp.tilt) & (res_np.psi == res_cp.psi)
    assert np.mean(same) >= 0.95, np.mean(same)
    assert isinstance(stats_cp.data_acc, np.ndarray)  # statistics leave the task on the host
    for a, b in (
        (stats_np.data_acc, stats_cp.data_acc),
        (stats_np.noise_power, stats_cp.noise_power),
    ):
        assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max()
