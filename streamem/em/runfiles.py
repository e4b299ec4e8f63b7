"""RELION-named outputs of a run folder: STAR tables, maps, FSC plot, checkpoints.

``run_itNNN_data.star``, ``run_itNNN_model.star``, ``run_itNNN_half{1,2}_class001_unfil.mrc``
each iteration; ``run_itNNN_optimiser.json`` is written last and marks the iteration
complete (``--continue`` resumes from the newest one). Per-particle results live in
``particles.zarr`` (``itNNN/<label>``), written region by region by the E-step tasks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from streamem.em.class_truth import class_accuracy
from streamem.errors import InputError
from streamem.io.relion import write_star
from streamem.io.store import ParticleStore

RESULT_FIELDS = {
    "rlnAngleRot": np.float64,
    "rlnAngleTilt": np.float64,
    "rlnAnglePsi": np.float64,
    "rlnOriginXAngst": np.float64,
    "rlnOriginYAngst": np.float64,
    "rlnMaxValueProbDistribution": np.float64,
    "rlnNrOfSignificantSamples": np.float64,
    "rlnLogLikeliContribution": np.float64,
    "rlnClassNumber": np.int32,
}


def iteration_prefix(out_dir: Path, iteration: int) -> Path:
    return Path(out_dir) / f"run_it{iteration:03d}"


def create_results_arrays(results_path: Path, iteration: int, n: int, chunk: int) -> None:
    root = zarr.open_group(str(results_path), mode="a")
    grp = root.require_group(f"it{iteration:03d}")
    for label, dtype in RESULT_FIELDS.items():
        if label not in grp:
            grp.create_array(
                label,
                shape=(n,),
                chunks=(chunk,),
                dtype=dtype,
                fill_value=np.nan if np.dtype(dtype).kind == "f" else 0,
            )


def write_results(results_path: str, iteration: int, start: int, columns: dict) -> None:
    """Write one chunk's per-particle results (called inside the E-step task)."""
    grp = zarr.open_group(str(results_path), mode="r+")[f"it{iteration:03d}"]
    for label, values in columns.items():
        grp[label][start : start + len(values)] = np.asarray(values).astype(grp[label].dtype)


def read_results(
    results_path: str, iteration: int, start: int | None = None, stop: int | None = None
) -> dict:
    grp = zarr.open_group(str(results_path), mode="r")[f"it{iteration:03d}"]
    sl = slice(start, stop)
    return {label: np.asarray(arr[sl]) for label, arr in grp.arrays()}


def write_data_star(path: Path, store: ParticleStore, results: dict) -> None:
    """Particles with this iteration's poses, RELION 3.1 (optics + particles)."""
    table = store.read_table()
    table.update(results)
    if "rlnImageName" not in table:
        # a simulated store has no stacks: refer to the store (streamem export writes stacks)
        table["rlnImageName"] = np.array(
            [f"{i + 1:06d}@{store.path.name}" for i in range(store.n_particles)], dtype=object
        )
    particles = pd.DataFrame(table)
    optics = pd.DataFrame(store.optics_groups)
    write_star(path, {"optics": optics, "particles": particles})


def write_model_star(
    path: Path,
    general: dict,
    fsc: np.ndarray,
    box_size: int,
    pixel_size_A: float,
    inv_sigma2: np.ndarray,
) -> None:
    shells = np.arange(len(fsc))
    with np.errstate(divide="ignore"):
        res = np.where(shells > 0, box_size * pixel_size_A / np.maximum(shells, 1), 999.0)
    blocks = {
        "model_general": pd.DataFrame([general]),
        "model_class_1": pd.DataFrame(
            {
                "rlnSpectralIndex": shells,
                "rlnResolution": shells / (box_size * pixel_size_A),
                "rlnAngstromResolution": res,
                "rlnGoldStandardFsc": fsc,
            }
        ),
    }
    for g, inv in enumerate(inv_sigma2):
        with np.errstate(divide="ignore"):
            sigma2 = np.where(inv > 0, 1.0 / np.maximum(inv, 1e-300), 0.0)
        blocks[f"model_optics_group_{g + 1}"] = pd.DataFrame(
            {
                "rlnSpectralIndex": shells,
                "rlnResolution": shells / (box_size * pixel_size_A),
                "rlnSigma2Noise": sigma2[: len(shells)],
            }
        )
    write_star(path, blocks)


def write_checkpoint(path: Path, state: dict) -> None:
    """Atomically write the JSON that marks an iteration complete."""
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def true_classes(store: ParticleStore) -> np.ndarray | None:
    """The store's true classes (truth/rlnClassNumber), or None for real data and for
    a simulation of one volume without junk (nothing to score)."""
    if not store.has_fields(("rlnClassNumber",), group="truth"):
        return None
    classes = np.asarray(store.read_field("rlnClassNumber", group="truth"), np.int64)
    return classes if np.unique(classes).size > 1 else None


def score_against_truth(prefix: Path, true_classes, classes, n_classes: int):
    """A classification's ClassAccuracy, also written to ``{prefix}_truth.star``;
    None when the store has no truth to score against."""
    if true_classes is None:
        return None
    accuracy = class_accuracy(true_classes, classes, n_classes)
    write_star(Path(f"{prefix}_truth.star"), {"truth_classes": accuracy.table()})
    return accuracy


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted(Path(out_dir).glob("run_it[0-9][0-9][0-9]_optimiser.json"))
    return found[-1] if found else None


def latest_state(out_dir) -> dict:
    """The newest complete iteration's checkpoint of a run (refine3d, class3d, class2d)."""
    path = latest_checkpoint(Path(out_dir))
    if path is None:
        raise InputError(out_dir, "no run_itNNN_optimiser.json: nothing to continue or select")
    return json.loads(path.read_text())


def plot_fsc(
    path: Path,
    fsc_curves: dict[str, np.ndarray],
    box_size: int,
    pixel_size_A: float,
    resolution_A: float,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in fsc_curves.items():
        shells = np.arange(len(curve))
        ax.plot(shells / (box_size * pixel_size_A), curve, label=label)
    ax.axhline(0.143, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(f"gold-standard resolution {resolution_A:.2f} Å")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
