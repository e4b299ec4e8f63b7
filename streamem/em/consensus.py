"""The start of consensus-then-classify: what class3d takes from a refine3d run folder.

RELION's standard path to states that a consensus map averages away: refine3d of the
whole set, then class3d with local searches (``--sigma_ang``) or ``--skip_align``
from the consensus map, its poses and its noise model. :func:`read_consensus` reads
a finished refine3d run (``class3d --from-refine DIR``) so the user stitches no files:

- the final map ``run_class001.mrc`` (halves joined; on the data's greyscale, so the
  first class3d iteration needs no scale fit),
- the noise spectra (1/σ², rlnSigma2Noise) and offset prior σ of its last checkpoint,
- the per-particle poses and origins of its last iteration (``particles.zarr``),
  which :func:`copy_poses` puts into the class3d run as iteration 0: the first class3d
  iteration's local searches centre on them and ``skip_align`` keeps them.

The refine3d run must be of the same store (:func:`streamem.em.runfolder.store_difference`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamem.em import runfiles, runfolder
from streamem.errors import InputError
from streamem.io.mrc import read_map
from streamem.io.results import create_results_arrays, read_results, write_results
from streamem.io.store import ParticleStore

POSE_FIELDS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


@dataclass(frozen=True)
class ConsensusStart:
    """A finished refine3d run, as class3d's start.

    map: (B, B, B) float32 final map; inv_sigma2: (G, B//2+1) 1/σ² of its noise model;
    sigma_offset_A: offset prior σ (Å); resolution_A: its gold-standard resolution;
    results_path, iteration: where its last per-particle poses are.
    """

    map: np.ndarray
    inv_sigma2: np.ndarray
    sigma_offset_A: float
    resolution_A: float
    results_path: Path
    iteration: int


def read_consensus(refine_dir: str | Path, store: ParticleStore) -> ConsensusStart:
    """The start that refine3d run folder ``refine_dir`` gives class3d on ``store``.

    InputError (one line naming the folder) when it is not a finished refine3d run of
    this store: no checkpoint, another job's folder, not joined yet (no
    ``run_class001.mrc``), a map of another box, or another store's run.
    """
    refine_dir = Path(refine_dir)
    if not refine_dir.is_dir():
        raise InputError(refine_dir, "--from-refine: not a folder")
    state = runfiles.latest_state(refine_dir, ("inv_sigma2", "sigma_offset_A", "resolution_A"))
    record = state.get("run") or {}
    if record.get("job", "refine3d") != "refine3d":
        raise InputError(refine_dir, f"--from-refine: a {record['job']} run, not refine3d")
    recorded_store = record.get("store")
    if recorded_store is not None:
        problem = runfolder.store_difference(recorded_store, runfolder.store_identity(store))
        if problem is not None:
            raise InputError(
                refine_dir, f"--from-refine: the refinement used another store ({problem})"
            )
    final = refine_dir / "run_class001.mrc"
    if not final.is_file():
        raise InputError(
            refine_dir, "--from-refine: no run_class001.mrc (the refinement has not finished)"
        )
    consensus, _ = read_map(final)
    if consensus.shape != (store.box_size,) * 3:
        raise InputError(final, f"map is {consensus.shape}, particles need ({store.box_size},)*3")
    inv_sigma2 = np.asarray(state["inv_sigma2"], np.float64)
    if inv_sigma2.shape != (len(store.optics_groups), store.box_size // 2 + 1):
        raise InputError(refine_dir, f"--from-refine: noise model of shape {inv_sigma2.shape}")
    return ConsensusStart(
        map=consensus.astype(np.float32),
        inv_sigma2=inv_sigma2,
        sigma_offset_A=float(state["sigma_offset_A"]),
        resolution_A=float(state["resolution_A"]),
        results_path=refine_dir / "particles.zarr",
        iteration=int(state["iteration"]),
    )


def copy_poses(start: ConsensusStart, results_path: Path, n_particles: int, chunk: int) -> None:
    """The consensus's last poses as iteration 0 of ``results_path`` (class3d's results).

    Written chunk by chunk (``chunk`` particles), so no more than a chunk's columns
    are in memory whatever N.
    """
    create_results_arrays(results_path, 0, n_particles, chunk)
    for lo in range(0, n_particles, chunk):
        hi = min(n_particles, lo + chunk)
        poses = read_results(start.results_path, start.iteration, lo, hi)
        missing = [k for k in POSE_FIELDS if k not in poses]
        if missing:
            raise InputError(start.results_path, f"--from-refine: no {', '.join(missing)}")
        write_results(str(results_path), 0, lo, {k: poses[k] for k in POSE_FIELDS})
