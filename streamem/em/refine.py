"""3D auto-refine as a streaming Dask job (the driver: graphs, outputs, schedule).

Per iteration: the E-step model (projectors of both half maps, noise spectra,
priors, sampling) goes to the workers once (``scatter``); one task per store chunk
runs :func:`streamem.em.estep.expectation`, writes its particles' poses into
``particles.zarr`` and returns its :class:`SufficientStatistics`; the statistics
are tree-reduced (``split_every`` 8) and the M-step runs on the client. Outputs use
RELION's names. Without a client the same graph runs on Dask's threaded scheduler.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import dask
import numpy as np

from streamem import validate as check
from streamem.core.filters import lowpass
from streamem.core.fsc import fsc as fourier_shell_correlation
from streamem.core.fsc import resolution_at
from streamem.core.masks import soft_sphere
from streamem.core.projector import half_cube_shape, make_projector, padded_radius
from streamem.core.symmetry import symmetry_matrices
from streamem.dist.graph import map_chunks, split_every_for, tree_sum
from streamem.em import memory, mstep, runfiles, runfolder
from streamem.em.estep import EStepModel, SearchGrid, expectation
from streamem.em.fourier_points import half_plane_points
from streamem.em.memory import EStepShape
from streamem.em.schedule import RefineSchedule, advance
from streamem.errors import InputError
from streamem.io.mrc import read_map, write_map
from streamem.io.store import ParticleStore, optics_params

log = logging.getLogger("streamem")

INCREMENT_SHELLS = 10  # RELION's incr_size: shells beyond the resolution kept each iteration


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
    max_iterations: int = 25  # --iter
    do_ctf: bool = True
    flatten_solvent: bool = True
    split_every: int = 8
    padding_factor: int = 2  # --pad
    memory_per_worker_bytes: int | None = None  # --memory-per-worker: E-step budget (em.memory)
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
        check.at_least("--max-iterations", self.max_iterations, 2)
        check.at_least("split_every", self.split_every, 2)  # a tree reduction's fan-in
        check.at_least("padding_factor", self.padding_factor, 1)

    def check_box(self, box_size: int, pixel_size_A: float) -> None:
        """What needs the store: the particle diameter fits in the box."""
        check.diameter_fits_box(
            "--particle-diameter", self.particle_diameter_A, box_size, pixel_size_A
        )


def estep_task(
    start, stop, store_path, results_path, prev_iteration, iteration, model, expectation_fn
):
    """One chunk's E-step: read, compute, write per-particle results, return statistics.

    ``expectation_fn(images, metadata, model) -> (statistics, ChunkResult)`` is the
    engine's E-step (refine3d, class3d or class2d).
    """
    store = ParticleStore(store_path)
    chunk = store.read_chunk(start, stop)
    meta = dict(chunk.metadata)
    meta["particle_index"] = np.arange(start, stop)  # for seeded classes (class3d)
    if prev_iteration is not None:
        meta.update(runfiles.read_results(results_path, prev_iteration, start, stop))
    stats, result = expectation_fn(chunk.images, meta, model)
    runfiles.write_results(results_path, iteration, start, result.as_columns())
    return stats


def run_estep(
    store,
    results_path,
    prev_iteration,
    iteration,
    model,
    client,
    expectation_fn,
    split_every=8,
    name="estep",
    progress=False,
):
    """One iteration's graph: the model sent once, one task per chunk, statistics tree-summed.

    ``progress`` shows a progress bar over the chunks (text in a terminal, a widget in a
    notebook). Each task bounds its own memory (:mod:`streamem.em.memory`); the tree's
    ``split_every`` is lowered for big statistics (:func:`split_every_for`). A worker
    killed for memory anyway (``KilledWorker``) stops the run with one line naming the
    iteration: the last complete iteration's checkpoint is untouched, so ``--continue``
    resumes from it.
    """
    runfiles.create_results_arrays(results_path, iteration, store.n_particles, store.chunk_size)
    parts = map_chunks(
        estep_task,
        store.chunk_bounds(),
        str(store.path),
        str(Path(results_path).absolute()),  # a worker's working folder is not ours
        prev_iteration,
        iteration,
        _broadcast(model, client),
        expectation_fn,
        name=f"{name}-it{iteration:03d}",
    )
    split_every = split_every_for(statistics_bytes(model), split_every)
    graph = tree_sum(parts, split_every, name=f"{name}-stats-it{iteration:03d}")
    try:
        return _compute(graph, client, progress)
    except Exception as exc:
        if type(exc).__name__ != "KilledWorker":
            raise
        raise InputError(
            None,
            f"iteration {iteration}: a Dask worker died repeatedly while running it "
            f"(usually out of memory: give more memory per worker with --memory-per-worker "
            "or fewer threads per worker); "
            + (
                f"resume after iteration {prev_iteration} with --continue"
                if prev_iteration
                else "no iteration is complete yet: rerun without --continue"
            ),
        ) from None


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
    Mc = int(np.searchsorted(np.hypot(coords[:, 0], coords[:, 1]), coarse_px, side="right"))
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


def statistics_bytes(model) -> int:
    """Bytes of one task's returned statistics (single-precision accumulators).

    refine3d: two half cubes; class3d (``model.base``): two per class; class2d: one
    (M,) row per class.
    """
    base = getattr(model, "base", model)
    projectors = getattr(base, "projectors", None)
    if projectors:
        n_acc = 2 * len(projectors) if base is not model else 2
        voxels = math.prod(
            half_cube_shape(padded_radius(base.max_radius_px, projectors[0].padding_factor))
        )
        return 12 * n_acc * voxels
    class_images = getattr(model, "class_images", None)
    if class_images is not None:
        return 12 * class_images.size
    return 0


def _power_task(start, stop, store_path, n_groups):
    store = ParticleStore(store_path)
    chunk = store.read_chunk(start, stop)
    groups = np.asarray(chunk.metadata["rlnOpticsGroup"], np.int64) - 1
    return mstep.image_power(chunk.images, groups, n_groups)


def initial_noise(store, client, split_every: int = 8) -> np.ndarray:
    """1/σ² (G, B//2+1) from the images' mean power spectra (a pass over the store)."""
    n_groups = len(store.optics_groups)
    parts = map_chunks(_power_task, store.chunk_bounds(), str(store.path), n_groups, name="power")
    power = _compute(tree_sum(parts, split_every), client)
    return mstep.initial_inv_sigma2(power[0], power[1])


def _compute(graph, client, progress: bool = False):
    progress = progress and sys.stdout.isatty()  # bars would flood a log file
    if client is None:
        if progress:
            from dask.diagnostics import ProgressBar

            with ProgressBar(minimum=2.0):
                return dask.compute(graph, scheduler="threads")[0]
        return dask.compute(graph, scheduler="threads")[0]
    future = client.compute(graph)
    if progress:
        from distributed import progress as show_progress

        show_progress(future, multi=False)
    return future.result()


def _broadcast(model, client):
    if client is None:
        return dask.delayed(model, pure=False)
    return client.scatter(model, broadcast=True, hash=False)


def work_box_for(resolution_A: float, box_size: int, pixel_size_A: float) -> tuple[int, float]:
    """(work box b, radius in Fourier pixels) for the current resolution (RELION current_size)."""
    shell = box_size * pixel_size_A / resolution_A if math.isfinite(resolution_A) else 0
    radius = min(box_size // 2 - 1, math.ceil(shell) + INCREMENT_SHELLS)
    b = min(box_size, 2 * (radius + 2))
    return b, float(radius)


def solvent_mask_for(box_size: int, pixel_size_A: float, diameter_A: float) -> np.ndarray:
    radius_px = 0.5 * diameter_A / pixel_size_A
    return soft_sphere(box_size, radius_px, edge_px=max(3.0, 0.05 * box_size))


def refine3d(
    store: str | Path | ParticleStore,
    reference: str | Path | np.ndarray,
    out_dir: str | Path,
    options: RefineOptions | None = None,
    client=None,
    continue_run: bool = False,
    progress: bool = False,
    stop_after_iteration: int | None = None,
) -> RefineResult:
    """RELION's 3D auto-refine: gold-standard halves, regularised likelihood.

    store: particle store (path or handle). reference: starting map (MRC path or
    (B, B, B) array at the store's pixel size); it is low-passed to ``ini_high_A``.
    out_dir: run folder (created). client: a ``distributed.Client`` or None (threads).
    continue_run: resume from the newest complete iteration in ``out_dir``.
    progress: a progress bar over each iteration's chunks.
    stop_after_iteration: stop (resumably) once this iteration is complete.
    The job holds ``out_dir`` (:func:`streamem.em.runfolder.claim`): one job at a time,
    continued only on the same store with the same options, restartable when it died
    before its first checkpoint.
    """
    options = options or RefineOptions()
    store = store if isinstance(store, ParticleStore) else ParticleStore(store)
    options.check_box(store.box_size, store.pixel_size_A)  # before the run folder is created
    ref = None if continue_run else _load_reference(reference, store.box_size, store.pixel_size_A)
    with runfolder.claim(out_dir, "refine3d", store, options, continue_run, STATE_KEYS) as run:
        return _refine3d(store, ref, run, options, client, progress, stop_after_iteration)


#: What a refine3d checkpoint must hold to be resumed from (runfiles.read_checkpoint).
STATE_KEYS = ("schedule", "inv_sigma2", "sigma_offset_A", "resolution_A", "half_maps", "fsc")


def _refine3d(store, ref, run, options, client, progress, stop_after_iteration) -> RefineResult:
    """refine3d's loop in a claimed run folder (``run.state``: the checkpoint to resume)."""
    out_dir = run.out_dir
    B, p = store.box_size, store.pixel_size_A
    diameter = options.particle_diameter_A or 0.8 * B * p
    sym_mats = symmetry_matrices(options.symmetry)
    optics = tuple(optics_params(g) for g in store.optics_groups)
    do_ctf = options.do_ctf and store.has_fields(("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"))
    results_path = out_dir / "particles.zarr"
    mask = solvent_mask_for(B, p, diameter) if options.flatten_solvent else None

    state = run.state
    if state is not None:
        schedule = with_max_iterations(
            RefineSchedule.from_json(state["schedule"]), options.max_iterations
        )
        inv_sigma2 = np.asarray(state["inv_sigma2"])
        sigma_offset_A = state["sigma_offset_A"]
        halves = np.stack([read_map(out_dir / f)[0] for f in state["half_maps"]])
        resolution_A = state["resolution_A"]
        prev_iteration = state["iteration"]
        log.info("continuing from iteration %d", prev_iteration)
    else:
        ref = lowpass(ref, options.ini_high_A, p)
        halves = np.stack([ref, ref])
        inv_sigma2 = initial_noise(store, client, options.split_every)
        sigma_offset_A = options.offset_range_px * p / 2
        resolution_A = options.ini_high_A
        schedule = RefineSchedule(
            healpix_order=options.healpix_order,
            offset_range_px=options.offset_range_px,
            offset_step_px=options.offset_step_px,
            local_from_order=options.local_from_order,
            max_order=options.max_order,
            max_iterations=options.max_iterations,
        )
        prev_iteration = None

    check_estep_memory(store, options, client)  # refuse before iteration 1 (one line)
    while not schedule.converged:
        iteration = schedule.iteration + 1
        t0 = time.perf_counter()
        final = schedule.final_iteration
        b, radius = work_box_for(resolution_A, B, p) if not final else (B, float(B // 2 - 1))
        refs = [h * mask if mask is not None else h for h in halves]
        projectors = tuple(
            make_projector(mstep.to_work_frame(h, b), options.padding_factor, max_radius_px=radius)
            for h in refs
        )
        grid = SearchGrid(
            healpix_order=schedule.healpix_order,
            oversampling=schedule.oversampling,
            offset_range_px=schedule.offset_range_px,
            offset_step_px=schedule.offset_step_px,
            local_sigma_deg=schedule.local_sigma_deg,
            symmetry=options.symmetry,
        )
        model = EStepModel(
            projectors=projectors,
            box_size=B,
            work_box=b,
            pixel_size_A=p,
            max_radius_px=radius,
            inv_sigma2=inv_sigma2,
            optics=optics,
            sigma_offset_A=sigma_offset_A,
            grid=grid,
            do_ctf=do_ctf,
            particle_diameter_A=diameter,
            memory_per_worker_bytes=options.memory_per_worker_bytes,
            scale_free=iteration == 1 and not options.reference_on_data_scale,
        )
        stats = run_estep(
            store,
            results_path,
            prev_iteration,
            iteration,
            model,
            client,
            expectation,
            options.split_every,
            progress=progress,
        )

        maps_b, fsc_b = mstep.reconstruct_halves(
            stats.data_acc,
            stats.weight_acc,
            b,
            options.padding_factor,
            options.tau2_fudge,
            sym_mats,
        )
        halves = np.stack([mstep.to_full_frame(m, B) for m in maps_b])
        fsc = np.zeros(B // 2 + 1)
        fsc[: len(fsc_b)] = fsc_b
        resolution_A = resolution_at(fsc, 0.143, B, p)
        if not model.scale_free:  # noise sums need a reference on the data's scale
            inv_sigma2 = mstep.update_inv_sigma2(inv_sigma2, stats.noise_power, stats.noise_count)
        sigma_offset_A = mstep.update_sigma_offset_A(
            stats.offset_sq_A2, stats.weight_sum, floor_A=p
        )
        n_prev = max(stats.n_with_previous, 1)
        pose_change = stats.pose_change_deg_sum / n_prev if stats.n_with_previous else 180.0
        offset_change_px = stats.offset_change_A_sum / n_prev / p if stats.n_with_previous else 99.0

        prefix = runfiles.iteration_prefix(out_dir, iteration)
        half_names = [f"{prefix.name}_half{h + 1}_class001_unfil.mrc" for h in range(2)]
        for h in range(2):
            write_map(out_dir / half_names[h], halves[h], p)
        results = runfiles.read_results(results_path, iteration)
        runfiles.write_data_star(Path(f"{prefix}_data.star"), store, results)
        general = {
            "rlnCurrentResolution": resolution_A,
            "rlnCurrentImageSize": b,
            "rlnPixelSize": p,
            "rlnOriginalImageSize": B,
            "rlnNrClasses": 1,
            "rlnTau2FudgeFactor": options.tau2_fudge,
            "rlnLogLikelihood": stats.loglik_sum,
            "rlnSigmaOffsetsAngst": sigma_offset_A,
            "rlnAngularSampling": grid.fine_angular_step_deg,
        }
        runfiles.write_model_star(Path(f"{prefix}_model.star"), general, fsc, B, p, inv_sigma2)
        seconds = time.perf_counter() - t0
        log.info(
            "it %3d  res %6.2f A  step %5.2f deg%s  pose change %6.2f deg  offset change %5.2f px  box %3d  %6.1f s",
            iteration,
            resolution_A,
            grid.fine_angular_step_deg,
            " (local)" if grid.local_sigma_deg else "",
            pose_change,
            offset_change_px,
            b,
            seconds,
        )
        schedule = advance(
            schedule, resolution_A, pose_change, offset_change_px, diameter, sigma_offset_A / p
        )
        if final:
            schedule = replace(schedule, converged=True)
            _write_final(
                out_dir, prefix, stats, b, options, sym_mats, fsc, resolution_A, B, p, halves
            )
        runfiles.write_checkpoint(
            Path(f"{prefix}_optimiser.json"),
            {
                "iteration": iteration,
                "schedule": schedule.to_json(),
                "inv_sigma2": inv_sigma2.tolist(),
                "sigma_offset_A": sigma_offset_A,
                "resolution_A": resolution_A,
                "half_maps": half_names,
                "fsc": fsc.tolist(),
                "run": run.record,  # store and options, checked by --continue
            },
        )
        prev_iteration = iteration
        if (
            stop_after_iteration is not None
            and iteration >= stop_after_iteration
            and not schedule.converged
        ):
            log.info("stopped after iteration %d; resume with --continue", iteration)
            return RefineResult(
                out_dir, halves.mean(axis=0), halves, fsc, resolution_A, p, iteration
            )

    final_map = read_map(out_dir / "run_class001.mrc")[0]
    state = runfiles.latest_state(out_dir, STATE_KEYS)
    return RefineResult(
        out_dir=out_dir,
        map=final_map,
        half_maps=halves,
        fsc=np.asarray(state["fsc"]),
        resolution_A=state["resolution_A"],
        pixel_size_A=p,
        iterations=state["iteration"],
        poses=runfiles.read_results(results_path, state["iteration"]),
    )


def _write_final(out_dir, prefix, stats, b, options, sym_mats, fsc, resolution_A, B, p, halves):
    """Join the halves (final iteration): the map from both accumulators, RELION names."""
    n_shells = b // 2 + 1
    joined = mstep.reconstruct_joined(
        stats.data_acc,
        stats.weight_acc,
        fsc[:n_shells],
        b,
        options.padding_factor,
        options.tau2_fudge,
        sym_mats,
    )
    joined = mstep.to_full_frame(joined, B)
    write_map(out_dir / "run_class001.mrc", joined, p)
    for h in range(2):
        write_map(out_dir / f"run_half{h + 1}_class001_unfil.mrc", halves[h], p)
    for suffix in ("data.star", "model.star"):
        src = Path(f"{prefix}_{suffix}")
        (out_dir / f"run_{suffix}").write_bytes(src.read_bytes())
    runfiles.plot_fsc(out_dir / "run_fsc.png", {"gold-standard": fsc}, B, p, resolution_A)


def with_max_iterations(schedule: RefineSchedule, max_iterations: int) -> RefineSchedule:
    """A resumed schedule bounded by ``--max-iterations`` as given now (it may change
    on ``--continue``). A run already at or past its final iteration is left as it is:
    the halves are about to be, or were, joined."""
    if schedule.final_iteration or schedule.converged:
        return schedule
    return replace(
        schedule,
        max_iterations=max_iterations,
        final_iteration=schedule.iteration + 1 >= max_iterations,  # as advance() decides
    )


def _load_reference(reference, box_size: int, pixel_size_A: float) -> np.ndarray:
    if isinstance(reference, np.ndarray):
        ref = reference.astype(np.float32)
        path = "reference"
    else:
        ref, voxel = read_map(reference)
        path = reference
        if abs(voxel - pixel_size_A) > 1e-3 * pixel_size_A and voxel > 0:
            raise InputError(
                path, f"voxel size {voxel:.4f} A differs from the particles' {pixel_size_A:.4f} A"
            )
    if ref.shape != (box_size,) * 3:
        raise InputError(path, f"map is {ref.shape}, particles need ({box_size},)*3")
    return ref


def half_map_fsc(halves: np.ndarray) -> np.ndarray:
    return fourier_shell_correlation(halves[0], halves[1])
