"""A small simulated chunk and refine3d / class3d E-step models on its truth map, for
the E-step tests."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from streamem.core.projector import make_projector
from streamem.em import mstep
from streamem.em.estep import EStepModel, SearchGrid
from streamem.io.mrc import read_map
from streamem.io.store import optics_params
from streamem.simulate.particles import simulate_particles, truth_volume_paths

POSES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")
STATS = ("data_acc", "weight_acc", "noise_power", "noise_count", "class_weight")
SCALARS = ("offset_sq_A2", "weight_sum", "loglik_sum", "pose_change_deg_sum")


def simulated_chunk(
    folder: Path,
    n: int,
    *,
    box: int,
    pixel_size_A: float,
    snr: float,
    seed: int,
    pose_noise_seed: int | None = None,
    pose_noise_deg: float = 0.0,
):
    """Simulate ``n`` particles under ``folder`` and read them back as one chunk.

    The metadata gets "particle_index" and previous poses (for local searches): the
    true poses, with Gaussian noise of ``pose_noise_deg`` on the angles (drawn from
    ``default_rng(pose_noise_seed)``) when ``pose_noise_deg`` > 0.
    Returns (store, chunk, metadata, truth map).
    """
    store = simulate_particles(
        folder / "p.zarr",
        n,
        box_size=box,
        pixel_size_A=pixel_size_A,
        snr=snr,
        seed=seed,
    )
    truth, _ = read_map(truth_volume_paths(store.path)[0])
    chunk = store.read_chunk(0, n, with_truth=True)
    metadata = dict(chunk.metadata)
    metadata["particle_index"] = np.arange(n)
    if pose_noise_deg > 0:
        rng = np.random.default_rng(pose_noise_seed)
        for label in POSES:
            noise = rng.normal(0, pose_noise_deg, n) if "Angle" in label else 0.0
            metadata[label] = chunk.truth[label] + noise
    else:
        for label in POSES:
            metadata[label] = chunk.truth[label]
    return store, chunk, metadata, truth


def refine_model(
    store,
    images: np.ndarray,
    truth: np.ndarray,
    *,
    box: int,
    pixel_size_A: float,
    healpix_order: int,
    local_sigma_deg: float | None = None,
    flipped_half2: bool = True,
    offset_range_px: int = 2,
    offset_step_px: int = 1,
    scale_free: bool = True,
) -> EStepModel:
    """A refine3d E-step model: half 1's reference is ``truth``, half 2's its copy
    flipped along y (``flipped_half2``) or ``truth`` itself; the initial noise comes
    from the images' power."""
    power = mstep.image_power(images, np.zeros(len(images), int), 1)
    half1 = make_projector(truth, 2, max_radius_px=box // 2 - 1)
    if flipped_half2:
        half2 = make_projector(truth[:, ::-1].copy(), 2, max_radius_px=box // 2 - 1)
    else:
        half2 = half1
    return EStepModel(
        projectors=(half1, half2),
        box_size=box,
        work_box=box,
        pixel_size_A=pixel_size_A,
        max_radius_px=box // 2 - 1,
        inv_sigma2=mstep.initial_inv_sigma2(power[0], power[1]),
        optics=(optics_params(store.optics_groups[0]),),
        sigma_offset_A=pixel_size_A,
        grid=SearchGrid(
            healpix_order=healpix_order,
            offset_range_px=offset_range_px,
            offset_step_px=offset_step_px,
            local_sigma_deg=local_sigma_deg,
        ),
        scale_free=scale_free,
    )


def two_class_model(model: EStepModel, truth: np.ndarray, **changes) -> EStepModel:
    """class3d with K = 2 from a refine3d ``model``: half 1's reference and ``truth``
    flipped along z, one reference per class for both halves; ``changes`` replace
    further fields."""
    other = make_projector(truth[::-1].copy(), 2, max_radius_px=model.max_radius_px)
    return replace(
        model,
        projectors=(model.projectors[0], other),
        n_classes=2,
        references_per_half=False,
        **changes,
    )


def largest_relative_difference(a, b) -> float:
    """The largest difference of two statistics' arrays (relative to the array's
    largest magnitude) and scalars (relative to the scalar)."""
    worst = 0.0
    for name in STATS:
        x, y = getattr(a, name), getattr(b, name)
        worst = max(worst, float(np.abs(x - y).max() / np.abs(x).max()))
    for name in SCALARS:
        x, y = getattr(a, name), getattr(b, name)
        worst = max(worst, abs(x - y) / max(abs(x), 1e-30))
    return worst
