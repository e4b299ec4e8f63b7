"""The E-step follows its model's array namespace: with the projectors' data in
array_api_strict (a strict array-API namespace on the CPU, standing in for a GPU
library that has only what the standard promises) or CuPy, the coarse pass, fine
pass, posteriors and sums give NumPy's statistics and poses. A NumPy-only call on a
device array in the engine fails here before it reaches a GPU."""

from dataclasses import replace

import numpy as np
import pytest

from streamem.core.projector import make_projector
from streamem.em import mstep
from streamem.em.estep import EStepModel, SearchGrid, expectation
from streamem.io.mrc import read_map
from streamem.io.store import optics_params
from streamem.simulate.particles import simulate_particles, truth_volume_paths

BOX, PIXEL, N = 24, 4.5, 16
POSES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")
FIELDS = ("rot", "tilt", "psi", "origin_x_A", "origin_y_A", "class_number", "n_significant")


@pytest.fixture(params=["array_api_strict", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    return pytest.importorskip(request.param)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    store = simulate_particles(
        tmp_path_factory.mktemp("xp") / "p.zarr", N, box_size=BOX, pixel_size_A=PIXEL, seed=3
    )
    truth, _ = read_map(truth_volume_paths(store.path)[0])
    chunk = store.read_chunk(0, N, with_truth=True)
    metadata = dict(chunk.metadata)
    metadata["particle_index"] = np.arange(N)
    for label in POSES:
        metadata[label] = chunk.truth[label]
    power = mstep.image_power(chunk.images, np.zeros(N, int), 1)
    projectors = tuple(
        make_projector(m, 2, max_radius_px=BOX // 2 - 1) for m in (truth, truth[::-1].copy())
    )
    model = EStepModel(
        projectors=(projectors[0], projectors[0]),
        box_size=BOX,
        work_box=BOX,
        pixel_size_A=PIXEL,
        max_radius_px=BOX // 2 - 1,
        inv_sigma2=mstep.initial_inv_sigma2(power[0], power[1]),
        optics=(optics_params(store.optics_groups[0]),),
        sigma_offset_A=PIXEL,
        grid=SearchGrid(healpix_order=1, offset_range_px=2, offset_step_px=1),
        scale_free=True,
    )
    return chunk.images, metadata, model, projectors


def _cases(model, projectors):
    local = replace(model, grid=replace(model.grid, healpix_order=2, local_sigma_deg=11.25))
    classes = dict(projectors=projectors, n_classes=2, references_per_half=False)
    with np.errstate(divide="ignore"):
        prior = np.log([0.7, 0.3])
    return {
        "refine3d global": (model, False),
        "refine3d local": (local, True),
        "class3d K=2": (replace(model, log_class_prior=prior, **classes), False),
        "class3d seeded": (replace(model, class_seed=5, **classes), False),
        "class3d skip_align": (replace(model, skip_align=True, scale_free=False, **classes), True),
    }


@pytest.mark.parametrize(
    "case",
    ["refine3d global", "refine3d local", "class3d K=2", "class3d seeded", "class3d skip_align"],
)
def test_estep_in_another_namespace_gives_numpys_statistics(data, xp, case):
    images, metadata, model, projectors = data
    model, with_poses = _cases(model, projectors)[case]
    angles = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    meta = metadata if with_poses else {k: v for k, v in metadata.items() if k not in angles}
    s_np, r_np = expectation(images, meta, replace(model, coarse={}))
    moved = tuple(replace(p, data=xp.asarray(p.data)) for p in model.projectors)
    s_xp, r_xp = expectation(images, meta, replace(model, projectors=moved, coarse={}))
    assert isinstance(s_xp.data_acc, np.ndarray)  # statistics leave the task on the host
    for name in ("data_acc", "weight_acc", "noise_power", "noise_count", "class_weight"):
        a, b = getattr(s_np, name), getattr(s_xp, name)
        assert a.shape == b.shape and np.abs(a).max() > 0, name
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), name
    for name in ("weight_sum", "loglik_sum", "offset_sq_A2"):
        assert getattr(s_xp, name) == pytest.approx(getattr(s_np, name), rel=1e-6)
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(r_xp, name), getattr(r_np, name), err_msg=name)
    np.testing.assert_allclose(r_xp.loglik, r_np.loglik, rtol=1e-6)
