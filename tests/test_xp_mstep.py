"""The M-step under every array backend (the ``xp`` fixture): half-map and joined
reconstructions from accumulators held as that namespace's arrays, the work/full
frames, τ² and the noise updates give NumPy's results; maps stay in the namespace,
per-shell curves come back to the host."""

import numpy as np
from test_backprojector import random_rotations
from test_projector import smooth_volume

from streamem.core.backend import to_numpy, xp_of
from streamem.core.backprojector import empty_accumulators, insert_points
from streamem.core.fourier import image_fourier_coords
from streamem.core.projector import make_projector, project_points
from streamem.core.symmetry import symmetry_matrices
from streamem.em import mstep

BOX = 24


def _close(got, want, xp, rel=1e-5):
    assert xp_of(got) is xp, type(got)
    np.testing.assert_allclose(to_numpy(got), want, rtol=0, atol=rel * np.abs(want).max())


def _accumulators(seed=0, n=60):
    """(2, *grid) complex64 / float32 accumulators of two noisy half sets, as reduced."""
    rng = np.random.default_rng(seed)
    vol = smooth_volume(BOX, seed=seed).astype(np.float32)
    coords, _ = image_fourier_coords(BOX, BOX // 2)
    fvol = make_projector(vol)
    data, weight = [], []
    for _ in range(2):
        rot = random_rotations(n, rng)
        vals = project_points(fvol, rot, coords)
        noise = rng.normal(0, np.abs(vals).std(), vals.shape + (2,))
        vals = vals + (noise[..., 0] + 1j * noise[..., 1]).astype(np.complex64)
        d, w = empty_accumulators(BOX)
        insert_points(d, w, rot, coords, vals, np.ones(coords.shape[0]))
        data.append(d)
        weight.append(w)
    return np.stack(data).astype(np.complex64), np.stack(weight).astype(np.float32), vol


def test_reconstructions_match_numpy(xp):
    data, weight, _ = _accumulators()
    d, w = xp.asarray(data), xp.asarray(weight)
    for sym in (None, symmetry_matrices("C2")):
        maps_np, fsc_np = mstep.reconstruct_halves(data, weight, BOX, 2, 1.0, sym)
        maps, fsc = mstep.reconstruct_halves(d, w, BOX, 2, 1.0, sym)
        assert isinstance(fsc, np.ndarray)
        np.testing.assert_allclose(fsc, fsc_np, atol=1e-6)
        _close(maps, maps_np, xp)
        joined_np = mstep.reconstruct_joined(data, weight, fsc_np, BOX, 2, 1.0, sym)
        _close(mstep.reconstruct_joined(d, w, fsc, BOX, 2, 1.0, sym), joined_np, xp)
    assert fsc_np[1] > 0.9  # the halves agree at low resolution: a real reconstruction


def test_frames_tau2_and_data_vs_prior_match_numpy(xp):
    data, weight, vol = _accumulators(seed=1, n=30)
    v = xp.asarray(vol)
    small_np = mstep.to_work_frame(vol, 16)
    small = mstep.to_work_frame(v, 16)
    _close(small, small_np, xp)
    _close(mstep.to_full_frame(small, BOX), mstep.to_full_frame(small_np, BOX), xp)
    # cropping then padding keeps the low frequencies: close to the original map
    back = to_numpy(mstep.to_full_frame(small, BOX))
    assert np.corrcoef(back.ravel(), vol.ravel())[0, 1] > 0.95
    tau2 = mstep.tau2_from_map(v)
    assert isinstance(tau2, np.ndarray)
    np.testing.assert_allclose(tau2, mstep.tau2_from_map(vol), rtol=1e-9)
    want = mstep.data_vs_prior(vol, weight[0], BOX, 2, 1.0, None)
    got = mstep.data_vs_prior(v, xp.asarray(weight[0]), BOX, 2, 1.0, None)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    joined_np = mstep.reconstruct_joined(data, weight, None, BOX, 2, 1.0, None, tau2=tau2)
    joined = mstep.reconstruct_joined(xp.asarray(data), xp.asarray(weight), None, BOX, 2, 1.0, None, tau2=tau2)  # fmt: skip
    _close(joined, joined_np, xp)


def test_noise_updates_match_numpy(xp):
    rng = np.random.default_rng(2)
    images = rng.standard_normal((9, BOX, BOX)).astype(np.float32)
    groups = np.array([0, 1, 0, 0, 1, 1, 0, 0, 1])
    power_np = mstep.image_power(images, groups, 3)  # group 2 has no images
    power = mstep.image_power(xp.asarray(images), groups, 3)
    _close(power, power_np, xp)
    assert np.all(power_np[1, 2] == 0) and np.all(power_np[1, :2, 1:] > 0)
    inv_np = mstep.initial_inv_sigma2(power_np[0], power_np[1])
    inv = mstep.initial_inv_sigma2(power[0, ...], power[1, ...])
    _close(inv, inv_np, xp)
    # white noise of variance 1 per pixel: σ² per complex component is B²/2
    np.testing.assert_allclose(inv_np[:2, 3:].mean(), 2.0 / BOX**2, rtol=0.1)
    noise_power = power_np[0] * 0.5
    new_np = mstep.update_inv_sigma2(inv_np, noise_power, power_np[1])
    new = mstep.update_inv_sigma2(inv, xp.asarray(noise_power), power[1, ...])
    _close(new, new_np, xp)
    np.testing.assert_allclose(new_np[:2, 1:], 2 * inv_np[:2, 1:], rtol=1e-12)
