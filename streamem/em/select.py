"""Subsets of a particle store by class (RELION's Subset selection), streamed chunk by chunk.

The run's newest complete iteration (``run_itNNN_optimiser.json``) gives each
particle's class (``particles.zarr``) and each class's fraction and resolution
(``run_itNNN_model.star``). The chosen particles are copied, with their images, metadata,
ground truth (if any) and the run's per-particle results (poses, rlnClassNumber), into
a new store, one input chunk at a time; the output appears only once complete.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamem.em import runfiles
from streamem.errors import InputError
from streamem.io.atomic import atomic_output
from streamem.io.store import ParticleStore, create_store


def run_classes(run_dir: str | Path) -> tuple[int, np.ndarray, dict]:
    """(iteration, rlnClassNumber (N,), model_classes table as dict) of a run's newest iteration."""
    import starfile

    run_dir = Path(run_dir)
    checkpoint = runfiles.latest_checkpoint(run_dir)
    if checkpoint is None:
        raise InputError(run_dir, "no run_itNNN_optimiser.json: not a classification run folder")
    iteration = int(checkpoint.name[6:9])
    results = runfiles.read_results(run_dir / "particles.zarr", iteration)
    model = starfile.read(run_dir / f"run_it{iteration:03d}_model.star", always_dict=True)
    if "model_classes" not in model:
        raise InputError(run_dir, "the run's model STAR has no model_classes table")
    return (
        iteration,
        np.asarray(results["rlnClassNumber"], np.int64),
        model["model_classes"].to_dict("list"),
    )


def chosen_classes(
    classes: list[int] | None,
    class_numbers: np.ndarray,
    model_classes: dict,
    min_size: int | None = None,
    max_resolution_A: float | None = None,
) -> list[int]:
    """Classes (from 1) that are listed (all if None), hold ≥ min_size particles and
    reach max_resolution_A or better."""
    K = len(model_classes["rlnClassDistribution"])
    wanted = list(range(1, K + 1)) if not classes else list(classes)
    for c in wanted:
        if not 1 <= c <= K:
            raise InputError(None, f"class {c} does not exist (the run has {K} classes)")
    sizes = np.bincount(class_numbers, minlength=K + 1)
    res = np.asarray(model_classes.get("rlnEstimatedResolution", [0.0] * K), np.float64)
    return [
        c
        for c in wanted
        if (min_size is None or sizes[c] >= min_size)
        and (max_resolution_A is None or res[c - 1] <= max_resolution_A)
    ]


def select_particles(
    store: str | Path | ParticleStore,
    run_dir: str | Path,
    out_path: str | Path,
    classes: list[int] | None = None,
    min_size: int | None = None,
    max_resolution_A: float | None = None,
    overwrite: bool = False,
) -> ParticleStore:
    """Copy the particles of the chosen classes into a new store; returns it."""
    store = store if isinstance(store, ParticleStore) else ParticleStore(store)
    iteration, numbers, model = run_classes(run_dir)
    if numbers.shape[0] != store.n_particles:
        raise InputError(
            run_dir, f"run has {numbers.shape[0]} particles, store {store.n_particles}"
        )
    keep_classes = chosen_classes(classes, numbers, model, min_size, max_resolution_A)
    keep = np.isin(numbers, keep_classes)
    if not keep.any():
        raise InputError(run_dir, "no particle passes the selection")
    results_path = Path(run_dir) / "particles.zarr"
    root = store._root()
    meta_fields = {k: a.dtype for k, a in root["metadata"].arrays()}
    result_fields = dict(runfiles.RESULT_FIELDS)
    meta_fields.update(result_fields)
    truth_fields = {k: a.dtype for k, a in root["truth"].arrays()} if "truth" in root else {}
    n_out = int(keep.sum())
    # the run's files that were read (the new store may go inside the run folder)
    model_star = Path(run_dir) / f"run_it{iteration:03d}_model.star"
    inputs = [store.path, results_path, model_star, runfiles.latest_checkpoint(Path(run_dir))]
    with atomic_output(Path(out_path), overwrite, inputs, "select") as tmp:
        out = create_store(
            tmp,
            n_particles=n_out,
            box_size=store.box_size,
            pixel_size_A=store.pixel_size_A,
            optics_groups=store.optics_groups,
            fields={
                k: v
                for k, v in meta_fields.items()
                if k not in ("rlnOpticsGroup", "rlnRandomSubset")
            },
            chunk_size=store.chunk_size,
            shard_size=None,  # written in selected runs that do not align with shards
            truth_fields=truth_fields,
            provenance={
                "command": "select",
                "source": str(store.path),
                "run": str(run_dir),
                "iteration": iteration,
                "classes": keep_classes,
            },
        )
        offset = 0
        for start, stop in store.chunk_bounds():
            sel = np.flatnonzero(keep[start:stop])
            if sel.size == 0:
                continue
            chunk = store.read_chunk(start, stop, with_truth=bool(truth_fields))
            meta = {k: v[sel] for k, v in chunk.metadata.items()}
            meta.update(
                {
                    k: v[sel]
                    for k, v in runfiles.read_results(results_path, iteration, start, stop).items()
                }
            )
            out.write_region(
                offset,
                images=chunk.images[sel],
                metadata=meta,
                truth={k: v[sel] for k, v in chunk.truth.items()} or None,
            )
            offset += sel.size
    return ParticleStore(out_path)
