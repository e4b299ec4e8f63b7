"""The batched coarse pass and significance (em/coarse_pass.py) give the per-image
path's statistics and poses (global, local, two classes with priors), the batched
significance picks the per-image rule's pairs, and the phase timer is exclusive and
sums over tasks."""

import time
from dataclasses import replace

import numpy as np
import pytest
from _estep_data import largest_relative_difference, refine_model, simulated_chunk, two_class_model

from streamem.em.coarse_pass import coarse_orientations, coarse_radius_points, significant_pairs
from streamem.em.estep import expectation
from streamem.em.fourier_points import half_plane_points
from streamem.em.phases import PHASES, PhaseTimer, phase_table
from streamem.em.significance import significant_class_pairs

BOX, PIXEL, N = 32, 4.5, 48


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    store, chunk, metadata, truth = simulated_chunk(
        tmp_path_factory.mktemp("coarse_batched"),
        N,
        box=BOX,
        pixel_size_A=PIXEL,
        snr=0.5,
        seed=5,
        pose_noise_seed=4,
        pose_noise_deg=3.0,
    )
    model = refine_model(
        store, chunk.images, truth, box=BOX, pixel_size_A=PIXEL, healpix_order=2, scale_free=False
    )
    return chunk.images, metadata, model, truth


def _models(model, truth):
    local = replace(model, grid=replace(model.grid, healpix_order=3, local_sigma_deg=5.0))
    classes = two_class_model(local, truth, log_class_prior=np.log([0.7, 0.3]))
    prepass = replace(local, grid=replace(local.grid, local_prepass=True))
    return {"global": model, "local": local, "local K=2": classes, "local pre-pass": prepass}


@pytest.mark.parametrize("name", ["global", "local", "local K=2", "local pre-pass"])
def test_batched_coarse_pass_gives_the_per_image_statistics(data, name):
    images, metadata, model, truth = data
    model = _models(model, truth)[name]
    s_old, r_old = expectation(images, metadata, replace(model, coarse={}), batched=False)
    s_new, r_new = expectation(images, metadata, replace(model, coarse={}), batched=True)
    worst = largest_relative_difference(s_old, s_new)
    print(f"{name}: largest relative difference {worst:.2e}")
    assert worst < 1e-5, worst
    for f in ("rot", "tilt", "psi", "origin_x_A", "origin_y_A", "class_number", "n_significant"):
        np.testing.assert_array_equal(getattr(r_old, f), getattr(r_new, f), err_msg=f)
    # both paths count the same useful GEMM work or more (padding), and time every phase
    assert s_new.coarse_flops >= s_old.coarse_flops > 0
    assert {"read_fft", "projection", "coarse_gemm", "significance", "fine"} <= set(
        s_new.phase_seconds
    )
    assert "backprojection" in s_new.phase_seconds
    # both project the same slices and insert the same rows, every one of whole points
    M = images.shape[-1] * (images.shape[-1] // 2 + 1)  # no slice has more points
    assert s_new.phase_points == s_old.phase_points
    assert M < s_new.phase_points["projection"] and M < s_new.phase_points["backprojection"]


@pytest.mark.parametrize(
    "K, C, cap, dtype",
    [
        (1, 40, 12, np.float32),
        (3, 40, 12, np.float32),
        (2, 6, 12, np.float64),
        (1, 40, 3, np.float64),
    ],
)
def test_batched_significance_is_the_per_image_rule(K, C, cap, dtype):
    """Also where the cap exceeds the columns (every column can hold a top pair), for an
    image with no finite sample (K = 1: its first pair), and for posteriors so broad
    (scale 40) that every sample is within the 30-nat floor or so sharp that few are."""
    rng = np.random.default_rng(K + C)
    n, T = 7, 5
    lp = rng.normal(0, 3, (n, T, K, C)) * rng.uniform(0.2, 40, (n, 1, 1, 1))
    lp[1] *= 0.01  # nearly flat: the cap, not the mass, ends the list
    if C > 10:
        lp[:, :, :, C - 7 :] = -np.inf  # padding columns
    lp[2, :, :, 3:] = -np.inf  # an image with fewer candidates
    if K > 1:
        lp[4, :, 1, :] = -np.inf  # a class this image never meets (a seeded class)
    else:
        lp[5] = -np.inf
    lp = lp.astype(dtype)
    got = significant_pairs(lp, 0.99, cap, 4, block_bytes=3 * 40 * T * K * C)  # blocks of 3
    for i in range(n):
        flat = lp[i].reshape(T, K * C)  # (T, K·C) class-major
        t_ref, c_ref = significant_class_pairs(flat, np.arange(K * C) // C, K, 0.99, cap, 4)
        np.testing.assert_array_equal(got[i][0], t_ref)
        np.testing.assert_array_equal(got[i][1], c_ref)
    if K > 1:
        assert not np.any(got[4][1] // C == 1)


def test_phase_timer_is_exclusive_and_sums():
    timer = PhaseTimer()
    with timer("fine"):
        time.sleep(0.02)
        with timer("backprojection"):
            time.sleep(0.05)
    s = timer.seconds
    assert 0.045 < s["backprojection"] < 0.2
    assert 0.015 < s["fine"] < 0.045  # the nested phase is not counted twice
    from streamem.em.statistics import SufficientStatistics

    a = SufficientStatistics.empty((3, 3, 2), 1, 4)
    b = SufficientStatistics.empty((3, 3, 2), 1, 4)
    a.phase_seconds.update(fine=1.0)
    b.phase_seconds.update(fine=2.0, projection=0.5)
    a.coarse_flops, b.coarse_flops = 1e9, 2e9
    a.phase_points.update(projection=1e9)
    b.phase_points.update(projection=3e9, backprojection=1e6)
    total = a + b
    assert total.phase_seconds.pop("reduction") > 0  # the sum times itself
    assert total.phase_seconds == {"fine": 3.0, "projection": 0.5}
    a += b
    assert a.phase_seconds.pop("reduction") > 0
    assert a.phase_seconds == total.phase_seconds and a.coarse_flops == 3e9
    assert a.phase_points == total.phase_points == {"projection": 4e9, "backprojection": 1e6}
    line = phase_table({p: 1.0 for p in PHASES}, coarse_flops=4e9, sgemm_flops=8e9)
    assert "(0.50 of SGEMM)" in line and line.startswith("read_fft 1.0")
    line = phase_table({"projection": 8.0, "fine": 1.0}, points=a.phase_points)
    assert line == "projection 8.0 (4.00 Gpt, 2.0 ns/pt)  fine 1.0"


@pytest.mark.parametrize("waste", [1, 3, 10**6])
def test_local_score_groups_of_any_size_give_the_per_image_statistics(data, waste, monkeypatch):
    """One dense GEMM per group against a run of the union's rows (groups of one image,
    a few, or the whole part) scores each image as the per-image loop does."""
    from streamem.em import coarse_pass

    images, metadata, model, truth = data
    local = _models(model, truth)["local"]
    _, r_old = expectation(images, metadata, replace(local, coarse={}), batched=False)
    monkeypatch.setattr(coarse_pass, "LOCAL_GROUP_WASTE", waste)
    seen = []
    groups = coarse_pass.local_score_groups
    monkeypatch.setattr(
        coarse_pass,
        "local_score_groups",
        lambda *a: [seen.append(g) or g for g in groups(*a)],
    )
    s_new, r_new = expectation(images, metadata, replace(local, coarse={}), batched=True)
    s_ref, _ = expectation(images, metadata, replace(local, coarse={}), batched=False)
    assert largest_relative_difference(s_ref, s_new) < 1e-5
    for f in ("rot", "tilt", "psi", "origin_x_A", "origin_y_A", "n_significant"):
        np.testing.assert_array_equal(getattr(r_old, f), getattr(r_new, f), err_msg=f)
    sizes = [g.stop - g.start for g, _ in seen]
    if waste == 1:  # a run never exceeds one image's count: groups of one image mostly
        assert max(sizes) <= 2
        assert any(not isinstance(r, range) for _, r in seen)  # some gathered alone
    if waste == 10**6:  # every part is one group, scored on a run (a view) of the union
        assert all(isinstance(r, range) for _, r in seen) and len(seen) == 2  # two halves


def test_local_score_groups_cover_the_part_in_order_and_hold_each_images_rows():
    from streamem.em.coarse_pass import LOCAL_GROUP_WASTE, local_score_groups

    rng = np.random.default_rng(3)
    # first-met order: an image's rows mostly its own run, some met before (shared)
    own, first = [], 0
    for _ in range(30):
        c = int(rng.integers(20, 40))
        shared = rng.integers(max(0, first - 4), first, 3) if first else np.zeros(0, int)
        own.append(np.unique(np.concatenate([np.arange(first, first + c), shared])))
        first += c
    own[7] = np.unique(np.concatenate([own[7], [0]]))  # one image spread wide
    groups = list(local_score_groups(own, first, 2, 9, 100))
    assert groups[0][0].start == 0 and groups[-1][0].stop == 30
    for (a, _), (b, _) in zip(groups, groups[1:], strict=False):
        assert a.stop == b.start
    assert any(g.stop - g.start > 1 for g, _ in groups)
    for sl, rows in groups:
        c = max(own[i].size for i in range(sl.start, sl.stop))
        if isinstance(rows, range):
            assert len(rows) <= LOCAL_GROUP_WASTE * c
            for i in range(sl.start, sl.stop):
                assert rows.start <= own[i].min() and own[i].max() < rows.stop
        else:  # one image, gathered: its own rows
            assert sl.stop - sl.start == 1 and sl.start == 7
            np.testing.assert_array_equal(rows, own[7])


def test_prepass_candidates_are_the_children_of_significant_coarser_orientations(data, monkeypatch):
    from astropy_healpix import healpy as hp

    from streamem.core import sampling
    from streamem.core.euler import angular_distance_deg, euler_to_matrix
    from streamem.em import coarse_pass

    images, metadata, model, truth = data
    local = _models(model, truth)["local"]
    prepass = replace(local, grid=replace(local.grid, local_prepass=True), coarse={})
    seen = []
    real = coarse_pass.prepass_candidates

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.extend(zip(args[6].previous, out, strict=True))  # args[6]: the part
        return out

    monkeypatch.setattr(coarse_pass, "prepass_candidates", spy)
    _, r_pre = expectation(images, metadata, prepass)
    _, r_plain = expectation(images, metadata, replace(local, coarse={}))
    assert len(seen) == N
    order = local.grid.healpix_order
    for prev, c in seen:
        # at least the pre-pass's best orientations (all it meets, when fewer)
        met = sampling.local_orientations(prev, order - 1, 3 * local.grid.local_sigma_deg)
        kept = min(prepass.prepass_min_orientations, len(met))
        assert c.shape[0] % 8 == 0 and c.shape[0] >= 8 * kept
        # directions are pixels of the grid's order; 4 per parent, 2 psi each
        pix = hp.ang2pix(2**order, np.radians(c[:, 1]), np.radians(c[:, 0]), nest=True)
        centre = hp.pix2ang(2**order, pix, nest=True)
        np.testing.assert_allclose(np.degrees(centre[0]), c[:, 1], atol=1e-6)
        parents, per_parent = np.unique(pix // 4, return_counts=True)
        assert np.all(per_parent % 8 == 0) and parents.size <= c.shape[0] // 8
        # the neighbourhood of the previous pose (3° off the truth) is among them
        near = angular_distance_deg(euler_to_matrix(*c.T), euler_to_matrix(*prev))
        assert near.min() < 1.5 * 60 / 2**order
    # the best poses are the plain local search's, to within a fine step
    rot = {
        n: euler_to_matrix(r.rot, r.tilt, r.psi) for n, r in (("pre", r_pre), ("plain", r_plain))
    }
    moved = angular_distance_deg(rot["pre"], rot["plain"])
    assert np.median(moved) <= local.grid.fine_angular_step_deg, np.median(moved)


def test_prepass_scores_within_its_radius_fraction(data, monkeypatch):
    from streamem.core.euler import angular_distance_deg, euler_to_matrix
    from streamem.em import coarse_pass

    images, metadata, model, truth = data
    local = _models(model, truth)["local"]
    radii = []
    real = coarse_pass.coarse_pass

    def spy(*args, **kwargs):  # the module's coarse_pass: the pre-pass's call only
        radii.append(args[4].coarse_radius_px)  # args[4]: the pass's model
        return real(*args, **kwargs)

    monkeypatch.setattr(coarse_pass, "coarse_pass", spy)
    # the pre-pass's order, built here apart from coarse_pass.prepass_model
    lower = replace(local, grid=replace(local.grid, healpix_order=local.grid.healpix_order - 1))
    rot = {}
    for fraction in (1.0, 0.5):
        radii.clear()
        pre = replace(local, grid=replace(local.grid, local_prepass=True), coarse={},
                      prepass_radius_fraction=fraction)  # fmt: skip
        _, r = expectation(images, metadata, pre)
        rot[fraction] = euler_to_matrix(r.rot, r.tilt, r.psi)
        assert radii, "no pre-pass ran"
        expected = min(
            local.max_radius_px, fraction * replace(lower, max_radius_px=1e9).coarse_radius_px
        )
        np.testing.assert_allclose(radii, expected)
    assert radii[0] < lower.coarse_radius_px  # the fraction took effect at this size
    # the best poses stay those of the full-radius pre-pass and of the plain local search,
    # to within a fine step
    moved = angular_distance_deg(rot[0.5], rot[1.0])
    assert np.median(moved) <= local.grid.fine_angular_step_deg, np.median(moved)
    _, r_plain = expectation(images, metadata, replace(local, coarse={}))
    plain = euler_to_matrix(r_plain.rot, r_plain.tilt, r_plain.psi)
    assert np.median(angular_distance_deg(rot[0.5], plain)) <= local.grid.fine_angular_step_deg


def test_phase_points_count_whole_slices(data):
    """A global search projects its coarse grid (Mc points a slice) once per half's
    references and whole fine-table slices (M points); it inserts whole slices."""
    images, metadata, model, truth = data
    stats, _ = expectation(images, metadata, replace(model, coarse={}))
    coords, _, _ = half_plane_points(model.box_size, model.max_radius_px)
    M, Mc = coords.shape[0], coarse_radius_points(coords, model)
    J = coarse_orientations(model)[1].shape[0]
    projected, inserted = stats.phase_points["projection"], stats.phase_points["backprojection"]
    fine = projected - 2 * J * Mc  # the two halves' coarse grids
    assert fine > 0 and fine % M == 0
    assert inserted > 0 and inserted % M == 0
