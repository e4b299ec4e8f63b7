"""``streamem bench ctf``: CTF estimation against the simulator's truth, and its speed.

- Micrographs from :func:`streamem.simulate.micrographs.simulate_micrographs`
  (``--size`` px at ``--angpix`` Å, defocus ``--defocus-min``..``--defocus-max``,
  astigmatism 0..``--astigmatism`` Å, SNR 0.05 in the particle discs, a carbon edge and
  two ice blobs, the ``asym`` phantom in a 128 px box), not timed.
- Timed, one micrograph at a time (NumPy's FFTs and element-wise work use one thread;
  run with ``OMP_NUM_THREADS=1`` so BLAS does too): reading the MRC, the tiled spectrum
  (:func:`streamem.ctf.spectrum.amplitude_spectrum`) and the fit
  (:func:`streamem.ctf.fit.fit_ctf`) with the job's defaults (``--tile``, 30-5 Å).
- ``--speed-size`` (default 4096; 0: skip): one more micrograph of that size (a few
  particles: the time does not depend on the content), timed the same way.

- ``--downstream``: the CTF job (:func:`streamem.ctf.job.estimate_ctf`) writes
  ``micrographs_ctf.star``; particles are extracted (box 128, inverted contrast) once
  with it and once with the simulator's ``micrographs.star`` (the true CTF), and each
  store is reconstructed at the true poses (origins from the coordinates' sub-pixel
  rest); the FSC of each map against the truth map at 0.5 gives two resolutions.

Reported: per micrograph the true and estimated U, V, angle, the relative error of the
mean defocus, the angle error (modulo 180°), FOM, fit resolution and seconds; then the
median relative defocus error, the median and largest angle error where the true
astigmatism exceeds 200 Å, and seconds per micrograph.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np


def register_bench(bench_sub) -> None:
    """Add ``ctf`` to ``streamem bench``."""
    from streamem.commands.execution import add_old_spelling

    p = bench_sub.add_parser(
        "ctf",
        help="CTF estimation: errors against the simulated truth, s/micrograph",
        description=__doc__,
    )
    p.add_argument("--size", type=int, default=2048, help="micrograph size in px (2048)")
    p.add_argument("--n-micrographs", type=int, default=8, help="micrographs (8)")
    a = p.add_argument(
        "--angpix", dest="pixel_size", type=float, default=1.5, help="pixel size in A"
    )
    add_old_spelling(p, a, "--pixel-size")
    p.add_argument("--defocus-min", type=float, default=5000.0, help="A (5000)")
    p.add_argument("--defocus-max", type=float, default=35000.0, help="A (35000)")
    p.add_argument("--astigmatism", type=float, default=1000.0, help="largest U - V, A (1000)")
    p.add_argument("--tile", type=int, default=512, help="spectrum tile in px (512)")
    p.add_argument("--speed-size", type=int, default=4096, help="also time one such (4096)")
    p.add_argument("--seed", type=int, default=1, help="simulation seed (1)")
    p.add_argument(
        "--downstream",
        action="store_true",
        help="also: streamem's ctf job, extract, reconstruct at the true poses with the "
        "estimated and the true CTF, FSC against the truth map",
    )
    p.set_defaults(func=run)


def _time_one(path, pixel_size_A: float, tile_px: int, optics, search):
    from streamem.ctf.fit import fit_ctf
    from streamem.ctf.spectrum import amplitude_spectrum
    from streamem.io.micrograph_read import read_micrograph

    t0 = time.perf_counter()
    image, _ = read_micrograph(path)
    spectrum = amplitude_spectrum(image, tile_px)
    t1 = time.perf_counter()
    fit, _ = fit_ctf(spectrum, pixel_size_A, optics, search)
    t2 = time.perf_counter()
    return fit, t1 - t0, t2 - t1


def measure(
    size: int = 2048,
    n_micrographs: int = 8,
    pixel_size_A: float = 1.5,
    defocus_range_A: tuple[float, float] = (5000.0, 35000.0),
    astigmatism_A: float = 1000.0,
    tile_px: int = 512,
    speed_size: int = 4096,
    seed: int = 1,
    downstream: bool = False,
) -> dict:
    """Simulate, fit and time; returns rows (per micrograph) and the summary numbers."""
    import starfile

    from streamem.core.ctf import OpticsParams
    from streamem.ctf.fit import CtfSearch
    from streamem.simulate.micrographs import simulate_micrographs

    optics, search = OpticsParams(300.0, 2.7, 0.1), CtfSearch()
    kw = dict(pixel_size_A=pixel_size_A, box_size=128, snr=0.05, astigmatism_A=astigmatism_A,
              defocus_range_A=defocus_range_A, seed=seed)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="streamem-bench-ctf-") as tmp:
        sim = simulate_micrographs(
            Path(tmp) / "mics",
            n_micrographs=n_micrographs,
            size_px=size,
            # --downstream: denser (more particles, a finer FSC to compare)
            particles_per_micrograph=max(10, (size // 128) ** 2 // (3 if downstream else 6)),
            **kw,
        )
        truth = starfile.read(sim.micrographs_star)["micrographs"]
        for path, t in zip(sim.micrographs, truth.itertuples(), strict=True):
            fit, t_spec, t_fit = _time_one(path, pixel_size_A, tile_px, optics, search)
            mean_t = 0.5 * (t.rlnDefocusU + t.rlnDefocusV)
            mean_e = 0.5 * (fit.defocus_u_A + fit.defocus_v_A)
            rows.append({
                "name": Path(path).name, "true_u": t.rlnDefocusU, "true_v": t.rlnDefocusV,
                "true_angle": t.rlnDefocusAngle, "u": fit.defocus_u_A, "v": fit.defocus_v_A,
                "angle": fit.defocus_angle_deg, "rel_error": abs(mean_e - mean_t) / mean_t,
                "angle_error": abs((fit.defocus_angle_deg - t.rlnDefocusAngle + 90) % 180 - 90),
                "fom": fit.figure_of_merit, "res": fit.max_resolution_A,
                "seconds": t_spec + t_fit,
            })  # fmt: skip
        fsc = _downstream(sim, Path(tmp)) if downstream else None
        speed = None
        if speed_size:
            big = simulate_micrographs(
                Path(tmp) / "big", n_micrographs=1, size_px=speed_size,
                particles_per_micrograph=20, **kw,
            )  # fmt: skip
            _, t_spec, t_fit = _time_one(big.micrographs[0], pixel_size_A, tile_px, optics, search)
            speed = {"size_px": speed_size, "spectrum_s": t_spec, "fit_s": t_fit}
    astig = np.array([r["true_u"] - r["true_v"] for r in rows])
    ang = np.array([r["angle_error"] for r in rows])[astig > 200.0]
    return {
        "size_px": size,
        "pixel_size_A": pixel_size_A,
        "tile_px": tile_px,
        "rows": rows,
        "median_rel_error": float(np.median([r["rel_error"] for r in rows])),
        "median_angle_error": float(np.median(ang)) if ang.size else float("nan"),
        "max_angle_error": float(ang.max()) if ang.size else float("nan"),
        "n_astigmatic": int(ang.size),
        "s_per_micrograph": float(np.mean([r["seconds"] for r in rows])),
        "speed": speed,
        "downstream": fsc,
    }


def _downstream(sim, tmp: Path) -> dict:
    """Resolutions (Å, FSC 0.5 against the truth) with the estimated and the true CTF."""
    from streamem.core.backprojector import reconstruct
    from streamem.core.ctf import OpticsParams
    from streamem.core.fsc import fsc, resolution_at
    from streamem.ctf.job import ctf_inputs, estimate_ctf
    from streamem.em.backproject_job import accumulate_from_poses
    from streamem.io.mrc import read_map
    from streamem.io.store import ParticleStore
    from streamem.pick.extract import extract_particles

    truth_map, pixel = read_map(sim.out_dir / "truth_class001.mrc")
    box = truth_map.shape[0]
    job = estimate_ctf(
        ctf_inputs([str(sim.micrographs_star)], None, OpticsParams()), tmp / "ctf", plots=False
    )
    truth = sim.truth.copy()
    truth["_key"] = [
        (str(n).split("/")[-1], round(x, 3), round(y, 3))
        for n, x, y in zip(truth.rlnMicrographName, truth.rlnCoordinateX, truth.rlnCoordinateY,
                           strict=True)
    ]  # fmt: skip
    by_key = truth.set_index("_key")
    out = {}
    for label, star in (("estimated", job.star), ("true", sim.micrographs_star)):
        path = tmp / f"{label}.zarr"
        extract_particles(star, sim.coordinates_star, path, box_size=box, invert_contrast=True)
        store = ParticleStore(path)
        names = [str(n).split("/")[-1] for n in store.read_field("rlnMicrographName")]
        x = np.asarray(store.read_field("rlnCoordinateX"))
        y = np.asarray(store.read_field("rlnCoordinateY"))
        rows = by_key.loc[[(n, round(a, 3), round(b, 3)) for n, a, b in zip(names, x, y,
                                                                              strict=True)]]  # fmt: skip
        # the window is centred on the rounded coordinate: the particle sits d px off,
        # and RELION's origin re-centres it (-d · pixel size)
        poses = {
            "rlnAngleRot": rows.rlnAngleRot.to_numpy(np.float64),
            "rlnAngleTilt": rows.rlnAngleTilt.to_numpy(np.float64),
            "rlnAnglePsi": rows.rlnAnglePsi.to_numpy(np.float64),
            "rlnOriginXAngst": -(x - np.rint(x)) * pixel,
            "rlnOriginYAngst": -(y - np.rint(y)) * pixel,
        }
        acc = accumulate_from_poses(store, "star", poses)
        vol = reconstruct(acc.data[0] + acc.data[1], acc.weight[0] + acc.weight[1], box, 2, None)
        curve = fsc(np.asarray(vol), truth_map)
        out[label] = float(resolution_at(curve, 0.5, box, pixel))
        out["n_particles"] = store.n_particles
    return out


def format_table(r: dict) -> str:
    """The error table and the summary lines of :func:`measure`'s result."""
    head = (f"{'micrograph':<12} {'true U':>7} {'true V':>7} {'angle':>6} {'fit U':>7} "
            f"{'fit V':>7} {'angle':>6} {'rel err':>8} {'ang err':>8} {'FOM':>6} "
            f"{'res A':>6} {'s':>5}")  # fmt: skip
    lines = [head]
    for x in r["rows"]:
        lines.append(
            f"{x['name']:<12} {x['true_u']:7.0f} {x['true_v']:7.0f} {x['true_angle']:6.1f} "
            f"{x['u']:7.0f} {x['v']:7.0f} {x['angle']:6.1f} {100 * x['rel_error']:7.2f}% "
            f"{x['angle_error']:7.1f}° {x['fom']:6.3f} {x['res']:6.1f} {x['seconds']:5.2f}"
        )
    lines.append(
        f"median relative defocus error {100 * r['median_rel_error']:.2f}%; angle error where "
        f"astigmatism > 200 A ({r['n_astigmatic']} micrographs): median "
        f"{r['median_angle_error']:.1f}°, largest {r['max_angle_error']:.1f}°; "
        f"{r['s_per_micrograph']:.2f} s per {r['size_px']} px micrograph"
    )
    if r["speed"]:
        s = r["speed"]
        lines.append(
            f"one {s['size_px']} px micrograph: {s['spectrum_s'] + s['fit_s']:.2f} s "
            f"(read + spectrum {s['spectrum_s']:.2f} s, fit {s['fit_s']:.2f} s)"
        )
    if r["downstream"]:
        d = r["downstream"]
        lines.append(
            f"downstream ({d['n_particles']} particles, true poses, FSC 0.5 vs truth): "
            f"estimated CTF {d['estimated']:.2f} A, true CTF {d['true']:.2f} A "
            f"({100 * (d['estimated'] / d['true'] - 1):+.1f}%)"
        )
    return "\n".join(lines)


def run(args) -> int:
    r = measure(
        args.size,
        args.n_micrographs,
        args.pixel_size,
        (args.defocus_min, args.defocus_max),
        args.astigmatism,
        args.tile,
        args.speed_size,
        args.seed,
        args.downstream,
    )
    print(
        f"CTF estimation, {r['size_px']}^2 px micrographs at {r['pixel_size_A']} A, "
        f"{r['tile_px']} px tiles, fit 30-5 A, simulated truth (SNR 0.05, carbon, ice); "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} (1: one core)"
    )
    print(format_table(r))
    return 0
