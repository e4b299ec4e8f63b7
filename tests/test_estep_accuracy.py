"""The E-step finds the true poses: with the true map as reference, the median
angular error is below the fine angular step, for a global and a local search."""

import numpy as np
import pytest

from streamem.api import angular_errors_deg
from streamem.core.projector import make_projector
from streamem.em import mstep
from streamem.em.estep import EStepModel, SearchGrid, expectation
from streamem.io.mrc import read_map
from streamem.io.store import optics_params
from streamem.simulate.particles import simulate_particles, truth_volume_paths

BOX, PIXEL, N = 32, 4.5, 120


@pytest.fixture(scope="module")
def chunk(tmp_path_factory):
    store = simulate_particles(
        tmp_path_factory.mktemp("acc") / "p.zarr",
        N,
        box_size=BOX,
        pixel_size_A=PIXEL,
        snr=1.0,
        seed=11,
    )
    truth, _ = read_map(truth_volume_paths(store.path)[0])
    return store, store.read_chunk(0, N, with_truth=True), truth


@pytest.mark.parametrize("order, local_sigma_deg", [(2, None), (3, 11.25)])
def test_median_error_below_the_fine_step(chunk, order, local_sigma_deg):
    store, ch, truth = chunk
    power = mstep.image_power(ch.images, np.zeros(N, int), 1)
    projector = make_projector(truth, 2, max_radius_px=BOX // 2 - 1)
    metadata = dict(ch.metadata)
    for label in (
        "rlnAngleRot",
        "rlnAngleTilt",
        "rlnAnglePsi",
        "rlnOriginXAngst",
        "rlnOriginYAngst",
    ):
        metadata[label] = ch.truth[label]  # previous poses for the local search
    model = EStepModel(
        projectors=(projector, projector),
        box_size=BOX,
        work_box=BOX,
        pixel_size_A=PIXEL,
        max_radius_px=BOX // 2 - 1,
        inv_sigma2=mstep.initial_inv_sigma2(power[0], power[1]),
        optics=(optics_params(store.optics_groups[0]),),
        sigma_offset_A=PIXEL,
        grid=SearchGrid(
            healpix_order=order,
            offset_range_px=2,
            offset_step_px=1,
            local_sigma_deg=local_sigma_deg,
        ),
        scale_free=True,  # the truth map is not on the images' grey scale
    )
    _, result = expectation(ch.images, metadata, model)
    errors = angular_errors_deg(
        store, {"rlnAngleRot": result.rot, "rlnAngleTilt": result.tilt, "rlnAnglePsi": result.psi}
    )
    assert np.median(errors) < model.grid.fine_angular_step_deg
