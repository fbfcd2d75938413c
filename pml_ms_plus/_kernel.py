"""The fused, chunked MS loss for inner-product similarities.

``ms_terms_fused(x, y, ...)`` equals ``functional.ms_terms(x @ y.T, masks, ...)``
but never builds more than one ``(B, chunk)`` block of similarities at a time,
and its backward uses the closed-form pair weights (``dL/dS = w_neg - w_pos``)
instead of letting autograd store ``(B, M)`` intermediates:

* forward pass 1 over the blocks: each anchor's hardest positive / negative
  (the exact log-sum-exp shift, and the mining thresholds);
* forward pass 2: the per-anchor sums of every side;
* backward: per block ``G = g * (w_neg - w_pos)``, ``dx += G @ y_blk``,
  ``dy_blk = G.T @ x``.

Peak extra memory is a few ``(B, chunk)`` tensors: with the default budget of
``CHUNK_ELEMENTS = 2**22`` similarities per block (``chunk = 2**22 // B``
references) that is about 16 MB per float32 block and under 100 MB in all,
whatever the number of references. When all references fit in one block the
block is computed once and kept for the backward; otherwise it is recomputed
(one extra matrix product per pass), trading time for bounded memory.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Tuple

import torch

from . import functional as F_ms

CHUNK_ELEMENTS = 2**22


def chunk_columns(num_anchors: int, chunk_size: Optional[int]) -> int:
    """References per block: ``chunk_size`` if given, else ``CHUNK_ELEMENTS // B``."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, CHUNK_ELEMENTS // max(1, num_anchors))


class _Config(NamedTuple):
    alpha: float
    beta: float
    epsilon: Optional[float]
    weighting: str
    cols: int


def _blocks(
    x: torch.Tensor,
    y: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor,
    self_index: torch.Tensor,
    cols: int,
    kept: Optional[torch.Tensor] = None,
) -> Iterator[Tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, stop, S, pos, neg)`` for each block of references."""
    M = y.shape[0]
    for c0 in range(0, M, cols):
        c1 = min(M, c0 + cols)
        S = kept if kept is not None else x @ y[c0:c1].T
        pos, neg = F_ms.pair_masks(labels, ref_labels[c0:c1], self_index - c0)
        yield c0, c1, S, pos, neg


def _hardest(x, y, labels, ref_labels, self_index, cols, kept=None):
    B = x.shape[0]
    min_pos = torch.full((B,), float("inf"), dtype=x.dtype, device=x.device)
    max_neg = torch.full((B,), float("-inf"), dtype=x.dtype, device=x.device)
    for _, _, S, pos, neg in _blocks(x, y, labels, ref_labels, self_index, cols, kept):
        mp, mn = F_ms.hardest(S, pos, neg)
        torch.minimum(min_pos, mp, out=min_pos)
        torch.maximum(max_neg, mn, out=max_neg)
    return min_pos, max_neg


class _FusedMS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, lam_pos, lam_neg, labels, ref_labels, self_index, cfg: _Config):
        with torch.autocast(x.device.type, enabled=False):
            B, M = x.shape[0], y.shape[0]
            keep = M <= cfg.cols
            kept = x @ y.T if keep else None
            min_pos, max_neg = _hardest(x, y, labels, ref_labels, self_index, cfg.cols, kept)
            sides = F_ms.sides(cfg.alpha, cfg.beta, lam_pos, lam_neg)
            shifts = [F_ms.side_shift(s.max_exponent(min_pos, max_neg), cfg.weighting) for s in sides]
            zeros = torch.zeros(B, dtype=x.dtype, device=x.device)
            acc = [zeros.clone(), zeros.clone()]
            cnt = [torch.zeros(B, dtype=torch.long, device=x.device) for _ in sides]
            wacc = [zeros.clone(), zeros.clone()]
            for _, _, S, pos, neg in _blocks(x, y, labels, ref_labels, self_index, cfg.cols, kept):
                if cfg.epsilon is not None:
                    pos, neg = F_ms.mine_hard_pairs(S, pos, neg, cfg.epsilon, min_pos, max_neg)
                for k, (side, mask) in enumerate(zip(sides, (pos, neg))):
                    a, c, w = F_ms.side_partial(side.exponents(S), mask, shifts[k], cfg.weighting)
                    acc[k] += a
                    cnt[k] += c
                    wacc[k] += w
            losses, lses, wsums = [], [], []
            for k, side in enumerate(sides):
                loss, lse = F_ms.side_finish(acc[k], cnt[k], shifts[k], side.coef, cfg.weighting)
                losses.append(loss)
                lses.append(lse)
                wsums.append(F_ms.weight_sums(acc[k], wacc[k], shifts[k], lse, cfg.weighting))
        ctx.cfg = cfg
        ctx.keep = keep
        ctx.save_for_backward(
            x, y, lam_pos, lam_neg, labels, ref_labels, self_index, min_pos, max_neg,
            lses[0], lses[1], kept if keep else None,
        )
        outs = (cnt[0], cnt[1], wsums[0], wsums[1])
        ctx.mark_non_differentiable(*outs)
        return (losses[0] + losses[1], *outs)

    @staticmethod
    def backward(ctx, g, *_):
        (x, y, lam_pos, lam_neg, labels, ref_labels, self_index,
         min_pos, max_neg, lse_pos, lse_neg, kept) = ctx.saved_tensors
        cfg = ctx.cfg
        need_x, need_y, need_lp, need_ln = ctx.needs_input_grad[:4]
        with torch.autocast(x.device.type, enabled=False):
            g = g.to(x.dtype)
            sides = F_ms.sides(cfg.alpha, cfg.beta, lam_pos, lam_neg)
            dx = torch.zeros_like(x) if need_x else None
            dy = torch.zeros_like(y) if need_y else None
            sum_wp = torch.zeros_like(g)
            sum_wn = torch.zeros_like(g)
            for c0, c1, S, pos, neg in _blocks(x, y, labels, ref_labels, self_index, cfg.cols, kept):
                if cfg.epsilon is not None:
                    pos, neg = F_ms.mine_hard_pairs(S, pos, neg, cfg.epsilon, min_pos, max_neg)
                wp = F_ms.side_weights(sides[0].exponents(S), pos, lse_pos, cfg.weighting)
                wn = F_ms.side_weights(sides[1].exponents(S), neg, lse_neg, cfg.weighting)
                if need_lp:
                    sum_wp += wp.sum(1)
                if need_ln:
                    sum_wn += wn.sum(1)
                G = wn.sub_(wp).mul_(g[:, None])
                if need_x:
                    dx.addmm_(G, y[c0:c1])
                if need_y:
                    dy[c0:c1] = G.T @ x
        d_lp = g * sum_wp if need_lp else None  # dL/dlam_pos = +sum w_pos
        d_ln = -g * sum_wn if need_ln else None  # dL/dlam_neg = -sum w_neg
        return dx, dy, d_lp, d_ln, None, None, None, None


def ms_terms_fused(
    x: torch.Tensor,
    y: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor,
    self_index: torch.Tensor,
    lam_pos: torch.Tensor,
    lam_neg: torch.Tensor,
    alpha: float,
    beta: float,
    weighting: str = "ms",
    epsilon: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> F_ms.MSTerms:
    """:func:`functional.ms_terms` for ``S = x @ y.T`` without storing ``(B, M)`` blocks.

    ``x``: ``(B, D)`` anchors, ``y``: ``(M, D)`` references (already normalised
    if the similarity is cosine); ``self_index``: ``(B,)`` column of each
    anchor's own copy in ``y`` (``-1``: none); ``lam_pos``/``lam_neg``: ``(B,)``
    thresholds (may require grad). The sums run in float32 or wider.
    """
    F_ms.check_weighting(weighting)
    dtype = F_ms.compute_dtype(x.dtype)
    x, y = x.to(dtype), y.to(dtype)
    cfg = _Config(float(alpha), float(beta), epsilon, weighting, chunk_columns(x.shape[0], chunk_size))
    out = _FusedMS.apply(
        x, y, lam_pos.to(dtype), lam_neg.to(dtype), labels, ref_labels, self_index, cfg
    )
    return F_ms.MSTerms(*out)


@torch.no_grad()
def centre_sums(x, y, labels, ref_labels, self_index, chunk_size: Optional[int] = None):
    """:func:`functional.masked_row_sums` of ``x @ y.T``, block by block."""
    dtype = F_ms.compute_dtype(x.dtype)
    x, y = x.to(dtype), y.to(dtype)
    cols = chunk_columns(x.shape[0], chunk_size)
    total = None
    for _, _, S, pos, neg in _blocks(x, y, labels, ref_labels, self_index, cols):
        part = F_ms.masked_row_sums(S, pos, neg)
        total = part if total is None else tuple(a + b for a, b in zip(total, part))
    return total
