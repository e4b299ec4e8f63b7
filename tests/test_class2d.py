"""2D classification: rotation convention (vs the projector), Fourier rotation identities,
statistics as a monoid, a mix of 3 volumes + 20% junk against the truth, CLI outputs."""

import collections

import numpy as np
import pytest
import starfile

from streamem.core.ctf import OpticsParams
from streamem.core.euler import euler_to_matrix
from streamem.core.masks import soft_sphere
from streamem.core.projector import make_projector, project_images
from streamem.em import classify2d as c2
from streamem.em.fourier_points import half_plane_points
from streamem.em.mstep import image_power, initial_inv_sigma2
from streamem.io.mrc import read_map
from streamem.io.store import optics_params
from streamem.simulate.particles import simulate_particles
from streamem.simulate.phantoms import phantom

BOX, PIXEL, N = 32, 4.0, 400


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    root = tmp_path_factory.mktemp("class2d")
    store = simulate_particles(
        root / "p.zarr", N, box_size=BOX, pixel_size_A=PIXEL, snr=0.3, seed=5,
        phantom=["asym", "C4", "D7"], junk_fraction=0.2, chunk_size=100,
    )  # fmt: skip
    return root, store, np.asarray(store.read_field("rlnClassNumber", "truth"))


@pytest.fixture(scope="module")
def run(mix):
    root, store, _ = mix
    options = c2.Class2DOptions(
        n_classes=10, iterations=10, psi_step_deg=10, offset_range_px=4, offset_step_px=2
    )
    return c2.classify2d(store, root / "run", options)


def _corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.mark.parametrize("psi", [30.0, 115.0])
def test_rotation_sense_is_relions(psi):
    """The projection at (0, 0, psi) is the one at (0, 0, 0) rotated by psi."""
    fvol = make_projector(phantom("asym", BOX, PIXEL, seed=1), 2)
    A = euler_to_matrix(np.zeros(2), np.zeros(2), np.array([0.0, psi]))
    p0, p_psi = project_images(fvol, A)
    rotated = c2.rotate_images(p0[None], [psi, -psi])[0]
    assert _corr(rotated[0], p_psi) > 0.99
    assert _corr(rotated[1], p_psi) < 0.95  # the opposite sense does not match


def _dft_at(image, ky, kx):
    """Direct DFT of a centred image at arbitrary (non-integer) frequencies."""
    B = image.shape[0]
    c = np.arange(B) - B // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    ph = np.exp(-2j * np.pi * (np.multiply.outer(ky, y) + np.multiply.outer(kx, x)) / B)
    return np.sum(ph * image, axis=(-2, -1))


def test_rotated_image_transform_is_the_rotated_transform():
    """FT(image rotated by psi)(k) = FT(image)(M k), M = [[c, −s], [s, c]] on (x, y)."""
    B, psi = 32, 40.0
    c = np.arange(B) - B // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    blob = np.exp(-((x - 4) ** 2 + (y + 2) ** 2) / (2 * 2.0**2))  # off-centre, smooth
    coords, flat, _ = half_plane_points(B, 6)
    got = c2.image_coefficients(c2.rotate_images(blob[None], [psi])[0, 0], flat)
    cs, sn = np.cos(np.deg2rad(psi)), np.sin(np.deg2rad(psi))
    kx, ky = coords[:, 1], coords[:, 0]
    want = _dft_at(blob, sn * kx + cs * ky, cs * kx - sn * ky)
    assert np.max(np.abs(got - want)) < 0.01 * np.max(np.abs(want))
    # the inverse: data rotated back by −psi returns the original coefficients
    # (band-limited to 12 shells; the sharp band edge rings, so compare well inside it)
    coords, flat, _ = half_plane_points(B, 12)
    data = c2.image_coefficients(c2.rotate_images(blob[None], [psi])[0, 0], flat)
    back = c2.rotate_data_back(data[None], coords, flat, B, [psi])[0]
    orig = c2.image_coefficients(blob, flat)
    inner = np.hypot(coords[:, 0], coords[:, 1]) <= 8
    assert np.max(np.abs(back - orig)[inner]) < 0.01 * np.max(np.abs(orig))


def test_weights_rotate_back_to_the_class_frame():
    """An anisotropic even weight accumulated at psi comes back as W(Mᵀ q)."""
    coords, _, _ = half_plane_points(32, 12)

    def w(kx, ky):
        return np.exp(-(kx**2) / 60.0 - ky**2 / 15.0)

    psi = 25.0
    cs, sn = np.cos(np.deg2rad(psi)), np.sin(np.deg2rad(psi))
    qx, qy = coords[:, 1], coords[:, 0]
    # image frame at psi: W_img(k) = W_class(M k)
    img = w(cs * qx - sn * qy, sn * qx + cs * qy)
    back = c2.rotate_weights_back(img[None], coords, [psi])[0]
    inner = np.hypot(qx, qy) <= 10  # at the disc's edge bilinear neighbours fall outside it
    assert np.max(np.abs(back - w(qx, qy))[inner]) < 0.03


def _small_model(store, n_classes=4, radius=10.0):
    chunk = store.read_chunk(0, 60)
    optics = tuple(optics_params(g) for g in store.optics_groups)
    mask = soft_sphere(BOX, 12.0, 2.0, ndim=2)
    classes = c2.initial_class_images(
        chunk.images, chunk.metadata, n_classes, PIXEL, optics, mask, seed=1
    )
    power = image_power(chunk.images, np.zeros(60, np.int64), 1)
    return chunk, c2.Class2DModel(
        class_images=classes, log_class_prior=np.log(np.full(n_classes, 1 / n_classes)),
        psi_deg=np.arange(12) * 30.0, box_size=BOX, pixel_size_A=PIXEL, max_radius_px=radius,
        inv_sigma2=initial_inv_sigma2(power[0], power[1]), optics=optics, sigma_offset_A=8.0,
        offset_range_px=2.0, offset_step_px=2.0,
    )  # fmt: skip


def test_statistics_are_a_chunking_invariant_monoid(mix):
    _, store, _ = mix
    chunk, model = _small_model(store)
    meta = chunk.metadata
    parts = [
        c2.expectation_2d(chunk.images[a:b], {k: v[a:b] for k, v in meta.items()}, model)[0]
        for a, b in ((0, 20), (20, 45), (45, 60))
    ]
    whole, _ = c2.expectation_2d(chunk.images, meta, model)
    left = (parts[0] + parts[1]) + parts[2]
    right = parts[0] + (parts[1] + parts[2])
    for s in (right, whole):
        scale = np.abs(left.data_acc).max()
        assert np.allclose(s.data_acc, left.data_acc, atol=1e-4 * scale)
        assert np.allclose(s.weight_acc, left.weight_acc, rtol=1e-4, atol=1e-6)
        assert np.allclose(s.noise_power, left.noise_power, rtol=1e-4)
        assert np.allclose(s.class_weight, left.class_weight, rtol=1e-5)
    assert whole.weight_sum == 60 and np.isclose(whole.class_weight.sum(), 60, rtol=1e-4)


def test_estep_finds_class_and_psi_of_clean_images():
    """Noise-free rotated, shifted copies of two classes: class and psi recovered."""
    B = 32
    c = np.arange(B) - B // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    a = np.exp(-((x - 5) ** 2 + y**2) / 8.0) + 0.5 * np.exp(-(x**2 + (y - 6) ** 2) / 4.0)
    b = np.exp(-((x + 4) ** 2 + (y + 4) ** 2) / 6.0) + np.exp(-((x - 4) ** 2 + (y + 4) ** 2) / 6.0)
    classes = np.stack([a, b]).astype(np.float32)
    psi_true = np.array([0.0, 60.0, 150.0, 270.0, 30.0, 330.0])
    labels = np.array([0, 1, 0, 1, 1, 0])
    imgs = np.stack(
        [
            c2.rotate_images(classes[k][None], [p])[0, 0]
            for k, p in zip(labels, psi_true, strict=True)
        ]
    )
    imgs = np.roll(imgs, 2, axis=-1)  # content at +2 px in x: the origin is −2 px
    model = c2.Class2DModel(
        class_images=classes, log_class_prior=np.log([0.5, 0.5]), psi_deg=np.arange(12) * 30.0,
        box_size=B, pixel_size_A=1.0, max_radius_px=12.0, inv_sigma2=np.full((1, 17), 10.0),
        optics=(OpticsParams(300.0, 2.7, 0.1),), sigma_offset_A=10.0,
        offset_range_px=4.0, offset_step_px=2.0, do_ctf=False,
    )  # fmt: skip
    _, result = c2.expectation_2d(imgs.astype(np.float32), {}, model)
    assert np.array_equal(result.class_number, labels + 1)
    assert np.allclose(result.psi, psi_true)
    assert np.allclose(result.origin_x_A, -2.0) and np.allclose(result.origin_y_A, 0.0)


def test_three_volumes_and_junk(mix, run):
    """Each volume's particles end (≥ 95%) in classes it dominates; junk in junk classes."""
    _, _, truth = mix
    found = run.class_numbers
    dominant = {
        k: collections.Counter(truth[found == k]).most_common(1)[0][0] for k in np.unique(found)
    }
    for v in (1, 2, 3):
        sel = truth == v
        share = np.mean([dominant[k] == v for k in found[sel]])
        assert share >= 0.95, (v, share)
    junk = truth == 0
    junk_share = np.mean([dominant[k] == 0 for k in found[junk]])
    assert junk_share >= 0.9
    assert np.isclose(run.fractions.sum(), 1.0)
    # the job scores itself against the store's truth the same way
    assert run.truth_accuracy.per_truth[0] == pytest.approx(junk_share)
    assert (run.out_dir / f"run_it{run.iterations:03d}_truth.star").exists()


def test_relion_outputs(mix, run):
    root, store, _ = mix
    out = run.out_dir
    it = run.iterations
    stack, voxel = read_map(out / f"run_it{it:03d}_classes.mrcs")
    assert stack.shape == (10, BOX, BOX) and np.isclose(voxel, PIXEL)
    model = starfile.read(out / f"run_it{it:03d}_model.star", always_dict=True)
    classes = model["model_classes"]
    assert list(classes["rlnReferenceImage"])[:2] == [
        f"000001@run_it{it:03d}_classes.mrcs",
        f"000002@run_it{it:03d}_classes.mrcs",
    ]
    assert np.isclose(classes["rlnClassDistribution"].sum(), 1.0)
    data = starfile.read(out / f"run_it{it:03d}_data.star", always_dict=True)["particles"]
    assert len(data) == N
    assert np.array_equal(data["rlnClassNumber"].to_numpy(), run.class_numbers)
    assert {"rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"} <= set(data.columns)
    assert (out / "run_classes.png").stat().st_size > 0
    # classes of particles have a resolution estimate; a class of pure noise has no signal
    truth = mix[2]
    for k in np.unique(run.class_numbers):
        major = collections.Counter(truth[run.class_numbers == k]).most_common(1)[0][0]
        if major != 0:
            assert run.resolutions_A[k - 1] < 40.0, k


def test_cli(mix, tmp_path):
    from streamem.cli import main

    _, store, _ = mix
    out = tmp_path / "cli"
    args = ["class2d", str(store.path), "--k", "3", "--out", str(out), "--iterations", "2"]
    args += ["--psi-step", "30", "--center-classes", "--ctf-intact-first-peak", "--no-cluster"]
    assert main(args) == 0
    for name in ("run_it002_classes.mrcs", "run_it002_model.star", "run_it002_data.star"):
        assert (out / name).exists()
    assert (out / "run_classes.png").exists()
    assert main(args) == 2  # the folder is not empty: one clear error
    assert main(["class2d", str(store.path), "--k", "0", "--out", str(tmp_path / "x")]) == 2


def test_continue_gives_the_uninterrupted_run(mix):
    """Stopped after iteration 2 and continued to 3 = three iterations in one go."""
    root, store, _ = mix
    common = dict(n_classes=4, psi_step_deg=20, offset_range_px=2, offset_step_px=2)
    whole = c2.classify2d(store, root / "whole", c2.Class2DOptions(iterations=3, **common))
    c2.classify2d(store, root / "part", c2.Class2DOptions(iterations=2, **common))
    resumed = c2.classify2d(
        store, root / "part", c2.Class2DOptions(iterations=3, **common), continue_run=True
    )
    assert resumed.iterations == 3 and len(resumed.history) == 3
    np.testing.assert_array_equal(resumed.class_numbers, whole.class_numbers)
    scale = np.abs(whole.class_images).max()
    np.testing.assert_allclose(resumed.class_images, whole.class_images, atol=1e-4 * scale)
