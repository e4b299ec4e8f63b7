"""RELION's 3D auto-refine schedule as a pure state machine.

After each iteration (RELION's ``updateAngularSampling`` / ``checkConvergence``):
a resolution gain resets ``iters_without_gain``; small pose changes (mean change of
the best orientation under 1.5 fine angular steps and of the offset under 1.5 fine
translation steps, or no smaller than the smallest seen) count towards
``iters_without_changes``. When both counters reach 1 (RELION's
MAX_NR_ITER_WO_RESOL_GAIN and MAX_NR_ITER_WO_LARGE_HIDDEN_VARIABLE_CHANGES), the
angular sampling is halved (HEALPix order + 1) and the translation step too, the
translation range is halved with it (at most 3σ of the offset prior), so the number
of translations stays constant; from ``local_from_order`` on,
searches are local with σ = 1.5 coarse steps over ±3σ (RELION:
--auto_local_healpix_order 4; refine3d defaults to 3 because a global search at
coarse order 3, 36,864 orientations, dominated CPU time: ~300 s against ~20 s per
iteration on a 1,000-particle box-48 test). Once the fine angular step is fine enough for the
resolution (step ≤ the angle that moves the particle's rim by a quarter of the
resolution) or
``max_order`` is reached, the next stall triggers the final iteration, in which
the two halves are joined; ``max_iterations`` bounds the run.

Local searches past the first local order take their candidates from a pre-pass one
order coarser (``local_prepass``; RELION has none: its local searches score every grid
point within 3σ): the children of each image's significant orientations there, the
same significance rule, priors and fine pass (the pre-pass only ranks, so it scores
within half its order's coarse radius: ``EStepModel.prepass_radius_fraction``). An
image then meets ~64 candidates at the full coarse radius instead of ~600: on a
box-128 local chunk (``streamem bench estep-chunk --local``, one run) the E-step at the 1.88° and 0.94° fine steps ran
about 3x faster with the same median angular error. The first local order keeps the plain
search: its poses still move by a few degrees, and the same bench's 3.75° rows show
what a pre-pass at 15° costs there in accuracy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from streamem.core.sampling import angular_step_deg


@dataclass(frozen=True)
class RefineSchedule:
    iteration: int = 0
    healpix_order: int = 1
    oversampling: int = 1
    offset_range_px: float = 6.0
    offset_step_px: float = 2.0
    local_sigma_deg: float | None = None
    best_resolution_A: float = math.inf
    iters_without_gain: int = 0
    iters_without_changes: int = 0
    smallest_pose_change_deg: float = math.inf
    fine_enough: bool = False
    final_iteration: bool = False
    converged: bool = False
    local_from_order: int = 4
    max_order: int = 5
    max_iterations: int = 25
    local_prepass: bool = True

    @property
    def fine_step_deg(self) -> float:
        return angular_step_deg(self.healpix_order + self.oversampling)

    @property
    def prepass(self) -> bool:
        """Whether this iteration's local search takes its candidates from a pre-pass one
        order coarser (:attr:`streamem.em.estep.SearchGrid.local_prepass`)."""
        return (
            self.local_prepass
            and self.local_sigma_deg is not None
            and self.healpix_order > self.local_from_order
        )

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> RefineSchedule:
        return cls(**d)


def required_angular_step_deg(resolution_A: float, particle_diameter_A: float) -> float:
    """Angle (deg) that moves a point on the particle's rim by a quarter of the resolution.

    RELION stops refining the sampling once the step is below its estimate of the
    angular accuracy; without that estimate we ask for a step that keeps the rim's
    sampling error well inside one resolution element (a quarter of it).
    """
    return math.degrees(0.25 * resolution_A / (0.5 * particle_diameter_A))


def advance(
    s: RefineSchedule,
    resolution_A: float,
    mean_pose_change_deg: float,
    mean_offset_change_px: float,
    particle_diameter_A: float,
    sigma_offset_px: float | None = None,
) -> RefineSchedule:
    """The schedule for the next iteration, given this iteration's outcome."""
    if s.final_iteration:
        return replace(s, iteration=s.iteration + 1, converged=True)
    gain = resolution_A < s.best_resolution_A * 0.995
    small_changes = (
        mean_pose_change_deg < 1.5 * s.fine_step_deg
        and mean_offset_change_px < 1.5 * s.offset_step_px / 2**s.oversampling
    ) or mean_pose_change_deg >= s.smallest_pose_change_deg
    s = replace(
        s,
        iteration=s.iteration + 1,
        best_resolution_A=min(resolution_A, s.best_resolution_A),
        iters_without_gain=0 if gain else s.iters_without_gain + 1,
        iters_without_changes=s.iters_without_changes + 1 if small_changes else 0,
        smallest_pose_change_deg=min(s.smallest_pose_change_deg, mean_pose_change_deg),
    )
    stalled = s.iters_without_gain >= 1 and s.iters_without_changes >= 1
    if s.iteration + 1 >= s.max_iterations:
        return replace(s, final_iteration=True)
    if not stalled:
        return s
    if s.fine_enough or s.healpix_order >= s.max_order:
        return replace(s, final_iteration=True)
    order = s.healpix_order + 1
    local = 1.5 * angular_step_deg(order) if order >= s.local_from_order else s.local_sigma_deg
    step = max(s.offset_step_px / 2, 0.5)
    # translations: around the previous origins, ±3σ of the offset prior, at least 2 steps
    # halve the range with the step (as RELION), so the number of translations stays put
    offset_range = max(s.offset_range_px / 2, 2 * step)
    if sigma_offset_px is not None:
        offset_range = min(offset_range, max(3 * sigma_offset_px, 2 * step))
    fine_enough = angular_step_deg(order + s.oversampling) <= required_angular_step_deg(
        s.best_resolution_A, particle_diameter_A
    )
    return replace(
        s,
        healpix_order=order,
        offset_step_px=step,
        offset_range_px=offset_range,
        local_sigma_deg=local,
        iters_without_gain=0,
        iters_without_changes=0,
        smallest_pose_change_deg=math.inf,
        fine_enough=fine_enough,
    )
