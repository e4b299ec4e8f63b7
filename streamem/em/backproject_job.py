"""Reconstruction from known poses (``relion_reconstruct``) as a Dask job.

One task per store chunk back-projects CTF·X (weights CTF²) of its particles at
their poses into padded accumulators, per half set; the accumulators are
tree-reduced and reconstructed once on the client. Poses come from the store's
metadata, its ground truth (``truth``), or a RELION STAR file matched by order.
Used by ``streamem reconstruct`` and for the oracle of refinements.
"""

from __future__ import annotations

import numpy as np

from streamem.core.backend import to_numpy
from streamem.core.backprojector import insert_points, reconstruct
from streamem.core.euler import euler_to_matrix
from streamem.core.projector import half_cube_shape, padded_radius
from streamem.core.sampling import shift_phases
from streamem.dist.device import device_namespace
from streamem.dist.iteration import run_chunks
from streamem.em.fourier_points import fourier_data, half_plane_points, origins_px
from streamem.errors import InputError
from streamem.io.store import ParticleStore, optics_params

POSE_LABELS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


class Accumulators:
    """(2, ...) data and weight accumulators per half set; a monoid under +."""

    def __init__(self, data, weight):
        self.data, self.weight = data, weight

    def __add__(self, other):
        return Accumulators(self.data + other.data, self.weight + other.weight)


def backproject_chunk(
    images,
    metadata,
    poses,
    pixel_size_A,
    optics,
    max_radius_px,
    padding_factor=2,
    do_ctf=True,
    xp=np,
) -> Accumulators:
    """Back-project a chunk at known poses. poses: RELION labels → (n,) arrays.

    xp: the namespace the work runs in (CuPy on a GPU worker); the accumulators
    come back as NumPy arrays.
    """
    n, B = images.shape[0], images.shape[-1]
    coords, flat, _ = half_plane_points(B, max_radius_px)
    X, ctf, _ = fourier_data(images, metadata, coords, flat, pixel_size_A, optics, do_ctf, xp)
    ctf = xp.asarray(ctf)
    X = X * xp.asarray(shift_phases(coords, origins_px(poses, pixel_size_A, n), B))
    rot = euler_to_matrix(poses["rlnAngleRot"], poses["rlnAngleTilt"], poses["rlnAnglePsi"])
    shape = half_cube_shape(padded_radius(max_radius_px, padding_factor))
    data = xp.zeros((2, *shape), dtype=xp.complex128)
    weight = xp.zeros((2, *shape), dtype=xp.float64)
    subset = np.asarray(metadata.get("rlnRandomSubset", np.ones(n)), np.int64)
    for h in (1, 2):
        sel = np.flatnonzero(subset == h)
        if sel.size:
            on = xp.asarray(sel)
            insert_points(
                data[h - 1],
                weight[h - 1],
                rot[sel],
                coords,
                X[on] * ctf[on],
                ctf[on] ** 2,
                padding_factor,
            )
    return Accumulators(to_numpy(data), to_numpy(weight))


def _task(start, stop, store_path, pose_source, max_radius_px, padding_factor, do_ctf, star_poses):
    store = ParticleStore(store_path)
    chunk = store.read_chunk(start, stop, with_truth=pose_source == "truth")
    if pose_source == "truth":
        poses = chunk.truth
    elif pose_source == "star":
        poses = {k: v[start:stop] for k, v in star_poses.items()}
    else:
        poses = chunk.metadata
    optics = tuple(optics_params(g) for g in store.optics_groups)
    return backproject_chunk(
        chunk.images,
        chunk.metadata,
        poses,
        store.pixel_size_A,
        optics,
        max_radius_px,
        padding_factor,
        do_ctf,
        device_namespace() or np,  # CuPy on a GPU worker (--gpu)
    )


def accumulate_from_poses(
    store: ParticleStore,
    pose_source: str = "metadata",
    star_poses: dict | None = None,
    max_resolution_A: float | None = None,
    do_ctf: bool = True,
    padding_factor: int = 2,
    client=None,
    split_every: int = 8,
) -> Accumulators:
    """Per-half accumulators of all particles at known poses (a Dask job).

    pose_source: "metadata" (the store's poses), "truth" (simulated ground truth) or
    "star" (``star_poses``: RELION labels → (N,) arrays in store order).
    """
    B, p = store.box_size, store.pixel_size_A
    group = "truth" if pose_source == "truth" else "metadata"
    if pose_source != "star" and not store.has_fields(POSE_LABELS[:3], group):
        raise InputError(store.path, f"store has no poses in '{group}' (rlnAngleRot/Tilt/Psi)")
    radius = B // 2 - 1
    if max_resolution_A:
        radius = min(radius, B * p / max_resolution_A)
    do_ctf = do_ctf and store.has_fields(("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"))
    return run_chunks(
        _task,
        store.chunk_bounds(),
        str(store.path),
        pose_source,
        radius,
        padding_factor,
        do_ctf,
        shared=star_poses,  # the STAR file's poses: sent once, not in every task
        client=client,
        split_every=split_every,
        name="backproject",
    )


def reconstruct_from_poses(
    store: ParticleStore, symmetry_matrices=None, padding_factor: int = 2, **kwargs
) -> np.ndarray:
    """Half maps (2, B, B, B) float32 from known poses (see :func:`accumulate_from_poses`)."""
    acc = accumulate_from_poses(store, padding_factor=padding_factor, **kwargs)
    B = store.box_size
    return np.stack(
        [
            reconstruct(
                acc.data[h],
                acc.weight[h],
                B,
                padding_factor,
                None,
                symmetry_matrices=symmetry_matrices,
            )
            for h in range(2)
        ]
    )


def reconstruct_map(
    store: ParticleStore,
    pose_source: str = "metadata",
    star_path=None,
    subset: int | None = None,
    symmetry_matrices=None,
    padding_factor: int = 2,
    **kwargs,
) -> np.ndarray:
    """One map (B, B, B): both half sets joined, or ``subset`` 1 or 2 alone."""
    star_poses = None
    if star_path is not None:
        star_poses = read_star_poses(star_path, store.n_particles)
        pose_source = "star"
    acc = accumulate_from_poses(
        store, pose_source, star_poses, padding_factor=padding_factor, **kwargs
    )
    if subset is None:
        data, weight = acc.data[0] + acc.data[1], acc.weight[0] + acc.weight[1]
    else:
        data, weight = acc.data[subset - 1], acc.weight[subset - 1]
    return reconstruct(
        data, weight, store.box_size, padding_factor, None, symmetry_matrices=symmetry_matrices
    )


def read_star_poses(star_path, n_particles: int) -> dict:
    """Poses (RELION labels → (N,) arrays) from a STAR file whose rows follow store order."""
    from streamem.io.relion import read_particles_star

    particles, _ = read_particles_star(star_path)
    missing = [c for c in POSE_LABELS[:3] if c not in particles.columns]
    if missing:
        raise InputError(star_path, f"no pose columns {', '.join(missing)}")
    if len(particles) != n_particles:
        raise InputError(star_path, f"{len(particles)} particles, the store has {n_particles}")
    out = {c: particles[c].to_numpy(np.float64) for c in POSE_LABELS if c in particles.columns}
    for c in POSE_LABELS[3:]:
        out.setdefault(c, np.zeros(n_particles))
    return out
