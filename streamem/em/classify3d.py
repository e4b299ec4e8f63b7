"""3D classification (RELION's class3d) as a streaming Dask job on the refine3d engine.

Per iteration, as in :mod:`streamem.em.refine`: the E-step model (the K class
projectors, noise spectra, class fractions, sampling) is broadcast once; one task per
store chunk runs :func:`streamem.em.estep.expectation` (refine3d's E-step with K
classes stacked along the orientation axis), writes its particles'
poses and rlnClassNumber into ``particles.zarr`` and returns statistics; these are
tree-reduced and the M-step runs on the client.

Decisions (RELION's class3d; where we differ, it is said):

- Starting references: the given map low-passed to ``ini_high_A``, one copy per class
  (optionally plus seeded random low-pass noise of rms ``perturbation`` × the map's rms
  inside the mask). As RELION's ``do_generate_seeds``, the first iteration scores each
  particle against one class drawn from its index (``random_seeds``), so the K
  reconstructions come from disjoint random subsets and the classes start to differ by
  the data, not by added noise (which, in our tests, locked the split: 70% vs 91–95%
  correct on a 60/40 mix of two conformations).
- The significant coarse samples are chosen class by class, so every class is compared
  with every particle at the fine resolution (RELION chooses them over all classes
  together; see :func:`streamem.em.significance.significant_class_pairs`), and
  rlnClassNumber is the class of largest marginal posterior (summed over poses;
  RELION: the class of the single most probable sample).
- No gold-standard halves: each class is reconstructed from all its particles. The
  signal power τ² that regularises a class comes, by default (``tau2_from="fsc"``),
  from the FSC between two reconstructions of the class from its particles' random
  halves (rlnRandomSubset), corrected to the full set (2f/(1+f)). RELION takes τ² from
  the class's current reference (``tau2_from="reference"``: fudge × the map's power).
  On the 60/40 test mix both recover the classes; the reference's power favoured the
  larger class (fractions 5 points off at 600 particles, and a collapse into one
  class with ``tau2_fudge`` 1), the FSC did not. ``tau2_fudge`` multiplies τ² (RELION's
  default for class3d: 4).
- The estimated resolution per class (rlnEstimatedResolution) is RELION's FSC-free
  one: the shell where the class's SSNR, τ²/σ²_rec with τ² from the new map's power
  (rlnSsnrMap), drops below 1. The random-half FSC is written as rlnGoldStandardFsc.
- Class fractions π_k = Σ posterior / N enter the log-posterior as log π_k.
- Fixed angular sampling (``healpix_order``, fine pass one order finer), optional local
  searches (σ ``local_sigma_deg`` around each particle's previous pose), or
  ``skip_align`` (poses from the store; posterior over classes only).
- Noise spectra and the offset prior are updated as in refine3d; the first iteration
  fits the reference's scale (the starting map is not on the data's greyscale).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from streamem import validate as check
from streamem.core.filters import lowpass
from streamem.core.fsc import fsc as fourier_shell_correlation
from streamem.core.projector import make_projector
from streamem.core.symmetry import symmetry_matrices
from streamem.em import mstep, runfiles, runfolder
from streamem.em.class_truth import ClassAccuracy
from streamem.em.estep import EStepModel, SearchGrid, expectation
from streamem.em.refine import (
    _load_reference,
    initial_noise,
    run_estep,
    solvent_mask_for,
    work_box_for,
)
from streamem.errors import InputError
from streamem.io.mrc import read_map, write_map
from streamem.io.relion import write_star
from streamem.io.store import ParticleStore, optics_params

log = logging.getLogger("streamem")


@dataclass(frozen=True)
class Class3DOptions:
    """Parameters of a class3d run (RELION option names in brackets)."""

    n_classes: int = 4  # --K
    iterations: int = 25  # --iter
    healpix_order: int = 2  # --healpix_order (coarse; the fine pass is one order finer)
    offset_range_px: float = 5.0  # --offset_range
    offset_step_px: float = 1.0  # --offset_step
    local_sigma_deg: float | None = None  # --sigma_ang (local searches)
    skip_align: bool = False  # --skip_align
    tau2_fudge: float = 4.0  # --tau2_fudge
    particle_diameter_A: float | None = None  # --particle_diameter
    ini_high_A: float = 40.0  # --ini_high
    strict_highres_A: float | None = None  # --strict_highres_exp: never use finer data
    lowres_iterations: int | None = None  # iterations at ini_high_A (default: a third)
    symmetry: str = "C1"  # --sym
    do_ctf: bool = True
    flatten_solvent: bool = True
    perturbation: float = 0.0  # rms of random low-pass noise added per class start
    random_seeds: bool = True  # first iteration: each particle in one random class
    tau2_from: str = "fsc"  # "fsc" (random halves of the class) or "reference" (RELION)
    seed: int = 0
    padding_factor: int = 2
    split_every: int = 8
    reference_on_data_scale: bool = False
    memory_per_worker_bytes: int | None = None  # --memory-per-worker: E-step budget (em.memory)

    def __post_init__(self):
        # every value checked before any work (streamem.validate); messages name the CLI option
        check.at_least("--k", self.n_classes, 1)
        check.at_least("--iterations", self.iterations, 1)
        check.healpix_order("--healpix-order", self.healpix_order)
        check.non_negative("--offset-range", self.offset_range_px, "pixels")
        check.positive("--offset-step", self.offset_step_px, "pixels")
        check.positive("--local", self.local_sigma_deg, "degrees")
        check.positive("--tau2-fudge", self.tau2_fudge)
        check.positive("--particle-diameter", self.particle_diameter_A, "Å")
        check.positive("--ini-high", self.ini_high_A, "Å")
        check.positive("--strict-highres", self.strict_highres_A, "Å")
        check.at_least("--lowres-iterations", self.lowres_iterations, 0)
        check.symmetry("--sym", self.symmetry)
        check.non_negative("--perturbation", self.perturbation)
        if self.tau2_from not in ("reference", "fsc"):
            raise InputError(
                None, f"tau2_from must be 'reference' or 'fsc', got {self.tau2_from!r}"
            )
        check.seed("--seed", self.seed)
        check.at_least("padding_factor", self.padding_factor, 1)
        check.at_least("split_every", self.split_every, 2)  # a tree reduction's fan-in

    def check_box(self, box_size: int, pixel_size_A: float) -> None:
        """What needs the store: the particle diameter fits in the box."""
        check.diameter_fits_box(
            "--particle-diameter", self.particle_diameter_A, box_size, pixel_size_A
        )


@dataclass
class Class3DResult:
    """What a class3d run produced; ``plot()`` draws the class fractions per iteration."""

    out_dir: Path
    maps: np.ndarray  # (K, B, B, B)
    fractions: np.ndarray  # (K,)
    resolutions_A: np.ndarray  # (K,)
    class_numbers: np.ndarray  # (N,) int, from 1
    pixel_size_A: float
    iterations: int
    truth_accuracy: ClassAccuracy | None = None  # against the simulation's truth, if any
    history: list = field(default_factory=list, repr=False)  # fractions per iteration
    seconds: list = field(default_factory=list, repr=False)  # wall time per iteration

    def plot(self, ax=None):
        import matplotlib.pyplot as plt

        ax = ax or plt.gca()
        h = np.asarray(self.history)
        for k in range(h.shape[1]):
            ax.plot(np.arange(1, len(h) + 1), h[:, k], label=f"class {k + 1}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("class fraction")
        ax.legend()
        return ax


def initial_references(
    reference: np.ndarray,
    n_classes: int,
    ini_high_A: float,
    pixel_size_A: float,
    mask,
    amplitude: float,
    seed: int,
) -> np.ndarray:
    """K low-passed copies of a map, each with its own seeded low-pass noise (K, B, B, B)."""
    ref = lowpass(reference.astype(np.float32), ini_high_A, pixel_size_A)
    inside = mask if mask is not None else np.ones_like(ref)
    rms = float(np.sqrt(np.sum(ref**2 * inside) / max(np.sum(inside), 1)))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 3]))
    out = []
    for _ in range(n_classes):
        noise = (
            lowpass(rng.standard_normal(ref.shape).astype(np.float32), ini_high_A, pixel_size_A)
            * inside
        )
        noise *= (
            amplitude * rms / max(float(np.sqrt(np.sum(noise**2) / max(np.sum(inside), 1))), 1e-30)
        )
        out.append(ref + noise)
    return np.stack(out).astype(np.float32)


def reconstruct_class(
    data_acc, weight_acc, work_box, padding_factor, tau2_fudge, sym_mats, tau2_prior=None
):
    """One class's map from its two random-half accumulators (2, *grid).

    tau2_prior: (≥ b//2+1,) signal power of the class (RELION's data-vs-prior:
    :func:`streamem.em.mstep.tau2_from_map` of the class's current reference) or None
    for τ² from the half FSC corrected to the full set. Returns (map (b, b, b), FSC of
    the unregularised halves (b//2+1,), which gives the class's resolution estimate).
    """
    if not np.any(weight_acc):
        return np.zeros((work_box,) * 3, np.float32), np.zeros(work_box // 2 + 1)
    fsc_halves = mstep.unregularised_half_fsc(
        data_acc, weight_acc, work_box, padding_factor, sym_mats
    )
    joined = mstep.reconstruct_joined(
        data_acc, weight_acc, fsc_halves, work_box, padding_factor, tau2_fudge, sym_mats,
        tau2=tau2_prior,
    )  # fmt: skip
    return joined, fsc_halves


def classify3d(
    store: str | Path | ParticleStore,
    reference: str | Path | np.ndarray,
    out_dir: str | Path,
    options: Class3DOptions | None = None,
    client=None,
    continue_run: bool = False,
) -> Class3DResult:
    """RELION's 3D classification: K classes from one reference.

    store: particle store; reference: MRC path or (B, B, B) array at the store's pixel
    size (ignored when continuing); out_dir: run folder (created, must be empty unless
    ``continue_run``); client: a ``distributed.Client`` or None (threads). With
    ``skip_align`` the store must hold poses (rlnAngleRot/Tilt/Psi in its metadata).
    continue_run: resume after the newest complete iteration in ``out_dir`` and run up
    to ``options.iterations`` (RELION's --continue). The job holds ``out_dir``
    (:func:`streamem.em.runfolder.claim`): one job at a time, continued only on the
    same store with the same options, restartable when it died before its first
    checkpoint.
    """
    options = options or Class3DOptions()
    store = store if isinstance(store, ParticleStore) else ParticleStore(store)
    options.check_box(store.box_size, store.pixel_size_A)  # before the run folder is created
    if options.skip_align and not store.has_fields(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        raise InputError(store.path, "--skip-align needs poses (rlnAngleRot/Tilt/Psi) in the store")
    ref = None if continue_run else _load_reference(reference, store.box_size, store.pixel_size_A)
    with runfolder.claim(out_dir, "class3d", store, options, continue_run, STATE_KEYS) as run:
        return _classify3d(store, ref, run, options, client)


#: What a class3d checkpoint must hold to be resumed from (runfiles.read_checkpoint).
STATE_KEYS = ("class_maps", "inv_sigma2", "sigma_offset_A", "fractions", "resolutions_A")


def _classify3d(store, ref, run, options, client) -> Class3DResult:
    """class3d's loop in a claimed run folder (``run.state``: the checkpoint to resume)."""
    out_dir = run.out_dir
    B, p = store.box_size, store.pixel_size_A
    K = options.n_classes
    diameter = options.particle_diameter_A or 0.8 * B * p
    sym_mats = symmetry_matrices(options.symmetry)
    optics = tuple(optics_params(g) for g in store.optics_groups)
    do_ctf = options.do_ctf and store.has_fields(("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"))
    results_path = out_dir / "particles.zarr"
    mask = solvent_mask_for(B, p, diameter) if options.flatten_solvent else None
    history, seconds = [], []
    state = run.state
    if state is not None:
        if len(state["class_maps"]) != K:
            raise InputError(out_dir, f"the run has {len(state['class_maps'])} classes, not {K}")
        maps = np.stack([read_map(out_dir / name)[0] for name in state["class_maps"]])
        inv_sigma2 = np.asarray(state["inv_sigma2"])
        sigma_offset_A = state["sigma_offset_A"]
        resolution_A = state.get("resolution_A", float(np.min(state["resolutions_A"])))
        fractions = np.asarray(state["fractions"])
        resolutions = np.asarray(state["resolutions_A"])
        history = list(state.get("history", []))  # runs before 0.1 kept no history
        prev_iteration = state["iteration"]
        previous_classes = runfiles.read_results(results_path, prev_iteration)["rlnClassNumber"]
        log.info("continuing from iteration %d", prev_iteration)
    else:
        maps = initial_references(
            ref, K, options.ini_high_A, p, mask, options.perturbation, options.seed
        )
        inv_sigma2 = initial_noise(store, client, options.split_every)
        sigma_offset_A = options.offset_range_px * p / 2
        resolution_A = options.ini_high_A
        fractions = np.full(K, 1.0 / K)
        resolutions = np.full(K, options.ini_high_A)
        prev_iteration = None
        previous_classes = None
    lowres_iterations = (
        options.iterations // 3 if options.lowres_iterations is None else options.lowres_iterations
    )
    true_classes = runfiles.true_classes(store)  # simulations: score every iteration
    accuracy = None
    for iteration in range((prev_iteration or 0) + 1, options.iterations + 1):
        t0 = time.perf_counter()
        b, radius = work_box_for(resolution_A, B, p)
        if iteration <= lowres_iterations:
            radius = min(radius, max(2.0, B * p / options.ini_high_A))
        if options.strict_highres_A:
            radius = min(radius, max(2.0, B * p / options.strict_highres_A))
        projectors = tuple(
            make_projector(
                mstep.to_work_frame(m * mask if mask is not None else m, b),
                options.padding_factor,
                max_radius_px=radius,
            )
            for m in maps
        )
        grid = SearchGrid(
            healpix_order=options.healpix_order,
            oversampling=1,
            offset_range_px=options.offset_range_px,
            offset_step_px=options.offset_step_px,
            local_sigma_deg=options.local_sigma_deg,
            symmetry=options.symmetry,
        )
        with np.errstate(divide="ignore"):
            log_fractions = np.log(fractions)
        base = EStepModel(
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
            n_classes=K,
            references_per_half=False,
            log_class_prior=log_fractions,
            class_seed=options.seed if iteration == 1 and options.random_seeds and K > 1 else None,
            skip_align=options.skip_align,
        )
        model = base
        stats = run_estep(
            store,
            results_path,
            prev_iteration,
            iteration,
            model,
            client,
            expectation,
            options.split_every,
            name="class3d",
        )

        # -- M-step ----------------------------------------------------------------------
        fsc_curves = np.zeros((K, B // 2 + 1))
        ssnr_curves = np.zeros((K, B // 2 + 1))
        new_maps = []
        for k in range(K):
            # τ² from the class's current reference once that is on the data's scale
            # (after the first, scale-free iteration); from the half FSC before
            use_reference = options.tau2_from == "reference" and not base.scale_free
            m_b, fsc_b = reconstruct_class(
                stats.data_acc[2 * k : 2 * k + 2],
                stats.weight_acc[2 * k : 2 * k + 2],
                b,
                options.padding_factor,
                options.tau2_fudge,
                sym_mats,
                tau2_prior=(
                    mstep.tau2_from_map(maps[k] * mask if mask is not None else maps[k])
                    if use_reference
                    else None
                ),
            )
            new_maps.append(mstep.to_full_frame(m_b, B))
            n_used = min(len(fsc_b), int(radius) + 1)  # no data beyond the E-step's radius
            fsc_curves[k, :n_used] = fsc_b[:n_used]
            ssnr_b = mstep.data_vs_prior(
                new_maps[-1] * mask if mask is not None else new_maps[-1],
                stats.weight_acc[2 * k] + stats.weight_acc[2 * k + 1],
                b,
                options.padding_factor,
                options.tau2_fudge,
                sym_mats,
            )
            ssnr_curves[k, :n_used] = ssnr_b[:n_used]
        maps = np.stack(new_maps)
        total = max(float(stats.class_weight.sum()), 1e-30)
        fractions = stats.class_weight / total
        # RELION's FSC-free estimate: where the class's SSNR (data vs prior) drops below 1
        resolutions = np.array([mstep.resolution_from_ssnr(c, B, p) for c in ssnr_curves])
        populated = fractions > 0.5 / store.n_particles
        resolution_A = (
            float(resolutions[populated].min()) if populated.any() else options.ini_high_A
        )
        if not base.scale_free:
            inv_sigma2 = mstep.update_inv_sigma2(inv_sigma2, stats.noise_power, stats.noise_count)
        if not options.skip_align:
            sigma_offset_A = mstep.update_sigma_offset_A(
                stats.offset_sq_A2, stats.weight_sum, floor_A=p
            )

        # -- outputs ---------------------------------------------------------------------
        prefix = runfiles.iteration_prefix(out_dir, iteration)
        names = [f"{prefix.name}_class{k + 1:03d}.mrc" for k in range(K)]
        for k in range(K):
            write_map(out_dir / names[k], maps[k], p)
        results = runfiles.read_results(results_path, iteration)
        runfiles.write_data_star(Path(f"{prefix}_data.star"), store, results)
        general = {
            "rlnCurrentResolution": resolution_A,
            "rlnCurrentImageSize": b,
            "rlnPixelSize": p,
            "rlnOriginalImageSize": B,
            "rlnNrClasses": K,
            "rlnTau2FudgeFactor": options.tau2_fudge,
            "rlnLogLikelihood": stats.loglik_sum,
            "rlnSigmaOffsetsAngst": sigma_offset_A,
            "rlnAngularSampling": grid.fine_angular_step_deg,
        }
        write_classes_model_star(
            Path(f"{prefix}_model.star"),
            general,
            names,
            fractions,
            resolutions,
            fsc_curves,
            B,
            p,
            inv_sigma2,
            ssnr_curves,
        )
        classes = results["rlnClassNumber"]
        accuracy = runfiles.score_against_truth(prefix, true_classes, classes, K)
        changed = (
            float(np.mean(classes != previous_classes)) if previous_classes is not None else 1.0
        )
        previous_classes = classes
        history.append(fractions.tolist())
        seconds.append(time.perf_counter() - t0)
        runfiles.write_checkpoint(
            Path(f"{prefix}_optimiser.json"),
            {
                "iteration": iteration,
                "fractions": fractions.tolist(),
                "resolutions_A": resolutions.tolist(),
                "class_maps": names,
                "sigma_offset_A": sigma_offset_A,
                "inv_sigma2": inv_sigma2.tolist(),
                "truth_accuracy": accuracy.accuracy if accuracy is not None else None,
                "resolution_A": resolution_A,
                "history": history,
                "run": run.record,  # store and options, checked by --continue
            },
        )
        log.info(
            "class3d it %3d  res %6.2f A  classes %s  changed %5.1f%%  box %3d  %6.1f s",
            iteration,
            resolution_A,
            " ".join(f"{f:.3f}" for f in fractions),
            100 * changed,
            b,
            time.perf_counter() - t0,
        )
        if accuracy is not None:
            log.info("%s it %3d  %s", "class3d", iteration, accuracy.summary())
        prev_iteration = iteration
    return Class3DResult(
        out_dir=out_dir,
        maps=maps,
        fractions=fractions,
        resolutions_A=resolutions,
        class_numbers=np.asarray(previous_classes, np.int64),
        pixel_size_A=p,
        iterations=max(options.iterations, prev_iteration or 0),
        truth_accuracy=accuracy,
        history=history,
        seconds=seconds,
    )


def write_classes_model_star(
    path,
    general,
    class_maps,
    fractions,
    resolutions_A,
    fsc_curves,
    box_size,
    pixel_size_A,
    inv_sigma2,
    ssnr_curves=None,
):
    """RELION's class3d model STAR: general, classes table, per-class spectra, noise.

    Per class: rlnSsnrMap (RELION's data vs prior, which gives rlnEstimatedResolution)
    and rlnGoldStandardFsc, here the FSC between the class's random halves.
    """
    shells = np.arange(box_size // 2 + 1)
    with np.errstate(divide="ignore"):
        res = np.where(shells > 0, box_size * pixel_size_A / np.maximum(shells, 1), 999.0)
    blocks = {
        "model_general": pd.DataFrame([general]),
        "model_classes": pd.DataFrame(
            {
                "rlnReferenceImage": list(class_maps),
                "rlnClassDistribution": np.asarray(fractions, np.float64),
                "rlnEstimatedResolution": np.asarray(resolutions_A, np.float64),
            }
        ),
    }
    for k, curve in enumerate(fsc_curves):
        table = {
            "rlnSpectralIndex": shells,
            "rlnResolution": shells / (box_size * pixel_size_A),
            "rlnAngstromResolution": res,
            "rlnGoldStandardFsc": curve[: len(shells)],
        }
        if ssnr_curves is not None:
            table["rlnSsnrMap"] = ssnr_curves[k][: len(shells)]
        blocks[f"model_class_{k + 1}"] = pd.DataFrame(table)
    for g, inv in enumerate(inv_sigma2):
        with np.errstate(divide="ignore"):
            sigma2 = np.where(inv > 0, 1.0 / np.maximum(inv, 1e-300), 0.0)
        blocks[f"model_optics_group_{g + 1}"] = pd.DataFrame(
            {"rlnSpectralIndex": shells, "rlnSigma2Noise": sigma2[: len(shells)]}
        )
    write_star(path, blocks)


def read_classes_model_star(path) -> pd.DataFrame:
    """The ``model_classes`` table of a run_itNNN_model.star (class2d or class3d)."""
    import starfile

    return starfile.read(path, always_dict=True)["model_classes"]


def class_fsc(maps: np.ndarray) -> np.ndarray:
    """FSC between every pair of class maps (K, K, B//2+1) (diagnostics)."""
    K = maps.shape[0]
    out = np.ones((K, K, maps.shape[1] // 2 + 1))
    for i in range(K):
        for j in range(i + 1, K):
            out[i, j] = out[j, i] = fourier_shell_correlation(maps[i], maps[j])
    return out
