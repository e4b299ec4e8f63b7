"""``truth.star``: a simulation's true poses, origins, CTF and classes, for RELION.

``streamem simulate --relion DIR`` writes ``DIR/particles.star`` (the images, CTF and
half sets, no poses: what RELION is given) and ``DIR/truth.star``: the same rows and
``rlnImageName`` with the ground truth put in, ``rlnAngleRot/Tilt/Psi`` (degrees),
``rlnOriginXAngst/YAngst`` (Å, RELION's sign: the shift that re-centres the particle)
and ``rlnClassNumber`` (1..K, the volume each image was made from). So
``relion_reconstruct --i truth.star`` gives the truth's map, and a refinement's
``run_data.star`` can be compared with it row by row.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import starfile

from streamem.io.atomic import atomic_output
from streamem.io.relion import write_star
from streamem.io.store import ParticleStore


def write_truth_star(
    store: ParticleStore, particles_star: str | Path, out: str | Path, overwrite: bool = False
) -> Path:
    """Write ``out`` from ``particles_star`` (rows in store order, as ``streamem export``
    writes them) with the store's ``truth`` fields in place of (or after) its columns."""
    blocks = starfile.read(particles_star, always_dict=True)
    particles = blocks["particles"].copy()
    truth = store.read_table("truth")
    if len(particles) != store.n_particles:
        raise ValueError(
            f"{particles_star}: {len(particles)} rows, the store has {store.n_particles}"
        )
    for label, values in truth.items():
        particles[label] = values
    with atomic_output(Path(out), overwrite=overwrite, inputs=[store.path, particles_star]) as tmp:
        write_star(tmp, {"optics": pd.DataFrame(blocks["optics"]), "particles": particles})
    return Path(out)
