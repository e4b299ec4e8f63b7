"""The E-step's GEMM formulation against the direct squared differences."""

import numpy as np
import pytest

from streamem.em.fourier_points import half_plane_points
from streamem.em.kernels import complex_of_stacked, cross_terms, ref_power_terms, stacked_real
from streamem.em.mstep import to_full_frame, to_work_frame
from streamem.em.significance import significant_mask
from streamem.em.statistics import SufficientStatistics


def test_gemm_terms_equal_direct_diff2():
    rng = np.random.default_rng(0)
    n, T, M, J = 3, 4, 50, 6
    X = (rng.standard_normal((n, T, M)) + 1j * rng.standard_normal((n, T, M))).astype(np.complex64)
    A = (rng.standard_normal((J, M)) + 1j * rng.standard_normal((J, M))).astype(np.complex64)
    ctf = rng.uniform(-1, 1, (n, M)).astype(np.float32)
    inv_s2 = rng.uniform(0.5, 2, (n, M)).astype(np.float32)
    C = cross_terms(X, ctf * inv_s2, A)
    S = ref_power_terms(ctf * ctf * inv_s2, A)
    norm = 0.5 * np.sum(np.abs(X) ** 2 * inv_s2[:, None, :], axis=-1)
    diff2 = norm[:, :, None] + S[:, None, :] - C
    direct = 0.5 * np.sum(
        np.abs(X[:, :, None, :] - ctf[:, None, None, :] * A[None, None]) ** 2
        * inv_s2[:, None, None, :],
        axis=-1,
    )
    np.testing.assert_allclose(diff2, direct, rtol=1e-4, atol=1e-3)


def test_stacked_real_is_the_complex_memory_and_its_dot_the_real_cross_term():
    """The GEMMs' real operand: on NumPy a view of the complex array (Re, Im of each
    point side by side), under the array API the same values by a stack; its dot
    product is Re Σ conj(a)·b, and complex_of_stacked undoes it."""
    xps = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((4, 7)) + 1j * rng.standard_normal((4, 7))).astype(np.complex64)
    b = (rng.standard_normal((5, 7)) + 1j * rng.standard_normal((5, 7))).astype(np.complex64)
    ra = stacked_real(a)
    assert ra.shape == (4, 14) and ra.dtype == np.float32 and np.shares_memory(ra, a)
    np.testing.assert_array_equal(ra[:, 0::2], a.real)
    np.testing.assert_array_equal(ra[:, 1::2], a.imag)
    np.testing.assert_array_equal(np.asarray(stacked_real(xps.asarray(a))), ra)
    np.testing.assert_allclose(ra @ stacked_real(b).T, (np.conj(a) @ b.T).real, rtol=1e-5)
    np.testing.assert_array_equal(complex_of_stacked(ra), a)
    np.testing.assert_array_equal(np.asarray(complex_of_stacked(xps.asarray(ra))), a)
    odd = a[:, ::2]  # not contiguous: a copy, the same values
    np.testing.assert_array_equal(stacked_real(odd)[:, 1::2], odd.imag)


def test_half_plane_points_are_independent_and_sorted():
    coords, flat, shell = half_plane_points(16, 6.0)
    ky, kx = coords[:, 0], coords[:, 1]
    assert np.all(np.diff(np.hypot(ky, kx)) >= -1e-12)
    assert not np.any((kx == 0) & (ky <= 0))  # no DC, no Friedel mates on the kx = 0 column
    assert len(np.unique(flat)) == len(flat)
    # every point of the full disc is either in the set or the conjugate of one
    full = {(a, b) for a in range(-6, 7) for b in range(-6, 7) if 0 < a * a + b * b <= 36}
    have = {(int(a), int(b)) for a, b in coords}
    assert all((a, b) in have or (-a, -b) in have for a, b in full)
    assert shell.max() == 6


def test_significant_mask_keeps_the_mass():
    logp = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.01, 0.01]]))
    m = significant_mask(logp, 0.9, 10)
    assert m[0].tolist() == [True, True, True, False]
    assert m[1].tolist() == [True, False, False, False]
    assert significant_mask(logp, 0.999, 2)[0].sum() == 2


@pytest.mark.parametrize("b", [16, 24])
def test_work_frame_round_trip_keeps_low_frequencies(b):
    rng = np.random.default_rng(1)
    B = 32
    vol = rng.standard_normal((B, B, B)).astype(np.float32)
    from streamem.core.filters import lowpass

    smooth = lowpass(vol, 4 * 1.0 * B / b, 1.0)
    back = to_full_frame(to_work_frame(smooth, b), B)
    np.testing.assert_allclose(back, smooth, atol=1e-3 * np.abs(smooth).max())


def test_statistics_add_is_associative():
    rng = np.random.default_rng(2)

    def rand():
        s = SufficientStatistics.empty((3, 3, 2), 1, 4)
        s.data_acc[:] = rng.standard_normal(s.data_acc.shape)
        s.weight_acc[:] = rng.random(s.weight_acc.shape)
        s.noise_power[:] = rng.random((1, 4))
        s.weight_sum = 1.0
        return s

    a, b, c = rand(), rand(), rand()
    left, right = (a + b) + c, a + (b + c)
    np.testing.assert_allclose(left.data_acc, right.data_acc)
    np.testing.assert_allclose(left.noise_power, right.noise_power)
    assert left.weight_sum == right.weight_sum == 3.0


def _coarse_inputs(rng, n=4, T=5, M=60, J=7):
    X = (rng.standard_normal((n, T, M)) + 1j * rng.standard_normal((n, T, M))).astype(np.complex64)
    A = (rng.standard_normal((J, M)) + 1j * rng.standard_normal((J, M))).astype(np.complex64)
    cw = rng.uniform(-1, 1, (n, M)).astype(np.float32)
    return X, A, cw, -rng.random((n, T)), np.log(rng.random((n, J)))


def test_coarse_log_posterior_is_the_sum_of_its_terms():
    from streamem.em.kernels import coarse_log_posterior, log_likelihood

    X, A, cw, offset_prior, row_prior = _coarse_inputs(np.random.default_rng(1))
    C, S = cross_terms(X, cw, A), ref_power_terms(cw * cw, A)
    expected = (
        log_likelihood(C.astype(np.float64), S[:, None, :], 0.0)
        + offset_prior[:, :, None]
        + row_prior[:, None, :]
    )
    got = coarse_log_posterior(C.copy(), S, offset_prior, False, row_prior)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    scale_free = coarse_log_posterior(C.copy(), S, offset_prior, True)
    np.testing.assert_allclose(
        scale_free,
        log_likelihood(C, S[:, None, :], 0.0, True) + offset_prior[:, :, None],
        rtol=1e-5,
    )


@pytest.mark.gpu
def test_coarse_pass_on_cupy_matches_numpy():
    cp = pytest.importorskip("cupy")
    from streamem.em.kernels import coarse_log_posterior

    X, A, cw, offset_prior, row_prior = _coarse_inputs(np.random.default_rng(2))
    ref = coarse_log_posterior(cross_terms(X, cw, A), ref_power_terms(cw, A), offset_prior, False)
    C = cross_terms(cp.asarray(X), cp.asarray(cw), cp.asarray(A))
    got = coarse_log_posterior(
        C, ref_power_terms(cp.asarray(cw), cp.asarray(A)), cp.asarray(offset_prior), False
    )
    assert isinstance(got, cp.ndarray)
    np.testing.assert_allclose(got.get(), ref, rtol=1e-5, atol=1e-3)


def test_batched_posterior_kernels_match_the_per_row_ones():
    """normalised_posterior, significant_weights_rows and weighted_image_sums against
    scipy's logsumexp, the per-image significant_weights and an einsum."""
    from scipy.special import logsumexp

    from streamem.em.kernels import (
        normalised_posterior,
        significant_weights_rows,
        weighted_image_sums,
    )
    from streamem.em.significance import significant_weights

    rng = np.random.default_rng(4)
    logp = rng.normal(0, 4, (6, 50))
    logp[2, 7:] = -np.inf  # padding
    W, lse, best = normalised_posterior(logp)
    np.testing.assert_allclose(lse, logsumexp(logp, axis=1), rtol=1e-12)
    np.testing.assert_array_equal(best, np.argmax(logp, axis=1))
    np.testing.assert_allclose(W.sum(axis=1), 1.0)
    assert np.all(W[2, 7:] == 0)
    kept, count = significant_weights_rows(W, 0.9)
    for row in range(6):
        ref, n = significant_weights(W[row], 0.9)
        np.testing.assert_allclose(kept[row], ref, rtol=1e-12)
        assert count[row] == n
    # the rule really trims: some rows keep fewer samples than they have non-zero weights
    assert (count < np.count_nonzero(W, axis=1)).any()
    Wr = rng.random((3, 4, 5))
    Y = (rng.normal(size=(3, 4, 7)) + 1j * rng.normal(size=(3, 4, 7))).astype(np.complex64)
    np.testing.assert_allclose(
        weighted_image_sums(Wr, Y), np.einsum("bsr,bsm->brm", Wr, Y), rtol=1e-5, atol=1e-5
    )
