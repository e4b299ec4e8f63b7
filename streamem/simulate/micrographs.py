"""Simulated micrographs with particles at known coordinates, for picking and extraction.

Each micrograph (S x S pixels) is built from its own generator
(``SeedSequence([seed, 5, m])``), so results do not depend on the number of workers:

1. particle centres are placed by random sequential addition: at least one
   particle diameter apart, at least ``box_size // 2 + 1`` pixels from the edges
   (so every particle's box lies inside), off the carbon and clear of ice blobs;
2. each particle is the simulator's real-space projection
   (:mod:`streamem.simulate.projection`) at a uniform random pose, shifted by the
   sub-pixel part of its centre and added to the micrograph's projected potential;
3. distractors: a carbon edge (the rim of a circular hole, a curved edge of
   100 Å thick carbon with fine amorphous texture) and ice contaminant blobs
   (projected spheres of 100-300 Å radius);
4. one CTF for the whole micrograph (``ctf_rfft`` on the S x S grid, RELION's
   formula) multiplies the potential's FT; the raw micrograph is the *negative*
   of that (dark protein, as recorded: ``relion_preprocess --invert_contrast``
   makes it white), minus an absorption term that darkens carbon and ice (not
   filtered by the CTF), plus white Gaussian noise of variance ``S / snr``, with S
   the mean variance of a CTF-modulated particle projection over its box (the
   definition of :mod:`streamem.simulate.particles`).

Coordinates: ``rlnCoordinateX/Y`` are 0-based pixel indices (x = column, y = row,
floats) of the point that becomes the box centre ``box // 2`` on extraction: a
particle's centre of mass sits exactly there.

Outputs in ``out_dir`` (written under a temporary name, then renamed):

- ``mic_001.mrc`` ... float32, voxel size in the header;
- ``mic_001_coords.star``: one ``data_`` block with ``rlnCoordinateX``,
  ``rlnCoordinateY`` (RELION coordinate file), and ``coordinates.star``
  (``data_coordinate_files``: ``rlnMicrographName``, ``rlnMicrographCoordinates``,
  as RELION 4's pickers write);
- ``micrographs.star``: RELION 3.1 ``data_optics`` + ``data_micrographs``
  (``rlnMicrographName``, ``rlnOpticsGroup``, ``rlnDefocusU/V``, ``rlnCtfAstigmatism``,
  ``rlnDefocusAngle``, ``rlnCtfMaxResolution``, ``rlnCtfFigureOfMerit``);
- ``truth_particles.star`` (``data_particles``: micrograph, coordinates, angles,
  class, defocus) and ``truth_class001.mrc`` (the volume), ``simulation.json``
  (parameters, particle diameter in Å).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import scipy.special
import starfile

from streamem import __version__
from streamem.core.backend import irfftn, rfftn
from streamem.core.ctf import OpticsParams, ctf_rfft
from streamem.core.euler import euler_to_matrix
from streamem.dist.tasks import run_tasks
from streamem.errors import InputError
from streamem.io.atomic import atomic_output, check_output
from streamem.io.mrc import write_map
from streamem.simulate.projection import RealSpaceProjector, shift_phases

CARBON_THICKNESS_A = 100.0
CARBON_DENSITY = 1.0  # relative to the phantoms' protein (~0.8), both above vitreous ice
ICE_DENSITY = 0.3
ABSORPTION = 0.02  # darkening per unit of projected potential, for carbon and ice


@dataclass(frozen=True)
class MicrographSimParams:
    """Parameters of :func:`simulate_micrographs` (units in the names)."""

    n_micrographs: int = 4
    size_px: int = 1024
    pixel_size_A: float = 1.5
    particles_per_micrograph: int = 50
    box_size: int = 128
    snr: float = 0.05
    seed: int = 0
    defocus_range_A: tuple[float, float] = (10000.0, 30000.0)
    astigmatism_A: float = 500.0
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    bfactor_A2: float = 0.0
    carbon_edge: bool = True
    ice_blobs: int = 2
    particle_diameter_A: float | None = None

    def __post_init__(self):
        problems = []
        if self.n_micrographs < 1:
            problems.append(f"need at least one micrograph, got {self.n_micrographs}")
        if self.box_size < 8 or self.size_px < 2 * self.box_size + 4:
            problems.append(
                f"micrograph size {self.size_px} must exceed twice the box {self.box_size}"
            )
        if self.pixel_size_A <= 0 or not self.snr > 0:
            problems.append("pixel size and SNR must be positive")
        lo, hi = self.defocus_range_A
        if not 0 < lo <= hi:
            problems.append(f"defocus range must satisfy 0 < min <= max, got {lo}, {hi}")
        if self.particles_per_micrograph < 0 or self.ice_blobs < 0:
            problems.append("particle and ice blob counts must be >= 0")
        if not 0 <= self.amplitude_contrast < 1 or self.voltage_kV <= 0:
            problems.append("voltage must be > 0 and amplitude contrast in [0, 1)")
        if problems:
            raise InputError(None, "; ".join(problems))

    @property
    def optics(self) -> OpticsParams:
        return OpticsParams(self.voltage_kV, self.cs_mm, self.amplitude_contrast)


@dataclass(frozen=True)
class MicrographSet:
    """What :func:`simulate_micrographs` wrote (paths absolute) and the truth table."""

    out_dir: Path
    micrographs: list[Path]
    coordinate_files: list[Path]
    micrographs_star: Path
    coordinates_star: Path
    truth_star: Path
    truth: pd.DataFrame
    particle_diameter_A: float


def particle_diameter_px(volume: np.ndarray, rel_threshold: float = 0.01) -> float:
    """Diameter (pixels) of the sphere about ``B // 2`` holding voxels above ``rel_threshold * max``."""
    v = np.asarray(volume)
    idx = np.nonzero(v > rel_threshold * v.max())
    c = v.shape[0] // 2
    r2 = sum((i.astype(np.float64) - c) ** 2 for i in idx)
    return 2.0 * float(np.sqrt(r2.max())) + 1.0


def place_particles(
    rng: np.random.Generator,
    size_px: int,
    n: int,
    min_distance_px: float,
    margin_px: float,
    allowed=None,
    max_tries: int = 100,
) -> np.ndarray:
    """Up to ``n`` centres ``(m, 2)`` (y, x) pixels, pairwise >= ``min_distance_px`` apart.

    Centres lie in ``[margin_px, size_px - 1 - margin_px]``; ``allowed(yx) -> bool`` may
    veto a candidate (carbon, ice). Random sequential addition with ``max_tries * n``
    candidates: crowded micrographs get fewer particles, never overlapping ones.
    """
    hi = size_px - 1 - margin_px
    if hi <= margin_px or n == 0:
        return np.zeros((0, 2))
    placed: list[np.ndarray] = []
    for _ in range(max_tries * n):
        p = rng.uniform(margin_px, hi, size=2)
        if allowed is not None and not allowed(p):
            continue
        if placed and np.min(np.sum((np.array(placed) - p) ** 2, axis=1)) < min_distance_px**2:
            continue
        placed.append(p)
        if len(placed) == n:
            break
    return np.array(placed).reshape(-1, 2)


def _carbon(rng: np.random.Generator, s: int):
    """Carbon outside a large circular hole whose rim crosses the micrograph.

    Returns (hole centre (y, x), hole radius) in pixels.
    """
    radius = s * rng.uniform(2.0, 4.0)
    angle = rng.uniform(0, 2 * np.pi)
    # the rim passes through a point 60-85 % of the way across, so carbon covers a corner
    rim = (s / 2) + s * rng.uniform(0.1, 0.35) * np.array([np.sin(angle), np.cos(angle)])
    centre = rim - radius * np.array([np.sin(angle), np.cos(angle)])
    return centre, radius


def _micrograph(m: int, params: MicrographSimParams, projector, noise_sigma: float, diam_px: float):
    """Task: one micrograph -> (image (S, S) float32, truth rows, CTF (U, V, angle))."""
    p = params
    s, b = p.size_px, p.box_size
    rng = np.random.default_rng(np.random.SeedSequence([p.seed, 5, m]))
    lo, hi = p.defocus_range_A
    mean_def = rng.uniform(lo, hi)
    astig = p.astigmatism_A * rng.random()
    du, dv, dang = mean_def + astig / 2, mean_def - astig / 2, 180.0 * rng.random()

    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    potential = np.zeros((s, s), dtype=np.float32)
    absorbing = np.zeros((s, s), dtype=np.float32)
    hole = None
    if p.carbon_edge:
        centre, radius = _carbon(rng, s)
        dist = np.hypot(yy - centre[0], xx - centre[1]) - radius  # > 0 on carbon
        carbon = scipy.special.expit(dist / 2.0)  # soft 2-pixel edge (no overflow far away)
        texture = rng.standard_normal((s, s)).astype(np.float32)
        thick_px = CARBON_THICKNESS_A / p.pixel_size_A
        carbon_pot = CARBON_DENSITY * thick_px * carbon * (1.0 + 0.15 * texture)
        potential += carbon_pot
        absorbing += carbon_pot
        hole = (centre, radius)
    blobs = []
    for _ in range(p.ice_blobs):
        r_px = rng.uniform(100.0, 300.0) / p.pixel_size_A
        c = rng.uniform(0, s, size=2)
        d2 = (yy - c[0]) ** 2 + (xx - c[1]) ** 2
        chord = 2.0 * np.sqrt(np.clip(r_px**2 - d2, 0.0, None))
        potential += ICE_DENSITY * chord
        absorbing += ICE_DENSITY * chord
        blobs.append((c, r_px))

    def allowed(yx) -> bool:
        if hole is not None and np.hypot(*(yx - hole[0])) > hole[1] - diam_px / 2:
            return False
        return all(np.hypot(*(yx - c)) > r + diam_px / 2 for c, r in blobs)

    centres = place_particles(
        rng, s, p.particles_per_micrograph, diam_px, b // 2 + 1, allowed=allowed
    )
    n = centres.shape[0]
    u = rng.random((n, 3))
    rot, tilt, psi = 360.0 * u[:, 0], np.rad2deg(np.arccos(2.0 * u[:, 1] - 1.0)), 360.0 * u[:, 2]
    if n:
        whole = np.floor(centres).astype(np.int64)
        frac = centres - whole
        proj = projector.project(euler_to_matrix(rot, tilt, psi))  # (n, B, B)
        ft = rfftn(proj, axes=(-2, -1)) * shift_phases(b, frac)
        proj = np.asarray(irfftn(ft, s=(b, b), axes=(-2, -1)), dtype=np.float32)
        for k in range(n):
            y0, x0 = whole[k] - b // 2
            potential[y0 : y0 + b, x0 : x0 + b] += proj[k]
    image = -_apply_ctf(potential, ctf_params=(du, dv, dang), params=p)
    image -= ABSORPTION * noise_sigma * absorbing
    image += noise_sigma * rng.standard_normal((s, s)).astype(np.float32)
    rows = {
        "rlnCoordinateX": centres[:, 1],
        "rlnCoordinateY": centres[:, 0],
        "rlnAngleRot": rot,
        "rlnAngleTilt": tilt,
        "rlnAnglePsi": psi,
    }
    return image.astype(np.float32), rows, (du, dv, dang)


def _apply_ctf(potential: np.ndarray, ctf_params, params: MicrographSimParams) -> np.ndarray:
    """CTF-filtered potential ``(S, S)``; mirror-padded by half a box so edges do not wrap."""
    s = potential.shape[0]
    pad = params.box_size // 2
    big = np.pad(potential, pad, mode="symmetric")
    n = big.shape[0]
    du, dv, dang = ctf_params
    ctf = ctf_rfft(
        n, params.pixel_size_A, du, dv, dang, params.optics, bfactor_A2=params.bfactor_A2
    )
    out = irfftn(rfftn(big, axes=(0, 1)) * ctf, s=(n, n), axes=(0, 1))
    return np.asarray(out[pad : pad + s, pad : pad + s])


def _reference_variance(params: MicrographSimParams, projector, n_ref: int = 32) -> float:
    """S: mean variance over the box of CTF-modulated projections at random poses/defoci."""
    p = params
    rng = np.random.default_rng(np.random.SeedSequence([p.seed, 6]))
    u = rng.random((n_ref, 5))
    rots = euler_to_matrix(360 * u[:, 0], np.rad2deg(np.arccos(2 * u[:, 1] - 1)), 360 * u[:, 2])
    lo, hi = p.defocus_range_A
    defocus = lo + (hi - lo) * u[:, 3]
    ctf = ctf_rfft(p.box_size, p.pixel_size_A, defocus, defocus, 0.0 * defocus, p.optics,
                   bfactor_A2=p.bfactor_A2)  # fmt: skip
    proj = projector.project(rots)
    clean = irfftn(rfftn(proj, axes=(-2, -1)) * ctf, s=proj.shape[-2:], axes=(-2, -1))
    return float(np.asarray(clean).reshape(n_ref, -1).var(axis=1).mean())


def _write_micrograph(path: Path, coords: Path, image, rows, pixel_size_A: float) -> None:
    write_map(path, image, pixel_size_A)
    starfile.write(
        pd.DataFrame(
            {"rlnCoordinateX": rows["rlnCoordinateX"], "rlnCoordinateY": rows["rlnCoordinateY"]}
        ),
        coords,
    )


def _one(m: int, tmp: str, names: tuple[str, str], params, projector, sigma, diam_px):
    image, rows, ctf = _micrograph(m, params, projector, sigma, diam_px)
    _write_micrograph(Path(tmp) / names[0], Path(tmp) / names[1], image, rows, params.pixel_size_A)
    return rows, ctf


def simulate_micrographs(
    out_dir: str | Path,
    n_micrographs: int = 4,
    size_px: int = 1024,
    pixel_size_A: float = 1.5,
    particles_per_micrograph: int = 50,
    box_size: int = 128,
    phantom: str = "asym",
    volume: np.ndarray | None = None,
    snr: float = 0.05,
    seed: int = 0,
    defocus_range_A: tuple[float, float] = (10000.0, 30000.0),
    astigmatism_A: float = 500.0,
    voltage_kV: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    bfactor_A2: float = 0.0,
    carbon_edge: bool = True,
    ice_blobs: int = 2,
    particle_diameter_A: float | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    inputs: Sequence[str | Path] = (),
    client=None,
) -> MicrographSet:
    """Write ``n_micrographs`` simulated micrographs and their truth into ``out_dir``.

    ``volume`` ((B, B, B) map, ``B = box_size``) or the built-in ``phantom``. The
    minimum distance between particle centres is ``particle_diameter_A`` (default:
    the volume's diameter). See the module docstring for the image model and files.
    ``inputs``: the file the volume was read from (the output may not touch it).
    One task per micrograph, on ``client``'s cluster (a ``distributed.Client``; its
    workers must see ``out_dir``'s folder), else on ``workers`` threads.
    """
    out_dir = Path(out_dir)
    params = MicrographSimParams(
        n_micrographs=int(n_micrographs),
        size_px=int(size_px),
        pixel_size_A=float(pixel_size_A),
        particles_per_micrograph=int(particles_per_micrograph),
        box_size=int(box_size),
        snr=float(snr),
        seed=int(seed),
        defocus_range_A=(float(defocus_range_A[0]), float(defocus_range_A[1])),
        astigmatism_A=float(astigmatism_A),
        voltage_kV=float(voltage_kV),
        cs_mm=float(cs_mm),
        amplitude_contrast=float(amplitude_contrast),
        bfactor_A2=float(bfactor_A2),
        carbon_edge=bool(carbon_edge),
        ice_blobs=int(ice_blobs),
        particle_diameter_A=particle_diameter_A,
    )
    check_output(out_dir, overwrite, inputs)
    if volume is None:
        from streamem.simulate.phantoms import phantom as make_phantom

        volume = make_phantom(phantom, box_size, pixel_size_A, seed=seed)
    volume = np.asarray(volume, dtype=np.float32)
    if volume.shape != (box_size,) * 3:
        raise InputError(None, f"volume shape {volume.shape} does not match box {box_size}")
    diam_px = (
        particle_diameter_A / pixel_size_A if particle_diameter_A else particle_diameter_px(volume)
    )
    projector = RealSpaceProjector(volume)
    sigma = math.sqrt(_reference_variance(params, projector) / params.snr)
    width = max(3, len(str(params.n_micrographs)))
    names = [
        (f"mic_{m + 1:0{width}d}.mrc", f"mic_{m + 1:0{width}d}_coords.star")
        for m in range(params.n_micrographs)
    ]
    with atomic_output(out_dir, overwrite, inputs, "simulate-micrographs") as tmp:
        tmp.mkdir(parents=True)
        shared = dask.delayed(projector, name=f"micrograph-volume-{dask.base.tokenize(volume)}")
        folder = str(tmp.absolute())  # workers have their own working folder
        tasks = [
            dask.delayed(_one, pure=True)(m, folder, names[m], params, shared, sigma, diam_px)
            for m in range(params.n_micrographs)
        ]
        results = run_tasks(tasks, client, workers)
        _write_tables(tmp, params, names, results, volume, diam_px, sigma)
    truth = starfile.read(out_dir / "truth_particles.star")
    if isinstance(truth, dict):
        truth = next(iter(truth.values()))
    return MicrographSet(
        out_dir=out_dir.absolute(),
        micrographs=[(out_dir / a).absolute() for a, _ in names],
        coordinate_files=[(out_dir / c).absolute() for _, c in names],
        micrographs_star=(out_dir / "micrographs.star").absolute(),
        coordinates_star=(out_dir / "coordinates.star").absolute(),
        truth_star=(out_dir / "truth_particles.star").absolute(),
        truth=truth,
        particle_diameter_A=diam_px * pixel_size_A,
    )


def _write_tables(tmp: Path, p: MicrographSimParams, names, results, volume, diam_px, sigma):
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnMicrographOriginalPixelSize": [p.pixel_size_A],
            "rlnVoltage": [p.voltage_kV],
            "rlnSphericalAberration": [p.cs_mm],
            "rlnAmplitudeContrast": [p.amplitude_contrast],
            "rlnMicrographPixelSize": [p.pixel_size_A],
        }
    )
    ctfs = np.array([c for _, c in results]).reshape(-1, 3)
    mics = pd.DataFrame(
        {
            "rlnMicrographName": [a for a, _ in names],
            "rlnOpticsGroup": 1,
            "rlnDefocusU": ctfs[:, 0],
            "rlnDefocusV": ctfs[:, 1],
            "rlnCtfAstigmatism": np.abs(ctfs[:, 0] - ctfs[:, 1]),
            "rlnDefocusAngle": ctfs[:, 2],
            "rlnCtfMaxResolution": 2.0 * p.pixel_size_A,
            "rlnCtfFigureOfMerit": 1.0,
        }
    )
    starfile.write({"optics": optics, "micrographs": mics}, tmp / "micrographs.star")
    starfile.write(
        {
            "coordinate_files": pd.DataFrame(
                {
                    "rlnMicrographName": [a for a, _ in names],
                    "rlnMicrographCoordinates": [c for _, c in names],
                }
            )
        },
        tmp / "coordinates.star",
    )
    parts = []
    for (mic, _), (rows, ctf) in zip(names, results, strict=True):
        df = pd.DataFrame(rows)
        df.insert(0, "rlnMicrographName", mic)
        df["rlnClassNumber"] = 1
        df["rlnDefocusU"], df["rlnDefocusV"], df["rlnDefocusAngle"] = ctf
        parts.append(df)
    starfile.write({"particles": pd.concat(parts, ignore_index=True)}, tmp / "truth_particles.star")
    write_map(tmp / "truth_class001.mrc", volume, p.pixel_size_A)
    facts = {
        "command": "simulate-micrographs",
        "streamem_version": __version__,
        "params": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(p).items()},
        "particle_diameter_A": diam_px * p.pixel_size_A,
        "noise_sigma": sigma,
        "coordinate_convention": "0-based pixel index of the box centre (box // 2)",
    }
    (tmp / "simulation.json").write_text(json.dumps(facts, indent=2))
