"""Which samples matter: RELION's significant samples (coarse pairs refined in the fine
pass) and significant weights (fine samples that enter the sums).

The coarse pass's selection runs on the host over each image's (translations ×
orientations) posterior; the fine pass's significant weights run row by row on the
device (:func:`streamem.em.kernels.significant_weights_rows`, re-exported here).
"""

from __future__ import annotations

import numpy as np

from streamem.em.kernels import significant_weights_rows

__all__ = [
    "significant_class_pairs",
    "significant_mask",
    "significant_pair_mask",
    "significant_weights",
    "significant_weights_rows",
]


def significant_mask(logp, fraction: float, max_count: int, log_floor: float = 30.0):
    """Per row, the samples holding ``fraction`` of the posterior mass (at least one,
    at most ``max_count``, the most probable first).

    logp: (n, S) log-posterior up to a constant. Returns a bool mask (n, S). Samples
    more than ``log_floor`` below a row's best are never candidates: together they
    hold under S·e^-30 of the mass, so the result is unchanged and the ranking only
    sorts the few that matter.
    """
    n, S = logp.shape
    mask = np.zeros((n, S), bool)
    for row in range(n):
        lp = logp[row]
        top = lp.max()
        if not np.isfinite(top):
            mask[row, int(np.argmax(lp))] = True
            continue
        cand = np.flatnonzero(lp >= top - log_floor)
        p = np.exp(lp[cand] - top)
        k = min(max_count, cand.size)
        if k < cand.size:
            part = np.argpartition(-p, k - 1)[:k]
            cand_k, p_k = cand[part], p[part]
        else:
            cand_k, p_k = cand, p
        order = np.argsort(-p_k, kind="stable")
        cand_k, p_k = cand_k[order], p_k[order]
        before = np.cumsum(p_k) - p_k  # mass of the more probable samples
        keep = before < fraction * p.sum()
        keep[0] = True
        mask[row, cand_k[keep]] = True
    return mask


def significant_pair_mask(lp, fraction: float, max_count: int, min_orientations: int):
    """One image's coarse (translation, orientation) pairs to refine: (T, J) bool.

    lp: (T, J) coarse log-posterior. The pairs holding ``fraction`` of the mass (at
    most ``max_count``) plus the ``min_orientations`` best orientations, each at its
    best translation (a guard against a sharp coarse posterior whose best grid point
    is wrong). Orientations whose every pair is −inf (outside a local search) are
    never added.
    """
    mask = significant_mask(lp.reshape(1, -1), fraction, max_count).reshape(lp.shape)
    k = min(min_orientations, lp.shape[1])
    if k > 0:
        best_j = np.argpartition(-lp.max(axis=0), k - 1)[:k]
        best_j = best_j[np.isfinite(lp[:, best_j].max(axis=0))]
        mask[lp[:, best_j].argmax(axis=0), best_j] = True
    return mask


def significant_weights(W, fraction: float):
    """Keep the largest posterior weights that hold ``fraction`` of the mass (renormalised).

    As RELION's ``storeWeightedSums``, only these samples enter the sums. Returns
    (weights of W's shape, number of significant samples).
    """
    flat = W.ravel()
    order = np.argsort(flat)[::-1]
    cum = np.cumsum(flat[order])
    count = int(min(np.searchsorted(cum, fraction * cum[-1]) + 1, flat.size))
    kept = np.zeros_like(flat)
    kept[order[:count]] = flat[order[:count]] / cum[count - 1]
    return kept.reshape(W.shape), count


def significant_class_pairs(
    lp, row_class, n_classes: int, fraction: float, max_count: int, min_orientations: int
):
    """One image's coarse (translation, column) pairs to refine, chosen class by class.

    lp: (T, R) coarse log-posterior over R rows; row_class: (R,) class of each row.
    Within each class the pairs of :func:`significant_pair_mask` over that class's own
    columns are kept, so every class with a finite prior is compared at the fine
    resolution (for K = 1: RELION's rule over all samples). RELION picks the
    significant samples over all classes together; at the coarse pass's low resolution
    the classes differ little, and a joint cap filled by one class decides the class at
    the coarse resolution and locks particles into the first random split. Returns
    (translation indices, column indices), both (P,).
    """
    if n_classes == 1:
        return np.nonzero(significant_pair_mask(lp, fraction, max_count, min_orientations))
    t_all, c_all = [], []
    for k in range(n_classes):
        cols = np.flatnonzero(row_class == k)
        lp_k = lp[:, cols]
        if cols.size == 0 or not np.isfinite(lp_k).any():
            continue
        t_idx, c_idx = np.nonzero(
            significant_pair_mask(lp_k, fraction, max_count, min_orientations)
        )
        t_all.append(t_idx)
        c_all.append(cols[c_idx])
    return np.concatenate(t_all), np.concatenate(c_all)
