"""The Python API: the CLI's verbs as functions returning result objects.

import streamem.api as sm
store = sm.simulate("p.zarr", n_particles=2000, box_size=48, pixel_size_A=3.0)
result = sm.refine3d(store, "ref.mrc", "run")
result.plot()
classes = sm.class3d(store, "ref.mrc", "class3d", sm.Class3DOptions(n_classes=4))
classes.plot(); classes.truth_accuracy  # on simulated data
mask = sm.mask_create("run/run_class001.mrc", out="mask.mrc", threshold=0.02)

Every CLI verb has a function here (:data:`VERBS`; ``cluster`` and ``bench`` are
CLI-only, :data:`CLI_ONLY` says why). refine3d, class2d, class3d, select, simulate and
demo are Python functions taking an options dataclass and a ``distributed.Client``
(:data:`CLI_NAMES` maps each CLI option to its parameter); the others run the
command's own code with the CLI's options as keywords (:mod:`streamem.api_cli`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from streamem.api_verbs import (
    CLI_NAMES,
    CLI_ONLY,
    EXECUTION_OPTIONS,
    ctf,
    export,
    extract,
    import_particles,
    info,
    local_resolution,
    mask_create,
    pick,
    postprocess,
    reconstruct,
    simulate_micrographs,
)
from streamem.em.classify2d import Class2DOptions, Class2DResult
from streamem.em.classify2d import classify2d as class2d
from streamem.em.classify3d import Class3DOptions, Class3DResult
from streamem.em.classify3d import classify3d as class3d
from streamem.em.refine import RefineOptions, RefineResult, refine3d
from streamem.em.select import select_particles as select
from streamem.simulate.particles import simulate_particles as simulate

log = logging.getLogger("streamem")

__all__ = [
    "RefineOptions",
    "RefineResult",
    "refine3d",
    "Class2DOptions",
    "Class2DResult",
    "class2d",
    "Class3DOptions",
    "Class3DResult",
    "class3d",
    "select",
    "simulate",
    "oracle",
    "angular_errors_deg",
    "demo",
    "import_particles",
    "export",
    "info",
    "reconstruct",
    "ctf",
    "pick",
    "extract",
    "postprocess",
    "mask_create",
    "local_resolution",
    "simulate_micrographs",
    "VERBS",
    "CLI_ONLY",
    "CLI_NAMES",
    "EXECUTION_OPTIONS",
]


def _verbs() -> dict:
    return {
        "demo": demo,
        "simulate": simulate,
        "simulate-micrographs": simulate_micrographs,
        "import": import_particles,
        "export": export,
        "info": info,
        "reconstruct": reconstruct,
        "refine3d": refine3d,
        "class3d": class3d,
        "class2d": class2d,
        "select": select,
        "ctf": ctf,
        "pick": pick,
        "extract": extract,
        "mask-create": mask_create,
        "postprocess": postprocess,
        "local-resolution": local_resolution,
    }


def oracle(store, symmetry_matrices=None, client=None) -> tuple[np.ndarray, np.ndarray, float]:
    """Half maps from the true poses, their FSC and resolution (Å at 0.143)."""
    from streamem.core.fsc import fsc, resolution_at
    from streamem.em.backproject_job import reconstruct_from_poses

    halves = reconstruct_from_poses(
        store, symmetry_matrices=symmetry_matrices, pose_source="truth", client=client
    )
    curve = fsc(halves[0], halves[1])
    return halves, curve, resolution_at(curve, 0.143, store.box_size, store.pixel_size_A)


def angular_errors_deg(store, poses: dict, symmetry: str = "C1") -> np.ndarray:
    """Per particle, the angle (deg) between refined and true orientations."""
    from streamem.core.euler import angular_distance_deg, euler_to_matrix
    from streamem.core.symmetry import symmetry_matrices

    truth = store.read_table("truth")
    A = euler_to_matrix(poses["rlnAngleRot"], poses["rlnAngleTilt"], poses["rlnAnglePsi"])
    T = euler_to_matrix(truth["rlnAngleRot"], truth["rlnAngleTilt"], truth["rlnAnglePsi"])
    return angular_distance_deg(A, T, symmetry_matrices(symmetry) if symmetry != "C1" else None)


def demo(
    out_dir,
    n_particles: int = 2000,
    box_size: int = 40,
    pixel_size_A: float = 3.6,
    snr: float = 0.1,
    seed: int = 0,
    max_iterations: int = 10,
    n_workers: int | None = None,
    use_cluster: bool = True,
    overwrite: bool = False,
    client=None,
) -> dict:
    """Simulate, refine from the truth low-passed to 30 Å, compare with the oracle.

    ``out_dir`` must be new, or (with ``overwrite``) a folder streamem wrote; the old
    one is kept aside until the new one is complete (:mod:`streamem.io.atomic`).
    Every step runs on ``client``'s cluster (a ``distributed.Client``); without one, on
    a new local cluster of ``n_workers`` workers, or on threads here if not
    ``use_cluster``.
    """
    from streamem.dist.cluster import run_with_client
    from streamem.io.atomic import output_folder_in_place

    out = Path(out_dir)
    args = (out, n_particles, box_size, pixel_size_A, snr, seed, max_iterations)
    # in place, not under a temporary name: the store records its truth maps' paths
    with output_folder_in_place(out, overwrite, command="demo"):
        if client is not None or not use_cluster:
            return _demo_in(*args, client)
        return run_with_client(lambda c: _demo_in(*args, c), n_workers=n_workers)


def _demo_in(
    out: Path,
    n_particles: int,
    box_size: int,
    pixel_size_A: float,
    snr: float,
    seed: int,
    max_iterations: int,
    client,
) -> dict:
    """The demo's work inside its (new, empty) output folder ``out``, on ``client``
    (a ``distributed.Client``) or, if None, on threads here."""
    from streamem.core.filters import lowpass
    from streamem.io.mrc import read_map, write_map
    from streamem.simulate.particles import truth_volume_paths

    log.info(
        "simulating %d particles (box %d, %.2f Å/px, SNR %.3f)",
        n_particles,
        box_size,
        pixel_size_A,
        snr,
    )
    store = simulate(
        out / "particles.zarr",
        n_particles,
        box_size=box_size,
        pixel_size_A=pixel_size_A,
        snr=snr,
        seed=seed,
        client=client,
    )
    truth, _ = read_map(truth_volume_paths(store.path)[0])
    reference = lowpass(truth, 30.0, pixel_size_A)
    write_map(out / "reference_30A.mrc", reference, pixel_size_A)
    options = RefineOptions(ini_high_A=30.0, max_iterations=max_iterations)

    result = refine3d(
        store, out / "reference_30A.mrc", out / "refine", options, client, progress=True
    )
    _, oracle_fsc, oracle_res = oracle(store, client=client)
    from streamem.em.runfiles import plot_fsc

    plot_fsc(
        out / "refine" / "run_fsc.png",
        {"gold-standard (refined)": result.fsc, "oracle (true poses)": oracle_fsc},
        box_size,
        pixel_size_A,
        result.resolution_A,
    )
    errors = angular_errors_deg(store, result.poses)
    import json

    state = json.loads(sorted((out / "refine").glob("run_it*_optimiser.json"))[-1].read_text())
    from streamem.core.sampling import angular_step_deg

    step = angular_step_deg(state["schedule"]["healpix_order"] + state["schedule"]["oversampling"])
    return {
        "resolution_A": result.resolution_A,
        "oracle_resolution_A": oracle_res,
        "median_angular_error_deg": float(np.median(errors)),
        "final_step_deg": step,
        "iterations": result.iterations,
        "result": result,
    }


#: CLI verb -> the Python function doing it (every verb but :data:`CLI_ONLY`'s).
VERBS = _verbs()
