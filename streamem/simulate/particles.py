"""Simulated particle images with ground truth, written straight into a particle store.

Image formation for particle i (all per-particle randomness comes from
``np.random.SeedSequence([seed, 0, i])``, so the data depend on the seed and the
particle's index only, never on the chunk size or the number of workers):

1. class: junk (0) with probability ``junk_fraction``, else volume k (1-based)
   with probability ``(1 - junk_fraction) * fractions[k]``;
2. pose A = ``euler_to_matrix(rot, tilt, psi)``: uniform on SO(3) (rot, psi
   uniform, cos(tilt) uniform) or, with ``orientation="preferred"``, a share
   ``preferred_fraction`` of top views (tilt from a Fisher distribution of spread
   ``preferred_spread_deg`` about 0) and the rest uniform;
3. projection ``P = sum_z V(Aᵀ (x, y, z))`` with the simulator's own real-space
   projector (:mod:`streamem.simulate.projection`), then a shift d (pixels,
   uniform in a disc of radius ``max_shift_A / pixel_size_A``): the particle's
   centre sits at ``box // 2 + d``, so the truth origin is
   ``rlnOriginX/YAngst = -d_x/y * pixel_size_A`` (RELION's sign, CONVENTIONS.md);
4. CTF: the image's FT is multiplied by ``ctf_rfft`` (RELION's sign: positive at
   low frequency, particles white); defocus is drawn per micrograph
   (``particles_per_micrograph`` consecutive particles, ``rlnMicrographName``
   ``mic{i // ppm:05d}.mrc``, from ``SeedSequence([seed, 1, micrograph])``) plus a
   per-particle offset of up to ±``defocus_spread_A`` (particle height in the ice);
5. Gaussian white noise of variance ``σ² = S / snr``. **S, the signal variance**, is
   the variance over the whole box of the clean, shifted, CTF-modulated projection,
   expected over poses, classes (never junk) and defoci, estimated from
   ``n_reference`` reference projections per class (:func:`signal_variance`). So
   the measured SNR, mean over particles of var(clean) / var(noise), is ``snr`` up
   to a few % on a set spanning many micrographs (one defocus alone can give a
   signal variance ~30 % off the average). Junk images are pure noise of the same σ;
6. normalisation as ``relion_preprocess``: each image minus the mean of its
   background (outside a circle of radius ``0.75 · box / 2``) divided by that
   background's standard deviation. The scale applies to signal and noise alike,
   so every image keeps its SNR.

The store gets CTF fields, ``rlnOpticsGroup`` (1), ``rlnRandomSubset`` (1, 2
alternating), ``rlnMicrographName`` and ``rlnCtfBfactor`` (if set) as metadata,
and the truth (``rlnAngleRot/Tilt/Psi``, ``rlnOriginX/YAngst``, ``rlnClassNumber``)
in the ``truth`` group. Truth volumes go next to the store as
``<stem>_truth_class001.mrc`` ... (``OUT.zarr`` -> ``OUT_truth_class001.mrc``);
their absolute paths are in the store's provenance (``truth_volumes``), see
:func:`truth_volume_paths`.

The job is one Dask task per store chunk (on threads here, or on a
distributed client's cluster); a task simulates its particles in batches,
writes its region and returns a count, so memory is about workers x one chunk
whatever N.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import dask
import numpy as np
from dask.callbacks import Callback

from streamem import __version__
from streamem.core.backend import irfftn, rfftn
from streamem.core.ctf import ctf_rfft
from streamem.core.euler import euler_to_matrix
from streamem.dist.tasks import run_tasks
from streamem.errors import InputError
from streamem.io.atomic import atomic_output, check_not_input, check_output
from streamem.io.mrc import write_map
from streamem.io.store import ParticleStore, create_store, default_chunk_size
from streamem.simulate.particle_draws import ParticleSimParams, draw_particles
from streamem.simulate.projection import RealSpaceProjector, shift_phases

log = logging.getLogger(__name__)

#: Particles simulated together inside a task (bounds the temporaries, not the result).
BATCH = 32


# -- image formation ----------------------------------------------------------------------


@dataclass(frozen=True)
class SimulatedImages:
    """A batch: ``images`` (n, B, B) normalised, ``clean`` (n, B, B) the signal part of
    ``images`` (same scale, before the background mean is removed), ``scale`` (n,) the
    normalisation factor applied (1 / background std)."""

    images: np.ndarray
    clean: np.ndarray
    scale: np.ndarray


def clean_images(
    params: ParticleSimParams, projectors: Sequence[RealSpaceProjector], draws: dict
) -> np.ndarray:
    """Noise-free shifted CTF-modulated projections ``(n, B, B)`` float32 (junk: zeros)."""
    b = params.box_size
    n = draws["class"].shape[0]
    proj = np.zeros((n, b, b), dtype=np.float32)
    rots = euler_to_matrix(draws["rot"], draws["tilt"], draws["psi"])  # (n, 3, 3)
    for k, projector in enumerate(projectors, start=1):
        sel = np.flatnonzero(draws["class"] == k)
        if sel.size:
            proj[sel] = projector.project(rots[sel])
    ft = rfftn(proj, axes=(-2, -1))  # (n, B, B//2+1)
    ft *= shift_phases(b, np.stack([draws["shift_y"], draws["shift_x"]], axis=-1))
    if params.ctf:
        ft *= ctf_rfft(
            b,
            params.pixel_size_A,
            draws["defocus_u"],
            draws["defocus_v"],
            draws["defocus_angle"],
            params.optics,
            bfactor_A2=params.bfactor_A2,
        )
    out = np.asarray(irfftn(ft, s=(b, b), axes=(-2, -1)), dtype=np.float32)
    out[draws["class"] == 0] = 0.0
    return out


def background_mask(box_size: int, radius_px: float) -> np.ndarray:
    """(B, B) bool: pixels farther than ``radius_px`` from the centre ``B // 2``."""
    ax = np.arange(box_size) - box_size // 2
    return (ax[:, None] ** 2 + ax[None, :] ** 2) > radius_px**2


def make_images(
    params: ParticleSimParams,
    projectors: Sequence[RealSpaceProjector],
    noise_sigma: float,
    draws: dict,
    rngs: Sequence[np.random.Generator],
) -> SimulatedImages:
    """Clean images plus white noise of std ``noise_sigma``, normalised like relion_preprocess."""
    b = params.box_size
    clean = clean_images(params, projectors, draws)
    noise = np.stack([rng.standard_normal((b, b), dtype=np.float32) for rng in rngs])
    noisy = clean + np.float32(noise_sigma) * noise
    bg = background_mask(b, params.bg_radius_px)
    mean = noisy[:, bg].mean(axis=1, dtype=np.float64)
    std = noisy[:, bg].std(axis=1, dtype=np.float64)
    scale = 1.0 / np.where(std > 0, std, 1.0)
    images = ((noisy - mean[:, None, None]) * scale[:, None, None]).astype(np.float32)
    return SimulatedImages(images, (clean * scale[:, None, None]).astype(np.float32), scale)


def signal_variance(params: ParticleSimParams, projectors: Sequence[RealSpaceProjector]) -> float:
    """S: the expected variance over the box of a clean (shifted, CTF-modulated) image.

    By Parseval, var = Σ_{k≠0} CTF(k)² |P̂(k)|² / B⁴ (full FFT); pose and defocus are
    drawn independently and a shift leaves |P̂| alone, so the expectation is
    Σ_k E[CTF(k)²] E[|P̂(k)|²] / B⁴. E[|P̂|²] averages ``n_reference`` projections at
    poses (and classes) drawn like real particles (``SeedSequence([seed, 2, j])``);
    E[CTF²] averages 8 x ``n_reference`` defoci drawn like real micrographs, which
    makes the defocus part of the average nearly exact.
    """
    p = params
    b = p.box_size
    power = np.zeros((b, b // 2 + 1))
    for k, weight, rots in _reference_poses(p):
        ft = rfftn(projectors[k - 1].project(rots), axes=(-2, -1))  # (n, B, B//2+1)
        power += weight * (np.abs(ft) ** 2).mean(axis=0)
    ctf2 = np.ones_like(power)
    if p.ctf:
        ctf2 = np.zeros_like(power)
        n_def = 8 * p.n_reference
        for start in range(0, n_def, 64):
            d, _ = draw_particles(p, start, min(start + 64, n_def), stream=2)
            c = ctf_rfft(b, p.pixel_size_A, d["defocus_u"], d["defocus_v"], d["defocus_angle"],
                         p.optics, bfactor_A2=p.bfactor_A2, dtype=np.float64)  # fmt: skip
            ctf2 += (c * c).sum(axis=0)
        ctf2 /= n_def
    # rfft half-plane: columns 1 .. ceil(B/2)-1 stand for two full-FFT coefficients
    weight = np.full(b // 2 + 1, 2.0)
    weight[0] = 1.0
    if b % 2 == 0:
        weight[-1] = 1.0
    total = (weight * ctf2 * power).sum() - ctf2[0, 0] * power[0, 0]  # without k = 0
    return float(total / b**4)


def _reference_poses(p: ParticleSimParams):
    """[(class k, weight, rotations (n, 3, 3))] for the signal-power average."""
    probs = p.class_probabilities[1:]
    probs = probs / probs.sum()
    n = p.n_reference
    draws, _ = draw_particles(p, 0, n, stream=2)  # in-plane angles (and poses if not uniform)
    if p.orientation == "uniform":
        j = np.arange(n)
        tilt = np.rad2deg(np.arccos(1.0 - (2.0 * j + 1.0) / n))
        rot = np.mod(j * 180.0 * (3.0 - np.sqrt(5.0)), 360.0)  # golden angle steps
        rots = euler_to_matrix(rot, tilt, draws["psi"])
    else:
        rots = euler_to_matrix(draws["rot"], draws["tilt"], draws["psi"])
    return [(k, w, rots) for k, w in enumerate(probs, start=1) if w > 0]


# -- the store job ----------------------------------------------------------------------------

META_FIELDS = {"rlnMicrographName": str}
CTF_META = {"rlnDefocusU": np.float64, "rlnDefocusV": np.float64, "rlnDefocusAngle": np.float64}
TRUTH_FIELDS = {
    "rlnAngleRot": np.float64,
    "rlnAngleTilt": np.float64,
    "rlnAnglePsi": np.float64,
    "rlnOriginXAngst": np.float64,
    "rlnOriginYAngst": np.float64,
    "rlnClassNumber": np.int32,
}


def particle_tables(params: ParticleSimParams, draws: dict, start: int) -> tuple[dict, dict]:
    """Metadata and truth columns ``{label: (n,)}`` for particles starting at ``start``."""
    n = draws["class"].shape[0]
    idx = np.arange(start, start + n)
    meta = {
        "rlnOpticsGroup": np.ones(n, dtype=np.int32),
        "rlnRandomSubset": (idx % 2 + 1).astype(np.int32),
        "rlnMicrographName": np.array(
            [f"mic{m:05d}.mrc" for m in draws["micrograph"]], dtype=object
        ),
    }
    if params.ctf:
        meta["rlnDefocusU"] = draws["defocus_u"]
        meta["rlnDefocusV"] = draws["defocus_v"]
        meta["rlnDefocusAngle"] = draws["defocus_angle"]
        if params.bfactor_A2:
            meta["rlnCtfBfactor"] = np.full(n, float(params.bfactor_A2))
    truth = {
        "rlnAngleRot": draws["rot"],
        "rlnAngleTilt": draws["tilt"],
        "rlnAnglePsi": draws["psi"],
        # the origin re-centres the particle: minus its offset from the box centre
        "rlnOriginXAngst": -draws["shift_x"] * params.pixel_size_A,
        "rlnOriginYAngst": -draws["shift_y"] * params.pixel_size_A,
        "rlnClassNumber": draws["class"].astype(np.int32),
    }
    return meta, truth


def simulate_chunk(
    start: int,
    stop: int,
    store_path: str,
    params: ParticleSimParams,
    projectors: Sequence[RealSpaceProjector],
    noise_sigma: float,
) -> int:
    """Task: simulate particles ``[start, stop)`` and write them into the store. Returns n."""
    b = params.box_size
    images = np.empty((stop - start, b, b), dtype=np.float32)
    tables = []
    for s in range(start, stop, BATCH):
        e = min(s + BATCH, stop)
        draws, rngs = draw_particles(params, s, e)
        images[s - start : e - start] = make_images(
            params, projectors, noise_sigma, draws, rngs
        ).images
        tables.append(particle_tables(params, draws, s))
    meta, truth = (
        {k: np.concatenate([t[g][k] for t in tables]) for k in tables[0][g]} for g in (0, 1)
    )
    store = ParticleStore(store_path)
    store.write_region(start, images=images, metadata=meta, truth=truth)
    return stop - start


def truth_volume_paths(store_path: str | Path) -> list[Path]:
    """Truth volumes of a simulated store (MRC files next to it), in class order."""
    prov = ParticleStore(store_path).facts.get("provenance", {})
    paths = []
    for absolute, name in zip(
        prov.get("truth_volumes", []), prov.get("truth_volume_files", []), strict=False
    ):
        p = Path(absolute)
        paths.append(p if p.exists() else Path(store_path).absolute().parent / name)
    return paths


def _truth_names(out_path: Path, k: int) -> list[Path]:
    stem = out_path.name[: -len(".zarr")] if out_path.name.endswith(".zarr") else out_path.name
    return [out_path.with_name(f"{stem}_truth_class{j:03d}.mrc") for j in range(1, k + 1)]


def _default_chunk(n: int, box: int) -> int:
    # At most the usual ~64 MiB chunk, but enough chunks to keep a few workers busy.
    return max(1, min(default_chunk_size(box), max(32, math.ceil(n / 8))))


def simulate_particles(
    out_path: str | Path,
    n_particles: int,
    box_size: int = 128,
    pixel_size_A: float = 1.5,
    snr: float = 0.05,
    seed: int = 0,
    phantom: str | Sequence[str] = "asym",
    volumes: Sequence[np.ndarray] | None = None,
    volume_names: Sequence[str] | None = None,
    mix: Sequence[float] | None = None,
    junk_fraction: float = 0.0,
    orientation: str = "uniform",
    preferred_fraction: float = 0.7,
    preferred_spread_deg: float = 20.0,
    max_shift_A: float = 3.0,
    defocus_range_A: tuple[float, float] = (10000.0, 30000.0),
    astigmatism_A: float = 500.0,
    voltage_kV: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    bfactor_A2: float = 0.0,
    chunk_size: int | None = None,
    shard_size: int | None | str = "auto",
    ctf: bool = True,
    particles_per_micrograph: int = 100,
    overwrite: bool = False,
    progress: bool = False,
    relion_dir: str | Path | None = None,
    workers: int | None = None,
    inputs: Sequence[str | Path] = (),
    client=None,
) -> ParticleStore:
    """Simulate ``n_particles`` images into a new store at ``out_path``; returns the store.

    Volumes: ``volumes`` (a list of (B, B, B) maps, ``[z, y, x]`` centred at ``B // 2``)
    or else the built-in ``phantom`` name(s) (:func:`streamem.simulate.phantoms.phantom`,
    e.g. ``["asym", "asym-B"]`` for two classes).
    ``mix``: one fraction per volume (normalised; default equal). See the module
    docstring for the image formation and what is stored. ``relion_dir``: also write
    ``relion_dir/particles.star`` and its MRCS stacks (RELION 3.1), and ``truth.star``
    (:mod:`streamem.io.truth_star`). The chunk tasks run on ``client``'s cluster (a
    ``distributed.Client``; its workers must see the
    output's folder), else on ``workers`` threads (default: all cores). ``inputs``:
    files the volumes were read from (no output may touch them).
    """
    out_path = Path(out_path)
    if volumes is None:
        from streamem.simulate.phantoms import phantom as make_phantom

        wanted = [phantom] if isinstance(phantom, str) else list(phantom)
        volumes = [make_phantom(name, box_size, pixel_size_A, seed=seed) for name in wanted]
        volume_names = volume_names or wanted
    volumes = [np.asarray(v, dtype=np.float32) for v in volumes]
    for v in volumes:
        if v.shape != (box_size,) * 3:
            raise InputError(None, f"volume shape {v.shape} does not match box {box_size}")
        if not np.all(np.isfinite(v)):
            raise InputError(None, "volume has NaN or Inf values")
    names = tuple(volume_names or [f"volume{k + 1}" for k in range(len(volumes))])
    if mix is None:
        mix = [1.0] * len(volumes)
    if len(mix) != len(volumes):
        raise InputError(None, f"{len(mix)} mix fractions for {len(volumes)} volumes")
    params = ParticleSimParams(
        n_particles=int(n_particles),
        box_size=int(box_size),
        pixel_size_A=float(pixel_size_A),
        snr=float(snr),
        seed=int(seed),
        fractions=tuple(float(f) for f in mix),
        junk_fraction=float(junk_fraction),
        orientation=orientation,
        preferred_fraction=float(preferred_fraction),
        preferred_spread_deg=float(preferred_spread_deg),
        max_shift_A=float(max_shift_A),
        defocus_range_A=(float(defocus_range_A[0]), float(defocus_range_A[1])),
        astigmatism_A=float(astigmatism_A),
        voltage_kV=float(voltage_kV),
        cs_mm=float(cs_mm),
        amplitude_contrast=float(amplitude_contrast),
        bfactor_A2=float(bfactor_A2),
        ctf=bool(ctf),
        particles_per_micrograph=int(particles_per_micrograph),
        volume_names=names,
    )
    truth_paths = _truth_names(out_path, len(volumes))
    inputs = list(inputs)
    check_output(out_path, overwrite, inputs)
    for p in truth_paths:
        check_output(p, overwrite, inputs)
    if relion_dir is not None:
        check_not_input(relion_dir, inputs)
        check_output(Path(relion_dir) / "particles.star", overwrite, inputs)
        check_output(Path(relion_dir) / "particles_stacks", overwrite, inputs)
        check_output(Path(relion_dir) / "truth.star", overwrite, inputs)

    projectors = [RealSpaceProjector(v, order=params.interpolation_order) for v in volumes]
    s_var = signal_variance(params, projectors)
    if not s_var > 0:
        raise InputError(None, "the volumes give no signal (all-zero projections)")
    noise_sigma = math.sqrt(s_var / params.snr)
    log.info("signal variance %.4g, noise sigma %.4g (SNR %.4g)", s_var, noise_sigma, params.snr)

    chunk = int(chunk_size or _default_chunk(params.n_particles, params.box_size))
    provenance = {
        "command": "simulate",
        "streamem_version": __version__,
        "params": _jsonable(asdict(params)),
        "signal_variance": s_var,
        "noise_sigma": noise_sigma,
        "truth_volumes": [str(p.absolute()) for p in truth_paths],
        "truth_volume_files": [p.name for p in truth_paths],
    }
    fields = dict(META_FIELDS)
    if params.ctf:
        fields.update(CTF_META)
        if params.bfactor_A2:
            fields["rlnCtfBfactor"] = np.float64
    with atomic_output(out_path, overwrite, inputs, "simulate") as tmp:
        store = create_store(
            tmp,
            n_particles=params.n_particles,
            box_size=params.box_size,
            pixel_size_A=params.pixel_size_A,
            optics_groups=[_optics_row(params)],
            fields=fields,
            chunk_size=chunk,
            shard_size=shard_size,  # one task per shard (write_bounds)
            truth_fields=TRUTH_FIELDS,
            provenance=provenance,
        )
        # The projectors (spline coefficients) enter the graph once, as one node.
        token = dask.base.tokenize(params, *volumes)
        shared = dask.delayed(projectors, name=f"simulate-volumes-{token}", traverse=False)
        from streamem.dist.graph import map_chunks

        tasks = map_chunks(
            simulate_chunk, store.write_bounds(), str(store.path), params, shared, noise_sigma,
            name="simulate",
        )  # fmt: skip
        callbacks = [_Progress(len(tasks))] if progress and client is None else []
        run_tasks(tasks, client, workers or os.cpu_count() or 1, callbacks)
        for path, vol in zip(truth_paths, volumes, strict=True):
            write_map(path, vol, params.pixel_size_A, overwrite=overwrite, inputs=inputs)
    store = ParticleStore(out_path)
    if relion_dir is not None:
        from streamem.io.relion_export import export_store

        export_store(
            out_path, Path(relion_dir) / "particles.star", overwrite=overwrite, client=client
        )
        from streamem.io.truth_star import write_truth_star

        relion = Path(relion_dir)
        write_truth_star(store, relion / "particles.star", relion / "truth.star", overwrite)
    return store


def _optics_row(p: ParticleSimParams) -> dict:
    return {
        "rlnOpticsGroup": 1,
        "rlnOpticsGroupName": "opticsGroup1",
        "rlnImagePixelSize": p.pixel_size_A,
        "rlnImageSize": p.box_size,
        "rlnImageDimensionality": 2,
        "rlnVoltage": p.voltage_kV,
        "rlnSphericalAberration": p.cs_mm,
        "rlnAmplitudeContrast": p.amplitude_contrast,
    }


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, list | tuple):
        return [_jsonable(v) for v in d]
    if isinstance(d, np.generic):
        return d.item()
    return d


class _Progress(Callback):
    """tqdm bar over finished chunk tasks (a widget in Jupyter, text in a terminal, none
    in a log: :func:`streamem.dist.progress.chunk_bar`)."""

    def __init__(self, total: int):
        super().__init__()
        from streamem.dist.progress import chunk_bar

        self.bar = chunk_bar(total, "simulate")

    def _posttask(self, key, result, dsk, state, worker_id):
        if str(key).startswith("simulate-") and not str(key).startswith("simulate-volumes"):
            self.bar.update(1)

    def _finish(self, dsk, state, errored):
        self.bar.close()
