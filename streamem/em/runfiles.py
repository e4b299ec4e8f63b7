"""A run folder's names, checkpoints, truth scores and FSC plot.

``run_itNNN_*`` each iteration (maps, ``_data.star`` and ``_model.star``, written by
:mod:`streamem.io.results` and :mod:`streamem.io.model_star`);
``run_itNNN_optimiser.json`` is written last and marks the iteration complete
(``--continue`` resumes from the newest usable one). Per-particle results live in
``particles.zarr`` (:mod:`streamem.io.results`; ``RESULT_FIELDS`` and ``read_results``
are re-exported here for the readers of run folders: select, benches).

At the final iteration refine3d and class3d also write what viewers open
(:func:`write_view_files`): ``run_classNNN_angdist.bild`` per class (RELION's format,
:mod:`streamem.io.bild`), ``run_angdist.png`` (HEALPix heat map), ``run_mask.mrc`` (the
solvent mask used) and ``run_chimerax.cxc`` (:mod:`streamem.io.chimerax`); class3d adds
``run_class_slices.png`` and ``run_class_sizes.png`` (:mod:`streamem.em.plots`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from streamem.em import angdist, plots
from streamem.em.class_truth import class_accuracy
from streamem.errors import InputError
from streamem.io.bild import angdist_bild
from streamem.io.chimerax import ShownMap, chimerax_script, map_level
from streamem.io.mrc import write_map
from streamem.io.relion import write_star
from streamem.io.results import RESULT_FIELDS, read_results  # noqa: F401 (re-exported)
from streamem.io.store import ParticleStore

log = logging.getLogger("streamem")


def iteration_prefix(out_dir: Path, iteration: int) -> Path:
    return Path(out_dir) / f"run_it{iteration:03d}"


def write_checkpoint(path: Path, state: dict) -> None:
    """Atomically and durably write the JSON that marks an iteration complete.

    Written as ``NAME.partial``, flushed and fsynced, renamed over ``NAME``, then the
    folder is fsynced: after a crash or power loss the checkpoint is either the old one
    or the complete new one, and the maps it names (written before it) are on disk.
    """
    write_run_text(path, json.dumps(state, indent=1))


def write_run_text(path: Path, text: str) -> Path:
    """Write a run folder's text file atomically and durably (``NAME.partial``, fsync,
    rename over ``NAME``, fsync the folder); the run folder is the job's own."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (the directory entry, not only the data)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and platforms) cannot fsync a directory
        pass
    finally:
        os.close(fd)


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


CHECKPOINT_GLOB = "run_it[0-9][0-9][0-9]_optimiser.json"
# keys whose values name files of the run folder that a resumed run reads
MAP_KEYS = ("half_maps", "class_maps", "class_stack")


def checkpoints(out_dir: Path) -> list[Path]:
    """Every ``run_itNNN_optimiser.json`` of a run folder, oldest first."""
    return sorted(Path(out_dir).glob(CHECKPOINT_GLOB))


def read_checkpoint(path: Path, required: tuple[str, ...] = ("iteration",)) -> dict:
    """One checkpoint's state, or ValueError saying why it cannot be resumed from.

    Unusable: empty, truncated or invalid JSON, not an object, a ``required`` key
    missing, a map it names (``MAP_KEYS``) missing, or its iteration's per-particle
    results (``particles.zarr/itNNN``) missing.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"unreadable ({type(exc).__name__})") from None
    if not text.strip():
        raise ValueError("empty")
    try:
        state = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON (truncated?): {exc.msg} at line {exc.lineno}") from None
    if not isinstance(state, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in ("iteration", *required) if k not in state]
    if missing:
        raise ValueError(f"no {', '.join(dict.fromkeys(missing))}")
    for key in MAP_KEYS:
        names = state.get(key)
        for name in [names] if isinstance(names, str) else names or []:
            if not (path.parent / name).is_file():
                raise ValueError(f"the map it names, {name}, is missing")
    results = path.parent / "particles.zarr" / f"it{int(state['iteration']):03d}"
    if not results.is_dir():
        raise ValueError(
            f"its per-particle results {results.parent.name}/{results.name} are missing"
        )
    return state


def newest_readable(
    out_dir: Path, required: tuple[str, ...] = ("iteration",), warn: bool = True
) -> tuple[Path, dict] | None:
    """(path, state) of the newest checkpoint that can be resumed from, or None.

    An unusable newer one (a crash while it was written, a disk that filled up) is
    skipped with a warning naming it: the run goes on from the one before, whose
    iteration is then simply run again.
    """
    for path in reversed(checkpoints(out_dir)):
        try:
            return path, read_checkpoint(path, required)
        except ValueError as problem:
            if warn:
                log.warning("%s: %s; using the previous checkpoint", path, problem)
    return None


def latest_checkpoint(out_dir: Path, required: tuple[str, ...] = ("iteration",)) -> Path | None:
    """The newest usable ``run_itNNN_optimiser.json`` (see :func:`newest_readable`)."""
    found = newest_readable(out_dir, required)
    return found[0] if found else None


def latest_state(out_dir, required: tuple[str, ...] = ("iteration",), warn: bool = True) -> dict:
    """The newest complete iteration's checkpoint of a run (refine3d, class3d, class2d).

    The one place where checkpoints are read: unusable newer ones are skipped with a
    warning (:func:`newest_readable`); InputError if none is usable.
    """
    found = newest_readable(Path(out_dir), required, warn)
    if found is not None:
        return found[1]
    names = checkpoints(Path(out_dir))
    if not names:
        raise InputError(out_dir, "no run_itNNN_optimiser.json: nothing to continue or select")
    try:
        read_checkpoint(names[-1], required)
        problem = "it changed while being read"  # another process wrote it meanwhile
    except ValueError as exc:
        problem = str(exc)
    raise InputError(
        out_dir, f"no usable run_itNNN_optimiser.json (the newest, {names[-1].name}: {problem})"
    )


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


def prefix_iteration(prefix: Path) -> int:
    """NNN of a ``run_itNNN`` prefix."""
    return int(Path(prefix).name[len("run_it") :])


def write_view_files(
    ctx, iteration: int, maps: dict[str, np.ndarray], mask: np.ndarray | None, n_classes: int
) -> list[str]:
    """What viewers open, from iteration ``iteration``'s results; returns the names.

    ctx: the job's :class:`streamem.em.engine.RunContext` (out_dir, results_path,
    box_size, pixel_size_A, diameter_A). maps: file name (in the run folder, already
    written) -> (B, B, B) map, shown first then as hidden meshes after the first
    ``n_classes`` (the halves). mask: (B, B, B) in [0, 1], written as ``run_mask.mrc``.
    Per class, the particles of that class (rlnClassNumber; all of them when
    ``n_classes`` is 1) give ``run_classNNN_angdist.bild``; all classes together
    ``run_angdist.png``.
    """
    out, B, p = Path(ctx.out_dir), ctx.box_size, ctx.pixel_size_A
    results = read_results(ctx.results_path, iteration)
    rot, tilt = results["rlnAngleRot"], results["rlnAngleTilt"]
    classes = results["rlnClassNumber"] if n_classes > 1 else np.ones(len(rot), np.int64)
    counts = angdist.class_direction_counts(rot, tilt, classes, n_classes)
    bilds = [f"run_class{k + 1:03d}_angdist.bild" for k in range(n_classes)]
    for name, c in zip(bilds, counts, strict=True):
        write_run_text(out / name, angdist_bild(c, B, p))
    titles = [f"class {k + 1}" for k in range(n_classes)] if n_classes > 1 else None
    plots.plot_angdist(out / "run_angdist.png", counts, titles)
    shown = [
        ShownMap(name, map_level(v, ctx.diameter_A, p), "surface" if i < n_classes else "mesh",
                 shown=i < n_classes)
        for i, (name, v) in enumerate(maps.items())
    ]  # fmt: skip
    written = [*bilds, "run_angdist.png", "run_chimerax.cxc"]
    if mask is not None:
        write_map(out / "run_mask.mrc", mask, p)
        shown.append(ShownMap("run_mask.mrc", 0.5, "mesh", shown=False))
        written.append("run_mask.mrc")
    write_run_text(out / "run_chimerax.cxc", chimerax_script(shown, bilds))
    return written


def write_class_pictures(out_dir: Path, state: dict, pixel_size_A: float) -> list[str]:
    """class3d's ``run_class_slices.png`` (each class's central slices) and
    ``run_class_sizes.png`` (fractions over iterations, this one included: the engine
    appends it to ``state["history"]`` after the outputs)."""
    out = Path(out_dir)
    plots.plot_class_slices(
        out / "run_class_slices.png", state["maps"], state["fractions"], state["resolutions"],
        pixel_size_A,
    )  # fmt: skip
    history = [*state.get("history", []), np.asarray(state["fractions"]).tolist()]
    plots.plot_class_sizes(out / "run_class_sizes.png", history)
    return ["run_class_slices.png", "run_class_sizes.png"]


def write_stacks_for_relion(ctx) -> None:
    """``--write-stacks``: a store without stacks as MRCS stacks in ``RUN/Particles``,
    before iteration 1, so every STAR file of the run names images RELION opens
    (:mod:`streamem.io.run_images`); a store with its own stacks keeps naming those."""
    from streamem.io.run_images import write_run_stacks

    if ctx.store.has_fields(("rlnImageName",)):
        log.info("--write-stacks: the store names its own stacks (rlnImageName); none written")
        return
    folder = write_run_stacks(ctx.store, ctx.out_dir, ctx.client)
    log.info("--write-stacks: %d images in %s", ctx.store.n_particles, folder)


def relabel_classes(results_path, iteration: int, store, half: int, pairing) -> None:
    """Rename the classes of half ``half``'s particles (rlnRandomSubset − 1) in iteration
    ``iteration``'s results: class ``pairing[k] + 1`` becomes ``k + 1``
    (:func:`streamem.em.classify3d.half_class_pairing`)."""
    from streamem.em.estep import particle_halves
    from streamem.io.results import read_results, write_results

    classes = read_results(results_path, iteration)["rlnClassNumber"].astype(np.int64)
    rename = np.empty(len(pairing), np.int64)
    rename[np.asarray(pairing)] = np.arange(len(pairing)) + 1
    ours = particle_halves(store) == half
    classes[ours] = rename[classes[ours] - 1]
    write_results(results_path, iteration, 0, {"rlnClassNumber": classes})
