"""``streamem bench pick``: template and LoG picking on real-size micrographs (issue 24).

Set-up (not timed): micrographs from
:func:`streamem.simulate.micrographs.simulate_micrographs` (``--size`` px at
``--angpix`` Å, ``--particles`` copies of the ``asym`` phantom in a ``--box`` box,
a carbon edge and ice blobs, known coordinates); templates: projections of the
phantom at the HEALPix directions of ``--healpix-order`` (1: 48), in-plane step
``--psi-step``, RELION's 20 Å low-pass (``--lowpass``).

Timed, per micrograph, in the same run (so the ratio holds on a loaded machine):

- **template, batched**: :func:`streamem.pick.template.pick_templates` as the pick
  command runs it: the batched scan (:mod:`streamem.pick.fastscan`), angle groups on
  ``--n-workers`` threads (default: all cores of this process), over coarse psi with
  the fine angles at the candidate peaks (:mod:`streamem.pick.psi_refine`);
- **template, exhaustive psi**: the same scan over every angle at every pixel
  (``--exhaustive-psi``), the speed-up's reference;
- **template, reference loop**: the same with ``batched=False`` (the scan as it was:
  per psi and template batch, interpolate, filter, correlate; FFTs on one thread);
  ``--no-reference`` skips it (it takes minutes per micrograph);
- **FFT floor**: only the ``n_templates x n_psi`` inverse FFTs of the work grid, batched
  on the same threads: the cost no exact scan avoids;
- **LoG**: :func:`streamem.pick.log.pick_log` with the default range (0.8-1.2x the
  particle diameter).

Reported: wall-clock and CPU seconds (all threads of the process) per micrograph,
recall and FDR against the simulation's truth
(one-to-one within a particle radius), how many batched picks have an exhaustive-psi
pick within 2 original pixels (the two maps' peak pickings, one-to-one), how many have a reference
pick within 2 original pixels, and the same for the exhaustive scan. The load average is printed with the numbers: on a
shared machine wall times move with the load (even within one run); CPU seconds
much less.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np


def register_bench(bench_sub) -> None:
    """Add ``pick`` to ``streamem bench``."""
    from streamem.commands.execution import add_old_spelling

    p = bench_sub.add_parser(
        "pick",
        help="template (coarse psi, exhaustive, reference scan) and LoG picking s/mic, recall, FDR",
        description=__doc__,
    )
    p.add_argument("--size", type=int, default=2048, help="micrograph size in px (2048)")
    a = p.add_argument(
        "--angpix", dest="pixel_size", type=float, default=3.59, help="pixel size in A"
    )
    add_old_spelling(p, a, "--pixel-size")
    p.add_argument("--box", type=int, default=128, help="phantom box in px (128)")
    p.add_argument("--particles", type=int, default=100, help="particles per micrograph (100)")
    p.add_argument("--n-micrographs", type=int, default=1, help="micrographs timed (1)")
    p.add_argument("--healpix-order", type=int, default=1, help="template directions (1: 48)")
    p.add_argument("--psi-step", type=float, default=5.0, help="in-plane step, degrees (5)")
    p.add_argument("--lowpass", type=float, default=20.0, help="low-pass filter in A (20)")
    a = p.add_argument(
        "--n-workers",
        dest="workers",
        type=int,
        default=None,
        help="scan threads (default: all cores)",
    )
    add_old_spelling(p, a, "--workers")
    p.add_argument(
        "--no-reference", action="store_true", help="skip the (slow) reference scan loop"
    )
    p.set_defaults(func=run)


def _score(picks, truth_yx: np.ndarray, radius_px: float) -> tuple[int, int, int]:
    from streamem.pick.peaks import match_coordinates

    m = match_coordinates(np.stack([picks.y, picks.x], 1), truth_yx, radius_px)
    return m.n_matched, m.n_picks, m.n_truth


def _fft_floor(W: int, n_templates: int, n_psi: int, workers: int) -> float:
    """Seconds for ``n_templates x n_psi`` inverse FFTs of a W grid, batched by template."""
    import scipy.fft

    spectra = np.ones((W, W // 2 + 1, n_templates), dtype=np.complex64)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n_psi):
        scipy.fft.irfft2(spectra, s=(W, W), axes=(0, 1), workers=workers)
    return time.perf_counter() - t0, time.process_time() - c0


def measure(
    size: int = 2048,
    pixel_size_A: float = 3.59,
    box: int = 128,
    particles: int = 100,
    n_micrographs: int = 1,
    healpix_order: int = 1,
    psi_step_deg: float = 5.0,
    lowpass_A: float = 20.0,
    workers: int | None = None,
    reference: bool = True,
) -> dict:
    """Run the benchmark (module docstring); returns a dict of results."""
    import starfile

    from streamem.io.mrc import read_map
    from streamem.pick.fastscan import fft_workers
    from streamem.pick.log import LogPickParams, default_log_diameters_A, pick_log
    from streamem.pick.peaks import match_coordinates
    from streamem.pick.template import (
        MicrographCtf,
        TemplatePickParams,
        pick_templates,
        prepare_templates,
        projection_templates,
        psi_angles_deg,
    )
    from streamem.simulate.micrographs import simulate_micrographs

    threads = fft_workers(workers)
    runs = ["batched", "exhaustive"] + (["reference"] if reference else []) + ["log"]
    times: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    counts = {k: np.zeros(3, dtype=np.int64) for k in runs}  # matched, picks, truth
    agree = {k: 0 for k in runs}
    total = {k: 0 for k in runs}
    refined: dict = {}
    with tempfile.TemporaryDirectory(prefix="streamem-bench-pick-") as tmp:
        sim = simulate_micrographs(
            Path(tmp) / "mics",
            n_micrographs=n_micrographs,
            size_px=size,
            pixel_size_A=pixel_size_A,
            box_size=box,
            snr=0.1,
            particles_per_micrograph=particles,
            seed=1,
        )
        volume, _ = read_map(sim.out_dir / "truth_class001.mrc")
        templates, _ = projection_templates(volume, healpix_order)
        bank = prepare_templates(np.asarray(templates))
        table = starfile.read(sim.micrographs_star)["micrographs"]
        diameter = sim.particle_diameter_A
        radius_px = 0.5 * diameter / pixel_size_A
        log_params = LogPickParams(*default_log_diameters_A(diameter), lowpass_A=lowpass_A)
        W = None
        for path, row in zip(sim.micrographs, table.itertuples(), strict=True):
            mic, _ = read_map(path)
            ctf = MicrographCtf(row.rlnDefocusU, row.rlnDefocusV, row.rlnDefocusAngle)
            truth = sim.truth[sim.truth["rlnMicrographName"] == row.rlnMicrographName]
            truth_yx = truth[["rlnCoordinateY", "rlnCoordinateX"]].to_numpy()
            picks = {}
            for key in runs:
                t0, c0 = time.perf_counter(), time.process_time()
                if key == "log":
                    picks[key], _, _ = pick_log(mic, pixel_size_A, log_params)
                else:
                    params = TemplatePickParams(
                        diameter,
                        lowpass_A=lowpass_A,
                        psi_step_deg=psi_step_deg,
                        batched=key != "reference",
                        fft_workers=threads,
                        coarse_psi=key == "batched",
                    )
                    picks[key], res, _ = pick_templates(mic, pixel_size_A, bank, params, ctf)
                    W = res.grid.work_px
                    refined = res.psi_refined or refined
                times[key].append(time.perf_counter() - t0)
                cpu[key].append(time.process_time() - c0)
                counts[key] += _score(picks[key], truth_yx, radius_px)
            a = picks["batched"]
            for key in ("exhaustive", "reference"):
                if key in picks:
                    b = picks[key]
                    yx_a, yx_b = np.stack([a.y, a.x], 1), np.stack([b.y, b.x], 1)
                    agree[key] += match_coordinates(yx_a, yx_b, 2.0).n_matched
                    total[key] += max(len(a), len(b))
    n_psi = len(psi_angles_deg(psi_step_deg))
    floor, floor_cpu = _fft_floor(W, len(templates), n_psi, threads)
    out = {
        "size_px": size,
        "pixel_size_A": pixel_size_A,
        "particle_diameter_A": diameter,
        "n_micrographs": n_micrographs,
        "n_templates": int(len(templates)),
        "n_psi": n_psi,
        "work_px": W,
        "fft_threads": threads,
        "cores": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "s_fft_floor": floor,
        "cpu_s_fft_floor": floor_cpu,
        "picks_agree": agree["reference"] if reference else 0,
        "picks_total": total["reference"] if reference else 0,
        "picks_agree_exhaustive": agree["exhaustive"],
        "picks_total_exhaustive": total["exhaustive"],
        "psi_refined": refined,
        "log_range_A": (log_params.diameter_min_A, log_params.diameter_max_A),
    }
    for key in runs:
        matched, n_picks, n_truth = (int(v) for v in counts[key])
        out[f"s_{key}"] = float(np.mean(times[key]))
        out[f"cpu_s_{key}"] = float(np.mean(cpu[key]))
        out[f"recall_{key}"] = matched / max(n_truth, 1)
        out[f"fdr_{key}"] = 1.0 - matched / n_picks if n_picks else 0.0
    return out


def format_table(r: dict) -> str:
    """A small text table of :func:`measure`'s result."""
    rows = [("template, batched", "batched"), ("template, exhaustive psi", "exhaustive")]
    rows += [("template, reference loop", "reference")]
    rows += [("LoG {:.0f}-{:.0f} A".format(*r["log_range_A"]), "log")]
    head = f"{'run':<26} {'wall s/mic':>10} {'CPU s/mic':>10} {'recall':>7} {'FDR':>6}"
    lines = [head]
    for label, key in rows:
        if f"s_{key}" in r:
            lines.append(
                f"{label:<26} {r[f's_{key}']:>10.2f} {r[f'cpu_s_{key}']:>10.2f} "
                f"{r[f'recall_{key}']:>7.3f} {r[f'fdr_{key}']:>6.3f}"
            )
    lines.append(
        f"{'FFT floor (irfft2 only)':<26} {r['s_fft_floor']:>10.2f} {r['cpu_s_fft_floor']:>10.2f}"
    )
    f = r["psi_refined"]
    if f:
        lines.append(
            f"coarse psi every {f['coarse_factor']} angles; {f['angles']} fine angles at "
            f"{f['peaks']} candidate peaks ({f['pixels']} px, {f['box_px']} px box)"
        )
    lines.append(
        f"speed-up of the coarse psi pass {r['s_exhaustive'] / r['s_batched']:.2f}x wall, "
        f"{r['cpu_s_exhaustive'] / r['cpu_s_batched']:.2f}x CPU; picks within 2 px of an "
        f"exhaustive-psi pick: {r['picks_agree_exhaustive']} of {r['picks_total_exhaustive']}"
    )
    if "s_reference" in r:
        lines.append(
            f"speed-up {r['s_reference'] / r['s_batched']:.1f}x wall, "
            f"{r['cpu_s_reference'] / r['cpu_s_batched']:.1f}x CPU; batched picks within 2 px "
            f"of a reference pick: {r['picks_agree']} of {r['picks_total']}"
        )
    return "\n".join(lines)


def run(args) -> int:
    r = measure(
        args.size,
        args.pixel_size,
        args.box,
        args.particles,
        args.n_micrographs,
        args.healpix_order,
        args.psi_step,
        args.lowpass,
        args.workers,
        reference=not args.no_reference,
    )
    print(
        f"picking, {r['n_micrographs']} x {r['size_px']}^2 px micrographs at "
        f"{r['pixel_size_A']} A, particle {r['particle_diameter_A']:.0f} A; "
        f"{r['n_templates']} templates x {r['n_psi']} psi on a {r['work_px']} px work grid; "
        f"{r['fft_threads']} FFT threads, {r['cores']} cores, load average "
        f"{r['load_average']:.1f}"
    )
    print(format_table(r))
    return 0
