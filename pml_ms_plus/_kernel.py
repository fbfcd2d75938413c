"""The fused, chunked MS loss for inner-product similarities.

``ms_terms_fused(x, y, ...)`` equals ``functional.ms_terms(x @ y.T, masks, ...)``
but never holds more than one ``(B, chunk)`` block of similarities at a time,
and its backward uses the closed-form pair weights (``dL/dS = w_neg - w_pos``)
instead of letting autograd store ``(B, M)`` intermediates:

* forward pass 1 over the blocks: each anchor's hardest positive / negative
  (the exact log-sum-exp shifts, and the mining thresholds);
* forward pass 2: mining and the per-anchor sums of both sides;
* backward: per block ``G = g * (w_neg - w_pos)``, ``dx += G @ y_blk``,
  ``dy_blk = G.T @ x``.

Memory: with the default budget of ``CHUNK_ELEMENTS = 2**22`` similarities per
block (``chunk = 2**22 // B`` references), a block is 16 MB in float32 and the
extra memory peaks at about five blocks plus the bool masks, under 100 MB,
whatever the number of references. When all references fit in one block the
block is computed once and its two per-side terms are kept for the backward
(two blocks held between forward and backward); otherwise every pass recomputes
its block (one extra matrix product per pass), trading time for bounded memory.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

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
    counts: bool


class _Problem(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor
    labels: torch.Tensor
    ref_labels: torch.Tensor
    self_index: torch.Tensor
    ref_scale: Optional[torch.Tensor] = None  # (M,) 1 / |y_j|: cosine with raw references

    def starts(self, cols: int):
        return range(0, self.y.shape[0], cols)

    def scale_columns_(self, A: torch.Tensor, c0: int) -> torch.Tensor:
        """``A * ref_scale`` over the block's columns, in place (the normalisation of y)."""
        if self.ref_scale is not None:
            A.mul_(self.ref_scale[c0 : c0 + A.shape[1]])
        return A

    def block(self, c0: int, cols: int) -> F_ms.Block:
        """The :class:`functional.Block` of references ``[c0, c0 + cols)``."""
        S = self.scale_columns_(self.x @ self.y[c0 : c0 + cols].T, c0)
        return F_ms.block_from_labels(
            S, self.labels, self.ref_labels[c0 : c0 + cols], self.self_index - c0, reuse=True
        )


def _terms(block, cfg: _Config, lam_pos, lam_neg, hard, counts: bool = False):
    """:func:`functional.block_terms` of one block, overwriting it."""
    return F_ms.block_terms(
        block,
        cfg.alpha,
        cfg.beta,
        lam_pos,
        lam_neg,
        cfg.weighting,
        cfg.epsilon,
        hard,
        reuse=True,
        counts=counts,
    )


class _FusedMS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, lam_pos, lam_neg, labels, ref_labels, self_index, cfg: _Config, ref_scale):
        prob = _Problem(x, y, labels, ref_labels, self_index, ref_scale)
        B = x.shape[0]
        keep = y.shape[0] <= cfg.cols
        with torch.autocast(x.device.type, enabled=False):
            if keep:
                block = prob.block(0, cfg.cols)
                hard = F_ms.hardest(block)
            else:
                min_pos = torch.full((B,), float("inf"), dtype=x.dtype, device=x.device)
                max_neg = torch.full((B,), float("-inf"), dtype=x.dtype, device=x.device)
                for c0 in prob.starts(cfg.cols):
                    mp, mn = F_ms.hardest(prob.block(c0, cfg.cols))
                    torch.minimum(min_pos, mp, out=min_pos)
                    torch.maximum(max_neg, mn, out=max_neg)
                hard = (min_pos, max_neg)
            acc = [torch.zeros(B, dtype=x.dtype, device=x.device) for _ in range(2)]
            cnt = [torch.zeros(B, dtype=torch.long, device=x.device) for _ in range(2)]
            rsum = [torch.zeros(B, dtype=x.dtype, device=x.device) for _ in range(2)]
            kept = []
            for c0 in prob.starts(cfg.cols):
                blk = block if keep else prob.block(c0, cfg.cols)
                blk, parts, shifts, num = _terms(blk, cfg, lam_pos, lam_neg, hard, cfg.counts)
                (Rp, acc_p), (Rn, acc_n) = parts
                acc[0] += acc_p
                acc[1] += acc_n
                if cfg.counts:
                    cnt[0] += num[0]
                    cnt[1] += num[1]
                if cfg.weighting == "self":  # sum of the weights sigmoid(z); else they follow from acc
                    rsum[0].index_add_(0, blk.pa, Rp)
                    rsum[1] += Rn.sum(1)
                if keep:
                    kept = [blk.pa, blk.pj, Rp, Rn]
            sides = F_ms.sides(cfg.alpha, cfg.beta, lam_pos, lam_neg)
            losses, scales = zip(
                *(F_ms.side_finish(acc[k], shifts[k], s.coef, cfg.weighting) for k, s in enumerate(sides))
            )
            wsums = [F_ms.weight_sum(acc[k], rsum[k], scales[k], cfg.weighting) for k in range(2)]
        # the kept block's terms live on ctx, not in save_for_backward: the first
        # backward builds its gradient block in their storage and frees them
        ctx.cfg, ctx.ref_scale, ctx.kept = cfg, ref_scale, kept or None
        ctx.save_for_backward(x, y, lam_pos, lam_neg, labels, ref_labels, self_index, *hard, *scales)
        outs = (cnt[0], cnt[1], wsums[0], wsums[1])
        ctx.mark_non_differentiable(*outs)
        return (losses[0] + losses[1], *outs)

    @staticmethod
    def backward(ctx, g, *_):
        x, y, lam_pos, lam_neg, labels, ref_labels, self_index, min_pos, max_neg, *scales = ctx.saved_tensors
        cfg, kept = ctx.cfg, ctx.kept
        ctx.kept = None  # consumed: a second backward (retain_graph) recomputes the block
        prob = _Problem(x, y, labels, ref_labels, self_index, ctx.ref_scale)
        need_x, need_y, need_lp, need_ln = ctx.needs_input_grad[:4]
        if need_y and ctx.ref_scale is not None:
            raise RuntimeError("references normalised inside the kernel cannot receive gradients")
        with torch.autocast(x.device.type, enabled=False):
            g = g.to(x.dtype)
            a_pos, a_neg = g * scales[0], g * scales[1]  # w = R * scale, times the upstream grad
            dx = torch.zeros_like(x) if need_x else None
            dy = torch.zeros_like(y) if need_y else None
            sum_rp = torch.zeros_like(g)
            sum_rn = torch.zeros_like(g)
            for c0 in prob.starts(cfg.cols):
                if kept is not None:
                    pa, pj, Rp, Rn = kept
                else:
                    blk, ((Rp, _), (Rn, _)), _, _ = _terms(
                        prob.block(c0, cfg.cols), cfg, lam_pos, lam_neg, (min_pos, max_neg)
                    )
                    pa, pj = blk.pa, blk.pj
                if need_lp:
                    sum_rp.index_add_(0, pa, Rp)
                if need_ln:
                    sum_rn += Rn.sum(1)
                G = Rn.mul_(a_neg[:, None])  # dL/dS = w_neg - w_pos; positives are 0 in Rn
                G.index_put_((pa, pj), -Rp * a_pos[pa], accumulate=True)
                c1 = c0 + G.shape[1]
                if need_x:
                    dx.addmm_(prob.scale_columns_(G, c0), y[c0:c1])
                if need_y:
                    dy[c0:c1] = G.T @ x
        d_lp = a_pos * sum_rp if need_lp else None  # dL/dlam_pos = +sum w_pos
        d_ln = -a_neg * sum_rn if need_ln else None  # dL/dlam_neg = -sum w_neg
        return dx, dy, d_lp, d_ln, None, None, None, None, None


def _inverse_norms(y: torch.Tensor, p: Optional[float]) -> Optional[torch.Tensor]:
    """``1 / max(|y_j|_p, 1e-12)``, as ``torch.nn.functional.normalize`` divides."""
    if p is None:
        return None
    with torch.no_grad():
        return y.norm(p=p, dim=1).clamp_min(1e-12).reciprocal_()


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
    counts: bool = True,
    ref_norm_p: Optional[float] = None,
) -> F_ms.MSTerms:
    """:func:`functional.ms_terms` for ``S = x @ y.T`` without storing ``(B, M)`` blocks.

    ``x``: ``(B, D)`` anchors, ``y``: ``(M, D)`` references (already normalised
    if the similarity is cosine); ``self_index``: ``(B,)`` column of each
    anchor's own copy in ``y`` (``-1``: none); ``lam_pos``/``lam_neg``: ``(B,)``
    thresholds (may require grad). The sums run in float32 or wider.
    ``counts=False`` skips counting pairs (``num_pos``/``num_neg`` are then 0).
    ``ref_norm_p``: if set, ``y`` is raw and is p-normalised implicitly: the
    similarity block's columns are scaled by ``1 / |y_j|`` (no ``(M, D)``
    normalised copy; ``y`` must not require grad).
    """
    F_ms.check_weighting(weighting)
    dtype = F_ms.compute_dtype(x.dtype)
    x, y = x.to(dtype), y.to(dtype)
    cfg = _Config(
        float(alpha), float(beta), epsilon, weighting, chunk_columns(x.shape[0], chunk_size), counts
    )
    ref_scale = _inverse_norms(y, ref_norm_p)
    out = _FusedMS.apply(
        x, y, lam_pos.to(dtype), lam_neg.to(dtype), labels, ref_labels, self_index, cfg, ref_scale
    )
    return F_ms.MSTerms(*out)


@torch.no_grad()
def centre_sums(x, y, labels, ref_labels, self_index, chunk_size: Optional[int] = None, ref_norm_p=None):
    """:func:`functional.block_row_sums` of ``x @ y.T``, block by block."""
    dtype = F_ms.compute_dtype(x.dtype)
    x, y = x.to(dtype), y.to(dtype)
    cols = chunk_columns(x.shape[0], chunk_size)
    prob = _Problem(x, y, labels, ref_labels, self_index, _inverse_norms(y, ref_norm_p))
    total = None
    for c0 in prob.starts(cols):
        part = F_ms.block_row_sums(prob.block(c0, cols))
        total = part if total is None else tuple(a + b for a, b in zip(total, part))
    return total
