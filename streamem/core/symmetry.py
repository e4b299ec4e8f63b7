"""Point-group symmetry with RELION's axis conventions (``src/symmetries.cpp``).

The groups are generated from RELION's generator axes (``fill_symmetry_class``) and
closed under multiplication:

- ``Cn``: n-fold about z.
- ``Dn``: n-fold about z and 2-fold about x.
- ``T``: 3-fold about z and 2-fold about (0, 0.816496, 0.577350).
- ``O``: 3-fold about (1, 1, 1)/√3 and 4-fold about z.
- ``I`` (= ``I2``, RELION's default): 2-fold about z, 5-fold about
  (0.525731, 0, 0.850651) and 3-fold about (0, 0.356822, 0.934172);
  ``I1``: 2-fold about x, 5-fold about (0.850651, 0, -0.525731), 3-fold about
  (0.934172, 0.356822, 0); ``I3``: 2-fold about (-0.525731, 0, 0.850651), 5-fold about
  z, 3-fold about (-0.491123, 0.356822, 0.794654); ``I4``: 2-fold about
  (0.525731, 0, 0.850651), 5-fold about (0.894427, 0, 0.447214), 3-fold about
  (0.491123, 0.356822, 0.794654).

Host-only by design: the matrices are small NumPy tables, built once on the host;
functions that apply them to device arrays (e.g.
:func:`streamem.core.backprojector.apply_symmetry`) move them there.

Matrices act on column vectors (x, y, z); a map with the symmetry satisfies
``V(L r) = V(r)`` for every L of the group, and so does its Fourier transform.
Because the group is closed under inversion, the sense in which an axis is
turned does not matter. An image at pose A is also the image at every pose
``A @ L`` (L in the group); its projection direction (the third row of A, i.e.
(rot, tilt)) maps to ``Lᵀ d``.

Asymmetric unit of directions (:func:`asymmetric_unit_mask`): for ``Cn`` the wedge
``-180/n <= rot < 180/n``, for ``Dn`` additionally ``tilt <= 90`` (these agree with
RELION's up to where the wedge starts); for T, O and I the Dirichlet (Voronoi)
cell of the group orbit of a generic direction u: d is kept when no symmetry mate
of d is closer to u. Any such cell is a valid asymmetric unit; directions on its
boundary may be kept twice, which is harmless for sampling.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from streamem.errors import InputError

_I_AXES = {
    "I2": [(2, (0, 0, 1)), (5, (0.525731114, 0, 0.850650807)), (3, (0, 0.356822076, 0.934172364))],
    "I1": [
        (2, (1, 0, 0)),
        (5, (0.85065080702670, 0, -0.5257311142635)),
        (3, (0.9341723640, 0.3568220765, 0)),
    ],
    "I3": [
        (2, (-0.5257311143, 0, 0.8506508070)),
        (5, (0, 0, 1)),
        (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428)),
    ],
    "I4": [
        (2, (0.5257311143, 0, 0.8506508070)),
        (5, (0.8944271932547096, 0, 0.4472135909903704)),
        (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428)),
    ],
}

_ORDERS = {"T": 12, "O": 24, "I": 60}


def axis_rotation(axis, angle_deg: float) -> np.ndarray:
    """Right-handed rotation by ``angle_deg`` about ``axis`` (Rodrigues), ``(3, 3)``."""
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    t = np.deg2rad(angle_deg)
    K = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * (K @ K)


class SymmetryNameError(InputError, ValueError):
    """An unknown point-group name: an :class:`InputError` naming the option, and a
    ``ValueError`` for callers that catch that."""


#: Largest n of ``Cn`` and ``Dn``: the group closure stops at 120 elements.
MAX_CYCLIC_ORDER = 120


def parse_symmetry(name: str, option: str = "--sym") -> tuple[str, list]:
    """Canonical name and generator (fold, axis) list of a point-group name.

    Accepted (case-insensitive, as RELION's ``--sym``): ``C1`` .. ``C120``, ``D2`` ..
    ``D60`` (at most 120 elements), ``T``, ``O``, ``I`` (= ``I2``), ``I1`` .. ``I4``.
    ``C0`` has no meaning and ``D1`` is refused (it would be a 2-fold about x only, not
    a dihedral group: write C2). Anything else raises :class:`SymmetryNameError`
    naming ``option``.
    """
    n = str(name).strip().upper()
    m = re.fullmatch(r"([CD])(\d+)", n)
    if m:
        order = int(m.group(2))
        lowest = 1 if m.group(1) == "C" else 2
        highest = MAX_CYCLIC_ORDER if m.group(1) == "C" else MAX_CYCLIC_ORDER // 2
        if not lowest <= order <= highest:
            raise SymmetryNameError(
                None,
                f"{option}: unknown symmetry group {name!r} "
                f"({m.group(1)}<n> needs n in {lowest}..{highest})",
            )
        n = f"{m.group(1)}{order}"  # C01 -> C1: one cache entry per group
        gens = [(order, (0, 0, 1))]
        if m.group(1) == "D":
            gens.append((2, (1, 0, 0)))
        return n, gens
    if n == "T":
        return n, [(3, (0, 0, 1)), (2, (0, 0.816496, 0.577350))]
    if n == "O":
        return n, [(3, (0.5773502, 0.5773502, 0.5773502)), (4, (0, 0, 1))]
    if n in ("I", "I1", "I2", "I3", "I4"):
        key = "I2" if n == "I" else n
        return key, _I_AXES[key]
    raise SymmetryNameError(
        None,
        f"{option}: unknown symmetry group {name!r} "
        "(expected C<n>, D<n>, T, O, I, I1, I2, I3 or I4)",
    )


def _generators(name: str) -> tuple[str, list]:
    """Canonical name and generator (fold, axis) list for a group name."""
    return parse_symmetry(name)


def symmetry_order(name: str) -> int:
    """Number of elements of the group."""
    n, gens = _generators(name)
    if n[0] == "C":
        return gens[0][0]
    if n[0] == "D" and n[1:].isdigit():
        return 2 * gens[0][0]
    return _ORDERS[n[0]]


def symmetry_matrices(name: str) -> np.ndarray:
    """All matrices of a point group, float64 ``(S, 3, 3)``, the identity first.

    ``name`` is RELION's ``--sym`` (case-insensitive): ``C1``, ``Cn``, ``Dn``, ``T``,
    ``O``, ``I`` (= ``I2``), ``I1`` .. ``I4``.
    """
    return _symmetry_matrices(_generators(name)[0]).copy()


@functools.lru_cache(maxsize=64)
def _symmetry_matrices(canonical: str) -> np.ndarray:
    _, gens = _generators(canonical)
    generators = [axis_rotation(axis, 360.0 / fold) for fold, axis in gens]
    group = np.eye(3)[None]
    frontier = group
    # Breadth-first closure: multiply new elements by the generators until nothing new
    # appears (the generator axes are given to ~7 digits, hence the tolerance).
    while len(frontier):
        cand = np.concatenate([frontier @ g for g in generators])
        new = []
        for M in cand:
            pool = group if not new else np.concatenate([group, np.stack(new)])
            if np.abs(pool - M).reshape(len(pool), -1).max(axis=1).min() > 1e-4:
                new.append(M)
        frontier = np.stack(new) if new else np.empty((0, 3, 3))
        group = np.concatenate([group, frontier])
        if len(group) > 120:
            raise RuntimeError(f"symmetry group {canonical!r} did not close")
    # Re-orthonormalise (axes given to finite precision) and clean exact zeros.
    u, _, vt = np.linalg.svd(group)
    out = u @ vt
    out[np.abs(out) < 1e-12] = 0.0
    out.setflags(write=False)
    return out


def _directions(rot_deg, tilt_deg) -> np.ndarray:
    """Unit projection directions (x, y, z) ``(..., 3)`` of (rot, tilt)."""
    a = np.deg2rad(np.asarray(rot_deg, dtype=np.float64))
    b = np.deg2rad(np.asarray(tilt_deg, dtype=np.float64))
    a, b = np.broadcast_arrays(a, b)
    return np.stack([np.sin(b) * np.cos(a), np.sin(b) * np.sin(a), np.cos(b)], axis=-1)


def _generic_direction(mats: np.ndarray) -> np.ndarray:
    """A direction fixed by no non-identity group element (reference for the Dirichlet cell)."""
    for cand in ([0.1, 0.2, 0.97], [0.3, -0.1, 0.9], [0.05, 0.31, 0.8]):
        u = np.asarray(cand) / np.linalg.norm(cand)
        d = np.linalg.norm(mats[1:] @ u - u, axis=-1)
        if d.size == 0 or d.min() > 0.05:
            return u
    raise RuntimeError("no generic direction found")


def asymmetric_unit_mask(rot_deg, tilt_deg, name: str) -> np.ndarray:
    """Bool mask of the directions (rot, tilt) (degrees, any shape) inside the
    asymmetric unit of ``name`` (see the module docstring for its shape)."""
    canon, gens = _generators(name)
    rot = np.asarray(rot_deg, dtype=np.float64)
    tilt = np.asarray(tilt_deg, dtype=np.float64)
    rot, tilt = np.broadcast_arrays(rot, tilt)
    if canon[0] in "CD" and canon[1:].isdigit():
        n = gens[0][0]
        half = 180.0 / n
        # rot (mod 360) within the wedge [-180/n, 180/n); directions on the z axis
        # have no rot and are kept.
        keep = ((rot + half) % 360.0) < 360.0 / n - 1e-9
        keep |= np.sin(np.deg2rad(tilt)) < 1e-9
        if canon[0] == "D":
            keep &= tilt <= 90.0 + 1e-9
        return keep
    mats = symmetry_matrices(name)
    u = _generic_direction(mats)
    d = _directions(rot, tilt)
    # d is kept when d·u >= (L d)·u for every L, i.e. d·u >= d·(Lᵀ u).
    mates = mats.transpose(0, 2, 1) @ u  # (S, 3): Lᵀ u
    scores = d @ mates.T  # (..., S)
    return scores[..., 0] >= scores.max(axis=-1) - 1e-9
