"""The Multi-Similarity math as plain tensor functions (no PML classes).

Orientation
-----------
Every function here works on a *similarity* block ``S`` of shape ``(B, M)``
(anchors x references) where larger means more similar. For a PML distance that
is not inverted (``LpDistance``) the adapters pass ``S = -D`` and the threshold
``-base``; negation is exact in floating point, so every formula below then
reproduces PML's ``distance.margin`` bit for bit.

The loss of anchor ``i`` is the sum of two *sides*. A side has a pair mask, a
coefficient ``c`` and a per-anchor threshold ``lam``; its exponents are
``z_ij = c * (S_ij - lam_i)``:

* positive side: ``c = -alpha``, so ``z = alpha * (lam - S)``;
* negative side: ``c = +beta``, so ``z = beta * (S - lam)``.

With ``k = |c|`` the side's loss for each ``weighting`` is

* ``"ms"``:        ``1/k * log(1 + sum_j exp(z_ij))`` (the MS loss);
* ``"relative"``:  ``1/k * log(sum_j exp(z_ij))``, 0 for an empty set;
* ``"self"``:      ``1/k * sum_j softplus(z_ij)`` (binomial deviance).

The General Pair Weighting weight of a pair is the magnitude of the derivative
of the anchor loss with respect to the pair's similarity: ``exp(z_ij - lse_i)``
for ``"ms"``/``"relative"`` and ``sigmoid(z_ij)`` for ``"self"``. Hence
``dL_i/dS_ij = w_neg_ij - w_pos_ij``.

Representation: a block of similarities is a :class:`Block`: the positive
pairs as a list (they are few: a handful per anchor) and the negatives as a
dense value matrix ``Vn`` (``S`` on negative pairs, ``-inf`` elsewhere). An
excluded pair then has the exponent ``-inf`` (``exp = 0``), so masking and
mining are fills, done in place where no gradient needs the old values.

Log-sum-exps subtract each anchor's exact maximum exponent, which the *hardest*
pair gives (the smallest positive and the largest negative similarity); the
mining rule keeps either both hardest pairs or nothing, so this shift is exact
after mining as well. Everything is computed in float32 or wider.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

WEIGHTINGS = ("ms", "self", "relative")

Threshold = Union[float, torch.Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reductions run in: float32, or float64 for float64 input."""
    return torch.promote_types(dtype, torch.float32)


def pair_masks(
    labels: torch.Tensor,
    ref_labels: Optional[torch.Tensor] = None,
    self_index: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative pair masks of shape ``(B, M)`` from labels.

    ``pos[i, j] = labels[i] == ref_labels[j] and j != self_index[i]``;
    ``neg[i, j] = labels[i] != ref_labels[j]``. ``self_index`` (``(B,)`` long)
    gives the column of each anchor's own copy among the references; entries
    outside ``[0, M)`` mean "no copy". With ``ref_labels=None`` the references
    are the anchors themselves and the diagonal is removed.
    """
    if ref_labels is None:
        ref_labels = labels
        if self_index is None:
            self_index = torch.arange(len(labels), device=labels.device)
    eq = labels[:, None] == ref_labels[None, :]
    pos = eq
    if self_index is not None:
        pos = eq.clone()
        pa, pj = eq.nonzero(as_tuple=True)
        own = pj == self_index[pa]
        pos[pa[own], pj[own]] = False
    return pos, ~eq


def masks_from_pairs(
    indices_tuple: Tuple[torch.Tensor, ...], shape: Tuple[int, int], device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense masks from a PML pair tuple ``(a1, p, a2, n)`` (duplicates collapse)."""
    a1, p, a2, n = (t.to(device=device, dtype=torch.long) for t in indices_tuple)
    pos = torch.zeros(shape, dtype=torch.bool, device=device)
    neg = torch.zeros(shape, dtype=torch.bool, device=device)
    pos[a1, p] = True
    neg[a2, n] = True
    if (pos & neg).any():
        raise ValueError("indices_tuple: a pair is listed both as positive and as negative")
    return pos, neg


_INF = float("inf")


class Block(NamedTuple):
    """A ``(B, M)`` block of similarities, split by side.

    ``pa``/``pj``: anchor row and reference column of each positive pair
    (``(P,)`` long); ``sp``: their similarities (``+inf`` once mined away);
    ``Vn``: ``S`` on negative pairs, ``-inf`` elsewhere.
    """

    pa: torch.Tensor
    pj: torch.Tensor
    sp: torch.Tensor
    Vn: torch.Tensor

    def kept_pos(self) -> torch.Tensor:
        return self.sp != _INF

    def kept_neg(self) -> torch.Tensor:
        return self.Vn != -_INF


def same_label_pairs(labels: torch.Tensor, ref_labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """All ``(i, j)`` with ``labels[i] == ref_labels[j]``, ordered by ``i`` then ``j``.

    Sorts the references' labels once and finds each anchor's run with a binary
    search: ``O((B + M) log M + P)`` for ``P`` pairs, no ``(B, M)`` comparison.
    """
    order = torch.argsort(ref_labels, stable=True)
    sorted_labels = ref_labels[order]
    lo = torch.searchsorted(sorted_labels, labels, side="left")
    counts = torch.searchsorted(sorted_labels, labels, side="right") - lo
    rows = torch.repeat_interleave(torch.arange(len(labels), device=labels.device), counts)
    starts = torch.repeat_interleave(lo - (torch.cumsum(counts, 0) - counts), counts)
    cols = order[starts + torch.arange(len(rows), device=labels.device)]
    return rows, cols


def block_from_labels(
    S: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: Optional[torch.Tensor] = None,
    self_index: Optional[torch.Tensor] = None,
    reuse: bool = False,
) -> Block:
    """The :class:`Block` of ``S`` for label-defined pairs (see :func:`pair_masks`).

    ``reuse=True`` writes ``Vn`` into ``S``'s storage (no autograd).
    """
    if ref_labels is None:
        ref_labels = labels
        if self_index is None:
            self_index = torch.arange(len(labels), device=labels.device)
    ea, ej = same_label_pairs(labels, ref_labels)
    pa, pj = ea, ej
    if self_index is not None:
        other = ej != self_index[ea]
        pa, pj = ea[other], ej[other]
    sp = S[pa, pj]
    minus_inf = torch.tensor(-_INF, dtype=S.dtype, device=S.device)
    Vn = S.index_put_((ea, ej), minus_inf) if reuse else S.index_put((ea, ej), minus_inf)
    return Block(pa, pj, sp, Vn)


def block_from_masks(S: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> Block:
    """The :class:`Block` of ``S`` for explicit ``(B, M)`` bool masks."""
    pa, pj = pos.nonzero(as_tuple=True)
    return Block(pa, pj, S[pa, pj], torch.where(neg, S, torch.tensor(-_INF, dtype=S.dtype, device=S.device)))


def hardest(block: Block) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per anchor: the smallest positive and the largest negative similarity.

    Returns ``(min_pos, max_neg)`` of shape ``(B,)``; ``+inf`` / ``-inf`` for an
    anchor without positives / negatives.
    """
    B = block.Vn.shape[0]
    init = torch.full((B,), _INF, dtype=block.sp.dtype, device=block.sp.device)
    min_pos = init.scatter_reduce(0, block.pa, block.sp.detach(), "amin")
    return min_pos, block.Vn.detach().amax(1)


def mine_(block: Block, epsilon: float, min_pos: torch.Tensor, max_neg: torch.Tensor) -> Block:
    """The MS paper's hard-pair rule: ``Vn`` in place, ``sp`` anew.

    Keeps a positive when ``S - epsilon < max_neg`` and a negative when
    ``S + epsilon > min_pos``, with the hardest pairs of the unmined sets
    (possibly over more references than this block). The comparisons are those
    of PML's miner, in ``S``'s dtype, so the pair sets agree exactly. Either
    both hardest pairs are kept or nothing is, so the log-sum-exp shifts taken
    from the hardest pairs stay exact.
    """
    sp = block.sp.masked_fill((block.sp - epsilon) >= max_neg[block.pa], _INF)
    block.Vn.masked_fill_((block.Vn + epsilon) <= min_pos[:, None], -_INF)
    return block._replace(sp=sp)


def mined_pairs(
    block: Block, epsilon: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pairs the hard-pair rule keeps, as PML's ``(a1, p, a2, n)`` (``Vn`` is overwritten)."""
    block = mine_(block, epsilon, *hardest(block))
    kept = block.kept_pos()
    a2, n = block.kept_neg().nonzero(as_tuple=True)
    return block.pa[kept], block.pj[kept], a2, n


def _as_row(lam: Threshold, n: int, like: torch.Tensor) -> torch.Tensor:
    if torch.is_tensor(lam):
        return lam.to(dtype=like.dtype, device=like.device).expand(n)
    return torch.full((n,), float(lam), dtype=like.dtype, device=like.device)


class Side(NamedTuple):
    """One side of the loss: ``z = coef * (S - lam)``; ``coef`` is ``-alpha`` or ``beta``."""

    coef: float
    lam: torch.Tensor  # (B,)

    def max_exponent(self, min_pos: torch.Tensor, max_neg: torch.Tensor) -> torch.Tensor:
        """The largest exponent over the side's set, from the hardest pairs."""
        hard = min_pos if self.coef < 0 else max_neg
        return self.coef * (hard - self.lam)


def sides(alpha: float, beta: float, lam_pos: torch.Tensor, lam_neg: torch.Tensor) -> Tuple[Side, Side]:
    return Side(-float(alpha), lam_pos), Side(float(beta), lam_neg)


def side_shift(zmax: torch.Tensor, weighting: str) -> torch.Tensor:
    """The stabilising shift of a side's log-sum-exp (never ``inf``; 0 for ``"self"``)."""
    zmax = zmax.detach()
    if weighting == "ms":
        return zmax.clamp(min=0)  # the "1 +" term is exp(0)
    if weighting == "self":
        return torch.zeros_like(zmax)
    return torch.where(torch.isfinite(zmax), zmax, torch.zeros_like(zmax))


def side_exp(
    V: torch.Tensor,
    side: Side,
    shift: torch.Tensor,
    weighting: str,
    rows: Optional[torch.Tensor] = None,
    reuse: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A side's per-pair terms: ``(R, acc)``.

    ``V`` is ``(B, M)`` dense, or ``(P,)`` values of pairs whose anchor rows are
    ``rows``. ``z - shift = coef * V - (coef * lam + shift)``. For
    ``"ms"``/``"relative"`` ``R = exp(z - shift)`` and ``acc_i = sum_j R_ij``;
    for ``"self"`` ``R = sigmoid(z)`` (the pair weights) and
    ``acc_i = sum_j softplus(z_ij)``. Excluded pairs (``V = +-inf``) give
    ``R = 0``. ``reuse=True`` overwrites ``V`` (no autograd).
    """
    bias = side.coef * side.lam + shift
    bias = bias[:, None] if rows is None else bias[rows]
    z = torch.add(-bias, V, alpha=side.coef, out=V) if reuse else torch.add(-bias, V, alpha=side.coef)
    if weighting == "self":
        R, terms = torch.sigmoid(z), F.softplus(z)
    else:
        R = terms = z.exp_()
    if rows is None:
        return R, terms.sum(1)
    return R, torch.zeros_like(shift).index_add(0, rows, terms)


def side_finish(
    acc: torch.Tensor, shift: torch.Tensor, coef: float, weighting: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A side's per-anchor loss and the per-anchor scale of its pair weights.

    Returns ``(loss, scale)`` with ``w_ij = R_ij * scale_i``
    (``scale = exp(shift - lse)``; 1 for ``"self"``).
    """
    k = abs(coef)
    if weighting == "self":
        return acc / k, torch.ones_like(acc)
    if weighting == "ms":
        lse = shift + torch.log(torch.exp(-shift) + acc)
    else:
        nonempty = acc > 0  # the hardest pair alone contributes exp(0) = 1
        lse = torch.where(nonempty, shift + torch.log(torch.where(nonempty, acc, 1.0)), 0.0)
    return lse / k, torch.exp(shift - lse.detach())


def check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


class MSTerms(NamedTuple):
    """Per-anchor results of the MS loss; all ``(B,)``."""

    losses: torch.Tensor
    num_pos: torch.Tensor
    num_neg: torch.Tensor
    pos_weight_sum: torch.Tensor
    neg_weight_sum: torch.Tensor


class SideTerms(NamedTuple):
    loss: torch.Tensor  # (B,)
    R: torch.Tensor  # (P,) or (B, M), detached
    scale: torch.Tensor  # (B,): weights are R * scale
    acc: torch.Tensor  # (B,)


def block_terms(
    block: Block,
    alpha: float,
    beta: float,
    lam_pos: torch.Tensor,
    lam_neg: torch.Tensor,
    weighting: str,
    epsilon: Optional[float],
    hard: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    reuse: bool = False,
    counts: bool = False,
):
    """Mine (if ``epsilon``) and compute both sides of one block.

    ``hard``: the hardest pairs over all references (default: this block's).
    Returns ``(block_after_mining, [(R_pos, acc_pos), (R_neg, acc_neg)], shifts,
    (num_pos, num_neg) or None)``; the ``acc`` of each side can be summed over
    blocks before :func:`side_finish`. ``reuse=True`` overwrites ``Vn``.
    """
    if hard is None:
        hard = hardest(block)
    if epsilon is not None:
        block = mine_(block, epsilon, *hard)
    num = None
    if counts:
        num = (
            torch.bincount(block.pa[block.kept_pos()], minlength=block.Vn.shape[0]),
            block.kept_neg().sum(1),
        )
    out, shifts = [], []
    for side, V, rows in zip(sides(alpha, beta, lam_pos, lam_neg), (block.sp, block.Vn), (block.pa, None)):
        shift = side_shift(side.max_exponent(*hard), weighting)
        R, acc = side_exp(V, side, shift, weighting, rows=rows, reuse=reuse and rows is None)
        out.append((R, acc))
        shifts.append(shift)
    return block, out, shifts, num


def _terms(S, pos, neg, alpha, beta, lam_pos, lam_neg, weighting, epsilon):
    check_weighting(weighting)
    S = S.to(compute_dtype(S.dtype))
    B = S.shape[0]
    block = block_from_masks(S, pos, neg)
    lam_pos, lam_neg = _as_row(lam_pos, B, S), _as_row(lam_neg, B, S)
    block, parts, shifts, num = block_terms(
        block, alpha, beta, lam_pos, lam_neg, weighting, epsilon, counts=True
    )
    result = []
    for side, (R, acc), shift in zip(sides(alpha, beta, lam_pos, lam_neg), parts, shifts):
        loss, scale = side_finish(acc, shift, side.coef, weighting)
        result.append(SideTerms(loss, R.detach(), scale, acc.detach()))
    return block, result, num


def weight_sum(acc: torch.Tensor, r_sum: Optional[torch.Tensor], scale: torch.Tensor, weighting: str):
    """Per-anchor sum of a side's pair weights ``R * scale``: ``R`` sums to ``acc``
    except for ``"self"``, whose ``R`` (sigmoids) is summed separately (``r_sum``)."""
    return (r_sum if weighting == "self" else acc) * scale


def _weight_sums(block: Block, t_pos: SideTerms, t_neg: SideTerms, weighting: str):
    r_pos = r_neg = None
    if weighting == "self":
        r_pos = torch.zeros_like(t_pos.scale).index_add(0, block.pa, t_pos.R)
        r_neg = t_neg.R.sum(1)
    return (
        weight_sum(t_pos.acc, r_pos, t_pos.scale, weighting),
        weight_sum(t_neg.acc, r_neg, t_neg.scale, weighting),
    )


def ms_terms(
    S: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 50.0,
    lam_pos: Threshold = 0.5,
    lam_neg: Threshold = 0.5,
    weighting: str = "ms",
    epsilon: Optional[float] = None,
) -> MSTerms:
    """Per-anchor MS losses (differentiable in ``S`` and tensor thresholds).

    ``S``: ``(B, M)`` similarities; ``pos``/``neg``: ``(B, M)`` bool masks
    (self-comparisons already removed); ``lam_pos``/``lam_neg``: the thresholds
    of the positive and negative sides, a float or ``(B,)``. With ``epsilon``
    the hard-pair rule first narrows the masks. Returns :class:`MSTerms`.
    """
    block, (tp, tn), num = _terms(S, pos, neg, alpha, beta, lam_pos, lam_neg, weighting, epsilon)
    return MSTerms(tp.loss + tn.loss, *num, *_weight_sums(block, tp, tn, weighting))


def ms_anchor_losses(S: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, **kwargs) -> torch.Tensor:
    """Per-anchor MS losses ``(B,)``; see :func:`ms_terms` for the arguments."""
    return ms_terms(S, pos, neg, **kwargs).losses


@torch.no_grad()
def pair_weights(
    S: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 50.0,
    lam_pos: Threshold = 0.5,
    lam_neg: Threshold = 0.5,
    weighting: str = "ms",
    epsilon: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense GPW pair weights ``(w_pos, w_neg)``, each ``(B, M)``, non-negative.

    ``w_pos[i, j] = -dL_i/dS_ij`` on (mined) positive pairs and
    ``w_neg[i, j] = dL_i/dS_ij`` on (mined) negative pairs, 0 elsewhere.
    """
    block, (tp, tn), _ = _terms(S, pos, neg, alpha, beta, lam_pos, lam_neg, weighting, epsilon)
    w_pos = torch.zeros_like(tn.R).index_put_((block.pa, block.pj), tp.R * tp.scale[block.pa])
    return w_pos, tn.R * tn.scale[:, None]


def block_row_sums(block: Block) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum_pos, count_pos, sum_neg, count_neg)`` of each anchor's similarities (unmined)."""
    B = block.Vn.shape[0]
    sum_pos = torch.zeros(B, dtype=block.sp.dtype, device=block.sp.device).index_add(0, block.pa, block.sp)
    count_pos = torch.bincount(block.pa, minlength=B)
    kept = block.kept_neg()
    return sum_pos, count_pos, block.Vn.masked_fill(~kept, 0).sum(1), kept.sum(1)


def anchor_centres(
    sums: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], default: float
) -> torch.Tensor:
    """Each anchor's centre ``(mean positive + mean negative similarity) / 2``.

    ``sums`` comes from :func:`block_row_sums` (possibly added up over blocks);
    an anchor without positives or without negatives gets ``default``.
    """
    sp, cp, sn, cn = sums
    ok = (cp > 0) & (cn > 0)
    centre = (sp / cp.clamp(min=1) + sn / cn.clamp(min=1)) / 2
    return torch.where(ok, centre, torch.full_like(centre, default))
