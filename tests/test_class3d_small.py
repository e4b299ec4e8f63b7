"""Consensus-then-classify (issue 25): refine3d of the whole set, then class3d --from-refine.

The mix: ``asym`` 60% and ``asym-del`` 40% (asym lacking a 6.0% edge cap), 300
particles at box 32 and SNR 0.5 (exaggerated: at SNR 0.2 the box-32 consensus's poses
are too poor for 300 particles). ``asym-del15`` (15%) is no easier here: without most
of its small domain the molecule is nearly flat, and refine3d flips the poses of half
of those particles.
"""

import numpy as np
import pytest

from streamem.em import runfiles
from streamem.em.classify3d import Class3DOptions, classify3d
from streamem.em.consensus import POSE_FIELDS
from streamem.em.refine import RefineOptions, refine3d
from streamem.errors import InputError
from streamem.io.mrc import read_map, write_map
from streamem.simulate.particles import simulate_particles, truth_volume_paths
from streamem.simulate.phantoms import deletion_fraction, phantom, phantom_atoms

BOX, PIXEL, N = 32, 4.0, 300


def test_edge_deletion_removes_the_stated_fraction_at_an_edge():
    box_A = 64 * 4.0
    assert deletion_fraction("asym-del", box_A) == pytest.approx(0.06, abs=0.002)
    assert deletion_fraction("asym-del15", box_A) == pytest.approx(0.15, abs=0.002)
    assert deletion_fraction("asym-B", box_A) == 0.0
    full, less = phantom_atoms("asym", box_A), phantom_atoms("asym-del", box_A)
    # a subset of asym's atoms (same frame), the missing ones far from the centre
    kept = {tuple(p) for p in np.round(less.positions_A, 6)}
    gone = np.array([p for p in np.round(full.positions_A, 6) if tuple(p) not in kept])
    assert len(gone) + len(less) == len(full)
    com = full.centre_of_mass_A()
    r_gone = np.linalg.norm(gone - com, axis=1)
    r_all = np.linalg.norm(full.positions_A - com, axis=1)
    assert np.median(r_gone) > np.percentile(r_all, 85)  # at an edge
    assert np.ptp(gone, axis=0).max() < 0.6 * np.ptp(full.positions_A, axis=0).max()  # one piece
    a, d = phantom("asym", 64, 4.0), phantom("asym-del", 64, 4.0)
    # in the maps: the deletion only removes density (no voxel gains), and what it removes
    # lies at the edge (its centroid farther out than 85% of the full map's density)
    lost = a - d
    assert lost.min() >= -1e-6 * a.max()
    grid = np.stack(np.meshgrid(*[np.arange(64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    centre = (grid * a.reshape(-1, 1)).sum(0) / a.sum()
    lost_centroid = (grid * lost.reshape(-1, 1)).sum(0) / lost.sum()
    r_full = np.linalg.norm(grid - centre, axis=1)
    order = np.argsort(r_full)
    cum = np.cumsum(a.reshape(-1)[order]) / a.sum()
    r85 = r_full[order][np.searchsorted(cum, 0.85)]
    assert np.linalg.norm(lost_centroid - centre) > r85


@pytest.fixture(scope="module")
def consensus(tmp_path_factory):
    root = tmp_path_factory.mktemp("consensus")
    store = simulate_particles(
        root / "p.zarr", N, box_size=BOX, pixel_size_A=PIXEL, snr=0.5, seed=5,
        phantom=["asym", "asym-del"], mix=[0.6, 0.4], chunk_size=150, max_shift_A=4.0,
    )  # fmt: skip
    reference, _ = read_map(truth_volume_paths(store.path)[0])
    refine = refine3d(store, reference, root / "refine", RefineOptions(max_iterations=4))
    return root, store, refine


def test_skip_align_from_refine_separates_the_states(consensus):
    """At this toy size (75 particles per class and half) the half maps are too noisy to
    cross: RELION's joined classes (--no-cross-half) gave 90/88% per state, crossed ones
    73/86%, crossed with the unbiased scores (the default) 82/86% (pooled τ², 6
    iterations, a scratch run of this fixture's data). At box 128 the crossing is what
    separates them (the class3d docstring)."""
    root, store, refine = consensus
    options = Class3DOptions(
        n_classes=2, iterations=6, lowres_iterations=2, ini_high_A=20.0, skip_align=True,
        from_refine=str(root / "refine"), cross_half=False,
    )  # fmt: skip
    result = classify3d(store, None, root / "skip", options)
    per_state = result.truth_accuracy.per_truth
    assert set(result.truth_accuracy.majority) == {1, 2}, result.truth_accuracy.composition
    assert min(per_state.values()) >= 0.8, per_state
    # the consensus's poses were kept (skip_align) and its noise model was the start
    poses = runfiles.read_results(root / "skip" / "particles.zarr", 1)
    for label in POSE_FIELDS:
        np.testing.assert_allclose(poses[label], refine.poses[label])
    first = runfiles.latest_state(root / "refine", ("inv_sigma2",))["inv_sigma2"]
    start = runfiles.read_results(root / "skip" / "particles.zarr", 0)
    np.testing.assert_allclose(start["rlnAngleRot"], refine.poses["rlnAngleRot"])
    assert np.asarray(first).shape == (1, BOX // 2 + 1)


@pytest.mark.parametrize("cross_half", [True, False])
def test_each_half_meets_the_other_halfs_classes(consensus, tmp_path, monkeypatch, cross_half):
    """cross_half: from iteration 2 the E-step gets references per half, those of half h
    being the classes reconstructed from the other half's particles (written as
    run_itNNN_half{1,2}_classKKK.mrc); without it, the K joined maps for everyone."""
    from streamem.em import engine

    root, store, _ = consensus
    seen = []
    real = engine.estep_model_3d

    def spy(ctx, state, maps, *args, **fields):
        seen.append((np.array(maps), fields["references_per_half"]))
        return real(ctx, state, maps, *args, **fields)

    monkeypatch.setattr(engine, "estep_model_3d", spy)
    options = Class3DOptions(
        n_classes=2, iterations=2, ini_high_A=20.0, skip_align=True,
        from_refine=str(root / "refine"), cross_half=cross_half,
    )  # fmt: skip
    classify3d(store, None, tmp_path / "run", options)
    (first, per_half_1), (second, per_half_2) = seen
    assert not per_half_1 and first.shape[0] == 2  # iteration 1: the K joined starts
    halves = sorted(tmp_path.glob("run/run_it001_half*_class*.mrc"))
    if not cross_half:
        assert not per_half_2 and second.shape[0] == 2 and not halves
        return
    assert per_half_2 and second.shape[0] == 4 and len(halves) == 4
    half = {(h, k): read_map(tmp_path / f"run/run_it001_half{h}_class00{k}.mrc")[0]
            for h in (1, 2) for k in (1, 2)}  # fmt: skip
    for k in (1, 2):  # projectors[h·K + k]: half 1's particles meet half 2's classes
        np.testing.assert_allclose(second[k - 1], half[2, k], atol=1e-6)
        np.testing.assert_allclose(second[2 + k - 1], half[1, k], atol=1e-6)
        assert not np.allclose(half[1, k], half[2, k], atol=1e-3 * np.abs(half[1, k]).max())
    joined = read_map(tmp_path / "run/run_it001_class001.mrc")[0]
    assert np.corrcoef(joined.ravel(), (half[1, 1] + half[2, 1]).ravel())[0, 1] > 0.9


def test_local_searches_start_at_the_consensus_poses(consensus):
    """--local: iteration 1 searches around the consensus's poses, not the whole sphere."""
    from streamem.core.euler import angular_distance_deg, euler_to_matrix

    root, store, refine = consensus
    options = Class3DOptions(
        n_classes=2, iterations=1, ini_high_A=20.0, local_sigma_deg=5.0, offset_range_px=2.0,
        from_refine=str(root / "refine"),
    )  # fmt: skip
    classify3d(store, None, root / "local", options)
    poses = runfiles.read_results(root / "local" / "particles.zarr", 1)

    def matrices(t):
        return euler_to_matrix(t["rlnAngleRot"], t["rlnAngleTilt"], t["rlnAnglePsi"])

    moved = angular_distance_deg(matrices(poses), matrices(refine.poses))
    assert np.percentile(moved, 90) < 20.0, np.percentile(moved, 90)  # 3σ of 5° is 15°


def test_from_refine_refuses_what_is_not_a_finished_refinement(consensus, tmp_path):
    root, store, _ = consensus
    options = Class3DOptions(n_classes=2, iterations=1, skip_align=True)
    with pytest.raises(InputError, match="not a folder"):
        classify3d(store, None, tmp_path / "o1", Class3DOptions(from_refine=str(tmp_path / "x")))
    with pytest.raises(InputError, match="optimiser"):  # no checkpoint
        classify3d(store, None, tmp_path / "o2", Class3DOptions(from_refine=str(tmp_path)))
    with pytest.raises(InputError, match="refine3d"):  # a class3d run folder
        classify3d(
            store, None, tmp_path / "o3",
            Class3DOptions(**{**options.__dict__, "from_refine": str(root / "skip")}),
        )  # fmt: skip
    other = simulate_particles(tmp_path / "q.zarr", 20, box_size=BOX, pixel_size_A=PIXEL, seed=1)
    with pytest.raises(InputError, match="another store"):
        classify3d(
            other, None, tmp_path / "o4",
            Class3DOptions(**{**options.__dict__, "from_refine": str(root / "refine")}),
        )  # fmt: skip


def test_solvent_mask_is_checked_and_used(consensus, tmp_path):
    root, store, _ = consensus
    common = dict(n_classes=2, iterations=1, skip_align=True, from_refine=str(root / "refine"))
    bad = tmp_path / "bad.mrc"
    write_map(bad, np.full((BOX,) * 3, 2.0, np.float32), PIXEL)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        classify3d(store, None, tmp_path / "o", Class3DOptions(solvent_mask=str(bad), **common))
    assert not (tmp_path / "o").exists()  # refused before the run folder is made
    mask = np.zeros((BOX,) * 3, np.float32)
    mask[8:24, 8:24, 8:24] = 1.0
    write_map(tmp_path / "m.mrc", mask, PIXEL)
    masked = classify3d(
        store, None, tmp_path / "masked",
        Class3DOptions(solvent_mask=str(tmp_path / "m.mrc"), **common),
    )  # fmt: skip
    sphere = classify3d(store, None, tmp_path / "sphere", Class3DOptions(**common))
    assert np.isfinite(masked.maps).all()
    # the references' τ² is the masked map's power: another mask, other maps
    assert not np.allclose(masked.maps, sphere.maps, atol=1e-3 * np.abs(sphere.maps).max())


def test_cli_from_refine(consensus, tmp_path, capsys):
    from streamem.cli import main

    root, store, _ = consensus
    base = ["class3d", str(store.path), "--k", "2", "--no-cluster", "--iterations", "1"]
    out = tmp_path / "cli"
    assert (
        main(base + ["--skip-align", "--from-refine", str(root / "refine"), "--out", str(out)]) == 0
    )
    assert (out / "run_it001_data.star").exists()
    ref = str(truth_volume_paths(store.path)[0])
    both = ["--ref", ref, "--from-refine", str(root / "refine"), "--out", str(tmp_path / "b")]
    assert main(base + both) == 2
    assert "not both" in capsys.readouterr().err


def test_bench_consensus_workflow_on_the_small_mix(tmp_path):
    """``bench class3d-accuracy --mix small --workflow consensus`` runs end to end (tiny);
    with ``--workdir`` a second run reuses the mix and the consensus refinement."""
    from streamem.bench.class3d_accuracy import measure

    tiny = dict(n_particles=60, search="skip", iterations=1, mix="small", workflow="consensus",
                refine_iterations=2, chunk_size=30, workdir=tmp_path)  # fmt: skip
    r = measure(**tiny)
    assert r["state"] == "asym-del" and r["difference_fraction"] == pytest.approx(0.06, abs=0.002)
    assert set(r["per_truth"]) == {1, 2} and 0.0 <= r["accuracy"] <= 1.0
    assert r["refine_seconds"] > 0 and r["seconds_per_iteration"] > 0
    (refined,) = tmp_path.glob("*-refine2/run_class001.mrc")
    (store,) = tmp_path.glob("*.zarr")
    kept = {p: p.stat().st_mtime_ns for p in (refined, store / "zarr.json")}
    again = measure(**{**tiny, "n_classes": 3})
    assert again["refine_seconds"] == 0  # the consensus was reused, not run again
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    runs = sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.glob("class3d-*"))
    assert runs == ["class3d-consensus-skip-k2", "class3d-consensus-skip-k3"]
    assert again["run_dir"] != r["run_dir"]
    with pytest.raises(InputError, match="local or skip"):
        measure(n_particles=60, search="global", workflow="consensus")
