"""Small RELION particle sets (STAR + MRCS) written with starfile and mrcfile for tests."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile


def write_stack(path: Path, images: np.ndarray, voxel_A: float = 1.5) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(images, dtype=np.float32))
        mrc.set_image_stack()
        mrc.voxel_size = voxel_A


def make_dataset(
    folder: Path,
    n_particles: int = 30,
    box: int = 16,
    n_stacks: int = 3,
    version: str = "3.1",
    pixel_A: float = 1.5,
    seed: int = 0,
    shapes: list[tuple[int, int]] | None = None,
    star_name: str = "particles.star",
    subdir: str = "Extract/job007/Movies",
):
    """Write ``n_stacks`` stacks under ``folder/subdir`` and a STAR file naming them
    relative to ``folder``, rows shuffled across stacks.

    ``shapes`` gives (ny, nx) per stack (default all ``box`` x ``box``). Returns
    (star_path, particles table as written, {stack path: images}).
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    per_stack = np.array_split(np.arange(n_particles), n_stacks)
    stacks, names, mics = {}, [], []
    for k, members in enumerate(per_stack):
        ny, nx = shapes[k] if shapes else (box, box)
        rel = f"{subdir}/mic{k + 1:03d}.mrcs"
        images = rng.normal(size=(len(members), ny, nx)).astype(np.float32)
        write_stack(folder / rel, images, pixel_A)
        stacks[folder / rel] = images
        names += [f"{i + 1:06d}@{rel}" for i in range(len(members))]
        mics += [f"{subdir}/mic{k + 1:03d}.mrc"] * len(members)
    order = rng.permutation(n_particles)
    n = n_particles
    table = pd.DataFrame(
        {
            "rlnCoordinateX": rng.uniform(0, 4000, n).round(1),
            "rlnCoordinateY": rng.uniform(0, 4000, n).round(1),
            "rlnImageName": np.array(names, dtype=object)[order],
            "rlnMicrographName": np.array(mics, dtype=object)[order],
            "rlnDefocusU": rng.uniform(8000, 30000, n).round(2),
            "rlnDefocusV": rng.uniform(8000, 30000, n).round(2),
            "rlnDefocusAngle": rng.uniform(-180, 180, n).round(3),
            "rlnAngleRot": rng.uniform(-180, 180, n).round(6),
            "rlnAngleTilt": rng.uniform(0, 180, n).round(6),
            "rlnAnglePsi": rng.uniform(-180, 180, n).round(6),
            "rlnClassNumber": rng.integers(1, 4, n),
            "rlnMyCustomThing": rng.normal(size=n).round(6),
            "rlnMyCustomText": [f"note {i}" if i % 3 else "x" for i in range(n)],
        }
    )
    if version == "3.1":
        table["rlnOriginXAngst"] = rng.uniform(-5, 5, n).round(6)
        table["rlnOriginYAngst"] = rng.uniform(-5, 5, n).round(6)
        table["rlnOpticsGroup"] = rng.integers(1, 3, n)
        table["rlnRandomSubset"] = rng.integers(1, 3, n)
        optics = pd.DataFrame(
            {
                "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"],
                "rlnOpticsGroup": [1, 2],
                "rlnMicrographOriginalPixelSize": [0.75, 0.75],
                "rlnVoltage": [300.0, 200.0],
                "rlnSphericalAberration": [2.7, 2.7],
                "rlnAmplitudeContrast": [0.1, 0.07],
                "rlnImagePixelSize": [pixel_A, pixel_A],
                "rlnImageSize": [box, box],
                "rlnImageDimensionality": [2, 2],
            }
        )
        blocks = {"optics": optics, "particles": table}
    else:  # RELION 3.0: optics on every row, origins in pixels
        table["rlnOriginX"] = rng.uniform(-3, 3, n).round(3)
        table["rlnOriginY"] = rng.uniform(-3, 3, n).round(3)
        table["rlnVoltage"] = np.where(np.arange(n) % 2, 300.0, 200.0)
        table["rlnSphericalAberration"] = 2.7
        table["rlnAmplitudeContrast"] = 0.1
        table["rlnDetectorPixelSize"] = 15.0  # µm
        table["rlnMagnification"] = 15.0 * 1e4 / pixel_A
        blocks = {"": table}
    star = folder / star_name
    star.parent.mkdir(parents=True, exist_ok=True)
    starfile.write(blocks, star)
    return star, table, stacks


def image_of(stacks: dict, star_folder: Path, name: str) -> np.ndarray:
    """The image a ``NNNNNN@stack`` name refers to, from the written stacks."""
    idx, rel = name.split("@")
    return stacks[star_folder / rel][int(idx) - 1]
