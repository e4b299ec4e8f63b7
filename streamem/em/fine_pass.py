"""The fine pass of the E-step: the children of each image's significant coarse samples.

The coarse (translation, orientation) pairs holding ``adaptive_fraction`` of an image's
coarse posterior are refined into their children (2³ orientations, 2² translations per
parent for oversampling 1) and the posterior is computed on those; only the samples
holding ``adaptive_fraction`` of the fine posterior enter the sums (RELION's
significant weights), which are back-projected per orientation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamem.core import sampling
from streamem.core.backend import to_numpy, xp_of
from streamem.core.euler import euler_to_matrix
from streamem.core.projector import project_points
from streamem.em.kernels import log_likelihood, offset_log_prior


@dataclass(frozen=True)
class FineTable:
    """The children of every refined coarse orientation of a chunk, projected once.

    angles (R, 3), rotations (R, 3, 3), refs (R, M) complex, power (R, M) |refs|²;
    the children of coarse row j are rows ``position[j]·n_kids + (0 .. n_kids−1)``.
    """

    angles: np.ndarray
    rotations: np.ndarray
    refs: np.ndarray
    power: np.ndarray
    position: np.ndarray
    n_kids: int

    def rows(self, coarse_rows):
        """(P, n_kids) table rows of the children of coarse rows (P,)."""
        return self.position[coarse_rows][:, None] * self.n_kids + np.arange(self.n_kids)


def fine_table(ang_c, pairs, grid, projector, coords) -> FineTable:
    union = np.unique(np.concatenate([j for _, j in pairs]))
    kids = np.asarray(
        sampling.oversample_orientations(ang_c[union], grid.healpix_order, grid.oversampling)
    )
    angles = kids.reshape(-1, 3)  # kids: (U, K, 3)
    position = np.full(ang_c.shape[0], -1)
    position[union] = np.arange(union.size)
    rotations = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    refs = project_points(projector, rotations, coords)  # (U·K, M), where the reference is
    power = (refs.real**2 + refs.imag**2).astype(refs.real.dtype)
    return FineTable(angles, rotations, refs, power, position, kids.shape[1])


def fine_log_posterior(Xs, cw, ctf2w, norm, A, power, total_px, model, orientation_prior=None):
    """Log-posterior of the fine samples of one image, a batched GEMM over its pairs.

    Xs (P, S, M) shifted image, A (P, K, M) and power (P, K, M) the children's slices,
    total_px (P, S, 2) total origins. Returns (P, S, K).
    """
    xp = xp_of(Xs, A)
    Y = xp.conj(Xs) * cw
    lhs = xp.concatenate([Y.real, -Y.imag], axis=-1)  # (P, S, 2M)
    rhs = xp.concatenate([A.real, A.imag], axis=-1).transpose(0, 2, 1)  # (P, 2M, K)
    C = lhs @ rhs  # (P, S, K)
    S = 0.5 * (power @ ctf2w)  # (P, K)
    logp = to_numpy(log_likelihood(C, S[:, None, :], norm, model.scale_free))  # small: host
    logp = logp + offset_log_prior(total_px, model.sigma_offset_A, model.pixel_size_A)[:, :, None]
    if orientation_prior is not None:
        logp += orientation_prior[:, None, :]
    return logp
