"""ONE run loop for refine3d, class3d and class2d; a job is a small definition (:class:`Job`).

Per iteration (:func:`run_job`): the job builds its E-step model from its state; the
model is broadcast once and one task (:func:`chunk_task`) per store chunk, or per
equal part of a chunk where the store has few (:func:`estep_task_size`), reads its
particles and the previous iteration's per-particle results, puts the model on the
worker's device (:func:`streamem.dist.device.model_on_device`), runs the job's E-step,
writes its particles' results into ``particles.zarr`` and returns its statistics; the
statistics are tree-summed (:func:`run_estep`, through :mod:`streamem.dist.iteration`).
On the client: the noise spectra and the offset prior are updated as in RELION (the
same for every job), then the job's M-step; then the outputs, RELION-named: the job's
maps and ``_model.star``, the common ``_data.star``, the truth scores (classifications
of simulated data), and last the checkpoint ``run_itNNN_optimiser.json``, which marks
the iteration complete, and the job's log line.

What every job shares also lives here: the initial noise spectra (:func:`initial_noise`,
a pass over the store), the starting map (:func:`load_reference`), the work box for a
resolution (:func:`work_box_for`), the solvent mask, the model.star general block
(:func:`write_model`), ``--continue`` (the common state read back from a checkpoint),
and ``stop_after_iteration``. The run folder is claimed by the job's public function
(:func:`streamem.em.runfolder.claim`) before :func:`run_job` runs in it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from streamem.core.masks import soft_sphere
from streamem.core.projector import (
    half_cube_reach,
    half_cube_shape,
    make_projector,
    padded_radius,
)
from streamem.dist.dashboard import publish_iteration
from streamem.dist.device import model_on_device
from streamem.dist.graph import map_chunks, tree_sum
from streamem.dist.iteration import compute, on_a_worker, run_chunks
from streamem.em import mstep, runfiles
from streamem.em.estep import EStepModel
from streamem.em.phases import PhaseTimer, add_seconds, phase_table, sgemm_rate_flops
from streamem.em.runfolder import Run
from streamem.errors import InputError
from streamem.io.model_star import SHELL_LABELS, write_model_star
from streamem.io.mrc import read_map
from streamem.io.results import (
    StoredResults,
    create_results_arrays,
    read_results,
    write_data_star,
    write_results,
)
from streamem.io.store import ParticleStore, optics_params, ranges

log = logging.getLogger("streamem")

INCREMENT_SHELLS = 10  # RELION's incr_size: shells beyond the resolution kept each iteration


@dataclass(frozen=True)
class RunContext:
    """What every iteration of a run reads: the store, the claimed folder, the cluster.

    box_size (pixels), pixel_size_A, diameter_A (the particle diameter, default 0.8 ×
    the box), optics (one OpticsParams per group), do_ctf (asked for and the store has
    defoci), split_every (fan-in of the statistics' tree sum).
    """

    store: ParticleStore
    run: Run
    client: Any
    progress: bool
    split_every: int
    box_size: int
    pixel_size_A: float
    diameter_A: float
    optics: tuple
    do_ctf: bool

    @property
    def out_dir(self) -> Path:
        return self.run.out_dir

    @property
    def results_path(self) -> Path:
        return self.run.out_dir / "particles.zarr"


def run_context(store: ParticleStore, run: Run, options, client, progress: bool = False):
    """The :class:`RunContext` of a job's ``options`` (``particle_diameter_A``,
    ``do_ctf``, ``split_every``) on ``store`` in the claimed folder ``run``."""
    B, p = store.box_size, store.pixel_size_A
    return RunContext(
        store=store,
        run=run,
        client=client,
        progress=progress,
        split_every=options.split_every,
        box_size=B,
        pixel_size_A=p,
        diameter_A=options.particle_diameter_A or 0.8 * B * p,
        optics=tuple(optics_params(g) for g in store.optics_groups),
        do_ctf=options.do_ctf
        and store.has_fields(("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")),
    )


@dataclass(frozen=True)
class JobKind:
    """What the engine knows of a job besides its hooks.

    name: "refine3d", "class3d", "class2d" (graph names, log lines). classifies:
    rlnClassNumber is the answer (truth scores, fractions' history, classes changed;
    the state then holds ``fractions`` (K,) and ``resolutions`` (K,) Å, which the
    checkpoint records as ``fractions`` and ``resolutions_A``). estep: ``(images,
    metadata, model) -> (statistics, ChunkResult)``, a module-level function (it is sent
    to the workers).
    """

    name: str
    classifies: bool
    estep: Callable


class Job(Protocol):
    """A job's definition: what differs between refine3d, class3d and class2d.

    ``state`` is a dict the engine threads through the iterations. The engine owns its
    keys ``iteration`` (last complete one, 0 before the first), ``inv_sigma2`` ((G, B//2+1)
    1/σ²), ``sigma_offset_A`` and, for classifications (``kind.classifies``), ``classes``
    ((N,) rlnClassNumber of the last iteration), ``history`` (fractions per iteration,
    from ``state["fractions"]``), ``seconds`` and ``accuracy``; the job adds its own.
    """

    kind: JobKind

    def start(self, ctx: RunContext, checkpoint: dict | None) -> dict:
        """The job's state: fresh (checkpoint None; ``sigma_offset_A`` included) or resumed."""

    def finished(self, state: dict) -> bool:
        """No iteration left to run."""

    def model(self, ctx: RunContext, state: dict, iteration: int) -> Any:
        """The E-step model of ``iteration`` (its ``scale_free`` says the first fits the scale)."""

    def maximise(self, ctx: RunContext, state: dict, model, stats) -> dict:
        """The M-step: the new state (noise and offsets already updated by the engine)."""

    def write_outputs(self, ctx: RunContext, state: dict, model, stats, prefix: Path) -> dict:
        """Write the iteration's maps and model.star; return the job's checkpoint fields."""

    def log_line(self, state: dict, model, iteration: int, changed: float, seconds: float) -> str:
        """The iteration's log line (``changed``: fraction of particles that changed class)."""


# -- the chunk task and the per-iteration graph ---------------------------------------------


def chunk_task(
    start, stop, store_path, results_path, prev_iteration, iteration, expectation_fn, model
):
    """One chunk's E-step: read, compute, write per-particle results, return statistics.

    ``expectation_fn(images, metadata, model) -> (statistics, ChunkResult)`` is the
    job's E-step; ``model`` goes to this worker's device first (identity on CPUs).
    """
    t0 = time.perf_counter()
    store = ParticleStore(store_path)
    chunk = store.read_chunk(start, stop)
    meta = dict(chunk.metadata)
    meta["particle_index"] = np.arange(start, stop)  # for seeded classes (class3d)
    if prev_iteration is not None:
        meta.update(read_results(results_path, prev_iteration, start, stop))
    read_s = time.perf_counter() - t0
    stats, result = expectation_fn(chunk.images, meta, model_on_device(model))
    t1 = time.perf_counter()
    write_results(results_path, iteration, start, result.as_columns())
    stats.phase_seconds = add_seconds(  # the task's own phases (streamem.em.phases)
        stats.phase_seconds, {"read_fft": read_s, "writing": time.perf_counter() - t1}
    )
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
    """One iteration's graph: the model sent once, one task per chunk (or per equal part
    of a chunk, :func:`estep_task_size`), statistics tree-summed.

    ``progress`` shows a progress bar over the chunks (text in a terminal, a widget in a
    notebook). Each task bounds its own memory (:mod:`streamem.em.memory`); the tree's
    ``split_every`` is lowered for big statistics (:func:`statistics_bytes`). A worker
    killed for memory anyway (``KilledWorker``) stops the run with one line naming the
    iteration: the last complete iteration's checkpoint is untouched, so ``--continue``
    resumes from it.
    """
    task_size = create_results_arrays(
        results_path, iteration, store.n_particles, estep_task_size(store)
    )
    resume = (
        f"resume after iteration {prev_iteration} with --continue"
        if prev_iteration
        else "no iteration is complete yet: rerun without --continue"
    )
    stats = run_chunks(
        chunk_task,
        ranges(store.n_particles, task_size),
        str(store.path),
        str(Path(results_path).absolute()),  # a worker's working folder is not ours
        prev_iteration,
        iteration,
        expectation_fn,
        shared=model,
        client=client,
        split_every=split_every,
        item_bytes=statistics_bytes(model),
        name=f"{name}-it{iteration:03d}",
        progress=progress,
        killed_message=(
            f"iteration {iteration}: a Dask worker died repeatedly while running it "
            "(usually out of memory: give more memory per worker with --memory-per-worker "
            f"or fewer threads per worker); {resume}"
        ),
    )
    return stats.expanded()  # the tasks' packed accumulators as whole half cubes


#: An iteration's E-step is cut into at least this many tasks where the store's chunks
#: allow it (:func:`estep_task_size`) ...
MIN_ESTEP_TASKS = 8
#: ... each of at least this many particles.
MIN_TASK_PARTICLES = 128


def estep_task_size(store) -> int:
    """Particles per E-step task: the store's chunk, or the smallest equal part of it
    (chunk/m, rounded up) that gives :data:`MIN_ESTEP_TASKS` tasks, but never fewer
    than :data:`MIN_TASK_PARTICLES` particles.

    Why: with one task per chunk, a store of few chunks leaves worker threads idle at
    the end of every iteration (5 chunks on 2 threads run in 3 rounds, the last with
    one task: one thread idle for a third of the E-step). The size depends on the store
    alone, not on the cluster, so an iteration's tasks, and the order of its sums, are
    the same whatever workers run it (workers that come and go included). The tasks
    are ranges of one size along the store (the results arrays are chunked by it), so
    where m does not divide the chunk a task may straddle two chunks and read both.
    """
    n, chunk = store.n_particles, store.chunk_size
    size, parts = chunk, 1
    while -(-n // size) < MIN_ESTEP_TASKS:
        parts += 1
        smaller = -(-chunk // parts)
        if smaller < MIN_TASK_PARTICLES:
            break
        size = smaller
    return size


def statistics_bytes(model) -> int:
    """Bytes of one task's returned statistics (single-precision accumulators of the
    reachable voxels, :meth:`~streamem.em.statistics.SufficientStatistics.compact`).

    3D models (``projectors``): two accumulators (random halves) per class; with
    ``references_per_half`` (refine3d) the projectors already count the halves.
    class2d (``class_images``): one (M,) row per class. Anything else: 0.
    """
    projectors = getattr(model, "projectors", None)
    if projectors:
        n_acc = len(projectors) if model.references_per_half else 2 * len(projectors)
        grid = half_cube_shape(padded_radius(model.max_radius_px, projectors[0].padding_factor))
        return 12 * n_acc * int(np.count_nonzero(half_cube_reach(grid)))
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
    power = compute(tree_sum(parts, split_every), client)
    return mstep.initial_inv_sigma2(power[0], power[1])


# -- what the jobs share ------------------------------------------------------------------


def load_reference(reference, box_size: int, pixel_size_A: float) -> np.ndarray:
    """The starting map (B, B, B) float32: an MRC path (its voxel size must be the
    particles') or an array at the store's pixel size. InputError otherwise."""
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


def work_box_for(resolution_A: float, box_size: int, pixel_size_A: float) -> tuple[int, float]:
    """(work box b, radius in Fourier pixels) for the current resolution (RELION current_size)."""
    shell = box_size * pixel_size_A / resolution_A if math.isfinite(resolution_A) else 0
    radius = min(box_size // 2 - 1, math.ceil(shell) + INCREMENT_SHELLS)
    b = min(box_size, 2 * (radius + 2))
    return b, float(radius)


def solvent_mask_for(box_size: int, pixel_size_A: float, diameter_A: float) -> np.ndarray:
    """Soft sphere (B, B, B) of the particle diameter, edge 5% of the box (≥ 3 px)."""
    radius_px = 0.5 * diameter_A / pixel_size_A
    return soft_sphere(box_size, radius_px, edge_px=max(3.0, 0.05 * box_size))


def estep_model_3d(
    ctx: RunContext,
    state: dict,
    maps,
    work_box: int,
    radius: float,
    grid,
    options,
    iteration,
    **fields,
) -> EStepModel:
    """refine3d's and class3d's E-step model: the projectors of ``maps`` ((R, B, B, B),
    times ``state["mask"]`` if any) in the work box to ``radius`` (Fourier pixels), the
    noise and offset prior of ``state``; the first iteration fits the reference's scale
    unless ``options.reference_on_data_scale``. ``fields``: the job's (classes, seeds)."""
    mask = state["mask"]
    projectors = tuple(
        make_projector(
            mstep.to_work_frame(m * mask if mask is not None else m, work_box),
            options.padding_factor,
            max_radius_px=float(radius),
        )
        for m in maps
    )
    return EStepModel(
        projectors=projectors,
        box_size=ctx.box_size,
        work_box=work_box,
        pixel_size_A=ctx.pixel_size_A,
        max_radius_px=float(radius),
        inv_sigma2=state["inv_sigma2"],
        optics=ctx.optics,
        sigma_offset_A=state["sigma_offset_A"],
        grid=grid,
        do_ctf=ctx.do_ctf,
        particle_diameter_A=ctx.diameter_A,
        memory_per_worker_bytes=options.memory_per_worker_bytes,
        scale_free=iteration == 1 and not options.reference_on_data_scale,
        **fields,
    )


def write_model(
    ctx: RunContext,
    state: dict,
    stats,
    prefix: Path,
    image_size: int,
    tau2_fudge: float,
    sampling: dict,
    curves: list[dict],
    reference_images: list[str] | None = None,
    class_axes: tuple[str, ...] = SHELL_LABELS,
    noise_axes: tuple[str, ...] = ("rlnSpectralIndex",),
) -> None:
    """``{prefix}_model.star``: the general block every job writes, the job's curves.

    state: ``resolution_A``, ``sigma_offset_A``, ``inv_sigma2`` (and, with
    ``reference_images``, a classification's ``fractions`` and ``resolutions``).
    image_size: the E-step's box; sampling: the job's sampling label(s) (RELION's
    rlnAngularSampling, rlnPsiStep); curves: per class, label -> (B//2+1,) curve.
    """
    general = {
        "rlnCurrentResolution": state["resolution_A"],
        "rlnCurrentImageSize": image_size,
        "rlnPixelSize": ctx.pixel_size_A,
        "rlnOriginalImageSize": ctx.box_size,
        "rlnNrClasses": len(curves),
        "rlnTau2FudgeFactor": tau2_fudge,
        "rlnLogLikelihood": stats.loglik_sum,
        "rlnSigmaOffsetsAngst": state["sigma_offset_A"],
        **sampling,
    }
    classes = None
    if reference_images is not None:
        classes = {
            "rlnReferenceImage": list(reference_images),
            "rlnClassDistribution": np.asarray(state["fractions"], np.float64),
            "rlnEstimatedResolution": np.asarray(state["resolutions"], np.float64),
        }
    write_model_star(
        Path(f"{prefix}_model.star"), general, ctx.box_size, ctx.pixel_size_A,
        state["inv_sigma2"], curves, classes, class_axes, noise_axes,
    )  # fmt: skip


def class_result_fields(ctx: RunContext, state: dict, iterations: int) -> dict:
    """The fields every classification's result has, from its last state (``iterations``:
    the options' count; a continued run past it reports its own)."""
    return {
        "out_dir": ctx.out_dir,
        "fractions": state["fractions"],
        "resolutions_A": state["resolutions"],
        "class_numbers": np.asarray(state["classes"], np.int64),
        "pixel_size_A": ctx.pixel_size_A,
        "iterations": max(iterations, state["iteration"]),
        "truth_accuracy": state["accuracy"],
        "history": state["history"],
        "seconds": state["seconds"],
    }


def class_log_line(
    name: str, iteration: int, state: dict, changed: float, seconds: float, head="", tail=""
) -> str:
    """A classification's log line: ``class3d it   3  res  12.00 A  classes 0.600 0.400
    changed  12.5%  box  32     4.0 s`` (``head``: before the classes, ``tail``: after)."""
    fractions = " ".join(f"{f:.3f}" for f in state["fractions"])
    return (
        f"{name} it {iteration:3d}  {head}classes {fractions}  changed {100 * changed:5.1f}%"
        f"  {tail}  {seconds:6.1f} s"
    )


# -- the loop -----------------------------------------------------------------------------


def run_job(job: Job, ctx: RunContext, stop_after_iteration: int | None = None) -> dict:
    """Run ``job``'s iterations in its claimed folder; return the last state.

    A resumed run (``ctx.run.state``) starts after the checkpoint's iteration.
    ``stop_after_iteration``: stop (resumably, ``state["stopped"]`` True) once that
    iteration is complete and the job is not finished.
    """
    state = _start(job, ctx)
    sgemm = _sgemm_rate(ctx.client)
    while not job.finished(state):
        iteration = state["iteration"] + 1
        t0 = time.perf_counter()
        timer = PhaseTimer()  # the run loop's phases; the tasks' come in the statistics
        model = job.model(ctx, state, iteration)
        stats = run_estep(
            ctx.store,
            ctx.results_path,
            # iteration 0: poses a job put in its results before its first iteration
            state["iteration"] or (0 if state.get("start_poses") else None),
            iteration,
            model,
            ctx.client,
            job.kind.estep,
            ctx.split_every,
            name=f"{job.kind.name}-estep",  # task keys: "refine3d-estep-it001-<start>-..."
            progress=ctx.progress,
        )
        with timer("mstep"):
            state = job.maximise(
                ctx, _update_noise_and_offsets(ctx, state, model, stats), model, stats
            )
        prefix = runfiles.iteration_prefix(ctx.out_dir, iteration)
        with timer("writing"):
            # streamed from particles.zarr; a classification also scores the whole table
            results = read_results(ctx.results_path, iteration) if job.kind.classifies else {}
            stored = StoredResults(ctx.results_path, iteration)
            write_data_star(Path(f"{prefix}_data.star"), ctx.store, stored)
            fields = job.write_outputs(ctx, state, model, stats, prefix)
        phase_s = add_seconds(stats.phase_seconds, timer.seconds)
        changed = _score_classes(job, ctx, state, results, prefix) if job.kind.classifies else 1.0
        checkpoint = {
            "iteration": iteration,
            **fields,
            "sigma_offset_A": state["sigma_offset_A"],
            "inv_sigma2": np.asarray(state["inv_sigma2"]).tolist(),
        }
        if job.kind.classifies:
            checkpoint["fractions"] = np.asarray(state["fractions"]).tolist()
            checkpoint["resolutions_A"] = np.asarray(state["resolutions"]).tolist()
            accuracy = state["accuracy"]
            checkpoint["truth_accuracy"] = accuracy.accuracy if accuracy is not None else None
            checkpoint["history"] = state["history"]
            state["seconds"].append(time.perf_counter() - t0)
        checkpoint["phase_seconds"] = phase_s  # summed over the workers' threads
        checkpoint["coarse_flops"] = stats.coarse_flops
        checkpoint["phase_points"] = stats.phase_points  # Fourier points made and inserted
        checkpoint["sgemm_flops_per_thread"] = sgemm
        checkpoint["run"] = ctx.run.record  # store and options, checked by --continue
        runfiles.write_checkpoint(Path(f"{prefix}_optimiser.json"), checkpoint)
        state["iteration"] = iteration
        log.info("%s", job.log_line(state, model, iteration, changed, time.perf_counter() - t0))
        log.info("%s it %3d  phases (s, all threads)  %s", job.kind.name, iteration,
                 phase_table(phase_s, stats.coarse_flops, sgemm, stats.phase_points))  # fmt: skip
        if job.kind.classifies and state["accuracy"] is not None:
            log.info("%s it %3d  %s", job.kind.name, iteration, state["accuracy"].summary())
        publish_iteration(ctx.client, job.kind.name, ctx=ctx, iteration=iteration, state=state,
                          model=model, stats=stats, phase_seconds=phase_s, changed=changed,
                          seconds=time.perf_counter() - t0)  # fmt: skip
        if stop_after_iteration is not None and iteration >= stop_after_iteration:
            if not job.finished(state):
                log.info("stopped after iteration %d; resume with --continue", iteration)
                return {**state, "stopped": True}
    return {**state, "stopped": False}


def _sgemm_rate(client) -> float:
    """One E-step thread's SGEMM rate (FLOP/s), measured once per process: on a worker
    (whose BLAS runs one thread per task thread) when there is a client."""
    return float(on_a_worker(sgemm_rate_flops, client))


def _start(job: Job, ctx: RunContext) -> dict:
    """The state before the first iteration to run: fresh, or from the checkpoint."""
    checkpoint = ctx.run.state
    if checkpoint is None:
        inv_sigma2 = initial_noise(ctx.store, ctx.client, ctx.split_every)
        state = {"iteration": 0, "inv_sigma2": inv_sigma2, "classes": None, "history": []}
    else:
        prev = checkpoint["iteration"]
        state = {
            "iteration": prev,
            "inv_sigma2": np.asarray(checkpoint["inv_sigma2"]),
            "sigma_offset_A": checkpoint["sigma_offset_A"],
            "history": list(checkpoint.get("history", [])),  # runs before 0.1 kept none
        }
        if job.kind.classifies:
            state["classes"] = read_results(ctx.results_path, prev)["rlnClassNumber"]
        log.info("continuing from iteration %d", prev)
    if job.kind.classifies:
        state.update(truth=runfiles.true_classes(ctx.store), accuracy=None, seconds=[])
    return {**state, **job.start(ctx, checkpoint)}


def _update_noise_and_offsets(ctx: RunContext, state: dict, model, stats) -> dict:
    """RELION's noise spectra (not from a scale-free iteration: the reference is not on
    the data's scale yet) and offset prior σ (not when poses are fixed), for every job."""
    state = dict(state)
    if not model.scale_free:
        state["inv_sigma2"] = mstep.update_inv_sigma2(
            state["inv_sigma2"], stats.noise_power, stats.noise_count
        )
    if not getattr(model, "skip_align", False):
        state["sigma_offset_A"] = mstep.update_sigma_offset_A(
            stats.offset_sq_A2, stats.weight_sum, floor_A=ctx.pixel_size_A
        )
    return state


def _score_classes(job: Job, ctx: RunContext, state: dict, results: dict, prefix) -> float:
    """Classifications: truth scores (written to ``_truth.star``), the fractions' history;
    returns the fraction of particles whose class changed (1 in the first iteration)."""
    classes = results["rlnClassNumber"]
    K = len(state["fractions"])
    state["accuracy"] = runfiles.score_against_truth(prefix, state["truth"], classes, K)
    previous = state["classes"]
    changed = float(np.mean(classes != previous)) if previous is not None else 1.0
    state["classes"] = classes
    state["history"] = [*state["history"], np.asarray(state["fractions"]).tolist()]
    return changed
