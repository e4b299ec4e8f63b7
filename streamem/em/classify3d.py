"""3D classification (RELION's class3d) as a job definition on the one run loop.

:class:`Class3DJob` for :func:`streamem.em.engine.run_job`: the E-step model is
refine3d's (:class:`streamem.em.estep.EStepModel`) with a class axis: the K class
projectors, used for the particles of both halves (``references_per_half`` False),
the class fractions as log priors, seeded classes in the first iteration and fixed
poses with ``skip_align``; each particle's rlnClassNumber is written with its pose.
The M-step reconstructs each class from its two random-half accumulators
(:mod:`streamem.em.class_maps`, with the starting references).

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
- Cross-half references (``cross_half``, default; where we differ from RELION): each
  class is reconstructed from each random half set (rlnRandomSubset) as well as from
  both, and from the second iteration on the particles of one half are scored against
  the classes of the other half (``EStepModel.references_per_half``, projectors
  ``h·K + k`` = class k of half 1 − h). RELION scores every particle against class maps
  it helped build. Each particle then meets its own noise in its own class's map, a
  pull towards the class it is in of about r³/N_k (r the E-step's radius in Fourier
  pixels, N_k the class's particles), against a true difference that does not grow
  with r. At box 128 it held the random first split: on issue 25's mix (5,000
  particles, SNR 0.05, ``asym`` vs ``asym-del`` 60/40, --skip-align from a refine3d
  consensus, ``bench class3d-accuracy --box 128 --angpix 3.59 --snr 0.05
  --n-particles 5000 --mix small --workflow consensus --search skip --ini-high 15
  --iterations 20``) RELION's scoring moved under 1% of the particles per iteration
  after the first and ended at 60.9% correct, with no class of the lacking state. The
  crossed one reached 98.3% at iteration 6, and with the pooled τ² below it ended at
  97.6% after 20 iterations (99.9% and 94.1% per state). The half maps are noisier:
  on the box-32 toy of ``tests/test_class3d_small.py`` (300 particles, 75 per class
  and half), the joined maps separate the states better (90/88% per state against
  73/86% crossed, 82/86% crossed with the unbiased scores below).
  That test sets ``cross_half=False``; ``--no-cross-half`` gives RELION's scoring.
  The half maps are written as ``run_itNNN_half{1,2}_classKKK.mrc`` (the names of
  refine3d's halves), which ``--continue`` reads. Each half's classes emerge from
  its own random start, so one state can become class 3 in one half and class 1 in
  the other; crossed, those labels would swap every iteration and each joined class
  would mix two states (K = 4 on the mix above: every particle changed class every
  iteration, and 15% of the lacking state was in classes of its own by iteration 9).
  After each M-step, half 2's classes are therefore paired with half 1's
  (:func:`streamem.em.class_halves.half_class_pairing`), and its accumulators, class weights and particles'
  labels are re-ordered to match (logged when it happens).
- Unbiased crossed scores (``unbiased_scores``, default with ``cross_half``; where we
  differ from RELION; ``--no-unbiased-scores`` turns them off): a half's class map
  estimates the class's true map, and its error adds c²/σ² × its error power to every
  particle's residual at each Fourier point, more for a class of fewer particles (less
  back-projected weight W: more noise, more shrinkage). Against the other half's maps
  that error is independent of the particle, so its expectation is taken off: each
  particle's log prior for class k gains Σ c²/σ² · E_k(shell), E_k = (φW + a²τ²)/(W+a)²
  (a = 1/(fudge·τ²), φ the mask's mean square; :func:`streamem.em.class_halves.half_map_error_power`,
  checked against a reconstruction's measured error in ``tests/test_class3d.py``), and
  the score estimates the distance to the class's true map. On the mix above
  (--skip-align from the consensus, --ini-high 15, 20 iterations): K = 4 without it
  ended at 78.7% (classes 0/0/0.18/0.82; two classes drained into the largest by
  iteration 8; 45.6% of the lacking state in a class of its own), with it at 98.0%
  (99.9% and 95.1% per state, classes 0.19/0.33/0.37/0.11); K = 2 went from 97.6%
  (99.9/94.1%) to 99.0% (99.2/98.5%, fraction 0.610 against the true 0.609).
  Global searches from the 30 Å low-pass (``--workflow poses --search global
  --ini-high 30 --iterations 25``): K = 2 99.4% at iteration 16 (99.5/99.1%; 98.8%
  after 25 iterations before this change), K = 4 98.8% after 25 (99.8/97.3%, classes
  0.22/0.24/0.38/0.15, the two of each state trading a third of their particles every
  iteration), both at 99.3-99.6% by iteration 5.
- The signal power τ² that regularises the classes (``tau2_from``):
  - ``pooled`` (default; where we differ from RELION): one spectrum for every class,
    Σ_k π_k × (fudge × the masked power of class k's current reference).
  - ``reference`` (RELION's): each class's own reference's power. A class with fewer
    particles is shrunk more, and so gets less power and a smaller τ², which shrinks it
    further. With crossed halves on the mix above, the lacking state drained into the
    complete one after iteration 6, from 95.7% to 66.8% of it in its own class by
    iteration 20, with the classes going from 0.37/0.63 to 0.26/0.74. Pooled, it
    stayed at 96.4% to 94.1% (0.37/0.63; true 0.39/0.61).
  - ``fsc``: the FSC between the class's random-half reconstructions, corrected to the
    full set (2f/(1+f)). Issue 25 measured it against ``reference`` on a small
    difference (true poses, --skip-align). It lets each class fit its own particles'
    noise at high frequency (the estimated resolution runs 10 shells past the
    reference's, and the random first split locks): 69% correct at box 64 (1,000
    particles, SNR 0.1) and at box 32 (400, SNR 0.2), against 98.6% and 93% with the
    reference's power.
  - The first, scale-free iteration always takes τ² from the half FSC.
  - On the 60/40 mix of two conformations, issue 6 found the reference's power
    favouring the larger class by 5 points at 600 particles.
  - ``tau2_fudge`` multiplies τ² (RELION's class3d default: 4).
- The estimated resolution per class (rlnEstimatedResolution) is RELION's FSC-free
  one: the shell where the class's SSNR, τ²/σ²_rec with τ² from the new map's power
  (rlnSsnrMap), drops below 1. The random-half FSC is written as rlnGoldStandardFsc.
  The best populated class's estimate sets the next E-step's resolution (plus
  RELION's 10 shells); ``strict_highres_A`` caps it (RELION's --strict_highres_exp).
  With the FSC's τ² this schedule ran to 14 Å at box 64 (4 Å/px) on the 6% mix and the
  split locked (69%); capped at 20 Å it gave 97.6%: the small difference is decided at
  low resolution, and shells past the signal only add each class's own noise.
- Consensus-then-classify (``from_refine``, :mod:`streamem.em.consensus`): a refine3d
  run's final map (on the data's scale: no scale fit), noise model, offset prior and
  poses (iteration 0 of the results, which local searches centre on).
- Class fractions π_k = Σ posterior / N enter the log-posterior as log π_k.
- Fixed angular sampling (``healpix_order``, fine pass one order finer), optional local
  searches (σ ``local_sigma_deg`` around each particle's previous pose), or
  ``skip_align`` (poses from the store; posterior over classes only).
- Noise spectra and the offset prior are updated as in refine3d; the first iteration
  fits the reference's scale (the starting map is not on the data's greyscale).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from streamem import validate as check
from streamem.core.symmetry import symmetry_matrices
from streamem.em import engine, mstep, runfiles, runfolder
from streamem.em.class_halves import (
    class_tau2,
    half_class_pairing,
    half_map_error_power,
    repair_second_half,
)
from streamem.em.class_maps import initial_references, reconstruct_class
from streamem.em.class_truth import ClassAccuracy
from streamem.em.consensus import ConsensusStart, copy_poses, read_consensus
from streamem.em.estep import EStepModel, SearchGrid, expectation
from streamem.errors import InputError
from streamem.io.mrc import read_map, read_solvent_mask, write_map
from streamem.io.store import ParticleStore

log = logging.getLogger("streamem")


#: Where each class's signal power τ² comes from (``tau2_from``; the module docstring)
TAU2_SOURCES = ("pooled", "reference", "fsc")


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
    tau2_from: str = "pooled"  # "pooled" (the classes' maps), "reference" (RELION), "fsc"
    seed: int = 0
    padding_factor: int = 2
    split_every: int = 8
    reference_on_data_scale: bool = False
    memory_per_worker_bytes: int | None = None  # --memory-per-worker: E-step budget (em.memory)
    from_refine: str | None = None  # a refine3d run folder: its map, poses and noise (consensus)
    solvent_mask: str | None = None  # --solvent_mask: MRC mask for the references (else a sphere)
    cross_half: bool = True  # each half set meets the other half set's classes (--no-cross-half)
    # crossed scores against the classes' true maps (--no-unbiased-scores)
    unbiased_scores: bool = True

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
        if self.tau2_from not in TAU2_SOURCES:
            raise InputError(
                None, f"tau2_from must be one of {', '.join(TAU2_SOURCES)}, got {self.tau2_from!r}"
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

    def __repr__(self) -> str:
        from streamem.display import short_repr

        return short_repr("Class3DResult", out_dir=self.out_dir, iterations=self.iterations,
                          maps=self.maps)  # fmt: skip

    def _repr_html_(self) -> str:
        from streamem.display import class3d_html

        return class3d_html(self)  # table of classes, map slices, fractions per iteration


def _read_half_maps(out_dir: Path, names: list[str], n_classes: int) -> np.ndarray:
    """(2, K, B, B, B) half maps of a checkpoint (names half-major)."""
    maps = np.stack([read_map(out_dir / name)[0] for name in names])
    return maps.reshape(2, n_classes, *maps.shape[1:])


def classify3d(
    store: str | Path | ParticleStore,
    reference: str | Path | np.ndarray,
    out_dir: str | Path,
    options: Class3DOptions | None = None,
    client=None,
    continue_run: bool = False,
    write_stacks: bool = False,
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
    checkpoint. write_stacks: a store without stacks is first written as MRCS stacks
    into ``out_dir/Particles``, which the run's STAR files name.
    """
    options = options or Class3DOptions()
    store = store if isinstance(store, ParticleStore) else ParticleStore(store)
    options.check_box(store.box_size, store.pixel_size_A)  # before the run folder is created
    poses = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    if options.skip_align and not options.from_refine and not store.has_fields(poses):
        raise InputError(store.path, "--skip-align needs poses (rlnAngleRot/Tilt/Psi) in the store")
    B, p = store.box_size, store.pixel_size_A
    consensus = None
    if options.from_refine:
        # the consensus map is on the data's greyscale: no scale fit in iteration 1
        options = replace(options, reference_on_data_scale=True)
        if not continue_run:
            consensus = read_consensus(options.from_refine, store)
            reference = consensus.map
    if not continue_run and reference is None:
        raise InputError(None, "class3d needs a starting map (--ref or --from-refine)")
    ref = None if continue_run else engine.load_reference(reference, B, p)
    mask = read_solvent_mask(options.solvent_mask, B) if options.solvent_mask else None
    with runfolder.claim(out_dir, "class3d", store, options, continue_run, STATE_KEYS) as run:
        ctx = engine.run_context(store, run, options, client)
        state = engine.run_job(Class3DJob(options, ref, consensus, mask, write_stacks), ctx)
    fields = engine.class_result_fields(ctx, state, options.iterations)
    return Class3DResult(maps=state["maps"], **fields)


#: What a class3d checkpoint must hold to be resumed from (runfiles.read_checkpoint).
STATE_KEYS = ("class_maps", "inv_sigma2", "sigma_offset_A", "fractions", "resolutions_A")


@dataclass(frozen=True)
class Class3DJob:
    """class3d for :func:`streamem.em.engine.run_job` (state: ``maps`` (K, B, B, B),
    ``fractions`` (K,), ``resolutions`` (K,) Å, ``resolution_A`` (the best populated
    class's), ``mask``; after an M-step ``fsc`` and ``ssnr`` (K, B//2+1); see engine.Job)."""

    options: Class3DOptions
    reference: np.ndarray | None  # the starting map (None when continuing)
    consensus: ConsensusStart | None = None  # --from-refine (None when continuing)
    solvent_mask: np.ndarray | None = None  # --solvent-mask (B, B, B) in [0, 1]
    write_stacks: bool = False  # --write-stacks: MRCS stacks in RUN/Particles first
    kind: ClassVar[engine.JobKind] = engine.JobKind("class3d", True, expectation)

    def start(self, ctx, checkpoint: dict | None) -> dict:
        o, K, p = self.options, self.options.n_classes, ctx.pixel_size_A
        mask = self.solvent_mask
        if mask is None and o.flatten_solvent:
            mask = engine.solvent_mask_for(ctx.box_size, p, ctx.diameter_A)
        if checkpoint is not None:
            names = checkpoint["class_maps"]
            if len(names) != K:
                raise InputError(ctx.out_dir, f"the run has {len(names)} classes, not {K}")
            resolutions = np.asarray(checkpoint["resolutions_A"])
            halves = checkpoint.get("half_maps")
            return {
                "mask": mask,
                "maps": np.stack([read_map(ctx.out_dir / name)[0] for name in names]),
                **(
                    {"half_maps": _read_half_maps(ctx.out_dir, halves, K)}
                    if halves and o.cross_half
                    else {}
                ),
                **(
                    {"half_map_error": np.asarray(checkpoint["half_map_error_power"])}
                    if checkpoint.get("half_map_error_power") and o.cross_half
                    else {}
                ),
                "resolution_A": checkpoint.get("resolution_A", float(np.min(resolutions))),
                "fractions": np.asarray(checkpoint["fractions"]),
                "resolutions": resolutions,
            }
        if self.write_stacks:
            runfiles.write_stacks_for_relion(ctx)
        state = {
            "mask": mask,
            "maps": initial_references(
                self.reference, K, o.ini_high_A, p, mask, o.perturbation, o.seed
            ),
            "sigma_offset_A": o.offset_range_px * p / 2,
            "resolution_A": o.ini_high_A,
            "fractions": np.full(K, 1.0 / K),
            "resolutions": np.full(K, o.ini_high_A),
        }
        if self.consensus is not None:  # the consensus's noise model, offsets and poses
            c = self.consensus
            copy_poses(c, ctx.results_path, ctx.store.n_particles, ctx.store.chunk_size)
            state.update(inv_sigma2=c.inv_sigma2, sigma_offset_A=c.sigma_offset_A, start_poses=True)
        return state

    def finished(self, state: dict) -> bool:
        return state["iteration"] >= self.options.iterations

    def model(self, ctx, state: dict, iteration: int) -> EStepModel:
        o, B, p = self.options, ctx.box_size, ctx.pixel_size_A
        b, radius = engine.work_box_for(state["resolution_A"], B, p)
        lowres = o.iterations // 3 if o.lowres_iterations is None else o.lowres_iterations
        if iteration <= lowres:
            radius = min(radius, max(2.0, B * p / o.ini_high_A))
        if o.strict_highres_A:
            radius = min(radius, max(2.0, B * p / o.strict_highres_A))
        grid = SearchGrid(
            healpix_order=o.healpix_order,
            oversampling=1,
            offset_range_px=o.offset_range_px,
            offset_step_px=o.offset_step_px,
            local_sigma_deg=o.local_sigma_deg,
            symmetry=o.symmetry,
        )
        seeded = iteration == 1 and o.random_seeds and o.n_classes > 1
        with np.errstate(divide="ignore"):
            log_prior = np.log(state["fractions"])
        crossed = o.cross_half and "half_maps" in state
        # projectors[h·K + k]: the particles of half h meet class k of the other half
        maps = np.concatenate(state["half_maps"][::-1]) if crossed else state["maps"]
        error = None
        if crossed and o.unbiased_scores and "half_map_error" in state:
            error = np.concatenate(state["half_map_error"][::-1])  # rows as the projectors
        return engine.estep_model_3d(
            ctx, state, maps, b, radius, grid, o, iteration,
            n_classes=o.n_classes,
            references_per_half=crossed,
            log_class_prior=log_prior,
            class_seed=o.seed if seeded else None,
            skip_align=o.skip_align,
            reference_error_power=error,
        )  # fmt: skip

    def maximise(self, ctx, state: dict, model: EStepModel, stats) -> dict:
        """Each class from its random halves; fractions; per-class SSNR resolutions."""
        tau2_maps = self.class_tau2(state, model)  # from last iteration's maps: one per M-step
        maps, half_maps, fsc_curves, ssnr_curves = self.reconstruct(
            ctx, state, model, stats, tau2_maps
        )
        if half_maps is not None and model.references_per_half:
            pairing = half_class_pairing(half_maps, state["mask"])
            if np.any(pairing != np.arange(len(pairing))):
                # half 2's particles took the labels of half 1's classes: re-pair them
                log.info("class3d: half 2's classes %s re-paired with half 1's 1..%d",
                         (pairing + 1).tolist(), len(pairing))  # fmt: skip
                repair_second_half(stats, pairing)
                runfiles.relabel_classes(
                    ctx.results_path, state["iteration"] + 1, ctx.store, half=1, pairing=pairing
                )
                maps, half_maps, fsc_curves, ssnr_curves = self.reconstruct(
                    ctx, state, model, stats, tau2_maps
                )
        error = None
        if half_maps is not None:  # what each half's class map gets wrong, for the next scores
            o = self.options
            error = half_map_error_power(
                stats.weight_acc, tau2_maps, fsc_curves, model.work_box,
                o.padding_factor, o.tau2_fudge, symmetry_matrices(o.symmetry), state["mask"],
                ctx.box_size // 2 + 1,
            )  # fmt: skip
        fractions = stats.class_weight / max(float(stats.class_weight.sum()), 1e-30)
        # RELION's FSC-free estimate: where the class's SSNR (data vs prior) drops below 1
        B, p = ctx.box_size, ctx.pixel_size_A
        resolutions = np.array([mstep.resolution_from_ssnr(c, B, p) for c in ssnr_curves])
        populated = fractions > 0.5 / ctx.store.n_particles
        best = float(resolutions[populated].min()) if populated.any() else self.options.ini_high_A
        return {
            **state,
            "maps": maps,
            **({"half_maps": half_maps, "half_map_error": error} if half_maps is not None else {}),
            "fractions": fractions,
            "resolutions": resolutions,
            "resolution_A": best,
            "fsc": fsc_curves,
            "ssnr": ssnr_curves,
        }

    def reconstruct(self, ctx, state: dict, model: EStepModel, stats, tau2_maps: list):
        """The classes: maps (K, B, B, B) from both halves, half maps (2, K, B, B, B) (or
        None without ``cross_half``), random-half FSC and SSNR (K, B//2+1). ``tau2_maps``:
        each class's τ² prior (:meth:`class_tau2`)."""
        o, B, b, mask = self.options, ctx.box_size, model.work_box, state["mask"]
        sym_mats = symmetry_matrices(o.symmetry)
        masked = (lambda m: m * mask) if mask is not None else (lambda m: m)
        K = o.n_classes
        fsc_curves, ssnr_curves = np.zeros((K, B // 2 + 1)), np.zeros((K, B // 2 + 1))
        n_used = int(model.max_radius_px) + 1  # no data beyond the E-step's radius
        maps, half_maps = [], []
        for k in range(K):
            halves = slice(2 * k, 2 * k + 2)
            tau2 = tau2_maps[k]
            m_b, fsc_b, halves_b = reconstruct_class(
                stats.data_acc[halves], stats.weight_acc[halves], b, o.padding_factor,
                o.tau2_fudge, sym_mats, tau2_prior=tau2, with_halves=o.cross_half,
            )  # fmt: skip
            maps.append(mstep.to_full_frame(m_b, B))
            if o.cross_half:
                half_maps.append([mstep.to_full_frame(m, B) for m in halves_b])
            n = min(len(fsc_b), n_used)
            fsc_curves[k, :n] = fsc_b[:n]
            ssnr_b = mstep.data_vs_prior(
                masked(maps[-1]), stats.weight_acc[2 * k] + stats.weight_acc[2 * k + 1], b,
                o.padding_factor, o.tau2_fudge, sym_mats,
            )  # fmt: skip
            ssnr_curves[k, :n] = ssnr_b[:n]
        halves_out = np.stack(half_maps, axis=1) if o.cross_half else None  # (2, K, B, B, B)
        return np.stack(maps), halves_out, fsc_curves, ssnr_curves

    def class_tau2(self, state: dict, model: EStepModel) -> list:
        """Each class's τ² for this M-step: from its current reference once that is on
        the data's scale (after the first, scale-free iteration); from the half FSC before."""
        source = "fsc" if model.scale_free else self.options.tau2_from
        return class_tau2(state["maps"], state["fractions"], state["mask"], source)

    def write_outputs(self, ctx, state: dict, model: EStepModel, stats, prefix: Path) -> dict:
        o, p, K = self.options, ctx.pixel_size_A, self.options.n_classes
        names = [f"{prefix.name}_class{k + 1:03d}.mrc" for k in range(K)]
        for k in range(K):
            write_map(ctx.out_dir / names[k], state["maps"][k], p)
        half_names = []
        if "half_maps" in state:  # what --continue needs to go on crossing the halves
            for h in range(2):
                for k in range(K):
                    half_names.append(f"{prefix.name}_half{h + 1}_class{k + 1:03d}.mrc")
                    write_map(ctx.out_dir / half_names[-1], state["half_maps"][h][k], p)
        # rlnGoldStandardFsc: between the class's random halves; rlnSsnrMap: data vs prior
        curves = [
            {"rlnGoldStandardFsc": f, "rlnSsnrMap": s}
            for f, s in zip(state["fsc"], state["ssnr"], strict=True)
        ]
        sampling = {"rlnAngularSampling": model.grid.fine_angular_step_deg}
        engine.write_model(
            ctx, state, stats, prefix, model.work_box, o.tau2_fudge, sampling, curves, names
        )
        iteration = runfiles.prefix_iteration(prefix)
        if iteration >= o.iterations:  # the final one: what viewers open, pictures
            maps = dict(zip(names, state["maps"], strict=True))
            runfiles.write_view_files(ctx, iteration, maps, state["mask"], K)
            runfiles.write_class_pictures(ctx.out_dir, state, p)
        error = state.get("half_map_error")
        return {
            "class_maps": names,
            "half_maps": half_names,
            "half_map_error_power": None if error is None else np.asarray(error).tolist(),
            "resolution_A": state["resolution_A"],
        }

    def log_line(self, state: dict, model, iteration: int, changed: float, seconds: float) -> str:
        res, box = f"res {state['resolution_A']:6.2f} A  ", f"box {model.work_box:3d}"
        return engine.class_log_line("class3d", iteration, state, changed, seconds, res, box)
