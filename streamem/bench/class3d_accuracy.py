"""``streamem bench class3d-accuracy``: class3d on a simulated 60/40 mix, against the truth.

The mix of the two built-in conformations (``asym`` 60%, ``asym-B`` 40%; box 32,
4 Å/px, SNR 0.2 unless given) is simulated with its true poses copied into the
store's metadata (as after a consensus refinement; ``--pose-noise-deg`` adds seeded
Gaussian errors of that size to each Euler angle and a third of it in Å to each
origin), then classified into K=2 classes from conformation A's map, with
``--search global`` (the stored poses are not used), ``local`` (σ 8° around them at
HEALPix order 2, offsets ±2 px) or ``skip`` (--skip-align). Reported: the share of
particles in their conformation's class, the estimated and true fraction of A,
the median angular error and seconds per iteration. The numbers of issue 6's notes
come from this command.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

POSE_LABELS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser(
        "class3d-accuracy",
        help="class3d on a simulated two-conformation mix, scored against the truth",
        description=__doc__,
    )
    p.add_argument("--n-particles", type=int, default=600)
    p.add_argument("--snr", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=3, help="simulation seed (default 3)")
    p.add_argument("--search", choices=("global", "local", "skip"), default="local")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--tau2-from", choices=("fsc", "reference"), default="fsc")
    p.add_argument("--tau2-fudge", type=float, default=4.0)
    p.add_argument("--pose-noise-deg", type=float, default=0.0)
    p.add_argument("--no-random-seeds", action="store_true")
    p.add_argument("--perturbation", type=float, default=0.0)
    p.set_defaults(func=run)


def measure(
    n_particles=600,
    snr=0.2,
    seed=3,
    search="local",
    iterations=10,
    tau2_from="fsc",
    tau2_fudge=4.0,
    pose_noise_deg=0.0,
    random_seeds=True,
    perturbation=0.0,
) -> dict:
    from streamem.core.euler import angular_distance_deg, euler_to_matrix
    from streamem.em import runfiles
    from streamem.em.classify3d import Class3DOptions, classify3d
    from streamem.io.mrc import read_map
    from streamem.simulate.particles import simulate_particles, truth_volume_paths

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = simulate_particles(
            root / "p.zarr", n_particles, box_size=32, pixel_size_A=4.0, snr=snr, seed=seed,
            phantom=["asym", "asym-B"], mix=[0.6, 0.4], chunk_size=100, max_shift_A=4.0,
        )  # fmt: skip
        truth = store.read_table("truth")
        rng = np.random.default_rng([seed, 1])
        for label in POSE_LABELS:
            store.add_field(label, np.float64)
        errors = {
            label: rng.normal(
                0, pose_noise_deg if "Angle" in label else pose_noise_deg / 3, n_particles
            )
            for label in POSE_LABELS
        }
        store.write_region(0, metadata={k: truth[k] + errors[k] for k in POSE_LABELS})
        reference, _ = read_map(truth_volume_paths(store.path)[0])
        search_options = {
            "global": {},
            "local": dict(local_sigma_deg=8.0, offset_range_px=2.0, offset_step_px=1.0),
            "skip": dict(skip_align=True),
        }[search]
        options = Class3DOptions(
            n_classes=2, iterations=iterations, lowres_iterations=3, healpix_order=2,
            ini_high_A=20.0, tau2_from=tau2_from, tau2_fudge=tau2_fudge, seed=0,
            random_seeds=random_seeds, perturbation=perturbation, **search_options,
        )  # fmt: skip
        t0 = time.perf_counter()
        result = classify3d(store, reference, root / "run", options)
        seconds = time.perf_counter() - t0
        poses = runfiles.read_results(root / "run" / "particles.zarr", result.iterations)
        found = euler_to_matrix(poses["rlnAngleRot"], poses["rlnAngleTilt"], poses["rlnAnglePsi"])
        true = euler_to_matrix(truth["rlnAngleRot"], truth["rlnAngleTilt"], truth["rlnAnglePsi"])
    accuracy = result.truth_accuracy
    fraction_a = float(
        sum(f for f, m in zip(result.fractions, accuracy.majority, strict=True) if m == 1)
    )
    return {
        "accuracy": accuracy.accuracy,
        "per_truth": accuracy.per_truth,
        "fraction_a": fraction_a,
        "true_fraction_a": float(np.mean(truth["rlnClassNumber"] == 1)),
        "median_angular_error_deg": float(np.median(angular_distance_deg(found, true))),
        "seconds_per_iteration": seconds / result.iterations,
    }


def run(args) -> int:
    r = measure(
        args.n_particles, args.snr, args.seed, args.search, args.iterations, args.tau2_from,
        args.tau2_fudge, args.pose_noise_deg, not args.no_random_seeds, args.perturbation,
    )  # fmt: skip
    per = " ".join(f"{k}:{100 * v:.1f}%" for k, v in r["per_truth"].items())
    print(f"correct                 {100 * r['accuracy']:.1f}%  (per true class {per})")
    print(f"fraction of A           {r['fraction_a']:.3f}  (true {r['true_fraction_a']:.3f})")
    print(f"median angular error    {r['median_angular_error_deg']:.2f}°")
    print(f"seconds per iteration   {r['seconds_per_iteration']:.1f}")
    return 0
