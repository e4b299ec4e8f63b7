"""RELION's auto-refine schedule as a pure state machine."""

import math

from streamem.em.schedule import RefineSchedule, advance, required_angular_step_deg


def test_resolution_gain_keeps_the_sampling():
    s = RefineSchedule(healpix_order=2, best_resolution_A=20.0)
    s2 = advance(s, 15.0, 30.0, 1.0, 150.0)
    assert s2.healpix_order == 2 and s2.iters_without_gain == 0 and s2.best_resolution_A == 15.0


def test_stall_refines_sampling_and_switches_to_local_searches():
    s = RefineSchedule(
        healpix_order=2, best_resolution_A=10.0, local_from_order=3, offset_step_px=2.0
    )
    s2 = advance(s, 10.2, 1.0, 0.1, 150.0, sigma_offset_px=1.0)  # no gain, small changes
    assert s2.healpix_order == 3
    assert s2.offset_step_px == 1.0
    assert s2.local_sigma_deg == 1.5 * 7.5  # 1.5 coarse steps at order 3
    assert s2.offset_range_px == 3.0  # 3 sigma of the offset prior
    assert not s2.final_iteration


def test_fine_enough_sampling_then_a_stall_gives_the_final_iteration():
    s = RefineSchedule(healpix_order=4, best_resolution_A=8.0, fine_enough=True)
    s2 = advance(s, 8.1, 0.5, 0.1, 150.0)
    assert s2.final_iteration and not s2.converged
    assert advance(s2, 8.1, 0.5, 0.1, 150.0).converged


def test_max_iterations_forces_the_final_iteration():
    s = RefineSchedule(iteration=8, max_iterations=10, best_resolution_A=30.0)
    assert advance(s, 20.0, 40.0, 2.0, 150.0).final_iteration


def test_required_step():
    # a quarter of 8 A on the rim of a 160 A particle: 2 A / 80 A rad
    assert math.isclose(required_angular_step_deg(8.0, 160.0), math.degrees(2.0 / 80.0))


def _fine_grid(order, oversampling, offset_step_px, offset_range_px, max_angle_deg):
    """The fine orientations (angle triples) of the coarse orientations within
    ``max_angle_deg`` of a pose, and the fine translations (pixels) of a range."""
    import numpy as np

    from streamem.core import sampling

    parents = sampling.local_orientations(np.array([40.0, 70.0, 100.0]), order, max_angle_deg)
    kids = sampling.oversample_orientations(parents, order, oversampling).reshape(-1, 3)
    coarse = sampling.translation_grid(offset_range_px, offset_step_px)
    fine = sampling.oversample_translations(coarse, offset_step_px, oversampling).reshape(-1, 2)
    return kids, fine


def test_local_oversampling_splits_the_same_fine_grid_with_a_coarser_coarse_pass():
    import numpy as np

    # the first local order keeps oversampling 1; later local orders lower the coarse one
    first = RefineSchedule(healpix_order=3, local_from_order=3, local_sigma_deg=11.25)
    assert first.estep_sampling() == (3, 1, 2.0)
    s = RefineSchedule(healpix_order=4, local_from_order=3, local_sigma_deg=5.6, offset_step_px=0.5)
    assert s.estep_sampling() == (3, 2, 1.0)
    assert RefineSchedule(healpix_order=4, local_from_order=3).estep_sampling() == (4, 1, 2.0)
    relion = RefineSchedule(healpix_order=5, local_sigma_deg=2.8, local_oversampling=1)
    assert relion.estep_sampling() == (5, 1, 2.0)
    # the fine angular and offset steps are those of the nominal grid
    order, os_, step = s.estep_sampling()
    assert math.isclose(60 / 2 ** (order + os_), s.fine_step_deg)
    assert math.isclose(step / 2**os_, s.offset_step_px / 2**s.oversampling)
    # ... and the fine lattices coincide: every fine sample of the nominal split is one
    # of the local-oversampling split's (orientations near a pose, translations in range)
    # (the split's coarse samples reach further: 20° around the pose against 10°; its
    # translation disk has fewer coarse points, so compare within 0.75 px)
    kids_nominal, shifts_nominal = _fine_grid(4, 1, 0.5, 1.0, 10.0)
    kids_split, shifts_split = _fine_grid(order, os_, step, 1.0, 20.0)
    as_set = lambda a: {tuple(np.round(r, 6) % 360) for r in a}  # noqa: E731
    assert len(kids_nominal) > 100 and as_set(kids_nominal) <= as_set(kids_split)
    near = lambda a: a[np.hypot(a[:, 0], a[:, 1]) <= 0.75]  # noqa: E731
    assert len(near(shifts_nominal)) >= 16
    assert as_set(near(shifts_nominal)) <= as_set(shifts_split)
