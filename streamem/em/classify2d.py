"""2D classification (RELION's class2d) as a job definition on the one run loop.

:class:`Class2DJob` for :func:`streamem.em.engine.run_job`: the E-step model holds the
K class averages, class fractions and the in-plane sampling (:mod:`streamem.em.inplane`:
in-plane rotations as the orientation set, on the E-step's kernels); the M-step
(:mod:`streamem.em.class2d_mstep`) regularises each class average with τ² from its own
data, masks it with a soft circle of the particle diameter and optionally centres it.
Class fractions π_k = Σ posterior / N enter the next E-step as log π_k.

Initial classes: averages of a seeded random partition of the first chunks' images
(:func:`~streamem.em.class2d_mstep.initial_class_images`). The first iteration fits
each reference's scale per sample (the start is not on the data's greyscale, as
class3d) and does not update the noise spectra.

Resolution limit: the first iteration uses all shells below Nyquist; later ones the
best populated class's resolution shell + 10 (RELION's incr_size).

Outputs per iteration: ``run_itNNN_classes.mrcs``, ``_model.star`` (classes as
``NNNNNN@run_itNNN_classes.mrcs``, per-class SSNR), ``_data.star``, ``_optimiser.json``;
at the end ``run_classes.png``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from streamem import validate as check
from streamem.core.masks import soft_sphere
from streamem.em import engine, runfolder
from streamem.em.class2d_mstep import (  # noqa: F401 (initial_class_images: kept importable)
    center_of_mass_shift,
    first_images,
    initial_class_images,
    maximisation_2d,
    resolution_shell,
    shift_image,
)
from streamem.em.class_truth import ClassAccuracy
from streamem.em.fourier_points import half_plane_points
from streamem.em.inplane import (  # noqa: F401 (class2d's E-step; names kept importable here)
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
from streamem.errors import InputError
from streamem.io.mrc import read_map, write_map
from streamem.io.store import ParticleStore

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


# -- M-step


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

    def __repr__(self) -> str:
        from streamem.display import short_repr

        return short_repr("Class2DResult", out_dir=self.out_dir, iterations=self.iterations,
                          class_images=self.class_images)  # fmt: skip

    def _repr_html_(self) -> str:
        from streamem.display import class2d_html

        return class2d_html(self)  # table of classes, gallery


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
    with runfolder.claim(out_dir, "class2d", store, options, continue_run, STATE_KEYS) as run:
        ctx = engine.run_context(store, run, options, client)
        state = engine.run_job(Class2DJob(options), ctx)
        write_gallery(
            ctx.out_dir / "run_classes.png",
            state["class_images"],
            state["fractions"],
            state["resolutions"],
        )
    fields = engine.class_result_fields(ctx, state, options.iterations)
    return Class2DResult(class_images=state["class_images"], **fields)


#: What a class2d checkpoint must hold to be resumed from (runfiles.read_checkpoint).
STATE_KEYS = (
    "class_stack",
    "inv_sigma2",
    "sigma_offset_A",
    "fractions",
    "resolutions_A",
    "max_radius_px",
)


@dataclass(frozen=True)
class Class2DJob:
    """class2d for :func:`streamem.em.engine.run_job` (state: ``class_images`` (K, B, B),
    ``fractions`` (K,), ``resolutions`` (K,) Å, ``radius`` (Fourier px), ``mask``,
    ``dvp`` (K, B//2+1) data vs prior; see engine.Job)."""

    options: Class2DOptions
    kind: ClassVar[engine.JobKind] = engine.JobKind("class2d", True, expectation_2d)

    def start(self, ctx, checkpoint: dict | None) -> dict:
        o, B, p, K = self.options, ctx.box_size, ctx.pixel_size_A, self.options.n_classes
        radius_px = min(0.5 * ctx.diameter_A / p, B / 2 - 1)
        mask = soft_sphere(B, radius_px, edge_px=max(2.0, 0.05 * B), ndim=2)
        if checkpoint is not None:
            class_images = read_map(ctx.out_dir / checkpoint["class_stack"])[0]
            if class_images.shape[0] != K:
                raise InputError(
                    ctx.out_dir, f"the run has {class_images.shape[0]} classes, not {K}"
                )
            return {
                "mask": mask,
                "class_images": np.asarray(class_images, np.float32),
                "fractions": np.asarray(checkpoint["fractions"]),
                "resolutions": np.asarray(checkpoint["resolutions_A"]),
                "radius": checkpoint["max_radius_px"],
            }
        images, meta = first_images(ctx.store, K)
        return {
            "mask": mask,
            "class_images": initial_class_images(
                images, meta, K, p, ctx.optics, mask, o.seed, ctx.do_ctf
            ),
            "sigma_offset_A": max(o.offset_range_px, 1.0) * p / 2,
            "fractions": np.full(K, 1.0 / K),
            "resolutions": np.full(K, 999.0),
            "radius": float(B // 2 - 1),
        }

    def finished(self, state: dict) -> bool:
        return state["iteration"] >= self.options.iterations

    def model(self, ctx, state: dict, iteration: int) -> Class2DModel:
        o = self.options
        with np.errstate(divide="ignore"):
            log_pi = np.log(state["fractions"])
        return Class2DModel(
            class_images=state["class_images"],
            log_class_prior=log_pi,
            psi_deg=o.psi_deg,
            box_size=ctx.box_size,
            pixel_size_A=ctx.pixel_size_A,
            max_radius_px=state["radius"],
            inv_sigma2=state["inv_sigma2"],
            optics=ctx.optics,
            sigma_offset_A=state["sigma_offset_A"],
            offset_range_px=o.offset_range_px,
            offset_step_px=o.offset_step_px,
            do_ctf=ctx.do_ctf,
            ctf_intact_first_peak=o.ctf_intact_first_peak,
            scale_free=iteration == 1,
            adaptive_fraction=o.adaptive_fraction,
            memory_per_worker_bytes=o.memory_per_worker_bytes,
        )

    def maximise(self, ctx, state: dict, model: Class2DModel, stats) -> dict:
        """Regularised, masked (optionally centred) averages; fractions; resolutions; radius."""
        B, p, mask = ctx.box_size, ctx.pixel_size_A, state["mask"]
        coords, flat, shell = half_plane_points(B, model.max_radius_px)
        averages, _, dvp = maximisation_2d(
            stats.data_acc, stats.weight_acc, shell, B // 2 + 1, self.options.tau2_fudge
        )
        images_k = coefficients_to_images(averages, coords, flat, B)  # (K, B, B)
        if self.options.center_classes:
            images_k = np.stack(
                [shift_image(im, center_of_mass_shift(im * mask)) for im in images_k]
            )
        fractions = stats.class_weight / max(float(stats.class_weight.sum()), 1e-30)
        shells = np.array([resolution_shell(d) for d in dvp])
        populated = fractions > 0.5 / ctx.store.n_particles
        best_shell = int(shells[populated].max()) if populated.any() else 0
        radius = model.max_radius_px
        if not model.scale_free:  # after the first iteration (all shells below Nyquist)
            radius = float(min(B // 2 - 1, max(best_shell + engine.INCREMENT_SHELLS, 4)))
        resolutions = np.where(shells > 0, B * p / np.maximum(shells, 1), 999.0)
        return {
            **state,
            "class_images": (images_k * mask).astype(np.float32),
            "fractions": fractions,
            "resolutions": resolutions,
            "resolution_A": float(resolutions[populated].min()) if populated.any() else 999.0,
            "radius": radius,
            "dvp": dvp,
        }

    def write_outputs(self, ctx, state: dict, model: Class2DModel, stats, prefix: Path) -> dict:
        o, B, p, K = self.options, ctx.box_size, ctx.pixel_size_A, self.options.n_classes
        stack_name = f"{prefix.name}_classes.mrcs"
        write_map(ctx.out_dir / stack_name, state["class_images"], p)
        engine.write_model(
            ctx, state, stats, prefix, B, o.tau2_fudge, {"rlnPsiStep": float(360.0 / o.psi_deg.size)},
            [{"rlnSsnrMap": np.asarray(d, np.float64)} for d in state["dvp"]],
            [f"{k + 1:06d}@{stack_name}" for k in range(K)],
            class_axes=("rlnSpectralIndex", "rlnResolution"),
        )  # fmt: skip
        return {"class_stack": stack_name, "max_radius_px": state["radius"]}

    def log_line(self, state: dict, model, iteration: int, changed: float, seconds: float) -> str:
        radius = f"radius {int(state['radius']):2d}"
        return engine.class_log_line("class2d", iteration, state, changed, seconds, tail=radius)


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
