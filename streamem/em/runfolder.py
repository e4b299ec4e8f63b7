"""Run folders are owned and identified: one job at a time, resumed only with its own data.

:func:`claim` is how refine3d, class3d and class2d take their ``--out`` folder:

- **Owned.** The job holds ``--out/.streamem.lock`` (:mod:`streamem.io.runlock`) from
  start to end; a second job on the folder is refused with one line naming the
  running job's pid and touches nothing.
- **Identified.** Every checkpoint records ``"run": {"job", "store", "options"}``: the
  store's identity (:func:`store_identity`: resolved path, N, box, pixel size, chunk
  size and a SHA-256 of the metadata that shapes the result) and the job's options
  (``dataclasses.asdict``). ``--continue`` refuses another job's folder, a different
  store, or a changed option, naming the option (``--continue with --ini-high 20.0,
  but the run was started with 30.0``), except:

  * ``SAFE_TO_CHANGE``: ``max_iterations``/``iterations`` (run further, or stop
    sooner) and ``split_every`` (the shape of the reduction tree, not its sum), and
    the cluster options, which are not job options at all;
  * ``START_ONLY``: options that only shape the first iteration (seeds, the starting
    perturbation), which a continued run never reads; changing them is allowed with a
    warning that they are ignored.

  A store at another path with the same identity otherwise (copied to a faster disk)
  is accepted with a warning. Checkpoints written before identities were recorded are
  continued with a warning that nothing could be checked.
- **Restartable.** A folder that holds only files streamem writes for a run
  (:func:`is_run_file`) and no checkpoint yet (the job died in its first iteration) is
  cleared by a fresh start without ``--continue``; anything else in the folder (a file
  the user put there, or a complete iteration) is refused as before. ``--continue`` in
  that state says to restart without it.

Every refusal happens before anything in the folder changes (a lock file this call
created is removed again).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamem.em import runfiles
from streamem.errors import InputError
from streamem.io import atomic, runlock
from streamem.io.store import ParticleStore
from streamem.io.store_url import is_url

log = logging.getLogger("streamem")

#: Options that may change between a run and its ``--continue`` (also in --continue's help).
SAFE_TO_CHANGE = frozenset({"max_iterations", "iterations", "split_every"})
#: Per job: options read only before or in the first iteration; ignored when continuing.
START_ONLY = {
    "refine3d": frozenset({"reference_on_data_scale"}),
    "class3d": frozenset({"seed", "random_seeds", "perturbation", "reference_on_data_scale"}),
    "class2d": frozenset({"seed"}),
}

#: Options dataclass field -> its CLI option (the same in every job that has it).
OPTION_NAMES = {
    "particle_diameter_A": "--particle-diameter",
    "ini_high_A": "--ini-high",
    "symmetry": "--sym",
    "tau2_fudge": "--tau2-fudge",
    "healpix_order": "--healpix-order",
    "offset_range_px": "--offset-range",
    "offset_step_px": "--offset-step",
    "local_from_order": "--auto-local-healpix-order",
    "max_iterations": "--iterations",
    "iterations": "--iterations",
    "n_classes": "--k",
    "local_sigma_deg": "--local",
    "strict_highres_A": "--strict-highres",
    "lowres_iterations": "--lowres-iterations",
    "perturbation": "--perturbation",
    "seed": "--seed",
    "psi_step_deg": "--psi-step",
}
#: Boolean fields set by a CLI flag: field -> (flag, the field's value when the flag is given).
FLAG_NAMES = {
    "do_ctf": ("--no-ctf", False),
    "local_prepass": ("--no-local-prepass", False),
    "skip_align": ("--skip-align", True),
    "random_seeds": ("--no-random-seeds", False),
    "cross_half": ("--no-cross-half", False),
    "ctf_intact_first_peak": ("--ctf-intact-first-peak", True),
    "center_classes": ("--center-classes", True),
}

#: Metadata columns hashed into a store's identity (those present): what the E-step reads.
IDENTITY_FIELDS = (
    "rlnOpticsGroup",
    "rlnRandomSubset",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnPhaseShift",
    "rlnCtfBfactor",
    "rlnCtfScalefactor",
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
)

# Names streamem writes into a run folder (refine3d, class3d, class2d), and the
# temporaries of its atomic writes (``.NAME.partial-PID-TOKEN``, ``NAME.partial``).
_RUN_NAME = (
    r"run_it\d{3}_[A-Za-z0-9_]+\.(?:mrc|mrcs|star|json|png)"
    r"|run_(?:class\d{3}|half[12]_class\d{3}_unfil)\.mrc"
    r"|run_(?:data|model)\.star|run_fsc\.png|run_classes\.(?:png|mrcs)"
    r"|run_class\d{3}_angdist\.bild|run_(?:angdist|class_slices|class_sizes)\.png"
    r"|run_chimerax\.cxc|run_mask\.mrc|run_[A-Za-z0-9_]+\.(?:bild|cxc)\.partial"
    r"|Particles"
    r"|particles\.zarr"
)
_RUN_FILE = re.compile(
    rf"^(?:{_RUN_NAME}|run_it\d{{3}}_optimiser\.json\.partial"
    rf"|\.(?:{_RUN_NAME})\.(?:partial|old)-\d+(?:-[0-9a-f]+)?"
    rf"|{re.escape(runlock.LOCK_NAME)}|{re.escape(atomic.MARKER_FILE)})$"
)


def is_run_file(name: str) -> bool:
    """Whether streamem writes a file of this name into a run folder (never a user's)."""
    return _RUN_FILE.match(name) is not None


def store_identity(store: ParticleStore) -> dict:
    """What makes a store the same data: path, N, box, pixel size (Å), chunk size, and a
    SHA-256 over the optics groups and the ``IDENTITY_FIELDS`` columns (N values each,
    so cheap next to one iteration)."""
    digest = hashlib.sha256(json.dumps(store.optics_groups, sort_keys=True).encode())
    present = set(store.fields())
    for label in IDENTITY_FIELDS:
        if label in present:
            values = np.ascontiguousarray(store.read_field(label))
            digest.update(f"{label}:{values.dtype.str}:".encode())
            digest.update(values.tobytes())
    return {
        # a URL (io.store_url.StoreURL) is its own identity; Path() would fold s3:// into
        # a local path under the working folder
        "path": str(store.path) if is_url(store.path) else str(Path(store.path).resolve()),
        "n_particles": store.n_particles,
        "box_size": store.box_size,
        "pixel_size_A": store.pixel_size_A,
        "chunk_size": store.chunk_size,
        "metadata_sha256": digest.hexdigest(),
    }


def options_record(options) -> dict:
    """The options dataclass as JSON values (what a checkpoint records)."""
    return json.loads(json.dumps(dataclasses.asdict(options)))


def store_difference(recorded: dict, current: dict) -> str | None:
    """How ``current`` is not the recorded store (path aside), or None if it is."""
    for key, what in (
        ("n_particles", "particles"),
        ("box_size", "box"),
        ("pixel_size_A", "Å pixel size"),
        ("chunk_size", "chunk size"),
    ):
        if key in recorded and recorded[key] != current[key]:
            return f"{current[key]} {what}, the run's store had {recorded[key]}"
    if recorded.get("metadata_sha256", current["metadata_sha256"]) != current["metadata_sha256"]:
        return "its metadata (optics groups, random subsets, CTF or poses) differs from the run's store"
    return None


def describe_change(field: str, old, new) -> str:
    """One line for a changed option, by its CLI name: ``--continue with --ini-high 20.0,
    but the run was started with 30.0``."""
    if field in FLAG_NAMES:
        flag, value_when_given = FLAG_NAMES[field]
        now, then = (new == value_when_given), (old == value_when_given)
        if now != then:
            return (
                f"--continue {'with' if now else 'without'} {flag}, but the run was started "
                f"{'with' if then else 'without'} it"
            )
    name = OPTION_NAMES.get(field, field)
    return f"--continue with {name} {_show(new)}, but the run was started with {_show(old)}"


def _show(value) -> str:
    return "(default)" if value is None else str(value)


def check_continuable(
    out_dir: Path, job: str, state: dict, store: ParticleStore, record: dict, warn: bool = True
) -> None:
    """Refuse (InputError) to continue ``state`` with another job, store or options.

    warn: log what is allowed but worth knowing (a moved store, ignored options)."""
    say = log.warning if warn else log.debug
    run = state.get("run")
    if not isinstance(run, dict):
        say("%s: the checkpoint records no store or options; not checked", out_dir)
        return
    if run.get("job", job) != job:
        raise InputError(out_dir, f"the run in this folder is a {run['job']} run, not {job}")
    old_store, new_store = run.get("store") or {}, record["store"]
    difference = store_difference(old_store, new_store)
    if difference is not None:
        raise InputError(
            store.path,
            f"--continue with a different particle store: {difference} "
            f"(the run in {out_dir} was started with {old_store.get('path')})",
        )
    if old_store.get("path", new_store["path"]) != new_store["path"]:
        say(
            "%s: the run was started with %s; the same data at a new path, continuing",
            store.path,
            old_store["path"],
        )
    old_options, new_options = run.get("options") or {}, record["options"]
    start_only = START_ONLY.get(job, frozenset())
    for field, new in new_options.items():
        if field not in old_options or old_options[field] == new or field in SAFE_TO_CHANGE:
            continue  # (a field the run predates cannot be compared)
        if field in start_only:
            say(
                "%s %s only shapes the first iteration: ignored when continuing",
                OPTION_NAMES.get(field, FLAG_NAMES.get(field, (field,))[0]),
                _show(new),
            )
            continue
        raise InputError(out_dir, describe_change(field, old_options[field], new))


def check_fresh(out_dir: Path) -> list[Path]:
    """Refuse a fresh start in a folder with a user's file or a complete iteration; else
    return the files of an unfinished run there (to clear). Reads only."""
    if not out_dir.exists():
        return []
    if not out_dir.is_dir():
        raise InputError(out_dir, "exists and is not a folder")
    entries = sorted(out_dir.iterdir())
    # only a folder streamem created for a run (its marker) may be cleared: a user's
    # files that merely look like run files (a RELION run_data.star) are never removed
    run_files = [e for e in entries if e.name not in (runlock.LOCK_NAME, atomic.MARKER_FILE)]
    if (
        any(not is_run_file(e.name) for e in entries)
        or runfiles.checkpoints(out_dir)
        or (run_files and not atomic.written_by_streamem(out_dir))
    ):
        raise InputError(out_dir, "output folder is not empty (use --continue to resume a run)")
    return run_files


def resumable_state(out_dir: Path, required: tuple[str, ...], warn: bool = True) -> dict:
    """The checkpoint to continue from, or the one-line reason there is none. Reads only.

    warn: log each unusable newer checkpoint that is skipped."""
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        raise InputError(out_dir, "nothing to continue: no run_itNNN_optimiser.json")
    if not runfiles.checkpoints(out_dir):
        if all(is_run_file(e.name) for e in out_dir.iterdir()):
            raise InputError(
                out_dir, "no complete iteration yet; run again without --continue to restart"
            )
        raise InputError(out_dir, "nothing to continue: no run_itNNN_optimiser.json")
    return runfiles.latest_state(out_dir, required, warn)


def _clear(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Run:
    """A claimed run folder: ``state`` to resume from (None: a fresh start) and the
    ``record`` every checkpoint of this job stores under ``"run"``."""

    out_dir: Path
    state: dict | None
    record: dict


@contextmanager
def claim(
    out_dir: str | Path,
    job: str,
    store: ParticleStore,
    options,
    continue_run: bool,
    required: tuple[str, ...] = ("iteration",),
) -> Iterator[Run]:
    """Hold ``out_dir`` for one job (``job``: refine3d, class3d or class2d) while the
    ``with`` block runs.

    continue_run: resume from the newest usable checkpoint (holding ``required`` keys),
    refused unless it is this job's, on this store, with these options (up to
    ``SAFE_TO_CHANGE``/``START_ONLY``). Else a fresh start: the folder is created, or
    must be empty but for an unfinished run's files, which are removed.
    """
    out_dir = Path(out_dir)
    record = {"job": job, "store": store_identity(store), "options": options_record(options)}
    # every check first, reading only, so a refusal leaves the folder as it was
    runlock.check_free(out_dir)
    if continue_run:
        state = resumable_state(out_dir, required, warn=False)  # warned under the lock
        check_continuable(out_dir, job, state, store, record, warn=False)
    else:
        check_fresh(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    created = not runlock.lock_path(out_dir).exists()
    lock = runlock.acquire(out_dir)
    try:  # again under the lock: another job may have changed the folder meanwhile
        if continue_run:
            state = resumable_state(out_dir, required)
            check_continuable(out_dir, job, state, store, record)
        else:
            state, unfinished = None, check_fresh(out_dir)
            if unfinished:
                log.warning(
                    "%s: removing %d files of a run that completed no iteration: %s",
                    out_dir,
                    len(unfinished),
                    " ".join(p.name for p in unfinished),
                )
                _clear(unfinished)
            (out_dir / atomic.MARKER_FILE).write_text(atomic.marker_text(job))
    except BaseException:
        lock.release(remove=created)
        raise
    try:
        yield Run(out_dir, state, record)
    finally:
        lock.release()
