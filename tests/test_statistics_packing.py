"""An E-step task's statistics leave it packed: single precision, and only the half
cube's voxels that trilinear insertion can reach (core.projector.half_cube_reach).
Packing must lose nothing: insertion never writes outside the reach, and packed
statistics, summed and expanded, equal the whole-cube sums exactly."""

import numpy as np
import pytest
from _estep_data import refine_model, simulated_chunk

from streamem.core.backprojector import empty_accumulators, insert_points
from streamem.core.euler import euler_to_matrix
from streamem.core.fourier import image_fourier_coords
from streamem.core.projector import half_cube_reach, half_cube_shape, padded_radius
from streamem.em.engine import statistics_bytes
from streamem.em.estep import expectation
from streamem.em.statistics import SufficientStatistics

BOX, PIXEL = 24, 4.5


@pytest.mark.parametrize("padding_factor", [1, 2])
def test_insertion_never_writes_outside_the_reach(padding_factor):
    """Points on the largest shell, at random poses (the worst case: the trilinear
    footprint reaches furthest out), leave every voxel outside the reach zero; and the
    reach is not the whole cube (else packing would save nothing)."""
    radius_px = BOX // 2 - 1
    R = padded_radius(radius_px, padding_factor)
    data, weight = empty_accumulators(BOX, padding_factor, max_radius_px=radius_px)
    rng = np.random.default_rng(0)
    coords, _ = image_fourier_coords(BOX, radius_px)  # (M, 2) ky, kx
    r = np.hypot(coords[:, 0], coords[:, 1])
    coords = coords[r > radius_px - 1]
    angles = rng.uniform([-180, 0, -180], [180, 180, 180], (200, 3))
    rotations = np.stack([euler_to_matrix(*a) for a in angles])
    values = np.ones((len(rotations), len(coords)), np.complex128)
    insert_points(data, weight, rotations, coords, values, np.ones(len(coords)), padding_factor)
    reach = half_cube_reach(data.shape)
    assert data.shape == half_cube_shape(R)
    assert np.count_nonzero(weight[reach]) > 0
    assert not weight[~reach].any() and not data[~reach].any()
    assert 0.4 < reach.mean() < 0.7


def test_packed_statistics_sum_and_expand_to_the_whole_cube_sums(tmp_path):
    """Two chunks' statistics: packed (what a task returns) then summed and expanded
    equals the sum of the whole-cube single-precision accumulators, bit for bit; the
    packed ones are about half the bytes; different layouts refuse to add."""
    store, chunk, metadata, truth = simulated_chunk(tmp_path, 12, box=BOX, pixel_size_A=PIXEL,
                                                    snr=1.0, seed=4)  # fmt: skip
    model = refine_model(store, chunk.images, truth, box=BOX, pixel_size_A=PIXEL,
                         healpix_order=1, local_sigma_deg=None)  # fmt: skip
    parts = []
    for sl in (slice(0, 6), slice(6, 12)):
        meta = {k: v[sl] for k, v in metadata.items()}
        parts.append(expectation(chunk.images[sl], meta, model)[0])
    whole = [p.expanded() for p in parts]
    assert all(p.grid_shape is not None and p.data_acc.ndim == 2 for p in parts)
    assert whole[0].data_acc.dtype == np.complex64 and whole[0].data_acc.ndim == 4
    assert parts[0].nbytes < 0.7 * whole[0].nbytes
    assert statistics_bytes(model) == parts[0].nbytes  # what the reduction's fan-in is sized by
    total = (parts[0] + parts[1]).expanded()
    reference = whole[0] + whole[1]
    np.testing.assert_array_equal(total.data_acc, reference.data_acc)
    np.testing.assert_array_equal(total.weight_acc, reference.weight_acc)
    assert np.abs(total.data_acc).max() > 0
    # packing a packed or expanding an expanded one changes nothing
    np.testing.assert_array_equal(parts[0].compact().data_acc, parts[0].data_acc)
    assert whole[0].expanded() is whole[0]
    with pytest.raises(ValueError, match="different layouts"):
        parts[0] + whole[1]


def test_class2d_rows_are_not_packed():
    rows = SufficientStatistics(
        data_acc=np.ones((3, 50), np.complex128),
        weight_acc=np.ones((3, 50)),
        noise_power=np.zeros((1, 5)),
        noise_count=np.zeros((1, 5)),
    ).compact()
    assert rows.grid_shape is None and rows.data_acc.shape == (3, 50)
    assert rows.data_acc.dtype == np.complex64
