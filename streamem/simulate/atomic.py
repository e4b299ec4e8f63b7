"""Density maps from atomic models (PDB / mmCIF, read with gemmi).

Each atom contributes the real-space form of its electron scattering factor in
the 5-Gaussian parameterisation of International Tables Vol. C, Table 4.3.2.2
(gemmi's ``Element.c4322``): with ``f(s) = Σ a_j exp(-b_j s²)`` and ``s = sinθ/λ``,

    ρ(r) = occupancy · Σ_j a_j (4π / B_j)^{3/2} exp(-4π² r² / B_j),   B_j = b_j + B_atom

i.e. five Gaussians of σ_j² = B_j / (8π²) and mass a_j (Å, electron scattering
amplitude at s = 0). They are rendered with the phantoms' renderer
(:func:`streamem.simulate.phantoms.render_atoms`: voxel-averaged, with a
0.35-voxel anti-aliasing blur). Waters are removed; only the first model is used.
The map's centre of mass (atomic masses) sits at voxel ``B // 2``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from streamem.errors import InputError
from streamem.simulate.phantoms import PseudoAtoms, render_atoms

log = logging.getLogger(__name__)


def read_model_atoms(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """Atoms of the first model: positions ``(n, 3)`` Å (x, y, z), B-factors, elements, occupancies.

    Raises InputError if the file is missing, unreadable or has no atoms.
    """
    import gemmi

    path = Path(path)
    if not path.exists():
        raise InputError(path, "atomic model not found")
    try:
        st = gemmi.read_structure(str(path))
    except Exception as exc:  # gemmi raises RuntimeError/ValueError/IOError
        raise InputError(path, f"not a readable PDB/mmCIF model ({exc})") from None
    st.remove_waters()
    if len(st) == 0:
        raise InputError(path, "model file has no atoms")
    pos, bfac, elem, occ = [], [], [], []
    for chain in st[0]:
        for res in chain:
            for atom in res:
                p = atom.pos
                pos.append((p.x, p.y, p.z))
                bfac.append(atom.b_iso)
                elem.append(atom.element.name)
                occ.append(atom.occ)
    if not pos:
        raise InputError(path, "model file has no atoms")
    return np.array(pos), np.array(bfac), elem, np.array(occ)


def model_pseudo_atoms(path: str | Path) -> PseudoAtoms:
    """Five Gaussians per atom (IT 4.3.2.2 electron scattering), centred on the centre of mass."""
    import gemmi

    pos, bfac, elem, occ = read_model_atoms(path)
    coefs = {}
    masses = {}
    for e in set(elem):
        el = gemmi.Element(e)
        c = np.array(el.c4322.get_coefs(), dtype=np.float64)
        if not np.any(c):  # unknown element: use carbon rather than nothing
            c = np.array(gemmi.Element("C").c4322.get_coefs(), dtype=np.float64)
        coefs[e] = c
        masses[e] = el.weight or 12.0
    a = np.stack([coefs[e][:5] for e in elem])  # (n, 5)
    b = np.stack([coefs[e][5:] for e in elem])  # (n, 5)
    mass = np.array([masses[e] for e in elem])
    com = (pos * mass[:, None]).sum(0) / mass.sum()
    big_b = np.clip(b + np.clip(bfac, 0.0, None)[:, None], 1e-3, None)
    sigmas = np.sqrt(big_b / (8.0 * np.pi**2))
    weights = a * occ[:, None]
    positions = np.repeat(pos - com, 5, axis=0)
    return PseudoAtoms(positions, weights.reshape(-1), sigmas.reshape(-1))


def volume_from_model(path: str | Path, box_size: int, pixel_size_A: float) -> np.ndarray:
    """Density map ``(B, B, B)`` float32 ``[z, y, x]`` of an atomic model (see module docstring).

    Raises InputError on an unreadable model; logs a warning if it does not fit the box.
    """
    if box_size < 8 or pixel_size_A <= 0:
        raise InputError(path, f"bad box {box_size} or pixel size {pixel_size_A}")
    atoms = model_pseudo_atoms(path)
    extent = float(np.linalg.norm(atoms.positions_A, axis=1).max())
    if 2 * extent > box_size * pixel_size_A:
        log.warning(
            "%s: model diameter %.0f A exceeds the box (%.0f A); it is cut",
            path,
            2 * extent,
            box_size * pixel_size_A,
        )
    return render_atoms(atoms, box_size, pixel_size_A)
