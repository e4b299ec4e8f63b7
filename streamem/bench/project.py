"""``streamem bench project`` / ``streamem bench backproject``: slices per second.

Projection (:func:`streamem.core.projector.project_points`) and back-projection
(:func:`streamem.core.backprojector.insert_points`) of full central slices (every
rfft-grid point within Nyquist) at random poses, padding factor 2, on this CPU
(or GPU with ``--gpu`` when CuPy is installed). Reported: slices/s, points/s and
ns per point, best of ``--repeats`` runs; for back-projection also the time of
one :func:`~streamem.core.backprojector.reconstruct`. On the CPU also the array-API
path on the same arrays (``host_kernel=False``) and its time over the compiled host
kernel's (:mod:`streamem.core.slice_kernel`), measured in the same run.

``--local``: instead, slices as an E-step's local search makes them (box 128 unless
given, 128 images at random poses, 64 slices each at σ 2.5° around its image's pose,
kept together, points within 0.36 of the box as at ~9.5 Å in ``bench refine-phases``),
projected and inserted by the host kernels with the slices run in blocks of 1, 16, 64
and 256 and as one block (the whole call), inserted into double-precision accumulators
and into the E-step's single-precision ones, the points in the E-step's order (raster
order within radius bands); at the default blocks also in plain radius order. Printed:
ns per point per block size, the ratio single/double, the ratio of the two point
orders, and the defaults (:data:`~streamem.core.slice_kernel.SLICE_BLOCK`,
:data:`~streamem.core.slice_kernel.INSERT_SLICE_BLOCK`).
"""

from __future__ import annotations

import time

import numpy as np

DEFAULT_BOXES = (64, 128)


def register_bench(bench_sub) -> None:
    """Add ``project`` and ``backproject`` to ``streamem bench``."""
    for name, helptext in (
        ("project", "Fourier-space projection speed (slices/s) at box 64 and 128"),
        ("backproject", "back-projection speed (slices/s) and reconstruct time"),
    ):
        p = bench_sub.add_parser(name, help=helptext, description=__doc__)
        p.add_argument(
            "--box", type=int, nargs="+", default=list(DEFAULT_BOXES), help="box sizes (px)"
        )
        p.add_argument("--n-slices", type=int, default=256, help="slices per timed run")
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--gpu", action="store_true", help="run on the GPU (needs CuPy)")
        p.add_argument(
            "--local", action="store_true", help="local-search slice sets, by slice block (above)"
        )
        p.set_defaults(func=run_project if name == "project" else run_backproject)


def _random_rotations(n: int, rng) -> np.ndarray:
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        1,
    )


def _xp(gpu: bool):
    if not gpu:
        return np, lambda: None
    import cupy

    return cupy, cupy.cuda.Device().synchronize


def _best(fn, repeats: int, sync) -> float:
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(
    box_sizes=DEFAULT_BOXES, n_slices: int = 256, repeats: int = 3, gpu: bool = False
) -> list[dict]:
    """Time projection, back-projection and reconstruction; one dict per box size."""
    from streamem.core.backprojector import empty_accumulators, insert_points, reconstruct
    from streamem.core.fourier import image_fourier_coords
    from streamem.core.projector import make_projector, project_points

    xp, sync = _xp(gpu)
    rng = np.random.default_rng(0)
    rows = []
    for box in box_sizes:
        volume = xp.asarray(rng.standard_normal((box, box, box)).astype(np.float32))
        t0 = time.perf_counter()
        fvol = make_projector(volume, 2)
        sync()
        make_s = time.perf_counter() - t0
        coords, _ = image_fourier_coords(box, box // 2, xp)
        A = xp.asarray(_random_rotations(n_slices, rng))
        M = coords.shape[0]
        project_points(fvol, A[:4], coords)  # warm-up

        def project(host_kernel, fvol=fvol, A=A, coords=coords):
            return project_points(fvol, A, coords, host_kernel=host_kernel)

        proj_s = _best(lambda: project(True), repeats, sync)
        # on the CPU, the array-API path on the same arrays (what the kernel replaces)
        proj_array_s = None if gpu else _best(lambda: project(False), repeats, sync)
        vals = project(True)
        data, weight = empty_accumulators(box, 2, xp)
        data[...] = 0  # touch the pages so that the first run is not charged for them
        weight[...] = 0

        def insert(host_kernel, data=data, weight=weight, A=A, coords=coords, vals=vals):
            insert_points(data, weight, A, coords, vals, 1.0, host_kernel=host_kernel)

        ins_s = _best(lambda: insert(True), repeats, sync)
        ins_array_s = None if gpu else _best(lambda: insert(False), repeats, sync)
        t0 = time.perf_counter()
        reconstruct(data, weight, box, 2)
        sync()
        rec_s = time.perf_counter() - t0
        rows.append(
            {
                "box": box,
                "points_per_slice": int(M),
                "make_projector_s": make_s,
                "project_slices_per_s": n_slices / proj_s,
                "project_ns_per_point": proj_s / (n_slices * M) * 1e9,
                "backproject_slices_per_s": n_slices / ins_s,
                "backproject_ns_per_point": ins_s / (n_slices * M) * 1e9,
                "project_array_over_kernel": None if gpu else proj_array_s / proj_s,
                "backproject_array_over_kernel": None if gpu else ins_array_s / ins_s,
                "reconstruct_s": rec_s,
            }
        )
    return rows


def format_table(rows: list[dict], which: str) -> str:
    """A small text table of :func:`measure`'s rows for ``which`` in project/backproject."""
    last, key = ("prepare s", "make_projector_s") if which == "project" else ("reconstruct s", "reconstruct_s")  # fmt: skip
    head = (
        f"{'box':>5} {'points':>7} {'slices/s':>10} {'ns/point':>9} {'array/kernel':>13} {last:>14}"
    )
    lines = []
    for r in rows:
        ratio = r[f"{which}_array_over_kernel"]
        lines.append(
            f"{r['box']:>5} {r['points_per_slice']:>7} {r[f'{which}_slices_per_s']:>10.0f} "
            f"{r[f'{which}_ns_per_point']:>9.1f} {'-' if ratio is None else f'{ratio:.2f}x':>13} "
            f"{r[key]:>14.3f}"
        )
    return "\n".join([head, *lines])


def main(which: str = "project", box_sizes=DEFAULT_BOXES, n_slices=256, repeats=3, gpu=False):
    """Measure and print the table; returns the rows (for the lead's scripts)."""
    rows = measure(box_sizes, n_slices, repeats, gpu)
    device = "GPU" if gpu else "CPU"
    print(f"{which} on {device}, padding 2, full slices to Nyquist, best of {repeats}")
    print(format_table(rows, which))
    return rows


LOCAL_BLOCKS = (1, 16, 64, 256, None)


def measure_local_blocks(box: int = 128, n_images: int = 128, per_image: int = 64,
                         sigma_deg: float = 2.5, repeats: int = 3, blocks=LOCAL_BLOCKS,
                         order: str = "estep") -> list[dict]:  # fmt: skip
    """ns per point of the host kernels by slice block (``--local``); one dict per block
    (``block`` None: the whole call). order: the points in the E-step's order ("estep":
    raster order within the bands of a coarse cut at half the radius) or by radius."""
    from streamem.core import slice_kernel
    from streamem.core.euler import euler_to_matrix
    from streamem.core.projector import half_cube_shape, padded_radius
    from streamem.em.fourier_points import half_plane_points

    rng = np.random.default_rng(0)
    radius_px = round(0.36 * box)
    cuts = (radius_px / 2,) if order == "estep" else None
    coords, _, _ = half_plane_points(box, radius_px, cuts=cuts)
    M, R = coords.shape[0], padded_radius(radius_px, 2)
    shape = half_cube_shape(R)
    data = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    poses = np.column_stack([
        rng.uniform(0, 360, n_images),
        np.degrees(np.arccos(rng.uniform(-1, 1, n_images))),
        rng.uniform(0, 360, n_images),
    ])  # fmt: skip
    angles = (poses[:, None, :] + rng.normal(0, sigma_deg, (n_images, per_image, 3))).reshape(-1, 3)
    rot = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    n, columns = rot.shape[0], np.arange(M)
    out = np.zeros((n, M), np.complex64)
    slice_kernel.project_slices_host(data, rot, coords, columns, 2, R, out)
    weights = np.ones((n, M))
    double = np.zeros(shape, np.complex128), np.zeros(shape)
    single = np.zeros(shape, np.complex64), np.zeros(shape, np.float32)  # the E-step's
    rows = []
    for block in blocks:
        b = n if block is None else block
        proj_s = _best(
            lambda b=b: slice_kernel.project_slices_host(data, rot, coords, columns, 2, R, out, b),
            repeats, lambda: None,
        )  # fmt: skip
        row = {"block": block, "order": order, "slices": n, "points_per_slice": int(M),
               "project_ns_per_point": proj_s / (n * M) * 1e9}  # fmt: skip
        for key, (acc, acc_w) in (("insert", double), ("insert_single", single)):
            ins_s = _best(
                lambda b=b, acc=acc, acc_w=acc_w: slice_kernel.insert_slices_host(
                    acc, acc_w, rot, coords, columns, out, weights, 2, R, b),
                repeats, lambda: None,
            )  # fmt: skip
            row[f"{key}_ns_per_point"] = ins_s / (n * M) * 1e9
        rows.append(row)
    return rows


def print_local_blocks(rows: list[dict], box: int) -> None:
    from streamem.core.slice_kernel import INSERT_SLICE_BLOCK, SLICE_BLOCK

    r0 = rows[0]
    print(f"local-search slices, box {box}: {r0['slices']} slices of {r0['points_per_slice']} "
          f"points, padding 2 (defaults: extraction blocks of {SLICE_BLOCK}, insertion "
          f"{INSERT_SLICE_BLOCK})")  # fmt: skip
    print(f"{'slice block':>12} {'project ns/pt':>14} {'insert ns/pt':>13} "
          f"{'single':>7} {'single/double':>13}")  # fmt: skip
    for r in rows:
        label = "whole call" if r["block"] is None else str(r["block"])
        if r["order"] != "estep":
            label += " by radius"
        ins, ins1 = r["insert_ns_per_point"], r["insert_single_ns_per_point"]
        print(f"{label:>12} {r['project_ns_per_point']:>14.1f} {ins:>13.1f} {ins1:>7.1f} "
              f"{ins1 / ins:>13.2f}")  # fmt: skip
    estep = {r["block"]: r for r in rows if r["order"] == "estep"}
    for r in rows:
        e = estep.get(r["block"]) if r["order"] != "estep" else None
        if e is not None:
            print(f"block {r['block']}: the E-step's point order / radius order: projection "
                  f"{e['project_ns_per_point'] / r['project_ns_per_point']:.2f}, single-precision "
                  f"insertion {e['insert_single_ns_per_point'] / r['insert_single_ns_per_point']:.2f}")  # fmt: skip


def _run(which: str, args) -> int:
    if args.local:
        box = args.box[0] if args.box != list(DEFAULT_BOXES) else 128
        from streamem.core.slice_kernel import INSERT_SLICE_BLOCK, SLICE_BLOCK

        rows = measure_local_blocks(box, repeats=args.repeats)
        defaults = sorted({INSERT_SLICE_BLOCK, SLICE_BLOCK})
        rows += measure_local_blocks(box, repeats=args.repeats, blocks=defaults, order="radius")
        print_local_blocks(rows, box)
        return 0
    main(which, args.box, args.n_slices, args.repeats, args.gpu)
    return 0


def run_project(args) -> int:
    return _run("project", args)


def run_backproject(args) -> int:
    return _run("backproject", args)
