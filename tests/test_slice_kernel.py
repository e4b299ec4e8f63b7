"""The host kernel of central-slice extraction (:mod:`streamem.core.slice_kernel`)
returns what the array-API formulation of :func:`project_points` returns, value for
value: the same half cube read through ``array_api_strict`` (which takes the
array-API path) is the reference."""

import dataclasses

import numpy as np
import pytest
from test_backprojector import random_rotations
from test_projector import smooth_volume

from streamem.core import projector
from streamem.core.backend import to_numpy
from streamem.core.fourier import image_fourier_coords
from streamem.core.projector import make_projector, project_points

xps = pytest.importorskip("array_api_strict")


@pytest.mark.parametrize(("box", "cutoff_px"), [(24, None), (25, 7.0), (32, 11.5)])
def test_host_kernel_equals_array_api_path(box, cutoff_px):
    rng = np.random.default_rng(box)
    ref = make_projector(smooth_volume(box, seed=box).astype(np.float32), max_radius_px=cutoff_px)
    # a cutoff below the points' radius: the kernel fills only the columns inside it
    coords, _ = image_fourier_coords(box, box // 2)
    rot = random_rotations(50, rng)  # random poses: about half the points are Friedel-flipped
    got = project_points(ref, rot, coords)
    strict = dataclasses.replace(ref, data=xps.asarray(ref.data))
    want = to_numpy(project_points(strict, xps.asarray(rot), xps.asarray(coords)))
    assert got.dtype == np.complex64 and got.shape == (50, coords.shape[0])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    assert np.mean(got == want) > 0.99  # same float32 arithmetic: equal, not just close
    if cutoff_px is not None:
        assert np.all(got[:, np.hypot(coords[:, 0], coords[:, 1]) > cutoff_px + 0.01] == 0)
    one = project_points(ref, rot[3], coords)
    np.testing.assert_array_equal(one, got[3])


def test_numpy_projection_runs_the_host_kernel(monkeypatch):
    ref = make_projector(smooth_volume(24, seed=0).astype(np.float32))
    coords, _ = image_fourier_coords(24, 12)

    def refuse(*args, **kwargs):
        raise RuntimeError("host kernel called")

    monkeypatch.setattr(projector, "project_slices_host", refuse)
    with pytest.raises(RuntimeError, match="host kernel"):
        project_points(ref, random_rotations(2, np.random.default_rng(0)), coords)
