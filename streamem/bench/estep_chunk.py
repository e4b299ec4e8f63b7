"""``streamem bench estep-chunk``: one refine3d E-step chunk on NumPy and on CuPy.

A smooth random map, noisy projections at random poses (no CTF, known truth), and
the refine3d E-step (:func:`streamem.em.estep.expectation`, scale-free scoring) run
once with NumPy references and once with CuPy references (after a warm-up), for a
global search at HEALPix orders 2 and 3 and a local search at order 3. Reported per
search: seconds on each, the speed-up, the share of particles given the same pose,
the median angular error against the truth on each, and the largest difference of
the back-projection accumulators relative to their largest value. Without CuPy only
the NumPy column is measured.

``--local``: instead, refine3d's local iterations on the CPU, one chunk each (box 128
and 128 images unless given, SNR 0.05, previous poses 2° off the truth, work radius
0.36 of the box as at ~9.5 Å in the 3.59 Å/px run of ``bench refine-phases``,
particle diameter 0.65 of the box as its 300 Å): at the fine steps 3.75°, 1.88° and
0.94° (coarse orders 3, 4, 5, σ = 1.5 coarse steps), the E-step of RELION's plain
local search (also with the per-image coarse pass, ``batched=False``) and of the
search with a pre-pass (refine3d uses it past the first local order,
:attr:`streamem.em.schedule.RefineSchedule.prepass`; ``--prepass-min-orientations``
sets what it always keeps, ``--prepass-radius-fraction`` the share of its coarse radius
it scores within). Printed: the coarse pass's and the pre-pass's radii, seconds, the seconds over those of the plain
3.75° row, and the median and 90th-percentile angular errors against the truth.
"""

from __future__ import annotations

import time

import numpy as np


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser(
        "estep-chunk", help="one refine3d E-step chunk on NumPy vs CuPy", description=__doc__
    )
    p.add_argument("--box", type=int, default=None, help="pixels (default 64; --local: 128)")
    p.add_argument("--images", type=int, default=None, help="(default 256; --local: 128)")
    p.add_argument("--local", action="store_true",
                   help="local iterations with and without the pre-pass (see above)")  # fmt: skip
    p.add_argument("--snr", type=float, default=0.05, help="with --local (default 0.05)")
    p.add_argument("--prepass-min-orientations", type=int, default=8,
                   help="with --local: orientations the pre-pass always keeps (default 8)")  # fmt: skip
    p.add_argument("--prepass-radius-fraction", type=float, default=0.5,
                   help="with --local: share of its coarse radius the pre-pass scores "
                        "within (default 0.5; 1: its order's whole coarse radius)")  # fmt: skip
    p.set_defaults(func=run)


def _chunk(box: int, n: int, seed: int = 0, snr: float = 1.0):
    from scipy import ndimage

    from streamem.core.euler import euler_to_matrix
    from streamem.core.masks import soft_sphere
    from streamem.core.projector import make_projector, project_images

    rng = np.random.default_rng(seed)
    vol = ndimage.gaussian_filter(rng.standard_normal((box,) * 3), 1.0)
    vol = (vol * soft_sphere(box, box / 4, edge_px=3.0)).astype(np.float32)
    angles = np.stack(
        [
            rng.uniform(0, 360, n),
            np.degrees(np.arccos(rng.uniform(-1, 1, n))),
            rng.uniform(0, 360, n),
        ],
        axis=1,
    )
    rot = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    images = project_images(make_projector(vol), rot)
    noise = images.std() / np.sqrt(snr)
    images = (images + rng.normal(0, noise, images.shape)).astype(np.float32)
    metadata = {
        "rlnRandomSubset": np.arange(n) % 2 + 1,
        "rlnAngleRot": angles[:, 0],
        "rlnAngleTilt": angles[:, 1],
        "rlnAnglePsi": angles[:, 2],
    }
    return vol, images, metadata, rot


def _model(projector, box: int, order: int, local_sigma_deg):
    from streamem.core.ctf import OpticsParams
    from streamem.em.estep import EStepModel, SearchGrid

    return EStepModel(
        projectors=(projector, projector),
        box_size=box,
        work_box=box,
        pixel_size_A=3.0,
        max_radius_px=box // 4,
        inv_sigma2=np.ones((1, box // 2 + 1)),
        optics=(OpticsParams(300.0, 2.7, 0.1),),
        sigma_offset_A=3.0,
        grid=SearchGrid(
            healpix_order=order,
            offset_range_px=3,
            offset_step_px=1,
            local_sigma_deg=local_sigma_deg,
        ),
        do_ctf=False,
        scale_free=True,
    )


def measure(box: int = 64, n_images: int = 256, xp=None, sync=lambda: None) -> list[dict]:
    """One row per search; the CuPy entries are None when ``xp`` is None."""
    from streamem.core.euler import angular_distance_deg, euler_to_matrix
    from streamem.core.projector import make_projector
    from streamem.em.estep import expectation

    vol, images, metadata, truth = _chunk(box, n_images)

    def error(res):
        return float(
            np.median(angular_distance_deg(euler_to_matrix(res.rot, res.tilt, res.psi), truth))
        )

    rows = []
    for order, local in ((2, None), (3, None), (3, 8.0)):
        t0 = time.perf_counter()
        stats_np, res_np = expectation(
            images, metadata, _model(make_projector(vol), box, order, local)
        )
        row = {
            "search": f"order {order} " + ("global" if local is None else f"local {local:g}°"),
            "numpy_s": time.perf_counter() - t0,
            "error_numpy_deg": error(res_np),
            "xp_s": None,
        }
        if xp is not None:
            model = _model(make_projector(xp.asarray(vol)), box, order, local)
            expectation(images[:8], {k: v[:8] for k, v in metadata.items()}, model)  # warm-up
            sync()
            t0 = time.perf_counter()
            stats_x, res_x = expectation(images, metadata, model)
            sync()
            same = (
                (res_np.rot == res_x.rot) & (res_np.tilt == res_x.tilt) & (res_np.psi == res_x.psi)
            )
            scale = np.abs(stats_np.data_acc).max()
            row.update(
                xp_s=time.perf_counter() - t0,
                same_pose=float(np.mean(same)),
                error_xp_deg=error(res_x),
                acc_rel_diff=float(np.abs(stats_np.data_acc - stats_x.data_acc).max() / scale),
            )
        rows.append(row)
    return rows


def measure_local(
    box: int = 128,
    n_images: int = 128,
    snr: float = 0.05,
    seed: int = 0,
    per_image: bool = True,
    prepass_min_orientations: int = 8,
    prepass_radius_fraction: float = 0.5,
) -> list[dict]:
    """One row per (fine step, search): see the module docstring (``--local``)."""
    import dataclasses

    from streamem.core.euler import angular_distance_deg, euler_to_matrix
    from streamem.core.projector import make_projector
    from streamem.em.coarse_pass import prepass_model
    from streamem.em.estep import expectation

    vol, images, metadata, truth = _chunk(box, n_images, seed, snr)
    rng = np.random.default_rng(seed + 1)
    for k in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        metadata[k] = metadata[k] + rng.normal(0, 2.0, n_images)
    radius_px = round(0.36 * box)
    projector = make_projector(vol, 2, radius_px)
    # warm-up (compiled kernels) before anything is timed
    few = {k: v[:4] for k, v in metadata.items()}
    expectation(images[:4], few, _model(projector, box, 3, 11.25))
    rows = []
    for order in (3, 4, 5):
        sigma_deg = 1.5 * 60.0 / 2**order
        for prepass in (False, True):
            model = _model(projector, box, order, sigma_deg)
            model = dataclasses.replace(
                model,
                grid=dataclasses.replace(model.grid, local_prepass=prepass),
                max_radius_px=radius_px,
                particle_diameter_A=0.65 * box * 3.0,
                prepass_min_orientations=prepass_min_orientations,
                prepass_radius_fraction=prepass_radius_fraction,
            )
            row = {"fine_step_deg": model.grid.fine_angular_step_deg, "coarse_order": order,
                   "prepass": prepass, "coarse_radius_px": model.coarse_radius_px,
                   "prepass_radius_px": prepass_model(model).coarse_radius_px if prepass else None}  # fmt: skip
            for key, batched in (("s", True), ("per_image_s", False)):
                if not batched and (prepass or not per_image):
                    row[key] = None
                    continue
                t0 = time.perf_counter()
                _, res = expectation(images, metadata, model, batched=batched)
                row[key] = time.perf_counter() - t0
                if batched:
                    rot = euler_to_matrix(res.rot, res.tilt, res.psi)
                    errors = angular_distance_deg(rot, truth)
                    row["error_deg"] = float(np.median(errors))
                    row["error_p90_deg"] = float(np.percentile(errors, 90))
            rows.append(row)
    return rows


def print_local(rows: list[dict], box: int, n_images: int, snr: float) -> None:
    base = rows[0]["s"]
    print(
        f"local iterations, box {box}, {n_images} images, SNR {snr:g}, radius {round(0.36 * box)}"
    )
    print(f"{'fine step':>9s} {'coarse order':>12s} {'pre-pass':>8s} {'coarse r':>8s} "
          f"{'pre r':>5s} "
          f"{'s':>7s} {'/ 3.75°':>7s} {'per-image s':>11s} {'median err °':>12s} "
          f"{'p90 err °':>9s}")  # fmt: skip
    for r in rows:
        per_image = "-" if r["per_image_s"] is None else f"{r['per_image_s']:.1f}"
        pre_r = "-" if r["prepass_radius_px"] is None else f"{r['prepass_radius_px']:.0f}"
        print(f"{r['fine_step_deg']:8.2f}° {r['coarse_order']:12d} "
              f"{'yes' if r['prepass'] else 'no':>8s} {r['coarse_radius_px']:8.0f} "
              f"{pre_r:>5s} {r['s']:7.1f} "
              f"{r['s'] / base:7.2f} {per_image:>11s} {r['error_deg']:12.2f} "
              f"{r['error_p90_deg']:9.2f}")  # fmt: skip


def run(args) -> int:
    if args.local:
        box, n = args.box or 128, args.images or 128
        rows = measure_local(
            box,
            n,
            args.snr,
            prepass_min_orientations=args.prepass_min_orientations,
            prepass_radius_fraction=args.prepass_radius_fraction,
        )
        print_local(rows, box, n, args.snr)
        return 0
    args.box, args.images = args.box or 64, args.images or 256
    xp, sync = None, (lambda: None)
    try:
        import cupy as cp

        cp.cuda.runtime.getDeviceCount()
        xp, sync = cp, cp.cuda.Stream.null.synchronize
    except Exception as exc:  # no CuPy or no GPU: the NumPy column alone
        print(f"no CuPy GPU ({type(exc).__name__}); measuring NumPy only")
    rows = measure(args.box, args.images, xp, sync)
    print(f"box {args.box}, {args.images} images, radius {args.box // 4}")
    print(
        f"{'search':20s} {'numpy s':>8s} {'cupy s':>8s} {'speed-up':>8s} {'same pose':>9s} {'err np':>7s} {'err cp':>7s} {'acc diff':>9s}"
    )
    for r in rows:
        if r["xp_s"] is None:
            print(
                f"{r['search']:20s} {r['numpy_s']:8.2f} {'-':>8s} {'-':>8s} {'-':>9s} {r['error_numpy_deg']:7.2f}"
            )
            continue
        print(
            f"{r['search']:20s} {r['numpy_s']:8.2f} {r['xp_s']:8.2f} {r['numpy_s'] / r['xp_s']:8.1f}"
            f" {r['same_pose']:9.3f} {r['error_numpy_deg']:7.2f} {r['error_xp_deg']:7.2f} {r['acc_rel_diff']:9.1e}"
        )
    return 0
