"""The batched fine pass of the E-step: the children of every image's significant
coarse samples, all images of a part scored together.

The significant coarse (translation t, row k·J + j) pairs of each image are refined
into their children: ``n_kids`` orientations (the row's HEALPix children at
``healpix_order + oversampling``, in the row's class) × ``n_subshifts`` translations
(t + s). The children's slices are projected once per part (:class:`FineTable`).

Batching: images are sorted by their number of pairs P_i and cut into a few groups
whose padded size (images × the group's largest P) stays within
``memory.fine_group_bytes``; within a group every (image, pair, subshift, child) sample
is scored by one batched GEMM ((g·P) × S × 2M) @ ((g·P) × 2M × n_kids) on stacked
real/imaginary parts, padding masked with −inf. Posteriors, the best sample,
RELION's significant weights and the per-row sums Σ_s W X_s stay on the device
(:mod:`streamem.em.kernels`); one packed array of small per-image numbers comes to
the host per group, which tells which rows carry weight. Those rows are buffered,
merged per (table row, half) with :func:`streamem.em.kernels.segment_sums` and
back-projected per (class, half) into accumulator 2k + h whenever the buffer fills.

The posterior of an image is the same as scoring it alone: the terms are those of
:func:`streamem.em.kernels.log_likelihood` in float64 from float32 GEMMs, with the
offset prior, the class prior and the local-search orientation prior.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamem.core import sampling
from streamem.core.backend import to_numpy
from streamem.core.backprojector import insert_points
from streamem.core.euler import euler_to_matrix
from streamem.core.projector import project_points, slice_power
from streamem.em import memory
from streamem.em.fourier_points import Translations
from streamem.em.kernels import (
    log_likelihood,
    namespace,
    normalised_posterior,
    offset_log_prior,
    segment_sums,
    significant_weights_rows,
    stacked_real,
    weighted_image_sums,
)
from streamem.em.phases import PhaseTimer, count_points


@dataclass(frozen=True)
class FineImages:
    """A part's images on the device (all (n, M) unless noted).

    X0: complex64 transforms re-centred on the previous origins; ctf: float32 CTF;
    cw: CTF/σ²; ctf2w: CTF²/σ²; norm: (n,) float64 Σ|X|²/2σ²; prior_px: (n, 2) host
    (dy, dx) previous origins in pixels.
    """

    X0: object
    ctf: object
    cw: object
    ctf2w: object
    norm: object
    prior_px: np.ndarray


@dataclass(frozen=True)
class FineOutcome:
    """Per-image results of a part (host arrays, (n,) unless noted).

    angles (n, 3) and origin_px (n, 2) of the best sample, prior_px (n, 2) previous
    origins; max_prob its posterior; n_significant the significant samples; loglik
    log Σ exp(log-posterior); class_posterior (n, K) marginal over poses; class_weight
    (n, K) the significant weights' class sums (what enters the statistics);
    offset_sq_px2 Σ w |total offset|² (pixels²); noise_rows (n, M) device
    Σ w |X − CTF·A|² per Fourier point.
    """

    angles: np.ndarray
    origin_px: np.ndarray
    prior_px: np.ndarray
    max_prob: np.ndarray
    n_significant: np.ndarray
    loglik: np.ndarray
    class_posterior: np.ndarray
    class_weight: np.ndarray
    offset_sq_px2: np.ndarray
    noise_rows: object


@dataclass(frozen=True)
class FineTable:
    """The children of every refined coarse row of a part, projected once.

    angles (R, 3), rotations (R, 3, 3), class_of (R,) on the host; on the device the
    slices as the GEMM's real operand, (R, 2M) float32 (:func:`kernels.stacked_real`: Re
    and Im of each point side by side, made once per table), and power (R, M)
    |A|²; the children of coarse row r (k·J + j) are rows
    ``position[r]·n_kids + (0 .. n_kids−1)``.
    """

    angles: np.ndarray
    rotations: np.ndarray
    class_of: np.ndarray
    stacked: object
    power: object
    position: np.ndarray
    n_kids: int

    def rows(self, coarse_rows):
        """(..., n_kids) table rows of the children of coarse rows (...)."""
        return self.position[coarse_rows][..., None] * self.n_kids + np.arange(self.n_kids)


def fine_table(ang_c, J: int, pairs, grid, refs, coords) -> FineTable:
    """The children of the coarse rows any image refines; ``refs`` the K references."""
    union = np.unique(np.concatenate([r for _, r in pairs]))
    kids = np.asarray(
        sampling.oversample_orientations(ang_c[union % J], grid.healpix_order, grid.oversampling)
    )
    n_kids = kids.shape[1]  # kids: (U, n_kids, 3)
    angles = kids.reshape(-1, 3)
    class_of = np.repeat(union // J, n_kids)
    position = np.full(len(refs) * J, -1)
    position[union] = np.arange(union.size)
    rotations = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    xp = namespace(refs[0].data)
    stacked, power = [], []
    for start in range(0, class_of.size, TABLE_BLOCK_ROWS):  # rows are sorted by class
        rows = np.arange(start, min(class_of.size, start + TABLE_BLOCK_ROWS))
        for k in np.unique(class_of[rows]):
            sel = rows[class_of[rows] == k]
            A = project_points(refs[k], rotations[sel], coords)  # (rows, M) complex
            stacked.append(stacked_real(A))
            power.append(slice_power(A))
    stacked = stacked[0] if len(stacked) == 1 else xp.concat(stacked, axis=0)
    power = power[0] if len(power) == 1 else xp.concat(power, axis=0)
    return FineTable(angles, rotations, class_of, stacked, power, position, n_kids)


#: Children projected at once: bounds the complex slices held while they are stacked.
TABLE_BLOCK_ROWS = 4096


def _groups(n_pairs: np.ndarray, cap_pairs: int):
    """Images sorted by pairs, cut into groups of padded size (images × largest P)
    at most ``cap_pairs`` (one image alone may exceed it). Returns index arrays."""
    order = np.argsort(n_pairs, kind="stable")
    groups, start = [], 0
    for end in range(1, order.size + 1):
        if end < order.size and (end + 1 - start) * n_pairs[order[end]] <= cap_pairs:
            continue
        groups.append(order[start:end])
        start = end
    return groups


def fine_pass(images: FineImages, table: FineTable, pairs, translations, part, model, coords,
              stats, bp_budget_bytes=None, timer: PhaseTimer | None = None) -> FineOutcome:  # fmt: skip
    """The fine pass of a part's images (``part``: estep._Part) against ``table``.

    pairs: per image (translation indices (P_i,), coarse rows (P_i,)); translations:
    fourier_points.Translations (the coarse shifts, the fine sub-steps around them and
    their phases at ``coords``). Back-projects into ``stats`` and returns the
    per-image results. Back-projection rows are flushed whenever they exceed
    ``bp_budget_bytes`` (None: once at the end). ``timer`` gets the back-projection's
    seconds (its flushes) as phase "backprojection".
    """
    K, n = model.n_classes, part.idx.size
    xp = namespace(images.X0)
    ctx = _Context(images, table, translations, part, model)
    timer = PhaseTimer() if timer is None else timer
    buffer = _BackProjection(table, coords, stats, part_padding(model), bp_budget_bytes, timer)
    n_pairs = np.array([t.size for t, _ in pairs])
    shape = memory.EStepShape(
        model.box_size, coords.shape[0], 0, 0, 0, 0, K,
        model.max_significant + model.min_orientations, table.n_kids, translations.sub.shape[0],
    )  # fmt: skip
    cap = memory.fine_group_pairs(shape)
    out = {
        k: [] for k in ("pos", "best", "lse", "max_prob", "count", "cls", "clsw", "off", "noise")
    }
    for members in _groups(n_pairs, cap):
        _score_group(ctx, members, pairs, buffer, out)
    buffer.flush()
    buffer.store()
    pos = np.concatenate(out["pos"])
    inv = np.argsort(pos)  # groups are in pairs order: back to the part's order
    noise = xp.concat(out["noise"], axis=0)
    best = np.concatenate(out["best"])[inv]  # (n, 4): table row, image, pair, subshift
    origin = images.prior_px + translations.shifts[best[:, 2]] + translations.sub[best[:, 3]]
    return FineOutcome(
        angles=table.angles[best[:, 0]],
        origin_px=origin,
        prior_px=images.prior_px,
        max_prob=np.concatenate(out["max_prob"])[inv],
        n_significant=np.concatenate(out["count"])[inv],
        loglik=np.concatenate(out["lse"])[inv],
        class_posterior=np.concatenate(out["cls"])[inv],
        class_weight=np.concatenate(out["clsw"])[inv],
        offset_sq_px2=np.concatenate(out["off"])[inv],
        noise_rows=xp.take(noise, xp.asarray(inv), axis=0) if n > 0 else noise,
    )


@dataclass(frozen=True)
class _Context:
    images: FineImages
    table: FineTable
    translations: Translations
    part: object
    model: object


def _padded(ctx: _Context, members, pairs):
    """Host bookkeeping of a group (g images, padded to P pairs): table rows (g, P, nk),
    translation indices (g, P), total offsets (g, P, S, 2) and the log prior of every
    sample (g, P, S, nk) float64 (offset, class, local orientation; −inf on padding)."""
    table, part, model = ctx.table, ctx.part, ctx.model
    g, P = members.size, max(pairs[i][0].size for i in members)
    t_pad = np.zeros((g, P), np.int64)
    r_pad = np.zeros((g, P), np.int64)
    valid = np.zeros((g, P), bool)
    for a, i in enumerate(members):
        t_idx, rows = pairs[i]
        t_pad[a, : t_idx.size], r_pad[a, : t_idx.size] = t_idx, rows
        r_pad[a, t_idx.size :] = rows[0]
        valid[a, : t_idx.size] = True
    krows = table.rows(r_pad)  # (g, P, nk)
    total = (
        ctx.images.prior_px[members][:, None, None, :]
        + ctx.translations.shifts[t_pad][:, :, None, :]
        + ctx.translations.sub[None, None]
    )  # fmt: skip  (g, P, S, 2)
    prior = offset_log_prior(total, model.sigma_offset_A, model.pixel_size_A)[..., None]
    row_prior = np.zeros(krows.shape)
    if part.log_pi is not None:
        row_prior += part.log_pi[members][np.arange(g)[:, None, None], table.class_of[krows]]
    if model.grid.local_sigma_deg is not None and part.previous is not None:
        for a, i in enumerate(members):  # normalised over the image's own children
            P_i = pairs[i][0].size
            row_prior[a, :P_i] += sampling.gaussian_orientation_prior(
                table.angles[krows[a, :P_i].ravel()], part.previous[i], model.grid.local_sigma_deg
            ).reshape(P_i, -1)
    prior = prior + row_prior[:, :, None, :]
    prior[~valid] = -np.inf
    return krows, t_pad, total, prior


def _score_group(ctx: _Context, members, pairs, buffer, out):
    """Score one padded group on the device; append its per-image results to ``out``
    and its weighted rows to the back-projection ``buffer``."""
    images, table, model = ctx.images, ctx.table, ctx.model
    xp = namespace(images.X0)
    krows, t_pad, total, prior = _padded(ctx, members, pairs)
    g, P, nk = krows.shape
    S, M = ctx.translations.sub.shape[0], images.X0.shape[1]
    ig = xp.asarray(members)
    X0 = xp.take(images.X0, ig, axis=0)
    cw, ctf2w = xp.take(images.cw, ig, axis=0), xp.take(images.ctf2w, ig, axis=0)
    ph = xp.reshape(
        xp.take(ctx.translations.phases, xp.asarray(t_pad.ravel()), axis=0), (g, P, 1, M)
    )
    Xs = X0[:, None, None, :] * ph * ctx.translations.sub_phases[None, None, ...]  # (g, P, S, M)
    # Re(conj(Xs)·cw·A) = (Re, Im of Xs·cw) · (Re, Im of A), point by point
    lhs = xp.reshape(stacked_real(Xs * cw[:, None, None, :]), (g * P, S, 2 * M))
    kr = xp.asarray(krows.ravel())
    A = xp.reshape(xp.take(table.stacked, kr, axis=0), (g * P, nk, 2 * M))
    power = xp.reshape(xp.take(table.power, kr, axis=0), (g * P, nk, M))
    C = xp.matmul(lhs, A.mT)  # (g·P, S, nk)
    del lhs
    Sf = 0.5 * xp.matmul(xp.reshape(power, (g, P * nk, M)), ctf2w[:, :, None])  # (g, P·nk, 1)
    f64 = xp.float64
    norm = xp.take(images.norm, ig, axis=0)[:, None, None, None]
    logp = log_likelihood(
        xp.reshape(xp.astype(C, f64), (g, P, S, nk)),
        xp.reshape(xp.astype(Sf, f64), (g, P, 1, nk)),
        norm,
        model.scale_free,
    ) + xp.asarray(prior)  # (g, P, S, nk)
    W, lse, best = normalised_posterior(xp.reshape(logp, (g, P * S * nk)))
    max_prob = xp.take_along_axis(W, best[:, None], axis=1)[:, 0]
    Wsig, count = significant_weights_rows(W, model.adaptive_fraction)
    W4 = xp.reshape(Wsig, (g, P, S, nk))
    w_full = xp.reshape(xp.sum(xp.reshape(W, (g, P, S, nk)), axis=2), (g, P * nk))
    w_sig = xp.reshape(xp.sum(W4, axis=2), (g, P * nk))
    off2 = xp.asarray(np.sum(total**2, axis=-1))  # (g, P, S)
    offset_sq = xp.sum(xp.reshape(W4 * off2[..., None], (g, -1)), axis=1)
    small = xp.concat([
        w_full, w_sig,
        xp.astype(xp.stack([lse, max_prob, offset_sq], axis=1), f64),
        xp.astype(xp.stack([best, count], axis=1), f64),
    ], axis=1)  # fmt: skip
    host = to_numpy(small)  # the group's one transfer of per-image numbers
    w_full_h, w_sig_h = host[:, : P * nk], host[:, P * nk : 2 * P * nk]
    lse_h, max_prob_h, off_h, best_h, count_h = host[:, 2 * P * nk :].T
    p_b, s_b, k_b = np.unravel_index(best_h.astype(np.int64), (P, S, nk))
    rows_b = krows[np.arange(g), p_b, k_b]
    out["pos"].append(members)
    out["best"].append(np.stack([rows_b, members, t_pad[np.arange(g), p_b], s_b], axis=1))
    out["lse"].append(lse_h), out["max_prob"].append(max_prob_h), out["off"].append(off_h)
    out["count"].append(count_h.astype(np.int64))
    cls = table.class_of[krows.reshape(g, -1)]  # (g, P·nk)
    out["cls"].append(_class_sums(cls, w_full_h, model.n_classes))
    out["clsw"].append(_class_sums(cls, w_sig_h, model.n_classes))
    live = _Live(w_sig_h.reshape(g * P, nk), krows.reshape(g * P, nk), P)
    sums = (xp.reshape(W4, (g * P, S, nk)), xp.reshape(Xs, (g * P, S, M)), A, power)
    out["noise"].append(_live_sums(ctx, members, live, sums, X0, cw, ctf2w, buffer))


@dataclass(frozen=True)
class _Live:
    """The group's (image, pair) rows that carry significant weight: w (g·P, nk) and
    krows (g·P, nk) on the host, P pairs per image."""

    w: np.ndarray
    krows: np.ndarray
    P: int


def _live_sums(ctx: _Context, members, live: _Live, sums, X0, cw, ctf2w, buffer):
    """Σ_s W X_s of the live pairs only, their back-projection rows into ``buffer``,
    and the group's noise rows (g, M) Σ w |X − CTF·A|² (a few pairs per image carry
    weight: the sums skip the rest)."""
    xp = namespace(X0)
    W4, Xs, A, power = sums
    M = Xs.shape[-1]
    pairs = np.flatnonzero(live.w.max(axis=1) > 0)  # (L,) every image has one
    img = pairs // live.P  # image of each live pair, sorted
    p_x = xp.asarray(pairs)
    D = weighted_image_sums(xp.take(W4, p_x, axis=0), xp.take(Xs, p_x, axis=0))  # (L, nk, M)
    A_l, power_l = xp.take(A, p_x, axis=0), xp.take(power, p_x, axis=0)
    w_l = live.w[pairs]  # (L, nk)
    w_x = xp.asarray(w_l.astype(np.float32))
    cross = xp.sum(xp.real(D) * A_l[..., 0::2] + xp.imag(D) * A_l[..., 1::2], axis=1)  # (L, M)
    fit = xp.matmul(w_x[:, None, :], power_l)[:, 0, :]  # (L, M)
    _, cross_i, fit_i = segment_sums(img, cross, fit)  # (g, M) per image
    ctf = xp.take(ctx.images.ctf, xp.asarray(members), axis=0)
    noise = xp.real(X0) ** 2 + xp.imag(X0) ** 2 - 2 * ctf * cross_i + ctf * ctf * fit_i
    rows = np.flatnonzero(w_l.ravel() > 0)  # the children that carry weight
    nk = w_l.shape[1]
    row_img = img[rows // nk]
    keys = 2 * live.krows[pairs].ravel()[rows] + ctx.part.halves[members][row_img]
    r_x, i_x = xp.asarray(rows), xp.asarray(row_img)
    vals = xp.take(xp.reshape(D, (-1, M)), r_x, axis=0) * xp.take(cw, i_x, axis=0)
    w_r = xp.asarray(w_l.ravel()[rows])
    buffer.add(keys, vals, w_r[:, None] * xp.take(ctf2w, i_x, axis=0))
    return noise


def part_padding(model) -> int:
    """The accumulators' padding factor: the references'."""
    return model.projectors[0].padding_factor


def _class_sums(cls, w, K: int):
    """(g, K) per-image sums of weights w (g, R) by class cls (g, R)."""
    g = cls.shape[0]
    out = np.zeros((g, K))
    np.add.at(out, (np.repeat(np.arange(g), cls.shape[1]), cls.ravel()), w.ravel())
    return out


class _BackProjection:
    """Buffered back-projection rows of a part, keyed 2·(table row) + half; merged with
    segment sums and inserted per (class, half) into accumulator 2k + h."""

    def __init__(self, table: FineTable, coords, stats, padding_factor: int, budget_bytes,
                 timer: PhaseTimer):  # fmt: skip
        self.table, self.coords, self.stats, self.timer = table, coords, stats, timer
        self.padding, self.budget = padding_factor, budget_bytes
        self.keys, self.vals, self.wgts, self.bytes = [], [], [], 0
        self.acc = DeviceAccumulators(stats, namespace(table.power))

    def add(self, keys, vals, wgts):
        self.keys.append(keys), self.vals.append(vals), self.wgts.append(wgts)
        self.bytes += keys.size * vals.shape[-1] * 16
        if self.budget is not None and self.bytes > self.budget:
            self.flush()

    def flush(self):
        if not self.keys:
            return
        with self.timer("backprojection"):
            self._flush()

    def _flush(self):
        xp = namespace(self.table.power)
        used, vals, wgts = segment_sums(
            np.concatenate(self.keys),
            xp.astype(xp.concat(self.vals, axis=0), xp.complex128),
            xp.astype(xp.concat(self.wgts, axis=0), xp.float64),
        )
        self.keys, self.vals, self.wgts, self.bytes = [], [], [], 0
        rows, half = used // 2, used % 2
        count_points(self.stats.phase_points, "backprojection", used.size, self.coords.shape[0])
        acc_index = 2 * self.table.class_of[rows] + half
        pf = self.padding
        for a in np.unique(acc_index):
            sel = np.flatnonzero(acc_index == a)
            data, weight = self.acc.get(int(a))
            sel_x = xp.asarray(sel)
            insert_points(data, weight, self.table.rotations[rows[sel]], self.coords,
                          xp.take(vals, sel_x, axis=0), xp.take(wgts, sel_x, axis=0), pf)  # fmt: skip

    def store(self):
        with self.timer("backprojection"):
            self.acc.store()


class DeviceAccumulators:
    """The statistics' accumulators a part inserts into, where its arrays live: views
    for NumPy, device copies (made on first use) otherwise, written back by
    :meth:`store`."""

    def __init__(self, stats, xp):
        self.stats, self.xp, self.acc = stats, xp, {}

    def get(self, a: int):
        """(data, weight) of accumulator ``a`` (2k + h)."""
        if a not in self.acc:
            s = self.stats
            self.acc[a] = (self.xp.asarray(s.data_acc[a]), self.xp.asarray(s.weight_acc[a]))
        return self.acc[a]

    def store(self):
        """Accumulators back into the host statistics (no copy for NumPy)."""
        for a, (data, weight) in self.acc.items():
            if not isinstance(data, np.ndarray):
                self.stats.data_acc[a] = to_numpy(data)
                self.stats.weight_acc[a] = to_numpy(weight)
