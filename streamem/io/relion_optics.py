"""RELION optics groups: the 3.0 -> 3.1 conversion, RELION's defaults for missing values,
and the optics columns streamem does not model yet.

Every rule is RELION's, cited from its source (``3dem/relion``):

- **RELION 3.0 files** keep the optics on every particle row. As
  ``StarConverter::convert_3p0_particlesTo_3p1`` (``src/jaz/io/star_converter.cpp``) does,
  one optics group is made per distinct (``rlnVoltage``, ``rlnSphericalAberration``,
  ``rlnAmplitudeContrast``, pixel size), and origins ``rlnOriginX/Y/Z`` in pixels become
  ``rlnOriginX/Y/ZAngst`` = origin_px · pixel size (``translateOffsets``: same sign).
- **Pixel size from the detector**: where ``rlnImagePixelSize`` is missing but
  ``rlnDetectorPixelSize`` (µm) and ``rlnMagnification`` are there,
  ``angpix = 10000 * dstep / mag`` Å (``StarConverter::unifyPixelSize``), in 3.0 and
  3.1 files alike, with one warning.
- **Amplitude contrast**: a missing ``rlnAmplitudeContrast`` is
  :data:`DEFAULT_AMPLITUDE_CONTRAST`, with one warning. RELION's source reads it as 0:
  ``CTF::readByGroup`` (``src/ctf.cpp``, RELION 3.1 to 5) calls
  ``readValue(EMDL_CTF_Q0, Q0, 0, ...)`` and RELION 3.0's ``CTF::read`` sets ``Q0 = 0``.
  The 0.1 often quoted is the default of RELION's GUI (Import, CtfFind jobs) and of
  CTFFIND, which write the value into the file; a file *without* the column is
  processed by RELION with Q0 = 0, so that is what we do (``shared/CONVENTIONS.md``:
  where a note and RELION's source disagree, RELION wins).
- **CTF-premultiplied images** (``rlnCtfDataAreCtfPremultiplied`` = 1, RELION 4/5
  subtomogram "2D stacks"): the images already carry one CTF factor, which RELION's
  ``ObservationModel`` squares in its prediction. streamem's E-step and reconstruction
  do not yet, so such a file is refused with one line rather than processed wrongly.
- **Aberrations and anisotropic magnification** (``rlnBeamTiltX/Y``, ``rlnOddZernike``,
  ``rlnEvenZernike``, ``rlnMagMat00..11``, RELION 3.1+ CtfRefine): RELION applies them in
  the CTF and the projection (``ObservationModel``: ``TiltHelper::insertTilt`` into the
  odd Zernike terms, ``applyAnisoMag`` on the projection matrix). streamem does not yet;
  the columns are carried into the store and out again, and one warning lists those
  whose values would change RELION's result (non-zero tilt or Zernike terms, a
  magnification matrix other than the identity).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from streamem.errors import InputError

log = logging.getLogger(__name__)

#: Optics labels that RELION 3.0 keeps on every particle row and 3.1 moves to data_optics.
OPTICS_CTF_LABELS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
#: RELION 3.0 pixel-size labels (dropped from particles, folded into rlnImagePixelSize).
PIXEL_LABELS_30 = ("rlnImagePixelSize", "rlnDetectorPixelSize", "rlnMagnification")
#: RELION's value for a missing rlnAmplitudeContrast (CTF::readByGroup, src/ctf.cpp).
DEFAULT_AMPLITUDE_CONTRAST = 0.0
#: Optics columns of RELION 3.1+ CtfRefine that streamem carries but does not apply.
ABERRATION_LABELS = (
    "rlnBeamTiltX",
    "rlnBeamTiltY",
    "rlnOddZernike",
    "rlnEvenZernike",
    "rlnMagMat00",
    "rlnMagMat01",
    "rlnMagMat10",
    "rlnMagMat11",
)
_IDENTITY = {"rlnMagMat00": 1.0, "rlnMagMat01": 0.0, "rlnMagMat10": 0.0, "rlnMagMat11": 1.0}


def detector_pixel_size_A(detector_um, magnification):
    """RELION's pixel size in Å from the detector pixel (µm) and magnification:
    ``10000 * dstep / mag`` (``StarConverter::unifyPixelSize``). Array-likes broadcast."""
    return 1e4 * np.asarray(detector_um, dtype=np.float64) / np.asarray(magnification, float)


def convert_relion30(particles: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RELION 3.0 -> 3.1: optics groups from the per-particle optics, origins px -> Å."""
    cols = particles.columns
    if "rlnImagePixelSize" in cols:
        pixel_A = particles["rlnImagePixelSize"].astype(float)
    elif "rlnDetectorPixelSize" in cols and "rlnMagnification" in cols:
        pixel_A = pd.Series(
            detector_pixel_size_A(particles["rlnDetectorPixelSize"], particles["rlnMagnification"]),
            index=particles.index,
        )
        _warn_detector_pixel(path, pixel_A.unique())
    else:
        pixel_A = None

    keys = pd.DataFrame({c: particles[c] for c in OPTICS_CTF_LABELS if c in cols})
    if pixel_A is not None:
        keys["rlnImagePixelSize"] = pixel_A
    if keys.shape[1]:
        group = keys.groupby(list(keys.columns), sort=False, dropna=False).ngroup() + 1
        optics = keys.assign(rlnOpticsGroup=group).drop_duplicates("rlnOpticsGroup")
    else:
        group = pd.Series(1, index=particles.index)
        optics = pd.DataFrame({"rlnOpticsGroup": [1]})
    groups = optics["rlnOpticsGroup"].astype(np.int64).to_numpy()
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in groups],
            "rlnOpticsGroup": groups,
            **{c: optics[c].to_numpy() for c in optics.columns if c != "rlnOpticsGroup"},
            "rlnImageDimensionality": 2,
        }
    )

    out = particles.copy()
    for axis in "XYZ":
        px = f"rlnOrigin{axis}"
        if px not in out.columns:
            continue
        if pixel_A is None:
            raise InputError(
                path,
                f"RELION 3.0 {px} is in pixels but there is no pixel size "
                "(rlnDetectorPixelSize and rlnMagnification) to convert it to Å",
            )
        # origin_Å = origin_px · pixel size; the sign is the same in 3.0 and 3.1
        out[px] = out[px].astype(float) * pixel_A
        out = out.rename(columns={px: f"{px}Angst"})
    out = out.drop(columns=[c for c in (*OPTICS_CTF_LABELS, *PIXEL_LABELS_30) if c in cols])
    out["rlnOpticsGroup"] = group.astype(np.int64).to_numpy()
    return out, optics


def _warn_detector_pixel(path: Path, values) -> None:
    shown = ", ".join(f"{v:.6g}" for v in sorted(values)[:4])
    log.warning(
        "%s: no rlnImagePixelSize; pixel size %s Å from 10000 * rlnDetectorPixelSize / "
        "rlnMagnification, as RELION does",
        path,
        shown,
    )


def apply_optics_rules(optics: pd.DataFrame, path: Path, has_defocus: bool) -> pd.DataFrame:
    """RELION's defaults for missing optics values, and its refusals (module docstring).

    ``optics``: one row per group (3.1 layout). Returns a copy with
    ``rlnImagePixelSize`` filled from the detector where missing, and
    ``rlnAmplitudeContrast`` filled with :data:`DEFAULT_AMPLITUDE_CONTRAST` where
    missing and the particles have defoci (each with one warning). Raises InputError
    for CTF-premultiplied images; warns once about aberration columns it ignores.
    """
    optics = optics.copy()
    cols = optics.columns
    if "rlnDetectorPixelSize" in cols and "rlnMagnification" in cols:
        derived = detector_pixel_size_A(optics["rlnDetectorPixelSize"], optics["rlnMagnification"])
        if "rlnImagePixelSize" not in cols:
            optics["rlnImagePixelSize"] = derived
            _warn_detector_pixel(path, np.unique(derived))
        elif optics["rlnImagePixelSize"].isna().any():
            missing = optics["rlnImagePixelSize"].isna().to_numpy()
            optics.loc[missing, "rlnImagePixelSize"] = derived[missing]
            _warn_detector_pixel(path, np.unique(derived[missing]))
    if has_defocus and "rlnVoltage" in cols and "rlnSphericalAberration" in cols:
        q0 = optics.get("rlnAmplitudeContrast")
        if q0 is None or q0.isna().any():
            optics["rlnAmplitudeContrast"] = (
                DEFAULT_AMPLITUDE_CONTRAST if q0 is None else q0.fillna(DEFAULT_AMPLITUDE_CONTRAST)
            )
            log.warning(
                "%s: no rlnAmplitudeContrast; using RELION's default %g "
                "(CTF::readByGroup in RELION's src/ctf.cpp)",
                path,
                DEFAULT_AMPLITUDE_CONTRAST,
            )
    _refuse_premultiplied(optics, path)
    _warn_aberrations(optics, path)
    return optics


def _refuse_premultiplied(optics: pd.DataFrame, path: Path) -> None:
    label = "rlnCtfDataAreCtfPremultiplied"
    if label not in optics.columns:
        return
    flags = pd.to_numeric(optics[label], errors="coerce").fillna(0).to_numpy()
    if (flags != 0).any():
        group = optics["rlnOpticsGroup"].to_numpy()[int(np.argmax(flags != 0))]
        raise InputError(
            path,
            f"optics group {group} has {label} = 1: CTF-premultiplied images are not "
            "supported yet (the E-step would apply the CTF twice)",
        )


def _nonzero_terms(value) -> bool:
    """Whether a Zernike list (``[0.1,0,...]`` text or numbers) holds a non-zero term."""
    text = str(value).strip().strip("[]")
    if not text:
        return False
    try:
        terms = np.array([float(t) for t in text.split(",")])
    except ValueError:
        return True  # something RELION would read: assume it matters
    return bool(np.any(terms != 0))


def _warn_aberrations(optics: pd.DataFrame, path: Path) -> None:
    effective = []
    for label in ABERRATION_LABELS:
        if label not in optics.columns:
            continue
        col = optics[label]
        if label in ("rlnOddZernike", "rlnEvenZernike"):
            matters = any(_nonzero_terms(v) for v in col)
        else:
            values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)
            neutral = _IDENTITY.get(label, 0.0)
            matters = bool(np.any(np.isnan(values) | (values != neutral)))
        if matters:
            effective.append(label)
    if effective:
        log.warning(
            "%s: optics columns %s are carried but ignored: streamem does not yet apply "
            "beam tilt, Zernike aberrations or anisotropic magnification as RELION does",
            path,
            ", ".join(effective),
        )
