"""3D auto-refine (RELION's refine3d): gold-standard halves, on the one run loop.

The job's definition (:class:`Refine3DJob`) for :func:`streamem.em.engine.run_job`:
the E-step model holds the projectors of both half maps (masked by the solvent mask,
in the work box of the current resolution), sampled as the schedule
(:mod:`streamem.em.schedule`) says; the M-step reconstructs each half from its own
particles (rlnRandomSubset), takes the resolution from their FSC and advances the
schedule; the final iteration (full box) joins the halves into ``run_class001.mrc``.
Outputs use RELION's names (``run_itNNN_half{1,2}_class001_unfil.mrc``, ``_model.star``
with the gold-standard FSC, ``run_fsc.png``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from streamem import validate as check
from streamem.core.filters import lowpass
from streamem.core.fourier import n_points_within
from streamem.core.fsc import fsc as fourier_shell_correlation
from streamem.core.fsc import resolution_at
from streamem.core.projector import half_cube_shape, padded_radius
from streamem.core.symmetry import symmetry_matrices
from streamem.em import engine, memory, mstep, runfiles, runfolder
from streamem.em.estep import EStepModel, SearchGrid, expectation
from streamem.em.fourier_points import half_plane_points
from streamem.em.memory import EStepShape
from streamem.em.schedule import RefineSchedule, advance
from streamem.errors import InputError
from streamem.io.mrc import read_map, read_solvent_mask, write_map
from streamem.io.results import read_results
from streamem.io.store import ParticleStore

log = logging.getLogger("streamem")


@dataclass
class RefineResult:
    """What a refinement produced; ``plot()`` draws the FSC curve."""

    out_dir: Path
    map: np.ndarray
    half_maps: np.ndarray
    fsc: np.ndarray
    resolution_A: float
    pixel_size_A: float
    iterations: int
    poses: dict = field(repr=False, default_factory=dict)

    def plot(self, ax=None):
        import matplotlib.pyplot as plt

        ax = ax or plt.gca()
        shells = np.arange(len(self.fsc))
        ax.plot(shells / (self.map.shape[0] * self.pixel_size_A), self.fsc)
        ax.axhline(0.143, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("spatial frequency (1/Å)")
        ax.set_ylabel("gold-standard FSC")
        ax.set_title(f"{self.resolution_A:.2f} Å")
        return ax

    def __repr__(self) -> str:
        from streamem.display import short_repr

        return short_repr("RefineResult", out_dir=self.out_dir, resolution_A=self.resolution_A,
                          iterations=self.iterations, map=self.map)  # fmt: skip

    def _repr_html_(self) -> str:
        from streamem.display import refine_html

        return refine_html(self)  # table, FSC, map slices, angular distribution


@dataclass(frozen=True)
class RefineOptions:
    """Parameters of a refine3d run (RELION option names in brackets).

    Every value is checked on construction (:mod:`streamem.validate`): an impossible
    one raises :class:`InputError` naming the CLI option, before any work starts.
    ``max_iterations`` counts the final iteration (halves joined), so it is >= 2.
    :meth:`check_box` checks what needs the store (the diameter against the box).
    """

    particle_diameter_A: float | None = None  # --particle_diameter (default 0.8 x box)
    ini_high_A: float = 30.0  # --ini_high
    symmetry: str = "C1"  # --sym
    tau2_fudge: float = 1.0  # --tau2_fudge
    healpix_order: int = 2  # --healpix_order (coarse)
    offset_range_px: float = 6.0  # --offset_range
    offset_step_px: float = 2.0  # --offset_step
    local_from_order: int = 3  # --auto_local_healpix_order
    max_order: int = 5  # coarsest order the schedule may reach
    local_prepass: bool = True  # --no-local-prepass: RELION's plain local searches
    max_iterations: int = 25  # --iter
    do_ctf: bool = True
    flatten_solvent: bool = True
    split_every: int = 8
    padding_factor: int = 2  # --pad
    memory_per_worker_bytes: int | None = None  # --memory-per-worker: E-step budget (em.memory)
    solvent_mask: str | None = None  # --solvent_mask: MRC mask (else a soft sphere), masked FSC
    reference_on_data_scale: bool = (
        False  # else the first iteration fits the scale (--firstiter_cc)
    )

    def __post_init__(self):
        check.positive("--particle-diameter", self.particle_diameter_A, "Å")
        check.positive("--ini-high", self.ini_high_A, "Å")
        check.symmetry("--sym", self.symmetry)
        check.positive("--tau2-fudge", self.tau2_fudge)
        check.healpix_order("--healpix-order", self.healpix_order)
        check.non_negative("--offset-range", self.offset_range_px, "pixels")
        check.positive("--offset-step", self.offset_step_px, "pixels")
        check.at_least("--auto-local-healpix-order", self.local_from_order, 0)
        check.healpix_order("max_order", self.max_order)
        # one iteration plus the final one with the halves joined
        check.at_least("--iterations", self.max_iterations, 2)
        check.at_least("split_every", self.split_every, 2)  # a tree reduction's fan-in
        check.at_least("padding_factor", self.padding_factor, 1)

    def check_box(self, box_size: int, pixel_size_A: float) -> None:
        """What needs the store: the particle diameter fits in the box."""
        check.diameter_fits_box(
            "--particle-diameter", self.particle_diameter_A, box_size, pixel_size_A
        )


def check_estep_memory(store, options, client) -> None:
    """Refuse, before iteration 1, a run whose final iteration cannot fit one image.

    The final iteration is the largest (full box, both halves' accumulators): its
    model, accumulators and chunk of images, plus one image's E-step at the first
    iteration's global grid, must fit the budget of the smallest worker's thread
    (:mod:`streamem.em.memory`). Raises InputError (one line) with the estimate.
    """
    B = store.box_size
    radius = float(B // 2 - 1)
    coords, _, _ = half_plane_points(B, radius)
    voxels = math.prod(half_cube_shape(padded_radius(radius, options.padding_factor)))
    thread_bytes = min(_thread_memory(client, options.memory_per_worker_bytes))
    step_deg = 60.0 / 2**options.healpix_order
    J = int(12 * 4**options.healpix_order * 360.0 / step_deg)
    # the coarse pass's radius (EStepModel.coarse_radius_px) at the first order
    diameter_A = options.particle_diameter_A or 0.8 * B * store.pixel_size_A
    coarse_px = B * store.pixel_size_A / (step_deg / 360.0 * math.pi * diameter_A / 1.2)
    Mc = n_points_within(coords, coarse_px)
    shape = EStepShape(
        box_size=B,
        n_points=coords.shape[0],
        n_coarse_points=Mc,
        n_orientations=J,
        n_orientations_total=J,
        n_translations=int((2 * options.offset_range_px / options.offset_step_px + 1) ** 2),
    )
    resident = memory.resident_bytes(store.chunk_size, B, 2 * voxels, 1) + 2 * 8 * voxels
    budget = memory.workspace_budget_bytes(thread_bytes, resident, capped=False)
    one = memory.peak_bytes(memory.estep_stage_bytes(shape, 1))
    if budget < one:
        raise InputError(
            None,
            f"box {B}: the final iteration needs ~{(resident + one) / 2**20:.0f} MiB per "
            f"thread (accumulators, model and a chunk of {store.chunk_size} images "
            f"~{resident / 2**20:.0f} MiB, one image's E-step ~{one / 2**20:.0f} MiB) but a "
            f"thread has {thread_bytes / 2**20:.0f} MiB, of which half may be used; give "
            "more memory per worker (--memory-per-worker), fewer threads per worker, or a "
            "smaller box",
        )


def _thread_memory(client, memory_per_worker_bytes) -> list[int]:
    """Memory per thread of each worker (the threaded scheduler: of this process)."""
    if client is None:
        return [memory.thread_memory_bytes(memory_per_worker_bytes)]
    workers = client.scheduler_info().get("workers", {}).values()
    out = [
        int((memory_per_worker_bytes or w.get("memory_limit") or 0) // max(1, w.get("nthreads", 1)))
        for w in workers
    ]
    out = [x for x in out if x > 0]
    return out or [memory.thread_memory_bytes(memory_per_worker_bytes)]


def refine3d(
    store: str | Path | ParticleStore,
    reference: str | Path | np.ndarray,
    out_dir: str | Path,
    options: RefineOptions | None = None,
    client=None,
    continue_run: bool = False,
    progress: bool = False,
    stop_after_iteration: int | None = None,
    write_stacks: bool = False,
) -> RefineResult:
    """RELION's 3D auto-refine: gold-standard halves, regularised likelihood.

    store: particle store (path or handle). reference: starting map (MRC path or
    (B, B, B) array at the store's pixel size); it is low-passed to ``ini_high_A``.
    out_dir: run folder (created). client: a ``distributed.Client`` or None (threads).
    continue_run: resume from the newest complete iteration in ``out_dir``.
    progress: a progress bar over each iteration's chunks.
    stop_after_iteration: stop (resumably) once this iteration is complete.
    write_stacks: a store without stacks is first written as MRCS stacks into
    ``out_dir/Particles``, which the run's STAR files name (:mod:`streamem.io.run_images`).
    ``options.solvent_mask``: an MRC mask (RELION's --solvent_mask) for solvent flattening
    and the masked FSC of ``run_fsc.png``.
    The job holds ``out_dir`` (:func:`streamem.em.runfolder.claim`): one job at a time,
    continued only on the same store with the same options, restartable when it died
    before its first checkpoint.
    """
    options = options or RefineOptions()
    store = store if isinstance(store, ParticleStore) else ParticleStore(store)
    options.check_box(store.box_size, store.pixel_size_A)  # before the run folder is created
    B, p = store.box_size, store.pixel_size_A
    ref = None if continue_run else engine.load_reference(reference, B, p)
    mask = read_solvent_mask(options.solvent_mask, B) if options.solvent_mask else None
    job = Refine3DJob(options, ref, mask, write_stacks)
    with runfolder.claim(out_dir, "refine3d", store, options, continue_run, STATE_KEYS) as run:
        ctx = engine.run_context(store, run, options, client, progress)
        state = engine.run_job(job, ctx, stop_after_iteration)
    if state["stopped"]:
        halves = state["halves"]
        return RefineResult(
            ctx.out_dir, halves.mean(axis=0), halves, state["fsc"], state["resolution_A"], p,
            state["iteration"],
        )  # fmt: skip
    final = runfiles.latest_state(ctx.out_dir, STATE_KEYS)
    return RefineResult(
        out_dir=ctx.out_dir,
        map=read_map(ctx.out_dir / "run_class001.mrc")[0],
        half_maps=state["halves"],
        fsc=np.asarray(final["fsc"]),
        resolution_A=final["resolution_A"],
        pixel_size_A=p,
        iterations=final["iteration"],
        poses=read_results(ctx.results_path, final["iteration"]),
    )


#: What a refine3d checkpoint must hold to be resumed from (runfiles.read_checkpoint).
STATE_KEYS = ("schedule", "inv_sigma2", "sigma_offset_A", "resolution_A", "half_maps", "fsc")


@dataclass(frozen=True)
class Refine3DJob:
    """refine3d for :func:`streamem.em.engine.run_job` (state: ``schedule``, ``halves``
    (2, B, B, B), ``resolution_A``, ``fsc`` (B//2+1,), ``mask``; see engine.Job)."""

    options: RefineOptions
    reference: np.ndarray | None  # the starting map (None when continuing)
    solvent_mask: np.ndarray | None = None  # --solvent-mask (B, B, B) in [0, 1]
    write_stacks: bool = False  # --write-stacks: MRCS stacks in RUN/Particles first
    kind: ClassVar[engine.JobKind] = engine.JobKind("refine3d", False, expectation)

    def start(self, ctx, checkpoint: dict | None) -> dict:
        o, p = self.options, ctx.pixel_size_A
        if checkpoint is not None:
            state = {
                "schedule": with_max_iterations(
                    RefineSchedule.from_json(checkpoint["schedule"]), o.max_iterations
                ),
                "halves": np.stack([read_map(ctx.out_dir / f)[0] for f in checkpoint["half_maps"]]),
                "resolution_A": checkpoint["resolution_A"],
                "fsc": np.asarray(checkpoint["fsc"]),
            }
        else:
            ref = lowpass(self.reference, o.ini_high_A, p)
            state = {
                "halves": np.stack([ref, ref]),
                "sigma_offset_A": o.offset_range_px * p / 2,
                "resolution_A": o.ini_high_A,
                "schedule": RefineSchedule(
                    healpix_order=o.healpix_order,
                    offset_range_px=o.offset_range_px,
                    offset_step_px=o.offset_step_px,
                    local_from_order=o.local_from_order,
                    max_order=o.max_order,
                    max_iterations=o.max_iterations,
                    local_prepass=o.local_prepass,
                ),
            }
        check_estep_memory(ctx.store, o, ctx.client)  # refuse before iteration 1 (one line)
        if self.write_stacks and checkpoint is None:
            runfiles.write_stacks_for_relion(ctx)
        return {**state, "mask": self.mask(ctx)}

    def mask(self, ctx) -> np.ndarray | None:
        """The solvent mask: --solvent-mask's, else a soft sphere (unless not flattening)."""
        if self.solvent_mask is not None:
            return self.solvent_mask
        if not self.options.flatten_solvent:
            return None
        return engine.solvent_mask_for(ctx.box_size, ctx.pixel_size_A, ctx.diameter_A)

    def finished(self, state: dict) -> bool:
        return state["schedule"].converged

    def model(self, ctx, state: dict, iteration: int) -> EStepModel:
        o, s, B, p = self.options, state["schedule"], ctx.box_size, ctx.pixel_size_A
        final = s.final_iteration
        b, radius = (
            engine.work_box_for(state["resolution_A"], B, p) if not final else (B, B // 2 - 1)
        )
        grid = SearchGrid(
            healpix_order=s.healpix_order,
            oversampling=s.oversampling,
            offset_range_px=s.offset_range_px,
            offset_step_px=s.offset_step_px,
            local_sigma_deg=s.local_sigma_deg,
            symmetry=o.symmetry,
            local_prepass=s.prepass,
        )
        return engine.estep_model_3d(ctx, state, state["halves"], b, radius, grid, o, iteration)

    def maximise(self, ctx, state: dict, model: EStepModel, stats) -> dict:
        """Both halves from their own accumulators, their FSC and resolution; the schedule."""
        o, B, p, b = self.options, ctx.box_size, ctx.pixel_size_A, model.work_box
        sym_mats = symmetry_matrices(o.symmetry)
        maps_b, fsc_b = mstep.reconstruct_halves(
            stats.data_acc, stats.weight_acc, b, o.padding_factor, o.tau2_fudge, sym_mats
        )
        halves = np.stack([mstep.to_full_frame(m, B) for m in maps_b])
        fsc = np.zeros(B // 2 + 1)
        fsc[: len(fsc_b)] = fsc_b
        resolution_A = resolution_at(fsc, 0.143, B, p)
        n_prev = max(stats.n_with_previous, 1)
        pose_change = stats.pose_change_deg_sum / n_prev if stats.n_with_previous else 180.0
        offset_change_px = stats.offset_change_A_sum / n_prev / p if stats.n_with_previous else 99.0
        joined = state["schedule"].final_iteration
        schedule = advance(
            state["schedule"], resolution_A, pose_change, offset_change_px, ctx.diameter_A,
            state["sigma_offset_A"] / p,
        )  # fmt: skip
        if joined:
            schedule = replace(schedule, converged=True)
        return {
            **state,
            "halves": halves,
            "fsc": fsc,
            "resolution_A": resolution_A,
            "schedule": schedule,
            "joined": joined,
            "changes": (pose_change, offset_change_px),
        }

    def write_outputs(self, ctx, state: dict, model: EStepModel, stats, prefix: Path) -> dict:
        out_dir, p = ctx.out_dir, ctx.pixel_size_A
        half_names = [f"{prefix.name}_half{h + 1}_class001_unfil.mrc" for h in range(2)]
        for h in range(2):
            write_map(out_dir / half_names[h], state["halves"][h], p)
        engine.write_model(
            ctx, state, stats, prefix, model.work_box, self.options.tau2_fudge,
            {"rlnAngularSampling": model.grid.fine_angular_step_deg},
            [{"rlnGoldStandardFsc": state["fsc"]}], noise_axes=("rlnSpectralIndex", "rlnResolution"),
        )  # fmt: skip
        if state["joined"]:
            self.write_final(ctx, state, stats, model.work_box, prefix)
        return {
            "schedule": state["schedule"].to_json(),
            "resolution_A": state["resolution_A"],
            "half_maps": half_names,
            "fsc": state["fsc"].tolist(),
        }

    def write_final(self, ctx, state: dict, stats, b: int, prefix: Path) -> None:
        """Join the halves (final iteration): the map from both accumulators, RELION names."""
        o, out_dir, B, p = self.options, ctx.out_dir, ctx.box_size, ctx.pixel_size_A
        fsc = state["fsc"]
        joined = mstep.reconstruct_joined(
            stats.data_acc, stats.weight_acc, fsc[: b // 2 + 1], b, o.padding_factor,
            o.tau2_fudge, symmetry_matrices(o.symmetry),
        )  # fmt: skip
        final_map = mstep.to_full_frame(joined, B)
        write_map(out_dir / "run_class001.mrc", final_map, p)
        maps = {"run_class001.mrc": final_map}
        for h in range(2):
            maps[f"run_half{h + 1}_class001_unfil.mrc"] = state["halves"][h]
            write_map(out_dir / f"run_half{h + 1}_class001_unfil.mrc", state["halves"][h], p)
        for suffix in ("data.star", "model.star"):
            src = Path(f"{prefix}_{suffix}")
            (out_dir / f"run_{suffix}").write_bytes(src.read_bytes())
        curves = {"gold-standard": fsc}
        if self.solvent_mask is not None:  # the halves' FSC inside --solvent-mask
            m, halves = self.solvent_mask, state["halves"]
            curves["masked"] = fourier_shell_correlation(halves[0] * m, halves[1] * m)
        runfiles.plot_fsc(out_dir / "run_fsc.png", curves, B, p, state["resolution_A"])
        iteration = runfiles.prefix_iteration(prefix)
        runfiles.write_view_files(ctx, iteration, maps, state["mask"], n_classes=1)

    def log_line(self, state: dict, model, iteration: int, changed: float, seconds: float) -> str:
        pose_change, offset_change_px = state["changes"]
        grid = model.grid
        return (
            f"it {iteration:3d}  res {state['resolution_A']:6.2f} A  step "
            f"{grid.fine_angular_step_deg:5.2f} deg{' (local)' if grid.local_sigma_deg else ''}"
            f"  pose change {pose_change:6.2f} deg  offset change {offset_change_px:5.2f} px"
            f"  box {model.work_box:3d}  {seconds:6.1f} s"
        )


def with_max_iterations(schedule: RefineSchedule, max_iterations: int) -> RefineSchedule:
    """A resumed schedule bounded by ``--iterations`` as given now (it may change
    on ``--continue``). A run already at or past its final iteration is left as it is:
    the halves are about to be, or were, joined."""
    if schedule.final_iteration or schedule.converged:
        return schedule
    return replace(
        schedule,
        max_iterations=max_iterations,
        final_iteration=schedule.iteration + 1 >= max_iterations,  # as advance() decides
    )


def half_map_fsc(halves: np.ndarray) -> np.ndarray:
    return fourier_shell_correlation(halves[0], halves[1])
