"""One E-step for refine3d and class3d: class3d's model with K = 1 (one reference for
both halves, no seeds) and refine3d's model (one reference per half) give the same
chunk statistics for the particles of one half set, whose references coincide; and the
class axis keeps its meaning (seeded classes, class priors, fixed poses)."""

from dataclasses import replace

import numpy as np
import pytest
from _estep_data import largest_relative_difference, refine_model, simulated_chunk, two_class_model

from streamem.em.estep import expectation, seeded_classes

BOX, PIXEL, N = 32, 4.5, 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    store, chunk, metadata, truth = simulated_chunk(
        tmp_path_factory.mktemp("one_engine"),
        N,
        box=BOX,
        pixel_size_A=PIXEL,
        snr=1.0,
        seed=8,
        pose_noise_seed=2,
        pose_noise_deg=2.0,  # previous poses a few degrees off, for local searches
    )
    return store, chunk.images, metadata, truth


def _refine_model(store, images, truth, local_sigma_deg=None):
    return refine_model(
        store,
        images,
        truth,
        box=BOX,
        pixel_size_A=PIXEL,
        healpix_order=2 if local_sigma_deg is None else 3,
        local_sigma_deg=local_sigma_deg,
    )


def _half(metadata, h):
    sel = np.asarray(metadata["rlnRandomSubset"]) == h
    return sel, {k: v[sel] if isinstance(v, np.ndarray) else v for k, v in metadata.items()}


@pytest.mark.parametrize("local_sigma_deg", [None, 3.75])
def test_class3d_with_one_class_is_refine3d_for_one_half(data, local_sigma_deg):
    store, images, metadata, truth = data
    refine = _refine_model(store, images, truth, local_sigma_deg)
    class3d = replace(
        refine,
        projectors=refine.projectors[:1],  # half 1's reference, for particles of both halves
        n_classes=1,
        references_per_half=False,
        log_class_prior=np.zeros(1),
        class_seed=None,
        coarse={},
    )
    sel, part = _half(metadata, 1)
    assert 10 < sel.sum() < N
    s_r, r_r = expectation(images[sel], part, refine)
    s_c, r_c = expectation(images[sel], part, class3d)
    assert s_r.data_acc.shape == s_c.data_acc.shape == (2, *s_r.data_acc.shape[1:])
    assert np.abs(s_r.data_acc[0]).max() > 0 and not s_r.data_acc[1].any()
    worst = largest_relative_difference(s_r, s_c)
    print(f"largest relative difference {worst:.2e}")
    assert worst < 1e-5, worst
    for f in ("rot", "tilt", "psi", "origin_x_A", "origin_y_A", "class_number", "n_significant"):
        np.testing.assert_array_equal(getattr(r_r, f), getattr(r_c, f), err_msg=f)
    np.testing.assert_allclose(r_c.loglik, r_r.loglik, rtol=1e-9)


def _class_model(store, images, truth, **kw):
    return two_class_model(_refine_model(store, images, truth), truth, coarse={}, **kw)


def test_seeded_classes_and_priors(data):
    """With a class seed each particle meets its seeded class only; a class of prior
    0 gets no particle and no weight; the accumulators are 2k + h."""
    store, images, metadata, truth = data
    seeded = _class_model(store, images, truth, class_seed=3)
    stats, result = expectation(images, metadata, seeded)
    np.testing.assert_array_equal(result.class_number, seeded_classes(np.arange(N), 2, 3) + 1)
    counts = np.bincount(result.class_number.astype(int) - 1, minlength=2)
    np.testing.assert_allclose(stats.class_weight, counts, rtol=1e-5)
    assert stats.data_acc.shape[0] == 4
    halves = np.asarray(metadata["rlnRandomSubset"]) - 1
    for k in (0, 1):
        for h in (0, 1):
            members = np.sum((result.class_number == k + 1) & (halves == h))
            assert (np.abs(stats.weight_acc[2 * k + h]).max() > 0) == (members > 0)
    with np.errstate(divide="ignore"):
        only_first = _class_model(store, images, truth, log_class_prior=np.log([1.0, 0.0]))
    stats, result = expectation(images, metadata, only_first)
    assert np.all(result.class_number == 1)
    assert stats.class_weight[1] == 0 and not stats.weight_acc[2:].any()


def test_skip_align_keeps_the_poses_and_prefers_the_true_class(data):
    store, images, metadata, truth = data
    model = _class_model(store, images, truth, skip_align=True, scale_free=False)
    stats, result = expectation(images, metadata, model)  # poses 2° off the truth
    np.testing.assert_array_equal(result.rot, metadata["rlnAngleRot"])
    assert np.mean(result.class_number == 1) > 0.9  # the images are of the first map
    assert stats.class_weight.sum() == pytest.approx(N)
