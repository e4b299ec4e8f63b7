"""RELION's ``run_itNNN_model.star``: one writer for refine3d, class3d and class2d.

Blocks, in RELION's order and with its labels: ``model_general`` (one row),
``model_classes`` (class jobs: reference image, distribution, estimated resolution),
``model_class_<k>`` (per class, curves over the Fourier shells 0..B//2) and
``model_optics_group_<g>`` (per optics group, the noise spectrum σ²). The jobs differ
only in which curves and which shell columns they write; they pass them in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from streamem.io.relion import write_star

#: Shell columns of a spectrum table: the index, 1/Å and Å (999 at the origin, as RELION).
SHELL_LABELS = ("rlnSpectralIndex", "rlnResolution", "rlnAngstromResolution")


def shell_columns(box_size: int, pixel_size_A: float, labels: Sequence[str]) -> dict:
    """label -> (B//2+1,) values of the shell columns named in ``labels`` (SHELL_LABELS)."""
    shells = np.arange(box_size // 2 + 1)
    with np.errstate(divide="ignore"):
        angstrom = np.where(shells > 0, box_size * pixel_size_A / np.maximum(shells, 1), 999.0)
    columns = {
        "rlnSpectralIndex": shells,
        "rlnResolution": shells / (box_size * pixel_size_A),
        "rlnAngstromResolution": angstrom,
    }
    return {label: columns[label] for label in labels}


def write_model_star(
    path: Path,
    general: Mapping,
    box_size: int,
    pixel_size_A: float,
    inv_sigma2: np.ndarray,
    class_curves: Sequence[Mapping[str, np.ndarray]],
    classes: Mapping[str, Sequence] | None = None,
    class_axes: Sequence[str] = SHELL_LABELS,
    noise_axes: Sequence[str] = ("rlnSpectralIndex",),
) -> None:
    """Write a model STAR.

    general: the ``model_general`` row (label -> value). inv_sigma2: (G, ≥ B//2+1) 1/σ²
    per optics group (0 -> σ² written as 0). class_curves: per class, label -> curve
    (≥ B//2+1,), cut to B//2+1 shells (``model_class_<k>``, after the ``class_axes``
    columns). classes: the ``model_classes`` table (label -> (K,) values) or None
    (refine3d has none). noise_axes: the shell columns of the optics-group tables.
    """
    n_shells = box_size // 2 + 1
    blocks = {"model_general": pd.DataFrame([dict(general)])}
    if classes is not None:
        blocks["model_classes"] = pd.DataFrame(dict(classes))
    for k, curves in enumerate(class_curves):
        table = shell_columns(box_size, pixel_size_A, class_axes)
        table.update({label: np.asarray(c)[:n_shells] for label, c in curves.items()})
        blocks[f"model_class_{k + 1}"] = pd.DataFrame(table)
    for g, inv in enumerate(np.asarray(inv_sigma2)):
        with np.errstate(divide="ignore"):
            sigma2 = np.where(inv > 0, 1.0 / np.maximum(inv, 1e-300), 0.0)
        table = shell_columns(box_size, pixel_size_A, noise_axes)
        table["rlnSigma2Noise"] = sigma2[:n_shells]
        blocks[f"model_optics_group_{g + 1}"] = pd.DataFrame(table)
    write_star(path, blocks)


def read_model_classes(path: Path) -> pd.DataFrame:
    """The ``model_classes`` table of a run_itNNN_model.star (class2d or class3d)."""
    import starfile

    return starfile.read(path, always_dict=True)["model_classes"]
