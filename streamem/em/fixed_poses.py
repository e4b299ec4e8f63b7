"""The E-step at fixed poses (class3d ``--skip-align``): the posterior over classes only.

Each particle keeps its stored pose and origin; it is compared with the K references'
slices at that pose (one projection per particle and class), its posterior over the
classes (with the class prior) sets the weights with which it enters each class's
accumulator 2k + h, and the noise sums are weighted the same way.
"""

from __future__ import annotations

import numpy as np

from streamem.core.backend import to_numpy
from streamem.core.backprojector import insert_points
from streamem.core.euler import euler_to_matrix
from streamem.core.projector import project_points
from streamem.em.fine_pass import DeviceAccumulators, FineImages, FineOutcome
from streamem.em.kernels import log_likelihood, namespace, normalised_posterior


def fixed_pose_posterior(images: FineImages, part, model, refs, coords, stats) -> FineOutcome:
    """Posterior over classes at the stored poses of ``part`` (estep._Part); inserts the
    weighted images into ``stats`` and returns the per-image results."""
    xp = namespace(images.X0)
    n, M = images.X0.shape
    K = len(refs)
    poses = part.previous
    rot = euler_to_matrix(poses[:, 0], poses[:, 1], poses[:, 2])  # (n, 3, 3)
    A = xp.stack([project_points(f, rot, coords) for f in refs])  # (K, n, M)
    Y = xp.conj(images.X0) * images.cw  # (n, M)
    C = xp.sum(xp.real(Y)[None, ...] * xp.real(A) - xp.imag(Y)[None, ...] * xp.imag(A), axis=-1).mT
    power = xp.real(A) ** 2 + xp.imag(A) ** 2  # (K, n, M)
    S = 0.5 * xp.sum(power * images.ctf2w[None, ...], axis=-1).mT  # (n, K)
    f64 = xp.float64
    logp = log_likelihood(xp.astype(C, f64), xp.astype(S, f64), images.norm[:, None],
                          model.scale_free)  # fmt: skip
    if part.log_pi is not None:
        logp = logp + xp.asarray(part.log_pi)
    W, lse, _ = normalised_posterior(logp)  # (n, K)
    ctf = images.ctf
    noise = xp.zeros((n, M), dtype=xp.float64)
    power_X = xp.real(images.X0) ** 2 + xp.imag(images.X0) ** 2
    halves = part.halves
    W_host = to_numpy(W)
    accumulators = DeviceAccumulators(stats, xp)
    for k in range(K):
        wk = W[:, k][:, None]
        cross = xp.real(xp.conj(images.X0) * A[k, ...])
        noise += wk * (power_X - 2 * ctf * cross + ctf * ctf * power[k, ...])
        for h in (0, 1):
            sel = np.flatnonzero((halves == h) & (W_host[:, k] > 0))
            if sel.size == 0:
                continue
            s = xp.asarray(sel)
            w_s = xp.take(wk, s, axis=0)
            insert_points(
                *accumulators.get(2 * k + h),
                rot[sel],
                coords,
                xp.astype(w_s * xp.take(images.X0 * images.cw, s, axis=0), xp.complex128),
                w_s * xp.take(images.ctf2w, s, axis=0),
                refs[k].padding_factor,
            )
    accumulators.store()
    max_prob = np.max(W_host, axis=1)
    return FineOutcome(
        angles=poses,
        origin_px=images.prior_px,
        prior_px=images.prior_px,
        max_prob=max_prob,
        n_significant=np.sum(W_host > 1e-3, axis=1),
        loglik=to_numpy(lse),
        class_posterior=W_host,
        class_weight=W_host,
        offset_sq_px2=np.sum(images.prior_px**2, axis=1),
        noise_rows=noise,
    )
