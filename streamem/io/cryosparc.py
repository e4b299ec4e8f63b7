"""The cryoSPARC adapter: particle ``.cs`` files (and ``.csg`` groups) in and out.

A ``.cs`` file is a NumPy structured array, one row per particle, read and written
with cryosparc-tools' :class:`cryosparc.dataset.Dataset` (BSD). Rows become the same
RELION-labelled table a STAR file gives (:mod:`streamem.io.relion`), so a store
imported from cryoSPARC is like any other.

Conventions (each pinned by ``tests/test_cryosparc.py``):

- **Poses.** ``alignments3D/pose`` is an axis-angle vector r (radians, float32 ``(3,)``).
  With R(r) its rotation matrix (Rodrigues; ``scipy.spatial.transform.Rotation
  .from_rotvec(r).as_matrix()``), RELION's matrix of ``Euler_angles2matrix(rot, tilt,
  psi)`` (:func:`streamem.core.euler.euler_to_matrix`) is the transpose::

      A = R(r)ᵀ,        r = rotvec(Aᵀ) = −rotvec(A)

  as in pyem's ``csparc2star`` (``geom.rot2euler(geom.expmap(pose))``, where ``expmap``
  returns Rodrigues' matrix transposed and ``rot2euler`` is RELION's decomposition).
- **Shifts.** ``alignments3D/shift`` (x, y) is in pixels of the particle image, with
  RELION's sign: ``rlnOriginXAngst = shift_x · blob/psize_A`` (pyem copies the shift
  into ``rlnOriginX/Y`` unchanged).
- **CTF.** ``ctf/df1_A``, ``ctf/df2_A`` = ``rlnDefocusU``, ``rlnDefocusV`` (Å);
  ``ctf/df_angle_rad`` = ``rlnDefocusAngle`` in radians; ``ctf/phase_shift_rad`` =
  ``rlnPhaseShift`` in radians; ``ctf/accel_kv``, ``ctf/cs_mm``, ``ctf/amp_contrast``
  = ``rlnVoltage``, ``rlnSphericalAberration``, ``rlnAmplitudeContrast``;
  ``ctf/bfactor`` = ``rlnCtfBfactor``. cryoSPARC keeps optics on every row: optics
  groups are made per distinct (voltage, Cs, Q0, pixel size), numbered
  ``ctf/exp_group_id + 1`` where that numbering is consistent.
- **Half sets and classes.** ``alignments3D/split`` 0/1 = ``rlnRandomSubset`` 1/2 (a
  split with one value only is dropped, as pyem does, and halves are assigned anew);
  ``alignments3D/class`` counts from 0, ``rlnClassNumber`` from 1.
- **Images.** ``blob/idx`` counts from 0 (``rlnImageName`` from 1). ``blob/path`` is
  relative to the cryoSPARC project folder; it is looked up next to the ``.cs`` file,
  then in each folder above it (the job folder's project, an export's project), then
  in the current folder. A leading ``>`` (cryoSPARC's mark for "relative to the file
  that names it", used by ``.csg`` metafiles) is dropped. ``blob/sign`` −1 marks dark
  protein (cryoSPARC's own extractions); such images are multiplied by −1 on import,
  with one warning, so protein is white as RELION and streamem expect; exports write
  ``blob/sign`` 1.
- **Precision.** cryoSPARC stores float32. Fields copied as they are (defoci, optics,
  pixel size) are read back as the shortest decimal of the float32, so a value written
  from a STAR file with up to 7 significant digits comes back exactly; converted fields
  (poses, shifts, angles in radians) keep float32 precision (poses ~1e-5°).
- ``.csg`` group files (YAML) name one metafile per result prefix
  (``results: {blob: {metafile: '>J3_particles.cs'}, ...}``); the prefixes are loaded
  from their files and joined on ``uid`` (:meth:`Dataset.innerjoin_many`).

Not converted: particle coordinates (``location/*``, fractions of a micrograph whose
axes cryoSPARC swaps and flips), per-class alignments of 3D classification
(``alignments_class_N``), uids (an export draws new ones).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from streamem.core.euler import euler_to_matrix, matrix_to_euler
from streamem.errors import InputError
from streamem.io.atomic import atomic_output, check_output
from streamem.io.relion_export import relative_to, stack_layout, write_stacks
from streamem.io.relion_optics import apply_optics_rules
from streamem.io.store import ParticleStore

log = logging.getLogger(__name__)

CRYOSPARC_SUFFIXES = (".cs", ".csg")


# -- conversions (pure) ------------------------------------------------------------------


def pose_to_euler(pose_rad) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cryoSPARC axis-angle poses ``(N, 3)`` radians -> RELION (rot, tilt, psi) ``(N,)`` °."""
    r = np.asarray(pose_rad, dtype=np.float64).reshape(-1, 3)
    A = np.swapaxes(Rotation.from_rotvec(r).as_matrix(), -1, -2)  # (N, 3, 3): A = R(r)ᵀ
    return matrix_to_euler(A)


def euler_to_pose(rot_deg, tilt_deg, psi_deg) -> np.ndarray:
    """RELION angles ``(N,)`` degrees -> cryoSPARC axis-angle poses ``(N, 3)`` float64 rad."""
    A = euler_to_matrix(rot_deg, tilt_deg, psi_deg).reshape(-1, 3, 3)
    return Rotation.from_matrix(np.swapaxes(A, -1, -2)).as_rotvec()  # r = rotvec(Aᵀ)


def from_float32(values) -> np.ndarray:
    """float32 values as float64 of their shortest decimal (``12345.67``, not ``...6699``)."""
    v = np.asarray(values, dtype=np.float32).ravel()
    return np.array([float(str(x)) for x in v], dtype=np.float64)


# -- reading -----------------------------------------------------------------------------


def load_dataset(path: str | Path):
    """A ``.cs`` file, or the ``.csg`` group's metafiles joined on uid, as a Dataset."""
    from cryosparc.dataset import Dataset

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "cryoSPARC file not found")
    if path.suffix.lower() != ".csg":
        return _load_cs(path)
    import yaml

    try:
        meta = yaml.safe_load(path.read_text())
        results = dict(meta["results"])
    except Exception as exc:  # yaml raises many types; a dict without results is KeyError
        raise InputError(path, f"not a cryoSPARC .csg group file ({type(exc).__name__})") from None
    by_file: dict[Path, list[str]] = {}
    for prefix, result in results.items():
        metafile = str(dict(result).get("metafile", ""))
        if not metafile:
            raise InputError(path, f"result {prefix!r} names no metafile")
        by_file.setdefault(_resolve(metafile, path), []).append(str(prefix))
    parts = [_load_cs(f, prefixes) for f, prefixes in by_file.items()]
    return Dataset.innerjoin_many(*parts)


def _load_cs(path: Path, prefixes: list[str] | None = None):
    from cryosparc.dataset import Dataset

    if not path.is_file():
        raise InputError(path, "cryoSPARC metafile not found")
    try:
        return Dataset.load(path, prefixes=prefixes)
    except Exception as exc:  # DatasetLoadError, or numpy's for a damaged file
        raise InputError(
            path, f"not a readable cryoSPARC .cs file ({type(exc).__name__})"
        ) from None


def _resolve(name: str, named_in: Path) -> Path:
    """A cryoSPARC path: next to ``named_in``, then each folder above, then the cwd."""
    p = Path(name[1:] if name.startswith(">") else name)
    if p.is_absolute():
        return p
    base = named_in.absolute().parent
    for folder in (base, *base.parents, Path.cwd()):
        if (folder / p).exists():
            return folder / p
    return base / p


def read_cryosparc(path: str | Path, require_ctf: bool = False):
    """Read a cryoSPARC particle file as a RELION-labelled table (module docstring).

    Returns ``(particles, optics, located, signs)``: particles as
    :func:`streamem.io.relion.read_particles_star` gives them (``rlnImageName`` is
    ``NNNNNN@blob/path`` as written), optics rows, ``located`` (N,) image names with
    resolved absolute stack paths for planning the import, and ``signs`` (N,) float32
    (``blob/sign``, 1 where absent).
    """
    path = Path(path)
    ds = load_dataset(path)
    fields = set(ds.fields())
    n = len(ds)
    if n == 0:
        raise InputError(path, "no particles")
    for need in ("blob/path", "blob/idx"):
        if need not in fields:
            raise InputError(path, f"no {need} field: not a particle file with images")
    paths = np.asarray(ds["blob/path"], dtype=object)
    index = np.asarray(ds["blob/idx"], dtype=np.int64) + 1  # RELION counts from 1
    cols: dict[str, object] = {
        "rlnImageName": [f"{i:06d}@{p}" for i, p in zip(index, paths, strict=True)]
    }
    resolved = {p: str(_resolve(str(p), path)) for p in pd.unique(paths)}
    located = np.array(
        [f"{i:06d}@{resolved[p]}" for i, p in zip(index, paths, strict=True)], dtype=object
    )
    if "location/micrograph_path" in fields:
        cols["rlnMicrographName"] = [
            str(m).lstrip(">") for m in np.asarray(ds["location/micrograph_path"])
        ]
    psize = from_float32(ds["blob/psize_A"]) if "blob/psize_A" in fields else np.full(n, np.nan)
    _ctf_columns(ds, fields, cols)
    _alignment_columns(ds, fields, cols, psize, path)
    particles = pd.DataFrame(cols)
    particles, optics = _optics_groups(ds, fields, particles, psize)
    has_defocus = "rlnDefocusU" in particles.columns
    if not has_defocus:
        if require_ctf:
            raise InputError(path, "no CTF fields (ctf/df1_A, ctf/df2_A, ctf/df_angle_rad)")
        log.warning("%s: no CTF fields; particles will be processed without CTF correction", path)
    optics = apply_optics_rules(optics, path, has_defocus)
    _warn_cs_aberrations(ds, fields, path)
    signs = (
        np.asarray(ds["blob/sign"], dtype=np.float32)
        if "blob/sign" in fields
        else np.ones(n, np.float32)
    )
    if (signs < 0).any():
        log.warning(
            "%s: %d particles have blob/sign -1 (dark protein); their images are multiplied "
            "by -1 so protein is white, as RELION expects",
            path,
            int((signs < 0).sum()),
        )
    return particles, optics, located, np.where(signs < 0, -1.0, 1.0).astype(np.float32)


def _ctf_columns(ds, fields: set[str], cols: dict) -> None:
    if {"ctf/df1_A", "ctf/df2_A"} <= fields:
        cols["rlnDefocusU"] = from_float32(ds["ctf/df1_A"])
        cols["rlnDefocusV"] = from_float32(ds["ctf/df2_A"])
        angle = ds["ctf/df_angle_rad"] if "ctf/df_angle_rad" in fields else np.zeros(len(ds))
        cols["rlnDefocusAngle"] = np.rad2deg(np.asarray(angle, dtype=np.float64))
        if "ctf/phase_shift_rad" in fields:
            cols["rlnPhaseShift"] = np.rad2deg(np.asarray(ds["ctf/phase_shift_rad"], float))
        if "ctf/bfactor" in fields:
            cols["rlnCtfBfactor"] = from_float32(ds["ctf/bfactor"])


def _alignment_columns(ds, fields: set[str], cols: dict, psize: np.ndarray, path: Path) -> None:
    if "alignments3D/pose" in fields:
        rot, tilt, psi = pose_to_euler(ds["alignments3D/pose"])
        cols.update(rlnAngleRot=rot, rlnAngleTilt=tilt, rlnAnglePsi=psi)
    if "alignments3D/shift" in fields:
        if np.isnan(psize).any():
            raise InputError(path, "alignments3D/shift is in pixels but there is no blob/psize_A")
        shift = np.asarray(ds["alignments3D/shift"], dtype=np.float64).reshape(-1, 2)
        cols["rlnOriginXAngst"] = shift[:, 0] * psize  # RELION's sign: pyem copies it as is
        cols["rlnOriginYAngst"] = shift[:, 1] * psize
    if "alignments3D/class" in fields:
        cols["rlnClassNumber"] = np.asarray(ds["alignments3D/class"], dtype=np.int64) + 1
    if "alignments3D/split" in fields:
        split = np.asarray(ds["alignments3D/split"], dtype=np.int64)
        if len(np.unique(split)) > 1:  # one value only: no half sets were assigned
            cols["rlnRandomSubset"] = split + 1


def _optics_groups(ds, fields: set[str], particles: pd.DataFrame, psize: np.ndarray):
    """Per-row optics -> groups of equal (voltage, Cs, Q0, pixel size), RELION 3.1 layout."""
    keys = {"rlnImagePixelSize": psize}
    for field, label in (
        ("ctf/accel_kv", "rlnVoltage"),
        ("ctf/cs_mm", "rlnSphericalAberration"),
        ("ctf/amp_contrast", "rlnAmplitudeContrast"),
    ):
        if field in fields:
            keys[label] = from_float32(ds[field])
    table = pd.DataFrame(keys)
    if "ctf/exp_group_id" in fields:
        exp = np.asarray(ds["ctf/exp_group_id"], dtype=np.int64)
        table.insert(0, "exp", exp)
    labels = list(table.columns)
    group = table.groupby(labels, sort=False, dropna=False).ngroup().to_numpy() + 1
    rows = table.assign(rlnOpticsGroup=group).drop_duplicates("rlnOpticsGroup")
    if "exp" in rows.columns:
        if not rows["exp"].duplicated().any():  # one optics set per exposure group
            renumber = dict(zip(rows["rlnOpticsGroup"], rows["exp"] + 1, strict=True))
            group = np.array([renumber[g] for g in group], dtype=np.int64)
            rows = rows.assign(rlnOpticsGroup=rows["exp"] + 1)
        rows = rows.drop(columns="exp")
    rows = rows.sort_values("rlnOpticsGroup").reset_index(drop=True)
    if rows["rlnImagePixelSize"].isna().all():
        rows = rows.drop(columns="rlnImagePixelSize")  # the importer falls back on the header
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in rows["rlnOpticsGroup"]],
            "rlnOpticsGroup": rows["rlnOpticsGroup"].astype(np.int64).to_numpy(),
            **{c: rows[c].to_numpy() for c in rows.columns if c != "rlnOpticsGroup"},
            "rlnImageDimensionality": 2,
        }
    )
    return particles.assign(rlnOpticsGroup=np.asarray(group, dtype=np.int64)), optics


def _warn_cs_aberrations(ds, fields: set[str], path: Path) -> None:
    used = []
    for field in ("ctf/tilt_A", "ctf/shift_A", "ctf/trefoil_A", "ctf/tetra_A"):
        if field in fields and np.any(np.asarray(ds[field]) != 0):
            used.append(field)
    if "ctf/anisomag" in fields and np.any(np.asarray(ds["ctf/anisomag"]) != 0):
        used.append("ctf/anisomag")
    if used:
        log.warning(
            "%s: %s are ignored: streamem does not yet apply beam tilt, higher-order "
            "aberrations or anisotropic magnification",
            path,
            ", ".join(used),
        )


# -- writing -----------------------------------------------------------------------------


def export_cs(
    store_path: str | Path,
    cs_path: str | Path,
    stacks_dir: str | Path | None = None,
    overwrite: bool = False,
    images_per_stack: int | None = None,
    workers: int | None = None,
    client=None,
) -> Path:
    """Write a store as a cryoSPARC particle ``.cs`` file plus MRCS stacks; returns the path.

    Stacks are laid out as :func:`streamem.io.relion_export.export_store` lays them out
    (``<cs stem>_stacks/`` by default); ``blob/path`` names them relative to the ``.cs``
    file's folder, which is what cryoSPARC's "Import Particle Stack" resolves against
    its "particle data path". Fields as in the module docstring; poses and
    ``alignments3D`` only when the store has poses, ``ctf`` only when it has defoci.
    """
    store = ParticleStore(store_path)
    cs_path = Path(cs_path)
    if cs_path.suffix.lower() != ".cs":
        raise InputError(cs_path, "a cryoSPARC particle file must end in .cs")
    stacks_dir = Path(stacks_dir) if stacks_dir else cs_path.with_name(f"{cs_path.stem}_stacks")
    inputs = [store.path]
    check_output(cs_path, overwrite, inputs)
    check_output(stacks_dir, overwrite, inputs)
    if cs_path.absolute().is_relative_to(stacks_dir.absolute()):
        raise InputError(cs_path, f"the .cs file may not lie inside --stacks-dir {stacks_dir}")
    bounds, stack_names = stack_layout(store, images_per_stack)
    rel = relative_to(stacks_dir.absolute(), cs_path.absolute().parent)
    dataset = cs_dataset(store, bounds, [f"{rel}/{s}" for s in stack_names])
    with atomic_output(cs_path, overwrite, inputs, "export") as tmp_cs:
        with atomic_output(stacks_dir, overwrite, inputs, "export") as tmp_dir:
            write_stacks(store, tmp_dir, bounds, stack_names, workers, client)
        with open(tmp_cs, "wb") as f:  # the stacks are in place before the file naming them
            dataset.save(f)
    return cs_path


def cs_dataset(store: ParticleStore, bounds: list[tuple[int, int]], stack_paths: list[str]):
    """The cryosparc-tools Dataset of a store whose images lie in ``stack_paths``."""
    from cryosparc.dataset import Dataset

    meta = store.read_table("metadata")
    n = store.n_particles
    optics = {int(g["rlnOpticsGroup"]): g for g in store.optics_groups} or {1: {}}
    group = np.asarray(meta.get("rlnOpticsGroup", np.ones(n)), dtype=np.int64)

    def per_particle(label: str, default: float) -> np.ndarray:
        lookup = {g: float(row.get(label, default)) for g, row in optics.items()}
        return np.array([lookup.get(g, default) for g in group], dtype=np.float32)

    psize = per_particle("rlnImagePixelSize", store.pixel_size_A)
    paths = np.empty(n, dtype=object)
    idx = np.empty(n, dtype=np.uint32)
    for (start, stop), p in zip(bounds, stack_paths, strict=True):
        paths[start:stop] = p
        idx[start:stop] = np.arange(stop - start)
    cols: list[tuple[str, np.ndarray]] = [
        ("blob/path", paths),
        ("blob/idx", idx),
        ("blob/shape", np.tile(np.array([store.box_size] * 2, np.uint32), (n, 1))),
        ("blob/psize_A", psize),
        ("blob/sign", np.ones(n, np.float32)),
    ]
    if all(k in meta for k in ("rlnDefocusU", "rlnDefocusV")):
        cols += _ctf_fields(meta, group, per_particle, n)
    if all(k in meta for k in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        cols += _alignment_fields(meta, psize, n)
    ds = Dataset.allocate(
        n, [(name, v.dtype.str if v.dtype != object else "O", v.shape[1:]) for name, v in cols]
    )
    for name, values in cols:
        ds[name] = values
    return ds


def _ctf_fields(meta, group, per_particle, n: int) -> list[tuple[str, np.ndarray]]:
    f32 = np.float32
    zeros = np.zeros(n, f32)
    return [
        ("ctf/type", np.array(["imported"] * n, dtype=object)),
        ("ctf/exp_group_id", (group - 1).astype(np.uint32)),
        ("ctf/accel_kv", per_particle("rlnVoltage", 300.0)),
        ("ctf/cs_mm", per_particle("rlnSphericalAberration", 2.7)),
        ("ctf/amp_contrast", per_particle("rlnAmplitudeContrast", 0.1)),
        ("ctf/df1_A", np.asarray(meta["rlnDefocusU"], f32)),
        ("ctf/df2_A", np.asarray(meta["rlnDefocusV"], f32)),
        ("ctf/df_angle_rad", np.deg2rad(meta.get("rlnDefocusAngle", zeros)).astype(f32)),
        ("ctf/phase_shift_rad", np.deg2rad(meta.get("rlnPhaseShift", zeros)).astype(f32)),
        ("ctf/scale", np.asarray(meta.get("rlnCtfScalefactor", np.ones(n)), f32)),
        ("ctf/scale_const", zeros),
        ("ctf/bfactor", np.asarray(meta.get("rlnCtfBfactor", zeros), f32)),
        ("ctf/shift_A", np.zeros((n, 2), f32)),
        ("ctf/tilt_A", np.zeros((n, 2), f32)),
        ("ctf/trefoil_A", np.zeros((n, 2), f32)),
        ("ctf/tetra_A", np.zeros((n, 4), f32)),
        ("ctf/anisomag", np.zeros((n, 4), f32)),
    ]


def _alignment_fields(meta, psize: np.ndarray, n: int) -> list[tuple[str, np.ndarray]]:
    f32 = np.float32
    pose = euler_to_pose(meta["rlnAngleRot"], meta["rlnAngleTilt"], meta["rlnAnglePsi"])
    origin = np.stack(
        [np.asarray(meta.get(f"rlnOrigin{a}Angst", np.zeros(n)), np.float64) for a in "XY"], 1
    )
    subset = np.asarray(meta.get("rlnRandomSubset", np.ones(n)), np.int64)
    klass = np.asarray(meta.get("rlnClassNumber", np.ones(n)), np.int64)
    ones = np.ones(n, f32)
    return [
        ("alignments3D/split", np.clip(subset - 1, 0, 1).astype(np.uint32)),
        ("alignments3D/shift", (origin / psize[:, None].astype(np.float64)).astype(f32)),
        ("alignments3D/pose", pose.astype(f32)),
        ("alignments3D/psize_A", psize),
        ("alignments3D/class", np.maximum(klass - 1, 0).astype(np.uint32)),
        ("alignments3D/class_posterior", ones),
        ("alignments3D/alpha", ones),
        ("alignments3D/weight", ones),
    ]
