"""``streamem simulate`` (particles into a store) and ``streamem simulate-micrographs``.

Volumes are given as a built-in phantom name (``asym``, ``asym-B``, ``C4``, ``D7``,
``T``, ``O``, ``I``), an atomic model (``.pdb``, ``.cif``, ``.ent``, ``.mmcif``,
optionally gzipped) or an MRC map whose box and voxel size match the simulation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from streamem import validate as check
from streamem.commands.execution import (
    add_old_spelling,
    add_scheduler_options,
    add_shard_size_option,
    add_threads_option,
    scheduler_client,
)
from streamem.errors import InputError

MODEL_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".ent.gz", ".cif.gz", ".mmcif.gz")
MAP_SUFFIXES = (".mrc", ".map", ".mrcs")


def resolve_volume(spec: str, box_size: int, pixel_size_A: float, seed: int = 0) -> np.ndarray:
    """A (B, B, B) map from a phantom name, an atomic model or an MRC map path."""
    from streamem.simulate.phantoms import list_phantoms, phantom

    if spec.lower() in (n.lower() for n in list_phantoms()):
        return phantom(spec, box_size, pixel_size_A, seed=seed)
    name = spec.lower()
    if name.endswith(MODEL_SUFFIXES):
        from streamem.simulate.atomic import volume_from_model

        return volume_from_model(spec, box_size, pixel_size_A)
    if name.endswith(MAP_SUFFIXES):
        from streamem.io.mrc import read_map

        vol, voxel = read_map(spec)
        if vol.shape != (box_size,) * 3:
            raise InputError(spec, f"map shape {vol.shape} does not match --box {box_size}")
        if voxel > 0 and abs(voxel - pixel_size_A) > 0.01 * pixel_size_A:
            raise InputError(spec, f"voxel size {voxel:.4g} A differs from --angpix {pixel_size_A}")
        return vol
    if Path(spec).exists():
        raise InputError(spec, "unknown volume file type (use .pdb/.cif or .mrc)")
    raise InputError(
        None, f"unknown phantom or missing file {spec!r} (phantoms: {', '.join(list_phantoms())})"
    )


def parse_mix(text: str) -> list[tuple[str, float]]:
    """``"asym:0.7,asym-B:0.3"`` -> [("asym", 0.7), ("asym-B", 0.3)]."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, frac = item.rpartition(":")
        if not sep or not name:
            raise InputError(None, f"--mix entries are NAME:FRACTION, got {item!r}")
        try:
            value = float(frac)
        except ValueError:
            raise InputError(None, f"--mix fraction {frac!r} is not a number") from None
        if value < 0:
            raise InputError(None, f"--mix fraction must be >= 0, got {value}")
        out.append((name, value))
    if not out or sum(f for _, f in out) <= 0:
        raise InputError(None, "--mix needs at least one volume with a positive fraction")
    return out


def parse_range(text: str, option: str) -> tuple[float, float]:
    """``"10000,30000"`` -> (10000.0, 30000.0)."""
    parts = text.split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise InputError(None, f"{option} expects MIN,MAX, got {text!r}") from None
    if lo > hi:
        raise InputError(None, f"{option}: MIN {lo} is larger than MAX {hi}")
    return lo, hi


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--box", type=int, default=128, help="box size in pixels (default 128)")
    angpix = p.add_argument(
        "--angpix", dest="pixel_size", type=float, default=1.5, help="pixel size in Å (default 1.5)"
    )
    add_old_spelling(p, angpix, "--pixel-size")
    p.add_argument("--snr", type=float, default=0.05, help="signal-to-noise ratio (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--phantom", default=None, help="built-in phantom (default asym)")
    src.add_argument("--model", default=None, help="atomic model (PDB/mmCIF) or MRC map")
    p.add_argument(
        "--defocus", default="10000,30000", help="defocus range MIN,MAX in A (default 10000,30000)"
    )
    p.add_argument("--astigmatism", type=float, default=500.0, help="max |U - V| in A (500)")
    p.add_argument("--voltage", type=float, default=300.0, help="kV (default 300)")
    p.add_argument("--cs", type=float, default=2.7, help="spherical aberration, mm (2.7)")
    p.add_argument("--amplitude-contrast", type=float, default=0.1, help="Q0 (default 0.1)")
    p.add_argument("--bfactor", type=float, default=0.0, help="CTF B-factor envelope, A^2 (0)")
    add_threads_option(p, "threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_scheduler_options(p)


def register(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate particle images with ground truth into a store",
        description="Simulate particles (projection, shift, CTF, noise) into a particle store, "
        "with the true poses and classes in its 'truth' group and the truth volumes "
        "written as OUT_truth_classNNN.mrc next to it.",
    )
    p.add_argument("out", help="output particle store (.zarr)")
    p.add_argument("--n-particles", type=int, default=1000, help="number of particles (1000)")
    _common(p)
    p.add_argument(
        "--mix", default=None, help="several volumes: NAME:FRAC,NAME:FRAC (phantoms or files)"
    )
    p.add_argument("--junk", type=float, default=0.0, help="fraction of pure-noise images (0)")
    p.add_argument(
        "--preferred-orientation",
        action="store_true",
        help="a share of top views (see --preferred-fraction, --preferred-spread)",
    )
    p.add_argument("--preferred-fraction", type=float, default=0.7, help="share of top views")
    p.add_argument(
        "--preferred-spread", type=float, default=20.0, help="spread of top views, deg (20)"
    )
    p.add_argument("--max-shift", type=float, default=3.0, help="max shift in A (default 3)")
    p.add_argument("--no-ctf", action="store_true", help="no CTF (and no CTF fields)")
    p.add_argument("--chunk-size", type=int, default=None, help="particles per store chunk")
    add_shard_size_option(p)
    p.add_argument(
        "--particles-per-micrograph", type=int, default=100, help="particles sharing a defocus"
    )
    p.add_argument(
        "--relion",
        default=None,
        metavar="DIR",
        help="also write DIR/particles.star (+ MRCS stacks) and DIR/truth.star (true poses, "
        "origins, CTF and classes)",
    )
    p.set_defaults(func=run)

    m = sub.add_parser(
        "simulate-micrographs",
        help="simulate micrographs with known particle coordinates",
        description="Simulate micrographs (particles at known coordinates, carbon edge, ice "
        "blobs, CTF, noise) with RELION coordinate files and a micrographs STAR file.",
    )
    m.add_argument("out", help="output folder")
    m.add_argument("--n-micrographs", type=int, default=4, help="number of micrographs (4)")
    m.add_argument("--size", type=int, default=1024, help="micrograph size in pixels (1024)")
    m.add_argument(
        "--particles", type=int, default=50, help="particles per micrograph (at most; 50)"
    )
    m.add_argument("--particle-diameter", type=float, default=None, help="min spacing, A")
    m.add_argument("--no-carbon", action="store_true", help="no carbon edge")
    m.add_argument("--ice-blobs", type=int, default=2, help="ice blobs per micrograph (2)")
    _common(m)
    m.set_defaults(func=run_micrographs)


def _volume_spec(args) -> str:
    return args.model or args.phantom or "asym"


def _imaging(args) -> dict:
    """The CTF and microscope options shared by particles and micrographs."""
    return {
        "defocus_range_A": parse_range(args.defocus, "--defocus"),
        "astigmatism_A": args.astigmatism,
        "voltage_kV": args.voltage,
        "cs_mm": args.cs,
        "amplitude_contrast": args.amplitude_contrast,
        "bfactor_A2": args.bfactor,
    }


def _check_geometry(args) -> None:
    """The options shared by both simulations, before any volume is read (InputError
    naming the option)."""
    check.at_least("--box", args.box, 8)  # smaller boxes leave no room for a particle
    check.positive("--angpix", args.pixel_size, "Å")
    check.positive("--snr", args.snr)
    check.seed("--seed", args.seed)
    lo, _ = parse_range(args.defocus, "--defocus")
    check.non_negative("--defocus", lo, "Å, underfocus")
    check.non_negative("--astigmatism", args.astigmatism, "Å")
    check.positive("--voltage", args.voltage, "kV")
    check.non_negative("--cs", args.cs, "mm")
    check.fraction("--amplitude-contrast", args.amplitude_contrast, open_high=True)
    # the envelope exp(-B k^2 / 4): a negative B would amplify the noise-free signal
    check.non_negative("--bfactor", args.bfactor, "Å^2")
    check.at_least("--n-workers", args.workers, 1)


def _check_particle_options(args) -> None:
    """``simulate``'s own options (InputError naming the option)."""
    check.at_least("--n-particles", args.n_particles, 1)
    check.fraction("--junk", args.junk)
    check.fraction("--preferred-fraction", args.preferred_fraction)
    check.non_negative("--preferred-spread", args.preferred_spread, "degrees")
    check.non_negative("--max-shift", args.max_shift, "Å")
    check.at_least("--chunk-size", args.chunk_size, 1)
    check.at_least("--shard-size", args.shard_size, 0)
    check.at_least("--particles-per-micrograph", args.particles_per_micrograph, 1)


def _check_micrograph_options(args) -> None:
    """``simulate-micrographs``' own options (InputError naming the option)."""
    check.at_least("--n-micrographs", args.n_micrographs, 1)
    if check.at_least("--size", args.size, 1) < args.box:
        raise InputError(None, f"--size {args.size} px is smaller than --box {args.box}")
    check.at_least("--particles", args.particles, 0)
    check.positive("--particle-diameter", args.particle_diameter, "Å")
    check.at_least("--ice-blobs", args.ice_blobs, 0)


def run(args) -> int:
    from streamem.simulate.particles import simulate_particles

    specs = parse_mix(args.mix) if args.mix else [(_volume_spec(args), 1.0)]
    if args.mix and (args.model or args.phantom):
        raise InputError(None, "give either --mix or --model/--phantom, not both")
    _check_geometry(args)
    _check_particle_options(args)
    volumes = [resolve_volume(name, args.box, args.pixel_size, args.seed) for name, _ in specs]
    with scheduler_client(args) as client:
        store = simulate_particles(
            args.out,
            n_particles=args.n_particles,
            box_size=args.box,
            pixel_size_A=args.pixel_size,
            snr=args.snr,
            seed=args.seed,
            volumes=volumes,
            volume_names=[name for name, _ in specs],
            mix=[f for _, f in specs],
            junk_fraction=args.junk,
            orientation="preferred" if args.preferred_orientation else "uniform",
            preferred_fraction=args.preferred_fraction,
            preferred_spread_deg=args.preferred_spread,
            max_shift_A=args.max_shift,
            **_imaging(args),
            chunk_size=args.chunk_size,
            shard_size="auto" if args.shard_size is None else args.shard_size,
            ctf=not args.no_ctf,
            particles_per_micrograph=args.particles_per_micrograph,
            overwrite=args.overwrite,
            progress=True,
            relion_dir=args.relion,
            workers=args.workers,
            inputs=[name for name, _ in specs if Path(name).exists()],
            client=client,
        )
    print(f"wrote {store.n_particles} particles to {store.path}")
    for path in store.facts["provenance"]["truth_volumes"]:
        print(f"truth volume {path}")
    if args.relion:
        print(f"RELION particles {Path(args.relion) / 'particles.star'}")
        print(f"RELION truth {Path(args.relion) / 'truth.star'}")
    return 0


def run_micrographs(args) -> int:
    from streamem.simulate.micrographs import simulate_micrographs

    _check_geometry(args)
    _check_micrograph_options(args)
    spec = _volume_spec(args)
    volume = resolve_volume(spec, args.box, args.pixel_size, args.seed)
    with scheduler_client(args) as client:
        result = simulate_micrographs(
            args.out,
            n_micrographs=args.n_micrographs,
            size_px=args.size,
            pixel_size_A=args.pixel_size,
            particles_per_micrograph=args.particles,
            box_size=args.box,
            volume=volume,
            snr=args.snr,
            seed=args.seed,
            **_imaging(args),
            carbon_edge=not args.no_carbon,
            ice_blobs=args.ice_blobs,
            particle_diameter_A=args.particle_diameter,
            overwrite=args.overwrite,
            workers=args.workers,
            inputs=[spec] if Path(spec).exists() else [],
            client=client,
        )
    print(
        f"wrote {len(result.micrographs)} micrographs with {len(result.truth)} particles "
        f"to {result.out_dir} (micrographs.star, coordinates.star, truth_particles.star)"
    )
    return 0
