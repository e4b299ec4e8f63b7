"""The E-step finds the true poses: with the true map as reference, the median
angular error is below the fine angular step, for a global and a local search."""

import numpy as np
import pytest
from _estep_data import refine_model, simulated_chunk

from streamem.api import angular_errors_deg
from streamem.em.estep import expectation

BOX, PIXEL, N = 32, 4.5, 120


@pytest.fixture(scope="module")
def chunk(tmp_path_factory):
    # previous poses for the local search: the true ones
    return simulated_chunk(
        tmp_path_factory.mktemp("acc"), N, box=BOX, pixel_size_A=PIXEL, snr=1.0, seed=11
    )


@pytest.mark.parametrize("order, local_sigma_deg", [(2, None), (3, 11.25)])
def test_median_error_below_the_fine_step(chunk, order, local_sigma_deg):
    store, ch, metadata, truth = chunk
    model = refine_model(  # scale_free: the truth map is not on the images' grey scale
        store,
        ch.images,
        truth,
        box=BOX,
        pixel_size_A=PIXEL,
        healpix_order=order,
        local_sigma_deg=local_sigma_deg,
        flipped_half2=False,
    )
    _, result = expectation(ch.images, metadata, model)
    errors = angular_errors_deg(
        store, {"rlnAngleRot": result.rot, "rlnAngleTilt": result.tilt, "rlnAnglePsi": result.psi}
    )
    assert np.median(errors) < model.grid.fine_angular_step_deg
