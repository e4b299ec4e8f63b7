"""3D classification on a simulated 60/40 mix of two conformations (asym, asym-B):
class fractions and per-particle assignments against the truth, RELION outputs, CLI."""

import collections

import numpy as np
import pytest
import starfile

from streamem.core.euler import angular_distance_deg, euler_to_matrix
from streamem.em.classify3d import Class3DOptions, classify3d
from streamem.em.estep import seeded_classes
from streamem.em.mstep import resolution_from_ssnr
from streamem.em.significance import significant_class_pairs
from streamem.io.mrc import read_map
from streamem.simulate.particles import simulate_particles, truth_volume_paths

BOX, PIXEL, N = 32, 4.0, 1500
POSES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 60/40 mix of two conformations whose stored poses carry a consensus
    refinement's errors (3° per Euler angle, 1 Å per origin, seeded)."""
    root = tmp_path_factory.mktemp("class3d")
    store = simulate_particles(
        root / "p.zarr", N, box_size=BOX, pixel_size_A=PIXEL, snr=0.2, seed=5,
        phantom=["asym", "asym-B"], mix=[0.6, 0.4], chunk_size=250, max_shift_A=4.0,
    )  # fmt: skip
    truth = store.read_table("truth")
    rng = np.random.default_rng(1)
    for label in POSES:
        store.add_field(label, np.float64)
    noisy = {
        label: truth[label] + rng.normal(0, 3.0 if "Angle" in label else 1.0, N) for label in POSES
    }
    store.write_region(0, metadata=noisy)
    reference, _ = read_map(truth_volume_paths(store.path)[0])  # conformation A only
    return root, store, truth, reference


def _matched_accuracy(truth_classes, found):
    """Fraction of particles in the truth class that is the majority of their class."""
    correct = 0
    for k in np.unique(found):
        correct += collections.Counter(truth_classes[found == k]).most_common(1)[0][1]
    return correct / len(found)


def _fractions_by_truth(truth_classes, found, fractions):
    """Estimated fraction of each true class (the classes whose majority it is)."""
    out = collections.defaultdict(float)
    for k in np.unique(found):
        major = collections.Counter(truth_classes[found == k]).most_common(1)[0][0]
        out[int(major)] += fractions[k - 1]
    return out


@pytest.fixture(scope="module")
def skip_align_run(data):
    root, store, _, reference = data
    options = Class3DOptions(
        n_classes=2, iterations=8, lowres_iterations=3, skip_align=True, ini_high_A=20.0,
        seed=0,
    )  # fmt: skip
    return classify3d(store, reference, root / "skip", options)


def test_skip_align_recovers_the_mix(data, skip_align_run):
    _, store, truth, _ = data
    result = skip_align_run
    tc = truth["rlnClassNumber"]
    accuracy = _matched_accuracy(tc, result.class_numbers)
    assert accuracy >= 0.90, accuracy
    assert result.truth_accuracy.accuracy == pytest.approx(accuracy)  # the job's own score
    est = _fractions_by_truth(tc, result.class_numbers, result.fractions)
    assert set(est) == {1, 2}  # each conformation has its own class
    for k in (1, 2):
        assert abs(est[k] - np.mean(tc == k)) < 0.05, (est, np.mean(tc == 1))


def test_relion_outputs(data, skip_align_run):
    out = skip_align_run.out_dir
    for name in (
        "run_it008_class001.mrc",
        "run_it008_class002.mrc",
        "run_it008_model.star",
        "run_it008_data.star",
        "run_it008_truth.star",
    ):
        assert (out / name).exists(), name
    vol, voxel = read_map(out / "run_it008_class001.mrc")
    assert vol.shape == (BOX,) * 3 and voxel == pytest.approx(PIXEL)
    model = starfile.read(out / "run_it008_model.star", always_dict=True)
    classes = model["model_classes"]
    assert list(classes["rlnReferenceImage"]) == [
        "run_it008_class001.mrc",
        "run_it008_class002.mrc",
    ]
    np.testing.assert_allclose(classes["rlnClassDistribution"].sum(), 1.0, atol=1e-6)
    np.testing.assert_allclose(classes["rlnClassDistribution"], skip_align_run.fractions, atol=1e-5)
    assert (classes["rlnEstimatedResolution"] >= 2 * PIXEL).all()
    for k in (1, 2):  # RELION's estimate: where the class's SSNR (data vs prior) drops below 1
        ssnr = model[f"model_class_{k}"]["rlnSsnrMap"].to_numpy()
        assert classes["rlnEstimatedResolution"][k - 1] == pytest.approx(
            resolution_from_ssnr(ssnr, BOX, PIXEL)
        )
    particles = starfile.read(out / "run_it008_data.star", always_dict=True)["particles"]
    np.testing.assert_array_equal(particles["rlnClassNumber"], skip_align_run.class_numbers)


def test_maps_resemble_their_conformation(data, skip_align_run):
    """Each class map correlates best with the truth volume of its majority class."""
    _, store, truth, _ = data
    truths = [read_map(p)[0] for p in truth_volume_paths(store.path)]
    tc = truth["rlnClassNumber"]
    for k, m in enumerate(skip_align_run.maps, start=1):
        major = collections.Counter(tc[skip_align_run.class_numbers == k]).most_common(1)[0][0]
        cc = [np.corrcoef(m.ravel(), t.ravel())[0, 1] for t in truths]
        assert int(np.argmax(cc)) + 1 == major, cc


@pytest.fixture(scope="module")
def aligned_run(data):
    root, store, _, reference = data
    options = Class3DOptions(
        n_classes=2, iterations=10, lowres_iterations=3, healpix_order=2, local_sigma_deg=8.0,
        offset_range_px=2.0, offset_step_px=1.0, ini_high_A=20.0, seed=0,
    )  # fmt: skip
    return classify3d(store, reference, root / "aligned", options)


def test_alignment_recovers_the_mix(data, aligned_run):
    """The must-show: poses and classes together (local searches around a consensus
    refinement's poses) give the 60/40 fractions within 5 points and >= 90% of the
    particles in their conformation's class."""
    _, _, truth, _ = data
    result = aligned_run
    tc = truth["rlnClassNumber"]
    accuracy = _matched_accuracy(tc, result.class_numbers)
    assert accuracy >= 0.90, accuracy
    est = _fractions_by_truth(tc, result.class_numbers, result.fractions)
    assert set(est) == {1, 2}
    for k in (1, 2):
        assert abs(est[k] - np.mean(tc == k)) < 0.05, (est, np.mean(tc == 1))


def test_alignment_refines_the_poses(data, aligned_run):
    """Poses re-estimated on the fine grid (7.5°) stay within one step of the truth."""
    _, store, truth, _ = data
    result = aligned_run
    from streamem.em import runfiles

    poses = runfiles.read_results(result.out_dir / "particles.zarr", result.iterations)
    stored = store.read_table("metadata")

    def errors(table):
        A = euler_to_matrix(table["rlnAngleRot"], table["rlnAngleTilt"], table["rlnAnglePsi"])
        T = euler_to_matrix(truth["rlnAngleRot"], truth["rlnAngleTilt"], truth["rlnAnglePsi"])
        return angular_distance_deg(A, T)

    refined, before = np.median(errors(poses)), np.median(errors(stored))
    assert refined < 7.5, (refined, before)  # the fine step of order 3


def test_continue_gives_the_uninterrupted_run(data):
    """Stopped after iteration 2 and continued to 3 = three iterations in one go."""
    root, store, _, reference = data
    common = dict(n_classes=2, lowres_iterations=1, skip_align=True, ini_high_A=20.0, seed=0)
    whole = classify3d(store, reference, root / "whole", Class3DOptions(iterations=3, **common))
    classify3d(store, reference, root / "part", Class3DOptions(iterations=2, **common))
    resumed = classify3d(
        store, None, root / "part", Class3DOptions(iterations=3, **common), continue_run=True
    )
    assert resumed.iterations == 3 and len(resumed.history) == 3
    np.testing.assert_array_equal(resumed.class_numbers, whole.class_numbers)
    np.testing.assert_allclose(resumed.maps, whole.maps, atol=1e-4 * np.abs(whole.maps).max())
    np.testing.assert_allclose(resumed.fractions, whole.fractions, atol=1e-6)


def test_continue_needs_a_run(tmp_path, data):
    from streamem.errors import InputError

    with pytest.raises(InputError, match="optimiser"):
        classify3d(data[1], None, tmp_path, Class3DOptions(n_classes=2), continue_run=True)


def test_seeded_classes_are_chunk_invariant_and_balanced():
    index = np.arange(10_000)
    classes = seeded_classes(index, 4, seed=7)
    np.testing.assert_array_equal(classes[2500:5000], seeded_classes(index[2500:5000], 4, 7))
    counts = np.bincount(classes, minlength=4)
    assert counts.min() > 2300 and counts.max() < 2700, counts
    assert np.mean(classes != seeded_classes(index, 4, seed=8)) > 0.6


def test_every_class_is_refined_even_when_one_dominates():
    """A class far less likely at the coarse pass still gets its best pairs refined."""
    T, J = 5, 40
    rng = np.random.default_rng(0)
    lp = rng.normal(0, 1, (T, 3 * J))
    lp[:, :J] += 50.0  # class 1 wins every coarse sample by far
    lp[:, 2 * J :] = -np.inf  # class 3 is empty (log prior −inf)
    t_idx, rows = significant_class_pairs(lp, np.arange(3 * J) // J, 3, 0.999, 8, 4)
    classes = rows // J
    assert set(np.unique(classes)) == {0, 1}
    assert (classes == 1).sum() >= 4  # the best orientations of class 2
    assert np.all(np.isfinite(lp[t_idx, rows]))


def test_cli_bad_input(data, tmp_path):
    from streamem.cli import main

    _, store, _, _ = data
    assert (
        main(
            [
                "class3d",
                str(store.path),
                "--ref",
                str(tmp_path / "missing.mrc"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )


def test_cli_needs_a_reference_unless_continuing(data, tmp_path, capsys):
    from streamem.cli import main

    assert main(["class3d", str(data[1].path), "--out", str(tmp_path / "o")]) == 2
    assert "--ref" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_python_api_exposes_the_classifiers():
    import streamem.api as sm

    assert sm.class3d is classify3d and sm.Class3DOptions is Class3DOptions
    assert callable(sm.class2d) and callable(sm.select)
    assert {"class2d", "class3d", "select"} <= set(sm.__all__)


def test_first_iteration_scores_each_particle_against_its_seeded_class(data):
    """RELION's random seeds: iteration 1 puts every particle in its drawn class;
    without them (and with noise-perturbed starts) the classes come from the data."""
    root, store, _, reference = data
    common = dict(n_classes=2, iterations=1, skip_align=True, ini_high_A=20.0, seed=4)
    seeded = classify3d(store, reference, root / "seeded", Class3DOptions(**common))
    drawn = seeded_classes(np.arange(N), 2, seed=4) + 1
    np.testing.assert_array_equal(seeded.class_numbers, drawn)
    unseeded = classify3d(
        store,
        reference,
        root / "unseeded",
        Class3DOptions(random_seeds=False, perturbation=0.3, **common),
    )
    assert np.mean(unseeded.class_numbers == drawn) < 0.9


def test_relions_reference_power_tau2_runs_and_differs(data, skip_align_run):
    root, store, _, reference = data
    options = Class3DOptions(
        n_classes=2, iterations=3, lowres_iterations=1, skip_align=True, ini_high_A=20.0,
        tau2_from="reference", seed=0,
    )  # fmt: skip
    result = classify3d(store, reference, root / "tau2_reference", options)
    assert np.isfinite(result.maps).all() and result.fractions.sum() == pytest.approx(1.0)
    fsc_run = classify3d(
        store,
        reference,
        root / "tau2_fsc",
        Class3DOptions(**{**options.__dict__, "tau2_from": "fsc"}),
    )
    assert not np.allclose(result.maps, fsc_run.maps, atol=1e-3 * np.abs(fsc_run.maps).max())


def test_tau2_from_must_be_known():
    from streamem.errors import InputError

    with pytest.raises(InputError, match="tau2_from"):
        Class3DOptions(tau2_from="power")


def test_cli_continue_and_seed_options(data, tmp_path):
    from streamem.cli import main

    _, store, _, _ = data
    ref = str(truth_volume_paths(store.path)[0])
    out = str(tmp_path / "run")
    common = ["class3d", str(store.path), "--k", "2", "--skip-align", "--ini-high", "20"]
    common += ["--out", out, "--no-cluster", "--lowres-iterations", "1"]
    assert main(common + ["--ref", ref, "--iterations", "1", "--no-random-seeds"]) == 0
    first = starfile.read(tmp_path / "run" / "run_it001_data.star", always_dict=True)["particles"]
    assert np.mean(first["rlnClassNumber"] == seeded_classes(np.arange(N), 2, 0) + 1) < 0.9
    assert main(common + ["--iterations", "2", "--continue"]) == 0
    assert (tmp_path / "run" / "run_it002_model.star").exists()


def test_class_tau2_sources():
    """pooled: one τ² for every class, the size-weighted mean of the classes' map powers;
    reference: each class's own (RELION); fsc: none (from the half FSCs)."""
    from streamem.em.class_halves import class_tau2
    from streamem.em.mstep import tau2_from_map

    rng = np.random.default_rng(0)
    maps = rng.standard_normal((2, 16, 16, 16)).astype(np.float32)
    maps[1] *= 0.5  # the smaller, more shrunk class: a quarter of the power
    mask = np.zeros((16,) * 3, np.float32)
    mask[4:12, 4:12, 4:12] = 1.0
    own = [tau2_from_map(m * mask) for m in maps]
    assert own[1][3:].mean() == pytest.approx(0.25 * own[0][3:].mean(), rel=0.2)
    reference = class_tau2(maps, [0.7, 0.3], mask, "reference")
    np.testing.assert_allclose(reference, own)
    pooled = class_tau2(maps, [0.7, 0.3], mask, "pooled")
    np.testing.assert_allclose(pooled[0], pooled[1])
    np.testing.assert_allclose(pooled[0], 0.7 * own[0] + 0.3 * own[1])
    assert class_tau2(maps, [0.7, 0.3], mask, "fsc") == [None, None]


@pytest.mark.parametrize("n_images, noise, fudge", [(200, 1.0, 4.0), (600, 2.0, 1.0)])
def test_half_map_error_power_predicts_the_maps_error(n_images, noise, fudge):
    """The error power the crossed scores subtract is what a regularised reconstruction
    gets wrong: back-project noisy central slices of a known map (weighted by 1/σ², as
    the E-step does), reconstruct with the map's own power as τ², and compare the
    measured error power per shell with the prediction from the weights alone. Shells
    1-4 hold the reconstruction's interpolation error too (the same for every class,
    and at high SNR it dominates); where the data's noise dominates, from shell 5 on,
    the prediction holds to ±30%."""
    from scipy.spatial.transform import Rotation

    from streamem.core.backprojector import empty_accumulators, insert_points, reconstruct
    from streamem.core.filters import lowpass
    from streamem.core.projector import make_projector, project_points
    from streamem.em import mstep
    from streamem.em.class_halves import half_map_error_power
    from streamem.em.fourier_points import half_plane_points

    B, pf, radius = 32, 2, 14
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:B, :B, :B] - B // 2
    sphere = (np.sqrt(x * x + y * y + z * z) < 10).astype(np.float32)
    volume = lowpass(rng.standard_normal((B,) * 3).astype(np.float32), 3.0, 1.0) * sphere
    coords, _, _ = half_plane_points(B, radius)
    rotations = Rotation.random(n_images, random_state=1).as_matrix()
    slices = project_points(make_projector(volume, pf, max_radius_px=radius), rotations, coords)
    sigma2 = noise * float(np.mean(np.abs(slices) ** 2)) / 2  # per complex component
    shape = slices.shape
    images = slices + np.sqrt(sigma2) * (
        rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    )
    data, weight = empty_accumulators(B, pf, max_radius_px=radius)
    insert_points(data, weight, rotations, coords, images / sigma2,
                  np.full(coords.shape[0], 1 / sigma2), pf)  # fmt: skip
    tau2 = mstep.tau2_from_map(volume)
    made = reconstruct(data, weight, B, pf, tau2, tau2_fudge=fudge)
    measured = mstep.tau2_from_map(made - volume)
    predicted = half_map_error_power(
        np.stack([weight, weight]), [tau2], None, B, pf, fudge, None, None, B // 2 + 1
    )
    assert predicted.shape == (2, 1, B // 2 + 1)
    ratio = measured[5:radius] / predicted[0, 0, 5:radius]
    assert np.all((ratio > 0.7) & (ratio < 1.3)), ratio
    # fewer images: a larger error, and with no weight at all the error is the power itself
    fewer = half_map_error_power(
        np.stack([weight / 4, weight]), [tau2], None, B, pf, fudge, None, None, B // 2 + 1
    )
    assert np.all(fewer[0, 0, 1:radius] > fewer[1, 0, 1:radius])
    empty = half_map_error_power(
        np.zeros((2, *weight.shape)), [tau2], None, B, pf, fudge, None, None, B // 2 + 1
    )
    np.testing.assert_allclose(empty[0, 0, 1:radius], tau2[1:radius])


def test_half_classes_are_paired_and_repaired():
    """A state that is class 3 in half 1 and class 1 in half 2 is paired back (the
    classes share a consensus that the pairing ignores); half 2's accumulators and
    class weights are re-ordered to match."""
    from types import SimpleNamespace

    from streamem.em.class_halves import half_class_pairing, repair_second_half

    rng = np.random.default_rng(1)
    consensus = 10 * rng.standard_normal((12, 12, 12))
    states = consensus + rng.standard_normal((3, 12, 12, 12))  # small differences
    permutation = np.array([2, 0, 1])  # half 2's class j holds half 1's state permutation[j]
    half_1 = states + 0.3 * rng.standard_normal(states.shape)
    half_2 = states[permutation] + 0.3 * rng.standard_normal(states.shape)
    pairing = half_class_pairing(np.stack([half_1, half_2]), None)
    np.testing.assert_array_equal(permutation[pairing], [0, 1, 2])
    assert list(half_class_pairing(np.stack([half_1, half_1]), None)) == [0, 1, 2]
    # two of four classes emptied: the two populated ones still pair by their difference
    empty = np.zeros((1, 12, 12, 12))
    four_1 = np.concatenate([empty, half_1[:2], empty])
    four_2 = np.concatenate([half_2[[1, 2]][::-1], empty, empty])  # states 1, 0 at 0, 1
    pairing_4 = half_class_pairing(np.stack([four_1, four_2]), None)
    assert list(pairing_4[[1, 2]]) == [1, 0]

    acc = np.arange(6, dtype=np.float64)[:, None] * np.ones((6, 4))  # accumulator 2k + h
    weights = np.array([[5.0, 6.0, 7.0], [1.0, 2.0, 3.0]])
    stats = SimpleNamespace(data_acc=acc.astype(np.complex128), weight_acc=acc.copy(),
                            class_weight_halves=weights.copy(), class_weight=weights.sum(0))  # fmt: skip
    repair_second_half(stats, pairing)
    np.testing.assert_array_equal(stats.weight_acc[[0, 2, 4], 0], [0, 2, 4])  # half 1 kept
    np.testing.assert_array_equal(stats.weight_acc[[1, 3, 5], 0], 2 * pairing + 1)
    np.testing.assert_array_equal(stats.class_weight_halves[1], weights[1][pairing])
    np.testing.assert_array_equal(stats.class_weight, weights[0] + weights[1][pairing])


def test_reference_error_power_raises_each_class_score_by_its_expected_residual():
    """Two identical class references, the second with a known error power e per
    shell: each image's odds for class 2 grow by exp(Σ_k c²/σ² · e), the residual that
    error adds in expectation (CTF off, σ² = 1: M·e over the M Fourier points used)."""
    from test_backprojector import random_rotations
    from test_projector import smooth_volume

    from streamem.core.ctf import OpticsParams
    from streamem.core.euler import matrix_to_euler
    from streamem.core.projector import make_projector, project_images
    from streamem.em.estep import EStepModel, SearchGrid, expectation
    from streamem.em.fourier_points import half_plane_points

    box, n, radius = 24, 40, 10.0
    rng = np.random.default_rng(0)
    projector = make_projector(smooth_volume(box, seed=0).astype(np.float32))
    rotations = random_rotations(n, rng)
    images = project_images(projector, rotations)
    images = (images + rng.normal(0, images.std(), images.shape)).astype(np.float32)
    rot, tilt, psi = matrix_to_euler(rotations)
    metadata = {"rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi,
                "rlnRandomSubset": np.arange(n) % 2 + 1, "particle_index": np.arange(n)}  # fmt: skip
    n_points = half_plane_points(box, radius)[0].shape[0]
    error = np.zeros((2, box // 2 + 1))
    error[1, :] = 1.0 / n_points  # class 2's map: Σ c²/σ² · e = 1 for every image

    def class_weights(error_power):
        model = EStepModel(
            projectors=(projector, projector), box_size=box, work_box=box, pixel_size_A=3.0,
            max_radius_px=radius, inv_sigma2=np.ones((1, box // 2 + 1)),
            optics=(OpticsParams(300.0, 2.7, 0.1),), sigma_offset_A=3.0,
            grid=SearchGrid(healpix_order=2), do_ctf=False, n_classes=2,
            references_per_half=False, log_class_prior=np.log([0.5, 0.5]), skip_align=True,
            reference_error_power=error_power,
        )  # fmt: skip
        stats, _ = expectation(images, metadata, model)
        return stats.class_weight / n

    np.testing.assert_allclose(class_weights(None), [0.5, 0.5], atol=1e-6)
    odds = np.exp(1.0)
    np.testing.assert_allclose(class_weights(error), [1 / (1 + odds), odds / (1 + odds)], rtol=1e-4)


def test_relabel_classes_renames_the_second_halfs_particles_only(tmp_path):
    """After a re-pairing, half 2's particles take the labels of half 1's classes
    (``pairing[k]`` the half-2 class of half-1 class k); half 1's keep theirs."""
    from streamem.em.estep import particle_halves
    from streamem.em.runfiles import relabel_classes
    from streamem.io.results import create_results_arrays, read_results, write_results
    from streamem.simulate.particles import simulate_particles

    n = 12
    store = simulate_particles(tmp_path / "p.zarr", n, box_size=16, pixel_size_A=4.0, snr=1.0,
                               seed=0)  # fmt: skip
    second = particle_halves(store) == 1
    assert 0 < second.sum() < n
    results = tmp_path / "particles.zarr"
    create_results_arrays(results, 2, n, 6)
    classes = np.arange(n) % 3 + 1
    write_results(str(results), 2, 0, {"rlnClassNumber": classes})
    relabel_classes(results, 2, store, half=1, pairing=np.array([2, 0, 1]))
    got = read_results(str(results), 2)["rlnClassNumber"]
    np.testing.assert_array_equal(got[~second], classes[~second])
    renamed = {3: 1, 1: 2, 2: 3}  # half 2's class 3 is half 1's class 1, and so on
    np.testing.assert_array_equal(got[second], [renamed[c] for c in classes[second]])
