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


def test_prepass_in_local_searches_past_the_first_local_order():
    first = RefineSchedule(
        healpix_order=3, local_from_order=3, local_sigma_deg=11.25, best_resolution_A=10.0
    )
    later = RefineSchedule(healpix_order=4, local_from_order=3, local_sigma_deg=5.6)
    assert not first.prepass and later.prepass
    assert not RefineSchedule(healpix_order=4, local_from_order=3).prepass  # global
    assert not RefineSchedule(
        healpix_order=4, local_from_order=3, local_sigma_deg=5.6, local_prepass=False
    ).prepass
    # advancing into the next order turns it on; the checkpoint keeps the choice
    s2 = advance(first, 10.2, 1.0, 0.1, 150.0, sigma_offset_px=1.0)
    assert s2.healpix_order == 4 and s2.prepass
    off = RefineSchedule.from_json({**later.to_json(), "local_prepass": False})
    assert not off.prepass
