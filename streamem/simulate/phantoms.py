"""Built-in protein-like phantoms that need no downloaded file.

A phantom is a set of Gaussian pseudo-atoms with positions in Å, rendered onto a
grid of any box and pixel size (:func:`render_atoms`), so the pixel size changes
the sampling, not the molecule. Two pseudo-atoms stand for one residue: a
backbone bead (56 Da, σ 1.0 Å) and a side-chain bead (15-100 Da, σ 1.2 Å).
Density is in Da/Å³ averaged over each voxel (protein ≈ 0.8), positive (protein
bright).

The fold: each domain is a self-avoiding walk on a 10 Å cubic lattice (the
packing distance of α-helices) filling an ellipsoid. Straight runs of the walk
become α-helices (1.5 Å rise, 100° per residue, Cα at 2.3 Å from the axis); an
isolated edge becomes a β-hairpin (two strands 4.8 Å apart, 3.3 Å per residue,
side chains alternating), so maps have helix and sheet features at 4-10 Å. The
walk continues straight with probability 0.8 (runs of up to 5 edges), otherwise
turns to the free neighbour with the fewest free neighbours (Warnsdorff's rule,
which keeps the walk from trapping itself); a trapped walk jumps to the nearest
free site (a chain break).

Phantoms (:func:`list_phantoms`):

- ``asym``: 300 kDa, four domains (105, 80, 70, 45 kDa) in an irregular
  arrangement (about 130 Å long); ``asym-B`` is the same molecule with the 45 kDa
  domain swung by 55° about its hinge (same mass, same frame: for 3D
  classification).
- ``asym-del``: ``asym`` lacking a small cap at one edge, 6.0% of its mass (the
  pseudo-atoms nearest the atom farthest from the centre of mass, taken until their
  mass reaches the fraction; the realised fraction is ``deletion_fraction``, within
  one atom's 100 Da of the target), the small-difference state of issue 25 (a
  consensus map averages it away). ``asym-del15`` removes 15% (an exaggerated
  difference, for tests at box 32 with a few hundred particles). Same frame as
  ``asym``: mixes ``asym:0.6,asym-del:0.4`` are for 3D classification.
- ``C4``, ``D7``, ``T``, ``O``, ``I``: one asymmetric globule (70, 25, 25, 15 and
  6 kDa) at a general position, copied by the group's matrices
  (:func:`streamem.core.symmetry.symmetry_matrices`, RELION's axis conventions):
  280-360 kDa.

A molecule larger than 0.7 of the box (in Å) is shrunk to fit: positions scale
by s and masses by s³ (fewer residues on the same 10 Å lattice), so small test
boxes get a smaller protein, never a clipped one. The molecule's centre of mass
sits at voxel ``B // 2`` (``asym-B`` uses the frame of ``asym``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from streamem.core.euler import euler_to_matrix
from streamem.errors import InputError

LATTICE_A = 10.0  # helix-helix packing distance
A3_PER_RESIDUE = 182.0  # ellipsoid volume per residue: 5.5 residues per 10 Å lattice site
DA_PER_RESIDUE = 110.0
FIT_FRACTION = 0.7  # the molecule's diameter is at most this fraction of the box
BLUR_PX = 0.35  # anti-aliasing blur (σ in voxels) added to every pseudo-atom

_SYMMETRIC = {
    # name: (asymmetric-unit mass in kDa)
    "C4": 70.0,
    "D7": 25.0,
    "T": 25.0,
    "O": 15.0,
    "I": 6.0,
}
_ASYM_DOMAINS_KDA = (115.0, 90.0, 75.0, 50.0)
_SWING_DEG = 55.0
#: ``asym`` less an edge cap of this fraction of its mass (issue 25's small difference)
_DELETIONS = {"asym-del": 0.06, "asym-del15": 0.15}
_ASYM_FAMILY = ("asym", "asym-B", *_DELETIONS)


@dataclass(frozen=True)
class PseudoAtoms:
    """Gaussian pseudo-atoms: positions ``(n, 3)`` (x, y, z) Å, weights (Da), widths σ (Å)."""

    positions_A: np.ndarray
    weights: np.ndarray
    sigmas_A: np.ndarray

    def __len__(self) -> int:
        return int(self.weights.shape[0])

    @property
    def mass_kDa(self) -> float:
        return float(self.weights.sum()) / 1000.0

    def transformed(self, rotation: np.ndarray, translation_A=(0.0, 0.0, 0.0)) -> PseudoAtoms:
        """Atoms at ``rotation @ r + translation_A``."""
        pos = self.positions_A @ np.asarray(rotation).T + np.asarray(translation_A)
        return PseudoAtoms(pos, self.weights, self.sigmas_A)

    @staticmethod
    def concat(parts: list[PseudoAtoms]) -> PseudoAtoms:
        return PseudoAtoms(
            np.concatenate([p.positions_A for p in parts]).reshape(-1, 3),
            np.concatenate([p.weights for p in parts]),
            np.concatenate([p.sigmas_A for p in parts]),
        )

    def centre_of_mass_A(self) -> np.ndarray:
        return (self.positions_A * self.weights[:, None]).sum(0) / self.weights.sum()

    def radius_A(self) -> float:
        """Largest distance of any atom's 3σ sphere from the origin."""
        r = np.linalg.norm(self.positions_A, axis=1) + 3.0 * self.sigmas_A
        return float(r.max()) if r.size else 0.0


# -- rendering ---------------------------------------------------------------------------


def render_atoms(
    atoms: PseudoAtoms, box_size: int, pixel_size_A: float, blur_px: float = BLUR_PX
) -> np.ndarray:
    """Density of Gaussian atoms on a ``(B, B, B)`` float32 grid ``[z, y, x]``.

    Atom positions are relative to voxel ``B // 2``. Each voxel holds the atoms'
    mass inside it divided by its volume (Da/Å³): 1-D cell integrals (erf
    differences) per axis, so total mass is exact whatever the pixel size. Every
    Gaussian is widened by ``blur_px`` voxels (σ² adds), which keeps aliasing
    small; Gaussians are cut at 4σ.
    """
    b = int(box_size)
    px = float(pixel_size_A)
    c = b // 2
    out = np.zeros(b * b * b, dtype=np.float64)
    if len(atoms) == 0:
        return out.reshape(b, b, b).astype(np.float32)
    sig_px = np.sqrt((atoms.sigmas_A / px) ** 2 + blur_px**2)
    q = atoms.positions_A / px + c  # (n, 3) x, y, z in voxel indices
    reach = np.ceil(4.0 * sig_px).astype(np.int64)
    # Group atoms of equal reach so each group uses one window size.
    for r in np.unique(reach):
        sel = np.flatnonzero(reach == r)
        w = 2 * int(r) + 2
        for part in np.array_split(sel, max(1, sel.size * w**3 // 4_000_000 + 1)):
            _splat(out, q[part], sig_px[part], atoms.weights[part], int(r), w, b)
    return (out / px**3).reshape(b, b, b).astype(np.float32)


def _splat(out, q, sig_px, weights, r: int, w: int, b: int) -> None:
    n = q.shape[0]
    lo = np.floor(q - r).astype(np.int64)  # (n, 3) first voxel of each window
    idx = lo[:, :, None] + np.arange(w)  # (n, 3, w) voxel indices per axis
    # Cell integral of N(q, σ²) over [i - 1/2, i + 1/2] per axis: (n, 3, w).
    s = (np.sqrt(2.0) * sig_px)[:, None, None]
    d = idx - q[:, :, None]
    prof = 0.5 * (erf((d + 0.5) / s) - erf((d - 0.5) / s))
    prof = np.where((idx >= 0) & (idx < b), prof, 0.0)
    gx, gy, gz = prof[:, 0], prof[:, 1], prof[:, 2]
    vals = weights[:, None, None, None] * gz[:, :, None, None] * gy[:, None, :, None]
    vals = vals * gx[:, None, None, :]  # (n, w, w, w) [z, y, x]
    ix, iy, iz = (np.clip(idx[:, k], 0, b - 1) for k in range(3))
    flat = (iz[:, :, None, None] * b + iy[:, None, :, None]) * b + ix[:, None, None, :]
    out += np.bincount(flat.reshape(-1), weights=vals.reshape(-1), minlength=b**3)[: b**3]
    del n


# -- folding -----------------------------------------------------------------------------


def _perpendicular_basis(u: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    v = rng.normal(size=3)
    v -= v.dot(u) * u
    v /= np.linalg.norm(v)
    return v, np.cross(u, v)


def _lattice_sites(semi_axes_A: np.ndarray) -> np.ndarray:
    """Integer lattice sites (m, 3) inside an ellipsoid, the ones nearest the centre first."""
    m = int(np.ceil(semi_axes_A.max() / LATTICE_A)) + 1
    g = np.stack(np.meshgrid(*[np.arange(-m, m + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    inside = (((g * LATTICE_A) / semi_axes_A) ** 2).sum(1) <= 1.0
    g = g[inside]
    if g.shape[0] == 0:
        g = np.zeros((1, 3), dtype=np.int64)
    return g[np.argsort((g * g).sum(1), kind="stable")]


_STEPS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])


def _walk(sites: np.ndarray, n_edges: int, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """Self-avoiding walk(s) over ``sites``: a list of chains of lattice points."""
    free = {tuple(s) for s in sites.tolist()}

    def n_free(p) -> int:
        return sum((p[0] + d[0], p[1] + d[1], p[2] + d[2]) in free for d in _STEPS.tolist())

    # Start on the surface (the site farthest from the centre along a random direction).
    start = tuple(sites[np.argmax(sites @ rng.normal(size=3))].tolist())
    chains = [[start]]
    free.discard(start)
    direction = None
    run = 0
    edges = 0
    while edges < n_edges and free:
        cur = chains[-1][-1]
        cands = [
            (cur[0] + d[0], cur[1] + d[1], cur[2] + d[2])
            for d in _STEPS.tolist()
            if (cur[0] + d[0], cur[1] + d[1], cur[2] + d[2]) in free
        ]
        if not cands:
            # Trapped: jump to the nearest free site and start a new chain there.
            pts = np.array(sorted(free))
            nxt = tuple(pts[np.argmin(((pts - np.array(cur)) ** 2).sum(1))].tolist())
            chains.append([nxt])
            free.discard(nxt)
            direction, run = None, 0
            continue
        straight = None
        if direction is not None:
            s = (cur[0] + direction[0], cur[1] + direction[1], cur[2] + direction[2])
            straight = s if s in free else None
        if straight is not None and run < 5 and rng.random() < 0.8:
            nxt = straight
        elif rng.random() < 0.7:
            scores = np.array([n_free(c) for c in cands]) + rng.random(len(cands)) * 0.5
            nxt = cands[int(np.argmin(scores))]
        else:
            nxt = cands[int(rng.integers(len(cands)))]
        d = (nxt[0] - cur[0], nxt[1] - cur[1], nxt[2] - cur[2])
        run = run + 1 if d == direction else 1
        direction = d
        chains[-1].append(nxt)
        free.discard(nxt)
        edges += 1
    return [[np.array(p, dtype=np.float64) * LATTICE_A for p in ch] for ch in chains]


def _residues_on_chain(chain: list[np.ndarray], rng: np.random.Generator):
    """Backbone and side-chain positions (each (m, 3) Å) along one lattice chain."""
    ca: list[np.ndarray] = []
    sc: list[np.ndarray] = []
    k = 0
    while k < len(chain) - 1:
        u = chain[k + 1] - chain[k]
        # Extend the run while the direction stays the same.
        m = 1
        while k + m < len(chain) - 1 and np.array_equal(chain[k + m + 1] - chain[k + m], u):
            m += 1
        u = u / LATTICE_A
        e1, e2 = _perpendicular_basis(u, rng)
        p0 = chain[k]
        if m >= 2:  # α-helix along the run
            n = int(m * LATTICE_A / 1.5)
            t = (np.arange(n) + 0.5) * 1.5
            phi = np.deg2rad(100.0) * np.arange(n) + rng.uniform(0, 2 * np.pi)
            radial = np.cos(phi)[:, None] * e1 + np.sin(phi)[:, None] * e2
            radial_sc = np.cos(phi + 0.3)[:, None] * e1 + np.sin(phi + 0.3)[:, None] * e2
            axis = p0 + t[:, None] * u
            ca.append(axis + 2.3 * radial)
            sc.append(axis + 4.3 * radial_sc)
        else:  # β-hairpin: two antiparallel strands 4.8 Å apart
            t = np.array([1.65, 4.95, 8.25])
            up = np.where(np.arange(3) % 2 == 0, 1.0, -1.0)[:, None] * e2
            s1 = p0 + t[:, None] * u + 2.4 * e1
            s2 = p0 + t[::-1, None] * u - 2.4 * e1
            ca += [s1, s2]
            sc += [s1 + 2.5 * up, s2 - 2.5 * up]
        k += m
    if not ca:  # a single site: one residue
        ca, sc = [chain[0][None]], [chain[0][None] + np.array([[0.0, 0.0, 2.5]])]
    return np.concatenate(ca), np.concatenate(sc)


def fold_domain(mass_kDa: float, rng: np.random.Generator, aspect=(1.25, 1.0, 0.8)) -> PseudoAtoms:
    """One compact globular domain of about ``mass_kDa``, centred at its centre of mass.

    ``aspect``: relative semi-axes of the ellipsoid the chain fills (the product is
    normalised to 1); the domain is randomly rotated.
    """
    n_res = max(1, int(round(mass_kDa * 1000.0 / DA_PER_RESIDUE)))
    aspect = np.asarray(aspect, dtype=np.float64)
    aspect = aspect / np.prod(aspect) ** (1 / 3)
    r_eq = (3.0 * n_res * A3_PER_RESIDUE / (4.0 * np.pi)) ** (1 / 3)
    sites = _lattice_sites(np.maximum(r_eq * aspect, 0.5 * LATTICE_A))
    chains = _walk(sites, n_edges=n_res, rng=rng)
    ca_parts, sc_parts = zip(*(_residues_on_chain(ch, rng) for ch in chains), strict=True)
    ca, sc = np.concatenate(ca_parts)[:n_res], np.concatenate(sc_parts)[:n_res]
    n = ca.shape[0]
    weights = np.concatenate([np.full(n, 56.0), rng.uniform(15.0, 100.0, n)])
    sigmas = np.concatenate([np.full(n, 1.0), np.full(n, 1.2)])
    atoms = PseudoAtoms(np.concatenate([ca, sc]), weights, sigmas)
    com = atoms.centre_of_mass_A()
    rot = _random_rotation(rng)
    return atoms.transformed(rot, -rot @ com)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _domain_radius_A(mass_kDa: float) -> float:
    n_res = mass_kDa * 1000.0 / DA_PER_RESIDUE
    return float((3.0 * n_res * A3_PER_RESIDUE / (4.0 * np.pi)) ** (1 / 3))


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *keys]))


# -- the phantoms ------------------------------------------------------------------------


def _asym_layout(scale: float) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Domain centres (Å) in an irregular tetrahedron, the hinge and swing axis of the last."""
    r = [_domain_radius_A(m * scale**3) for m in _ASYM_DOMAINS_KDA]

    def d(i: int, j: int) -> float:  # neighbouring domains interpenetrate a little
        return 0.7 * (r[i] + r[j])

    c1 = np.zeros(3)
    c2 = np.array([d(0, 1), 0.0, 0.0])
    # c3 in the xy plane at distances d13, d23; c4 above it at d14, d24, d34 (trilateration).
    x3 = (d(0, 2) ** 2 - d(1, 2) ** 2 + c2[0] ** 2) / (2 * c2[0])
    c3 = np.array([x3, np.sqrt(max(d(0, 2) ** 2 - x3**2, 0.0)), 0.0])
    x4 = (d(0, 3) ** 2 - d(1, 3) ** 2 + c2[0] ** 2) / (2 * c2[0])
    y4 = (d(0, 3) ** 2 - d(2, 3) ** 2 + c3 @ c3 - 2 * x4 * c3[0]) / (2 * c3[1])
    c4 = np.array([x4, y4, np.sqrt(max(d(0, 3) ** 2 - x4**2 - y4**2, 0.0))])
    # The small domain swings about its contact with domain 2, away from domain 1.
    hinge = c2 + (c4 - c2) * r[1] / (r[1] + r[3])
    axis = _unit(np.cross(c1 - c2, c4 - c2))
    return [c1, c2, c3, c4], hinge, axis


def _axis_rotation(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    x, y, z = axis
    K = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K


def _without_clashes(part: PseudoAtoms, others: list[PseudoAtoms], min_A: float = 3.0):
    """``part`` less the residues (backbone + side chain) within ``min_A`` of ``others``.

    Neighbouring domains interpenetrate a little; dropping the clashing residues
    keeps the density at protein level at the interfaces.
    """
    if not others:
        return part
    from scipy.spatial import cKDTree

    tree = cKDTree(np.concatenate([o.positions_A for o in others]))
    dist, _ = tree.query(part.positions_A)
    n = len(part) // 2  # atoms are [backbone(n), side chains(n)]
    keep = np.tile((dist[:n] >= min_A) & (dist[n:] >= min_A), 2)
    return PseudoAtoms(part.positions_A[keep], part.weights[keep], part.sigmas_A[keep])


def _asym_pair(seed: int, scale: float) -> tuple[PseudoAtoms, PseudoAtoms]:
    centres, hinge, axis = _asym_layout(scale)
    aspects = [(1.2, 1.0, 0.8), (1.0, 1.15, 0.85), (1.25, 0.9, 0.85), (1.1, 1.05, 0.9)]
    domains = [
        fold_domain(m * scale**3, _rng(seed, 1, k), aspects[k]).transformed(np.eye(3), centres[k])
        for k, m in enumerate(_ASYM_DOMAINS_KDA)
    ]
    R = _axis_rotation(axis, _SWING_DEG)
    moved = domains[-1].transformed(R, hinge - R @ hinge)
    core = []
    for d in domains[:-1]:
        core.append(_without_clashes(d, core))
    a = PseudoAtoms.concat(core + [_without_clashes(domains[-1], core)])
    b = PseudoAtoms.concat(core + [_without_clashes(moved, core)])
    com = a.centre_of_mass_A()
    return a.transformed(np.eye(3), -com), b.transformed(np.eye(3), -com)


def _group_matrices(name: str) -> np.ndarray:
    """(n, 3, 3) matrices of a point group in RELION's conventions."""
    try:
        from streamem.core.symmetry import symmetry_matrices
    except ImportError:
        symmetry_matrices = None
    if symmetry_matrices is not None:
        return np.asarray(symmetry_matrices(name), dtype=np.float64)
    # Fallback while streamem.core.symmetry is missing: C_n about z, D_n adds a 2-fold about x.
    kind, n = name[0].upper(), name[1:]
    if kind not in "CD" or not n.isdigit():
        raise InputError(None, f"symmetry {name} needs streamem.core.symmetry")
    n = int(n)
    cyc = euler_to_matrix(np.arange(n) * 360.0 / n, np.zeros(n), np.zeros(n))
    if kind == "C":
        return cyc
    flip = np.diag([1.0, -1.0, -1.0])
    return np.concatenate([cyc, cyc @ flip])


def _symmetric(name: str, seed: int, scale: float) -> PseudoAtoms:
    mats = _group_matrices(name)
    n = mats.shape[0]
    m_asu = _SYMMETRIC[name] * scale**3
    r = _domain_radius_A(m_asu)
    if name[0] == "C":
        rad = 0.75 * r / np.sin(np.pi / n)
        centre = np.array([rad * np.cos(0.35), rad * np.sin(0.35), 0.3 * r])
    elif name[0] == "D":
        k = n // 2
        rad = 0.75 * r / np.sin(np.pi / k)
        phi = np.pi / (2 * k)  # between two 2-fold axes
        centre = np.array([rad * np.cos(phi), rad * np.sin(phi), 0.75 * r])
    else:
        # A general position on a shell: the direction whose copies are farthest apart.
        rad = 0.85 * r * np.sqrt(n / 3.0)
        dirs = np.random.default_rng(20240611).normal(size=(256, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        copies = np.einsum("gij,dj->dgi", mats, dirs)  # (256, n, 3)
        gap = np.linalg.norm(copies[:, :, None] - copies[:, None], axis=-1)
        gap[:, np.arange(n), np.arange(n)] = np.inf
        centre = rad * dirs[int(np.argmax(gap.min(axis=(1, 2))))]
    asu = fold_domain(m_asu, _rng(seed, 2), (1.35, 1.0, 0.75)).transformed(np.eye(3), centre)
    whole = PseudoAtoms.concat([asu.transformed(R) for R in mats])
    # The centre of mass lies on every symmetry axis (for C_n: on z), so centring keeps symmetry.
    return whole.transformed(np.eye(3), -whole.centre_of_mass_A())


def edge_deletion_mask(atoms: PseudoAtoms, fraction: float) -> np.ndarray:
    """(n,) bool: the atoms kept when a cap of ``fraction`` of the mass is removed at an edge.

    The cap: the atoms nearest the atom farthest from the centre of mass (a compact,
    roughly spherical piece at the molecule's surface), in order of distance, until
    their mass reaches ``fraction`` of the total.
    """
    com = atoms.centre_of_mass_A()
    edge = atoms.positions_A[int(np.argmax(np.linalg.norm(atoms.positions_A - com, axis=1)))]
    order = np.argsort(np.linalg.norm(atoms.positions_A - edge, axis=1), kind="stable")
    removed_mass = np.cumsum(atoms.weights[order])
    n_removed = int(np.searchsorted(removed_mass, fraction * atoms.weights.sum())) + 1
    keep = np.ones(len(atoms), bool)
    keep[order[:n_removed]] = False
    return keep


def deletion_fraction(name: str, box_A: float | None = None, seed: int = 0) -> float:
    """The mass fraction that phantom ``name`` lacks relative to ``asym`` (0 for others)."""
    name = _canonical(name)
    if name not in _DELETIONS:
        return 0.0
    full = phantom_atoms("asym", box_A, seed).mass_kDa
    return 1.0 - phantom_atoms(name, box_A, seed).mass_kDa / full


def list_phantoms() -> list[str]:
    """Names accepted by :func:`phantom` and :func:`phantom_atoms`."""
    return [*_ASYM_FAMILY, *_SYMMETRIC]


def _canonical(name: str) -> str:
    for known in list_phantoms():
        if name.lower() == known.lower():
            return known
    raise InputError(None, f"unknown phantom {name!r} (choose from {', '.join(list_phantoms())})")


def _build(name: str, seed: int, scale: float) -> PseudoAtoms:
    if name in _ASYM_FAMILY:
        a, b = _asym_pair(seed, scale)
        if name in _DELETIONS:
            keep = edge_deletion_mask(a, _DELETIONS[name])
            return PseudoAtoms(a.positions_A[keep], a.weights[keep], a.sigmas_A[keep])
        return a if name == "asym" else b
    return _symmetric(name, seed, scale)


def _fit_radius(name: str, seed: int, scale: float) -> float:
    if name in _ASYM_FAMILY:  # every state shares one scale (that of asym and asym-B)
        return max(p.radius_A() for p in _asym_pair(seed, scale))
    return _build(name, seed, scale).radius_A()


def phantom_atoms(name: str, box_A: float | None = None, seed: int = 0) -> PseudoAtoms:
    """The pseudo-atoms of phantom ``name``, centred, shrunk to fit ``box_A`` if given.

    The molecule's diameter (atoms plus 3σ) is at most ``FIT_FRACTION * box_A``.
    """
    name = _canonical(name)
    scale = 1.0
    if box_A is not None:
        limit = 0.5 * FIT_FRACTION * float(box_A)
        # Shrinking changes the number of residues, so iterate to a fixed point.
        for _ in range(6):
            radius = _fit_radius(name, seed, scale)
            if radius <= limit:
                break
            scale *= 0.98 * limit / radius
    return _build(name, seed, scale)


def phantom(name: str, box_size: int, pixel_size_A: float, seed: int = 0) -> np.ndarray:
    """Density map ``(B, B, B)`` float32 (``[z, y, x]``, Da/Å³) of a built-in phantom.

    The centre of mass is at voxel ``B // 2``. See the module docstring for names.
    """
    if box_size < 8:
        raise InputError(None, f"box size {box_size} is too small for a phantom (min 8)")
    if pixel_size_A <= 0:
        raise InputError(None, f"pixel size must be positive, got {pixel_size_A}")
    atoms = phantom_atoms(name, box_A=box_size * pixel_size_A, seed=seed)
    return render_atoms(atoms, box_size, pixel_size_A)
