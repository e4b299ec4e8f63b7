"""``streamem bench pick``: template picking with and without the low-pass downscaling.

RELION-2 (Kimanius et al. 2016) reports that low-pass filtering the micrograph and
the templates to 20 Å and computing the cross-correlations on the micrograph
downscaled to that filter's Nyquist makes autopicking about 20x faster with nearly
the same picks. This benchmark measures that ratio in one run, on the same
micrographs and templates:

- micrographs from :func:`streamem.simulate.micrographs.simulate_micrographs`
  (``--size`` px, ``--pixel-size`` Å, the ``asym`` phantom in a ``--box`` box, carbon
  edge and ice blobs), not timed;
- templates: projections of the phantom at the HEALPix directions of
  ``--healpix-order`` (order 0: 12), in-plane step ``--psi-step``;
- timed: :func:`streamem.pick.template.pick_templates` per micrograph (normalisation,
  FFTs, local statistics, the scan over templates and psi, peaks), once with
  ``--lowpass`` Å and once at full resolution (no filter, no downscaling), on one
  thread (``STREAMEM_FFT_WORKERS`` sets the FFT threads).

Reported: seconds per micrograph for each, their ratio, the work-grid sizes, and how
many picks the two runs share (one-to-one within a particle radius).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np


def register_bench(bench_sub) -> None:
    """Add ``pick`` to ``streamem bench``."""
    p = bench_sub.add_parser(
        "pick",
        help="template picking s/micrograph with and without the low-pass downscaling",
        description=__doc__,
    )
    p.add_argument("--size", type=int, default=2048, help="micrograph size in px (2048)")
    p.add_argument("--pixel-size", type=float, default=1.5, help="pixel size in A (1.5)")
    p.add_argument("--box", type=int, default=128, help="template box in px (128)")
    p.add_argument("--n-micrographs", type=int, default=1, help="micrographs timed (1)")
    p.add_argument("--healpix-order", type=int, default=0, help="template directions (0: 12)")
    p.add_argument("--psi-step", type=float, default=10.0, help="in-plane step, degrees (10)")
    p.add_argument("--lowpass", type=float, default=20.0, help="low-pass filter in A (20)")
    p.set_defaults(func=run)


def measure(
    size: int = 2048,
    pixel_size_A: float = 1.5,
    box: int = 128,
    n_micrographs: int = 1,
    healpix_order: int = 0,
    psi_step_deg: float = 10.0,
    lowpass_A: float = 20.0,
) -> dict:
    """Time template picking with and without the low-pass; returns a dict of results."""
    import starfile

    from streamem.io.mrc import read_map
    from streamem.pick.peaks import match_coordinates
    from streamem.pick.template import (
        MicrographCtf,
        TemplatePickParams,
        pick_templates,
        prepare_templates,
        projection_templates,
    )
    from streamem.simulate.micrographs import simulate_micrographs

    with tempfile.TemporaryDirectory(prefix="streamem-bench-pick-") as tmp:
        sim = simulate_micrographs(
            Path(tmp) / "mics",
            n_micrographs=n_micrographs,
            size_px=size,
            pixel_size_A=pixel_size_A,
            box_size=box,
            snr=0.1,
            particles_per_micrograph=max(10, (size // box) ** 2 // 6),
            seed=1,
        )
        volume, _ = read_map(sim.out_dir / "truth_class001.mrc")
        templates, _ = projection_templates(volume, healpix_order)
        bank = prepare_templates(np.asarray(templates))
        table = starfile.read(sim.micrographs_star)["micrographs"]
        diameter = sim.particle_diameter_A
        times = {"lowpass": [], "full": []}
        grids = {}
        shared = total = 0
        for path, row in zip(sim.micrographs, table.itertuples(), strict=True):
            mic, _ = read_map(path)
            ctf = MicrographCtf(row.rlnDefocusU, row.rlnDefocusV, row.rlnDefocusAngle)
            picks = {}
            for key, lp in (("lowpass", lowpass_A), ("full", None)):
                params = TemplatePickParams(diameter, lowpass_A=lp, psi_step_deg=psi_step_deg)
                t0 = time.perf_counter()
                picks[key], res, _ = pick_templates(mic, pixel_size_A, bank, params, ctf)
                times[key].append(time.perf_counter() - t0)
                grids[key] = res.grid.work_px
            a, b = picks["lowpass"], picks["full"]
            m = match_coordinates(
                np.stack([a.y, a.x], 1), np.stack([b.y, b.x], 1), 0.5 * diameter / pixel_size_A
            )
            shared += m.n_matched
            total += max(len(a), len(b))
    per_mic = {k: float(np.mean(v)) for k, v in times.items()}
    return {
        "size_px": size,
        "pixel_size_A": pixel_size_A,
        "n_templates": int(len(templates)),
        "n_psi": int(round(360.0 / psi_step_deg)),
        "lowpass_A": lowpass_A,
        "work_px_lowpass": grids["lowpass"],
        "work_px_full": grids["full"],
        "s_per_micrograph_lowpass": per_mic["lowpass"],
        "s_per_micrograph_full": per_mic["full"],
        "speedup": per_mic["full"] / per_mic["lowpass"],
        "picks_shared": shared,
        "picks_total": total,
    }


def format_table(r: dict) -> str:
    """A small text table of :func:`measure`'s result."""
    head = f"{'run':<22} {'work grid':>10} {'s/micrograph':>13}"
    lines = [
        f"{'low-pass ' + format(r['lowpass_A'], 'g') + ' A':<22} "
        f"{r['work_px_lowpass']:>7} px {r['s_per_micrograph_lowpass']:>13.2f}",
        f"{'full resolution':<22} {r['work_px_full']:>7} px {r['s_per_micrograph_full']:>13.2f}",
        f"speed-up {r['speedup']:.1f}x; picks shared {r['picks_shared']} of {r['picks_total']}",
    ]
    return "\n".join([head, *lines])


def run(args) -> int:
    r = measure(
        args.size,
        args.pixel_size,
        args.box,
        args.n_micrographs,
        args.healpix_order,
        args.psi_step,
        args.lowpass,
    )
    print(
        f"template picking, {r['size_px']}^2 px micrographs at {r['pixel_size_A']} A, "
        f"{r['n_templates']} templates x {r['n_psi']} psi, CPU (one thread per FFT)"
    )
    print(format_table(r))
    return 0
