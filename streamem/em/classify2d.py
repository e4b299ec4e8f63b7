"""2D classification (RELION's class2d) as a streaming Dask job on the refine3d kernels.

Per iteration, as in :mod:`streamem.em.refine`: the model (the K class averages, noise
spectra, class fractions, sampling) is broadcast once; one task per store chunk runs
:func:`expectation_2d`, writes its particles' class, psi and origin into
``particles.zarr`` and returns :class:`~streamem.em.statistics.SufficientStatistics`;
these are tree-reduced and the M-step (:func:`maximisation_2d`) runs on the client.

Frames and units. A class is kept as a real (B, B) image centred at B//2; the E-step
and the statistics use its rfft coefficients at the half-plane points of
:func:`streamem.em.estep.half_plane_points` (full-box DFT units, as the images).

In-plane rotation (RELION's convention, pinned by a test against the projector): an
image at pose (0, 0, psi) is the class rotated by psi, i.e. its coefficient at k is the
class's at ``M k`` with ``M = [[c, −s], [s, c]]`` (x, y order), and in real space
``out(x) = in(M x)`` about the centre (:func:`rotate_images`). References are rotated
in real space (cubic spline, ``scipy.ndimage.map_coordinates``) and re-transformed.

E-step (per chunk, image batches bounded in memory): the K·P rotated references
(class-major, row k·P + p) against every image × translation in one GEMM
(:func:`streamem.em.estep.cross_terms`, :func:`~streamem.em.estep.ref_power_terms`),
log-posterior = −diff2 + log π_k + Gaussian offset prior (translations searched around
the particle's previous origin, as refine3d). No fine pass: the grid is the psi step ×
the offset step (adaptive oversampling is left for later). Posterior weights keep the
samples holding ``adaptive_fraction`` of the mass (:func:`significant_weights`).

Statistics: per (class, psi) row J, Σ_{i,t} w · CTF·X_t/σ² is a GEMM
(J, n·T) @ (n·T, M), and Σ_i w · CTF²/σ² a GEMM (J, n) @ (n, M); the rows are rotated
back to the class frame by −psi once per chunk and summed over psi: the data sums in
real space (inverse FT, cubic rotation, FT), the CTF² weights by bilinear interpolation
on the centred Fourier grid (they are real and even in k). Noise sums per optics group
and shell, class weights, offsets as refine3d.

M-step: the class average is Σ CTF·X/σ² / (Σ CTF²/σ² + 1/(fudge·τ²)) (RELION's Wiener
form). τ² per class and shell is estimated from the class's own data (no half sets in
class2d): the unregularised average D/W has noise power 2/W per coefficient, so
τ²(s) = max(0, ⟨|D/W|²⟩_s/2 − ⟨1/W⟩_s) (per complex component, as σ²). RELION instead
reuses the previous iteration's reference power; this estimate needs no history. The
class's data-vs-prior fudge·τ²·⟨W⟩ gives its resolution (rlnEstimatedResolution: the
last shell before it drops below 1). The average is masked with a soft circle of the
particle diameter; ``center_classes`` moves each average's centre of mass (of its
positive part) to the box centre. Class fractions π_k = Σ posterior / N.

Initial classes: K averages of a seeded random partition of the first chunks' images
(at most ``max(20·K, one chunk)`` images), phase-flipped, masked. The first iteration
fits each reference's scale per sample (the start is not on the data's greyscale,
as class3d) and does not update the noise spectra.

Resolution limit: the first iteration uses all shells below Nyquist; later ones the
best populated class's resolution shell + 10 (RELION's incr_size).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from streamem import validate as check
from streamem.core.backend import fftshift, ifftshift, irfftn, rfftn
from streamem.core.ctf import OpticsParams, ctf_rfft, phase_flip
from streamem.core.masks import soft_sphere
from streamem.em import mstep, runfiles, runfolder
from streamem.em.class_truth import ClassAccuracy
from streamem.em.fourier_points import half_plane_points
from streamem.em.inplane import (  # class2d's E-step (moved; names kept importable here)
    Class2DModel,
    class2d_batch_size,
    coefficients_to_images,
    expectation_2d,
    image_coefficients,
    rotate_data_back,
    rotate_images,
    rotate_weights_back,
    rotated_references,
)
from streamem.em.refine import INCREMENT_SHELLS, initial_noise, run_estep
from streamem.errors import InputError
from streamem.io.mrc import read_map, write_map
from streamem.io.relion import write_star
from streamem.io.store import ParticleStore, optics_params

log = logging.getLogger("streamem")


@dataclass(frozen=True)
class Class2DOptions:
    """Parameters of a class2d run (RELION option names in brackets)."""

    n_classes: int = 50  # --K
    iterations: int = 25  # --iter
    psi_step_deg: float = 10.0  # --psi_step
    offset_range_px: float = 5.0  # --offset_range
    offset_step_px: float = 2.0  # --offset_step
    tau2_fudge: float = 2.0  # --tau2_fudge
    particle_diameter_A: float | None = None  # --particle_diameter (default 0.8 x box)
    ctf_intact_first_peak: bool = False  # --ctf_intact_first_peak
    center_classes: bool = False  # --center_classes
    do_ctf: bool = True
    adaptive_fraction: float = 0.999
    seed: int = 0
    split_every: int = 8
    memory_per_worker_bytes: int | None = None  # --memory-per-worker: E-step budget (em.memory)

    def __post_init__(self):
        # every value checked before any work (streamem.validate); messages name the CLI option
        check.at_least("--k", self.n_classes, 1)
        check.at_least("--iterations", self.iterations, 1)
        if check.number("--psi-step", self.psi_step_deg, "degrees") is not None and not (
            0 < self.psi_step_deg <= 360
        ):
            raise InputError(
                None, f"--psi-step must be in (0, 360] degrees, got {self.psi_step_deg}"
            )
        check.non_negative("--offset-range", self.offset_range_px, "pixels")
        check.positive("--offset-step", self.offset_step_px, "pixels")
        check.positive("--tau2-fudge", self.tau2_fudge)
        check.positive("--particle-diameter", self.particle_diameter_A, "Å")
        check.fraction("adaptive_fraction", self.adaptive_fraction, open_low=True)
        check.seed("--seed", self.seed)
        check.at_least("split_every", self.split_every, 2)  # a tree reduction's fan-in

    def check_box(self, box_size: int, pixel_size_A: float) -> None:
        """What needs the store: the particle diameter fits in the box."""
        check.diameter_fits_box(
            "--particle-diameter", self.particle_diameter_A, box_size, pixel_size_A
        )

    @property
    def psi_deg(self) -> np.ndarray:
        n = max(1, int(round(360.0 / self.psi_step_deg)))
        return np.arange(n) * (360.0 / n)


# -- M-step ----------------------------------------------------------------------------------


def maximisation_2d(
    data_acc: np.ndarray,
    weight_acc: np.ndarray,
    shell: np.ndarray,
    n_shells: int,
    tau2_fudge: float,
):
    """Regularised class averages from the summed statistics (module docstring).

    data_acc (K, M) complex, weight_acc (K, M), shell (M,) int. Returns (averages (K, M)
    complex128, τ² (K, n_shells), data-vs-prior (K, n_shells)).
    """
    K = data_acc.shape[0]
    count = np.bincount(shell, minlength=n_shells)[:n_shells].astype(np.float64)
    tau2 = np.zeros((K, n_shells))
    dvp = np.zeros((K, n_shells))
    out = np.zeros_like(data_acc, dtype=np.complex128)
    for k in range(K):
        w = weight_acc[k]
        ok = w > 0
        if not ok.any():
            continue
        raw = np.where(ok, data_acc[k] / np.where(ok, w, 1.0), 0.0)
        n_ok = np.bincount(shell[ok], minlength=n_shells)[:n_shells]
        with np.errstate(divide="ignore", invalid="ignore"):
            p_raw = np.bincount(shell[ok], np.abs(raw[ok]) ** 2, n_shells)[:n_shells] / n_ok
            noise = np.bincount(shell[ok], 1.0 / w[ok], n_shells)[:n_shells] / n_ok
            mean_w = np.bincount(shell, w, n_shells)[:n_shells] / count
        t2 = np.nan_to_num(np.maximum(0.5 * p_raw - noise, 0.0))
        tau2[k] = t2
        dvp[k] = np.nan_to_num(tau2_fudge * t2 * mean_w)
        prior = np.where(t2[shell] > 0, 1.0 / (tau2_fudge * np.maximum(t2[shell], 1e-300)), np.inf)
        with np.errstate(invalid="ignore"):
            out[k] = np.where(np.isfinite(prior), data_acc[k] / (w + prior), 0.0)
    return out, tau2, dvp


def resolution_shell(data_vs_prior: np.ndarray) -> int:
    """Last shell s ≥ 1 such that shells 1..s all have data-vs-prior ≥ 1 (0 if none)."""
    low = np.flatnonzero(data_vs_prior[1:] < 1.0)
    return int(low[0]) if low.size else len(data_vs_prior) - 1


def center_of_mass_shift(image: np.ndarray) -> np.ndarray:
    """(dy, dx) pixels that move the centre of mass of the image's positive part to B//2."""
    pos = np.clip(image, 0, None)
    total = pos.sum()
    if total <= 0:
        return np.zeros(2)
    com = np.asarray(ndimage.center_of_mass(pos))
    return image.shape[-1] // 2 - com


def shift_image(image: np.ndarray, shift_px) -> np.ndarray:
    """Image moved by (dy, dx) pixels (Fourier phase shift, periodic)."""
    B = image.shape[-1]
    ky = np.fft.fftfreq(B)[:, None]
    kx = np.fft.rfftfreq(B)[None, :]
    F = np.fft.rfft2(image) * np.exp(-2j * np.pi * (ky * shift_px[0] + kx * shift_px[1]))
    return np.fft.irfft2(F, s=(B, B)).astype(np.float32)


# -- initial classes -------------------------------------------------------------------------


def initial_class_images(
    images: np.ndarray,
    metadata: dict[str, np.ndarray],
    n_classes: int,
    pixel_size_A: float,
    optics: tuple[OpticsParams, ...],
    mask: np.ndarray,
    seed: int,
    do_ctf: bool = True,
) -> np.ndarray:
    """K averages of a seeded random partition of ``images`` (phase-flipped), masked.

    images: (n, B, B) with n ≥ K. Returns (K, B, B) float32.
    """
    n, B = images.shape[0], images.shape[-1]
    data = np.asarray(images, np.float64)
    if do_ctf and "rlnDefocusU" in metadata:
        groups = np.asarray(metadata.get("rlnOpticsGroup", np.ones(n)), np.int64) - 1
        F = rfftn(ifftshift(data, axes=(-2, -1)), axes=(-2, -1))
        for g in np.unique(groups):
            sel = groups == g
            ctf = ctf_rfft(
                B,
                pixel_size_A,
                metadata["rlnDefocusU"][sel],
                metadata["rlnDefocusV"][sel],
                metadata["rlnDefocusAngle"][sel],
                optics[g],
                metadata.get("rlnPhaseShift", np.zeros(n))[sel],
            )
            F[sel] *= phase_flip(ctf)
        data = fftshift(irfftn(F, s=(B, B), axes=(-2, -1)), axes=(-2, -1))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2]))
    labels = rng.permutation(np.arange(n) % n_classes)  # every class gets ⌊n/K⌋ or more
    out = np.stack([data[labels == k].mean(axis=0) for k in range(n_classes)])
    return (out * mask).astype(np.float32)


# -- driver ------------------------------------------------------------------------------------


@dataclass
class Class2DResult:
    """What a class2d run produced; ``plot()`` shows the class averages sorted by size."""

    out_dir: Path
    class_images: np.ndarray  # (K, B, B)
    fractions: np.ndarray  # (K,)
    resolutions_A: np.ndarray  # (K,)
    class_numbers: np.ndarray  # (N,) from 1
    pixel_size_A: float
    iterations: int
    truth_accuracy: ClassAccuracy | None = None  # against the simulation's truth, if any
    history: list = field(default_factory=list, repr=False)
    seconds: list = field(default_factory=list, repr=False)

    def plot(self, fig=None):
        return plot_gallery(self.class_images, self.fractions, self.resolutions_A, fig=fig)


def _initial_images(store: ParticleStore, n_classes: int):
    """The first chunks' images and metadata, at least max(20·K, one chunk) images if held."""
    want = max(20 * n_classes, store.chunk_size)
    imgs, metas = [], []
    for start, stop in store.chunk_bounds():
        chunk = store.read_chunk(start, stop)
        imgs.append(chunk.images)
        metas.append(chunk.metadata)
        if sum(i.shape[0] for i in imgs) >= want:
            break
    meta = {k: np.concatenate([m[k] for m in metas]) for k in metas[0]}
    return np.concatenate(imgs), meta


def classify2d(
    store: str | Path | ParticleStore,
    out_dir: str | Path,
    options: Class2DOptions | None = None,
    client=None,
    continue_run: bool = False,
) -> Class2DResult:
    """RELION's 2D classification of a particle store into K classes.

    out_dir: run folder (created, must be empty unless ``continue_run``); client: a
    ``distributed.Client`` or None (threads). Writes per iteration
    ``run_itNNN_classes.mrcs``, ``_model.star``, ``_data.star``, ``_optimiser.json``
    and at the end ``run_classes.png``. continue_run: resume after the newest complete
    iteration and run up to ``options.iterations`` (RELION's --continue). The job holds
    ``out_dir`` (:func:`streamem.em.runfolder.claim`): one job at a time, continued only
    on the same store with the same options, restartable when it died before its first
    checkpoint.
    """
    options = options or Class2DOptions()
    store = store if isinstance(store, ParticleStore) else ParticleStore(store)
    options.check_box(store.box_size, store.pixel_size_A)  # before the run folder is created
    if options.n_classes > store.n_particles:
        raise InputError(
            store.path, f"--k {options.n_classes} is more than the {store.n_particles} particles"
        )
    if options.particle_diameter_A is not None and options.particle_diameter_A <= 0:
        raise InputError(None, "--particle-diameter must be positive")
    with runfolder.claim(out_dir, "class2d", store, options, continue_run, STATE_KEYS) as run:
        return _classify2d(store, run, options, client)


#: What a class2d checkpoint must hold to be resumed from (runfiles.read_checkpoint).
STATE_KEYS = (
    "class_stack",
    "inv_sigma2",
    "sigma_offset_A",
    "fractions",
    "resolutions_A",
    "max_radius_px",
)


def _classify2d(store, run, options, client) -> Class2DResult:
    """class2d's loop in a claimed run folder (``run.state``: the checkpoint to resume)."""
    out_dir = run.out_dir
    B, p, N = store.box_size, store.pixel_size_A, store.n_particles
    K = options.n_classes
    diameter = options.particle_diameter_A or 0.8 * B * p
    optics = tuple(optics_params(g) for g in store.optics_groups)
    do_ctf = options.do_ctf and store.has_fields(("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"))
    results_path = out_dir / "particles.zarr"
    mask = soft_sphere(B, min(0.5 * diameter / p, B / 2 - 1), edge_px=max(2.0, 0.05 * B), ndim=2)
    history, seconds = [], []
    state = run.state
    if state is not None:
        class_images = np.asarray(read_map(out_dir / state["class_stack"])[0], np.float32)
        if class_images.shape[0] != K:
            raise InputError(out_dir, f"the run has {class_images.shape[0]} classes, not {K}")
        inv_sigma2 = np.asarray(state["inv_sigma2"])
        sigma_offset_A = state["sigma_offset_A"]
        fractions = np.asarray(state["fractions"])
        resolutions = np.asarray(state["resolutions_A"])
        radius = state["max_radius_px"]
        history = list(state.get("history", []))  # runs before 0.1 kept no history
        prev_iteration = state["iteration"]
        previous_classes = runfiles.read_results(results_path, prev_iteration)["rlnClassNumber"]
        log.info("continuing from iteration %d", prev_iteration)
    else:
        first_images, first_meta = _initial_images(store, K)
        class_images = initial_class_images(
            first_images, first_meta, K, p, optics, mask, options.seed, do_ctf
        )
        del first_images
        inv_sigma2 = initial_noise(store, client, options.split_every)
        sigma_offset_A = max(options.offset_range_px, 1.0) * p / 2
        fractions = np.full(K, 1.0 / K)
        resolutions = np.full(K, 999.0)
        radius = float(B // 2 - 1)
        prev_iteration, previous_classes = None, None
    true_classes = runfiles.true_classes(store)  # simulations: score every iteration
    accuracy = None
    for iteration in range((prev_iteration or 0) + 1, options.iterations + 1):
        t0 = time.perf_counter()
        with np.errstate(divide="ignore"):
            log_pi = np.log(fractions)
        model = Class2DModel(
            class_images=class_images,
            log_class_prior=log_pi,
            psi_deg=options.psi_deg,
            box_size=B,
            pixel_size_A=p,
            max_radius_px=radius,
            inv_sigma2=inv_sigma2,
            optics=optics,
            sigma_offset_A=sigma_offset_A,
            offset_range_px=options.offset_range_px,
            offset_step_px=options.offset_step_px,
            do_ctf=do_ctf,
            ctf_intact_first_peak=options.ctf_intact_first_peak,
            scale_free=iteration == 1,
            adaptive_fraction=options.adaptive_fraction,
            memory_per_worker_bytes=options.memory_per_worker_bytes,
        )
        stats = run_estep(
            store,
            results_path,
            prev_iteration,
            iteration,
            model,
            client,
            expectation_2d,
            options.split_every,
            name="class2d",
        )

        # -- M-step ----------------------------------------------------------------------
        coords, flat, shell = half_plane_points(B, radius)
        averages, _, dvp = maximisation_2d(
            stats.data_acc, stats.weight_acc, shell, B // 2 + 1, options.tau2_fudge
        )
        images_k = coefficients_to_images(averages, coords, flat, B)  # (K, B, B)
        if options.center_classes:
            images_k = np.stack(
                [shift_image(im, center_of_mass_shift(im * mask)) for im in images_k]
            )
        class_images = (images_k * mask).astype(np.float32)
        fractions = stats.class_weight / max(float(stats.class_weight.sum()), 1e-30)
        shells = np.array([resolution_shell(d) for d in dvp])
        resolutions = np.where(shells > 0, B * p / np.maximum(shells, 1), 999.0)
        populated = fractions > 0.5 / N
        best_shell = int(shells[populated].max()) if populated.any() else 0
        if iteration > 1:
            radius = float(min(B // 2 - 1, max(best_shell + INCREMENT_SHELLS, 4)))
        if not model.scale_free:
            inv_sigma2 = mstep.update_inv_sigma2(inv_sigma2, stats.noise_power, stats.noise_count)
        sigma_offset_A = mstep.update_sigma_offset_A(
            stats.offset_sq_A2, stats.weight_sum, floor_A=p
        )

        # -- outputs ---------------------------------------------------------------------
        prefix = runfiles.iteration_prefix(out_dir, iteration)
        stack_name = f"{prefix.name}_classes.mrcs"
        write_map(out_dir / stack_name, class_images, p)
        results = runfiles.read_results(results_path, iteration)
        runfiles.write_data_star(Path(f"{prefix}_data.star"), store, results)
        general = {
            "rlnCurrentResolution": float(resolutions[populated].min())
            if populated.any()
            else 999.0,
            "rlnCurrentImageSize": B,
            "rlnPixelSize": p,
            "rlnOriginalImageSize": B,
            "rlnNrClasses": K,
            "rlnTau2FudgeFactor": options.tau2_fudge,
            "rlnLogLikelihood": stats.loglik_sum,
            "rlnSigmaOffsetsAngst": sigma_offset_A,
            "rlnPsiStep": float(360.0 / options.psi_deg.size),
        }
        write_class2d_model_star(
            Path(f"{prefix}_model.star"), general, stack_name, fractions, resolutions, dvp, B, p,
            inv_sigma2,
        )  # fmt: skip
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
                "class_stack": stack_name,
                "sigma_offset_A": sigma_offset_A,
                "max_radius_px": radius,
                "inv_sigma2": inv_sigma2.tolist(),
                "truth_accuracy": accuracy.accuracy if accuracy is not None else None,
                "history": history,
                "run": run.record,  # store and options, checked by --continue
            },
        )
        log.info(
            "class2d it %3d  classes %s  changed %5.1f%%  radius %2d  %6.1f s",
            iteration,
            " ".join(f"{f:.3f}" for f in fractions),
            100 * changed,
            int(radius),
            time.perf_counter() - t0,
        )
        if accuracy is not None:
            log.info("%s it %3d  %s", "class2d", iteration, accuracy.summary())
        prev_iteration = iteration
    write_gallery(out_dir / "run_classes.png", class_images, fractions, resolutions)
    return Class2DResult(
        out_dir=out_dir,
        class_images=class_images,
        fractions=fractions,
        resolutions_A=resolutions,
        class_numbers=np.asarray(previous_classes, np.int64),
        pixel_size_A=p,
        iterations=max(options.iterations, prev_iteration or 0),
        truth_accuracy=accuracy,
        history=history,
        seconds=seconds,
    )


def write_class2d_model_star(
    path, general, stack_name, fractions, resolutions_A, data_vs_prior, box_size, pixel_size_A,
    inv_sigma2,
) -> None:  # fmt: skip
    """RELION's class2d model STAR: general, classes (NNNNNN@stack), per-class SSNR, noise."""
    K = len(fractions)
    shells = np.arange(box_size // 2 + 1)
    blocks = {
        "model_general": pd.DataFrame([general]),
        "model_classes": pd.DataFrame(
            {
                "rlnReferenceImage": [f"{k + 1:06d}@{stack_name}" for k in range(K)],
                "rlnClassDistribution": np.asarray(fractions, np.float64),
                "rlnEstimatedResolution": np.asarray(resolutions_A, np.float64),
            }
        ),
    }
    for k in range(K):
        blocks[f"model_class_{k + 1}"] = pd.DataFrame(
            {
                "rlnSpectralIndex": shells,
                "rlnResolution": shells / (box_size * pixel_size_A),
                "rlnSsnrMap": np.asarray(data_vs_prior[k][: len(shells)], np.float64),
            }
        )
    for g, inv in enumerate(inv_sigma2):
        with np.errstate(divide="ignore"):
            sigma2 = np.where(inv > 0, 1.0 / np.maximum(inv, 1e-300), 0.0)
        blocks[f"model_optics_group_{g + 1}"] = pd.DataFrame(
            {"rlnSpectralIndex": shells, "rlnSigma2Noise": sigma2[: len(shells)]}
        )
    write_star(path, blocks)


def plot_gallery(class_images, fractions, resolutions_A, fig=None):
    """Class averages sorted by class size (largest first), titled by fraction and resolution."""
    import matplotlib.pyplot as plt

    K = len(fractions)
    order = np.argsort(-np.asarray(fractions), kind="stable")
    cols = int(np.ceil(np.sqrt(K)))
    rows = int(np.ceil(K / cols))
    fig = fig or plt.figure(figsize=(1.6 * cols, 1.8 * rows))
    for i, k in enumerate(order):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(class_images[k], cmap="gray", origin="lower")
        ax.set_title(f"{k + 1}: {100 * fractions[k]:.1f}% {resolutions_A[k]:.0f}Å", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    return fig


def write_gallery(path: Path, class_images, fractions, resolutions_A) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot_gallery(class_images, fractions, resolutions_A)
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = [
    "Class2DModel",
    "Class2DOptions",
    "Class2DResult",
    "class2d_batch_size",
    "classify2d",
    "coefficients_to_images",
    "expectation_2d",
    "image_coefficients",
    "initial_class_images",
    "maximisation_2d",
    "rotate_data_back",
    "rotate_images",
    "rotate_weights_back",
    "rotated_references",
]
