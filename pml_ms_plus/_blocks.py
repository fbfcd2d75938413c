"""The block math behind :mod:`pml_ms_plus.functional` and the fused kernel (private).

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

Representation: a block of similarities is a :class:`Block`: the negatives as
a dense value matrix ``Vn`` (``S`` on negative pairs, ``-inf`` elsewhere), the
positives either as a list (large blocks: they are a handful per anchor) or as
a dense matrix ``S`` / ``+inf`` (small blocks, and the dense path: no
data-dependent shapes). An excluded pair then has the exponent ``-inf``
(``exp = 0``), so masking and mining are fills, done in place where no
gradient needs the old values.

Log-sum-exps are shifted by each side's true maximum exponent over its kept
pairs, which the *hardest* pair gives (the smallest positive and the largest
negative similarity); the mining comparisons are monotone in the similarity, so
a side keeps a pair exactly when it keeps its hardest one (:func:`kept_sides`),
and the shift is exact after mining as well. The exponents are formed as
``coef * (S - ref)`` with ``ref`` the hardest similarity, so the hardest pair's
is exactly 0 and every other one ``<= 0``: no overflow for any finite input, and
an anchor whose pairs are all mined away has the loss 0. On the CPU the log-sum-exp
weightings' pair terms below ``2 e tiny`` (``exp(-inf)`` included) are formed as exact zeros,
not subnormals (:func:`exp_of_exponents_`: the slow path of the CPU's ``exp``). Each weighting is one
entry of :data:`WEIGHTING_TABLE`. Everything is computed in float32 or wider.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

Threshold = Union[float, torch.Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reductions run in: float32, or float64 for float64 input."""
    if dtype is torch.float32 or dtype is torch.float64:
        return dtype
    return torch.promote_types(dtype, torch.float32)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` (``t`` itself when it has that dtype, as ``to`` returns it), without the
    operator call of a no-op cast (~1 us a call, a few each step)."""
    return t if t.dtype == dtype else t.to(dtype)


class PairMasks(NamedTuple):
    """Positive and negative pair masks, ``(B, M)`` bool each."""

    pos: torch.Tensor
    neg: torch.Tensor


class PairWeights(NamedTuple):
    """GPW pair weights ``(B, M)``: ``w_pos = -dL_i/dS_ij`` on positives, ``w_neg = dL_i/dS_ij``
    on negatives, 0 elsewhere."""

    pos: torch.Tensor
    neg: torch.Tensor


def pair_masks(
    labels: torch.Tensor,
    ref_labels: Optional[torch.Tensor] = None,
    self_index: Optional[torch.Tensor] = None,
) -> PairMasks:
    """Positive and negative pair masks of shape ``(B, M)`` from labels.

    ``pos[i, j] = labels[i] == ref_labels[j] and j != self_index[i]``;
    ``neg[i, j] = labels[i] != ref_labels[j] and j != self_index[i]``.
    ``self_index`` (``(B,)`` long) gives the column of each anchor's own copy
    among the references; entries outside ``[0, M)`` mean "no copy". With ``ref_labels=None`` the references
    are the anchors themselves and the diagonal is removed.
    """
    if ref_labels is None:
        ref_labels = labels
        if self_index is None:
            self_index = torch.arange(len(labels), device=labels.device)
    eq = labels[:, None] == ref_labels  # (B, 1) against (M,): (B, M)
    pos, neg = eq, ~eq
    if self_index is not None:
        rows = torch.arange(len(labels), device=labels.device)
        valid = (self_index >= 0) & (self_index < eq.shape[1])
        pos = eq.clone()
        pos[rows[valid], self_index[valid]] = False
        neg[rows[valid], self_index[valid]] = False
    return PairMasks(pos, neg)


def masks_from_pairs(
    indices_tuple: Tuple[torch.Tensor, ...], shape: Tuple[int, int], device: Optional[torch.device] = None
) -> PairMasks:
    """Dense masks from a PML pair tuple ``(a1, p, a2, n)`` (duplicates collapse)."""
    device = indices_tuple[0].device if device is None else device
    a1, p, a2, n = (t.to(device=device, dtype=torch.long) for t in indices_tuple)
    pos = torch.zeros(shape, dtype=torch.bool, device=device)
    neg = torch.zeros(shape, dtype=torch.bool, device=device)
    pos[a1, p] = True
    neg[a2, n] = True
    if (pos & neg).any():
        raise ValueError("indices_tuple: a pair is listed both as positive and as negative")
    return PairMasks(pos, neg)


_INF = float("inf")


def values(t: torch.Tensor) -> torch.Tensor:
    """``t.detach()`` where autograd records operations (what follows must not be tracked);
    ``t`` itself where it does not (the kernel's forward runs without it): nothing would be
    tracked, and a detach is an operator call (~1 us on the CPU)."""
    return t.detach() if torch.is_grad_enabled() else t


class Block(NamedTuple):
    """A ``(B, M)`` block of similarities, split by side.

    ``Vn``: ``S`` on negative pairs, ``-inf`` elsewhere. The positives come in
    one of two layouts:

    * *listed* (large blocks, where they are a handful per anchor): ``pa``/``pj``
      the anchor row and reference column of each positive pair (``(P,)``
      long) and ``sp`` their similarities (``+inf`` once mined away);
    * *dense* (``pa = pj = None``): ``sp`` is ``(B, M)``, ``S`` on positive
      pairs and ``+inf`` elsewhere -- no data-dependent shapes, so no host
      synchronisation and nothing that stops ``torch.compile``.

    Per-anchor quantities reach the pairs through :meth:`per_pair` and per-pair
    ones are summed per anchor by :meth:`row_sum`, whatever the layout.
    """

    pa: Optional[torch.Tensor]
    pj: Optional[torch.Tensor]
    sp: torch.Tensor
    Vn: torch.Tensor

    @property
    def dense(self) -> bool:
        return self.pa is None

    def kept_pos(self) -> torch.Tensor:
        return self.sp != _INF

    def kept_neg(self) -> torch.Tensor:
        return self.Vn != -_INF

    def per_pair(self, t: torch.Tensor) -> torch.Tensor:
        """A per-anchor ``(B,)`` tensor, broadcast to the positive pairs' layout."""
        return t[:, None] if self.pa is None else t[self.pa]

    def row_sum(self, v: torch.Tensor) -> torch.Tensor:
        """``(B,)`` per-anchor sums of positive-pair values ``v`` (in ``sp``'s layout)."""
        if self.pa is None:
            return v.sum(1)
        v = v.long() if v.dtype == torch.bool else v  # counts
        return v.new_zeros(self.Vn.shape[0]).index_add_(0, self.pa, v)


def same_label_pairs(labels: torch.Tensor, ref_labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """All ``(i, j)`` with ``labels[i] == ref_labels[j]``, ordered by ``i`` then ``j``.

    Sorts the references' labels once and finds each anchor's run with a binary
    search: ``O((B + M) log M + P)`` for ``P`` pairs, no ``(B, M)`` comparison.
    """
    labels, ref_labels = labels.long(), ref_labels.long()  # one dtype for the search (bool included)
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
    inplace: bool = False,
    dense: bool = False,
    positives: bool = True,
) -> Block:
    """The :class:`Block` of ``S`` for label-defined pairs (see :func:`pair_masks`).

    ``self_index`` (``(B,)`` long, entries outside ``[0, M)`` meaning "none")
    names each anchor's own copy among the references: it is excluded from
    both sides. ``inplace=True`` writes ``Vn`` into ``S``'s storage (no autograd).
    ``dense=True``: positives in the dense layout (no pair lists, no host
    synchronisation). ``positives=False``: the negatives alone (an empty list of
    positives, whatever ``dense``), for a caller that holds the positives elsewhere.
    """
    if ref_labels is None:
        ref_labels = labels
        if self_index is None:
            self_index = torch.arange(len(labels), device=labels.device)
    if dense:
        eq, own = _same_label_and_own(labels, ref_labels, self_index, S.shape[1])
        if own is None:
            pos, not_neg = eq, eq
        else:
            pos, not_neg = eq & ~own, eq | own
        sp = S.masked_fill(~pos, _INF) if positives else None
        Vn = S.masked_fill_(not_neg, -_INF) if inplace else S.masked_fill(not_neg, -_INF)
        return Block(None, None, sp, Vn) if sp is not None else negatives_only(Vn)
    ea, ej = same_label_pairs(labels, ref_labels)
    pa, pj = ea, ej
    if self_index is not None and positives:
        other = ej != self_index[ea]
        pa, pj = ea[other], ej[other]
    sp = S[pa, pj] if positives else None
    minus_inf = torch.tensor(-_INF, dtype=S.dtype, device=S.device)
    Vn = S.index_put_((ea, ej), minus_inf) if inplace else S.index_put((ea, ej), minus_inf)
    if self_index is not None and S.shape[1]:  # a copy whose label differs (explicit self indices)
        _exclude_own_copies_(Vn, self_index)
    return Block(pa, pj, sp, Vn) if sp is not None else negatives_only(Vn)


def _same_label_and_own(
    labels: torch.Tensor, ref_labels: torch.Tensor, self_index: Optional[torch.Tensor], M: int
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(B, M)`` bool: same label, and each anchor's own copy (``None`` without self indices;
    an index outside ``[0, M)`` matches no column)."""
    eq = labels[:, None] == ref_labels  # (B, 1) against (M,): (B, M)
    if self_index is None:
        return eq, None
    return eq, torch.arange(M, device=eq.device) == self_index[:, None]


def negatives_only(Vn: torch.Tensor) -> Block:
    """A :class:`Block` of the negatives ``Vn`` with an empty list of positives."""
    none = torch.empty(0, dtype=torch.long, device=Vn.device)
    return Block(none, none, Vn.new_empty(0), Vn)


def _exclude_own_copies_(V: torch.Tensor, self_index: torch.Tensor) -> None:
    """``V[..., i, self_index[i]] = -inf`` where ``self_index[i]`` lies in ``[0, M)``, for a
    ``(B, M)`` block or a stack of them (a gather and a scatter of ``B`` values per block; no
    data-dependent shapes)."""
    M = V.shape[-1]
    rows = torch.arange(len(self_index), device=V.device)
    cols = self_index.clamp(0, M - 1)
    valid = (self_index >= 0) & (self_index < M)
    current = V[..., rows, cols]
    V[..., rows, cols] = current.masked_fill(valid, -_INF)


def block_from_masks(S: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> Block:
    """The dense-layout :class:`Block` of ``S`` for explicit ``(B, M)`` bool masks."""
    return Block(None, None, S.masked_fill(~pos, _INF), S.masked_fill(~neg, -_INF))


class Hardest(NamedTuple):
    """Per anchor, ``(B,)``: the smallest positive and the largest negative similarity
    (``+inf`` / ``-inf`` for an anchor without positives / negatives)."""

    min_pos: torch.Tensor
    max_neg: torch.Tensor

    def merge(self, other: "Hardest") -> "Hardest":
        """The hardest pairs over the references of both (blocks of the same anchors)."""
        return Hardest(torch.minimum(self.min_pos, other.min_pos), torch.maximum(self.max_neg, other.max_neg))


def hardest(block: Block) -> Hardest:
    """The :class:`Hardest` pairs of a block (one of its sides may be empty: a block of
    ``M = 0`` columns, or the listed positives alone beside a ``(B, 0)`` ``Vn``)."""
    B, M = block.Vn.shape
    init = torch.full((B,), _INF, dtype=block.sp.dtype, device=block.sp.device)
    sp = values(block.sp)
    if block.pa is not None:
        min_pos = init.scatter_reduce(0, block.pa, sp, "amin")
    else:
        min_pos = sp.amin(1) if M else init
    max_neg = values(block.Vn).amax(1) if M else torch.full_like(init, -_INF)
    return Hardest(min_pos, max_neg)


class Kept(NamedTuple):
    """Per anchor, ``(B,)`` bool: whether each side keeps any pair (after mining)."""

    pos: torch.Tensor
    neg: torch.Tensor


def kept_sides(hard: Hardest, epsilon: Optional[float]) -> Kept:
    """Which anchors keep pairs on each side.

    Without mining, a side is kept when it has a pair. With mining, a side
    keeps a pair exactly when it keeps its hardest pair (the comparisons of
    :func:`mine_`, which are monotone in the similarity), so the test on the
    hardest pair decides for the whole side.
    """
    if epsilon is None:
        return Kept(hard.min_pos != _INF, hard.max_neg != -_INF)
    return Kept(~((hard.min_pos - epsilon) >= hard.max_neg), ~((hard.max_neg + epsilon) <= hard.min_pos))


def mine_(block: Block, epsilon: float, hard: Hardest) -> Block:
    """The MS paper's hard-pair rule: ``Vn`` in place, ``sp`` anew (or in place, dense).

    Keeps a positive when ``S - epsilon < max_neg`` and a negative when
    ``S + epsilon > min_pos``, with the hardest pairs of the unmined sets
    (possibly over more references than this block). The comparisons are those
    of PML's miner, in ``S``'s dtype, so the pair sets agree exactly.
    """
    mine_negatives_(block.Vn, epsilon, hard.min_pos)
    return mine_positives(block, epsilon, hard.max_neg)


def mine_positives(block: Block, epsilon: float, max_neg: torch.Tensor) -> Block:
    """The positive half of :func:`mine_`: ``sp = +inf`` where ``sp - epsilon >= max_neg``
    (``max_neg``: ``(B,)``, each anchor's hardest negative); in place in the dense layout."""
    drop = (block.sp - epsilon) >= block.per_pair(max_neg)
    sp = block.sp.masked_fill_(drop, _INF) if block.dense else block.sp.masked_fill(drop, _INF)
    return block._replace(sp=sp)


FLOAT_MASK_ELEMENTS = 2**12  # eager blocks of at least this many values are masked in float passes
# (fill_where_: more operator calls, each several times cheaper per value than a boolean mask and a
# masked fill); smaller ones by the boolean mask and the masked fill. Measured, 2 CPU cores, the
# signed block of B anchors (2 B^2 values): B=32 22 vs 27 us, B=48 40 vs 24, B=128 145 vs 59


def mine_negatives_(
    Vn: torch.Tensor, epsilon: Threshold, min_pos: torch.Tensor, anchor_dim: int = 0
) -> torch.Tensor:
    """The negative half of :func:`mine_`, in place: ``Vn = -inf`` where ``Vn + epsilon <= min_pos``
    (``min_pos``: ``(B,)``, each anchor's hardest positive; ``anchor_dim=1``: ``Vn`` is a
    reference-major ``(M, B)`` block). See :func:`mine_below_`."""
    per_anchor = (-1, 1) if anchor_dim == 0 else (1, -1)  # min_pos broadcast over the block
    return mine_below_(Vn, epsilon, min_pos.view(per_anchor))


def mine_below_(V: torch.Tensor, epsilon: Threshold, bound: torch.Tensor) -> torch.Tensor:
    """``V = -inf`` where ``V + epsilon <= bound`` (``bound`` broadcast over ``V``), in place:
    PML's comparison, ``V + epsilon`` rounded in ``V``'s dtype as PML rounds it; a NaN value or
    bound compares false and keeps the value. Eagerly, on blocks of :data:`FLOAT_MASK_ELEMENTS`
    values or more, the comparison writes its 1.0/0.0 into a float tensor and the fill is
    :func:`fill_where_`; smaller blocks and ``torch.compile`` (inductor fuses them into the
    block's one loop) take the comparison and the masked fill themselves. The same pairs either
    way. Differentiable in place."""
    if torch.compiler.is_compiling():
        return V.masked_fill_((V + epsilon) <= bound, -_INF)
    drop = torch.add(values(V), number(epsilon, V))
    if V.numel() < FLOAT_MASK_ELEMENTS:  # small: fewer operator calls (B=32's stacked block 7 vs 17 us)
        return V.masked_fill_(drop <= bound, -_INF)
    return fill_where_(V, torch.le(drop, bound, out=drop), -_INF)


def fill_where_(V: torch.Tensor, drop: torch.Tensor, value: float) -> torch.Tensor:
    """``V.masked_fill_(drop == 1, value)`` for ``value`` ``+inf`` or ``-inf``, in float passes:
    ``drop`` holds 1.0 (fill) and 0.0 (keep), broadcastable to ``V`` and overwritten. A boolean
    mask and a masked fill take 5-10x as long on the CPU as a float pass over a block of 2**15
    values (measured: a comparison into bool 29 us, into float 5 us; ``masked_fill_`` 53 us,
    ``clamp_max_`` by a tensor 5 us). Each value is capped: ``(drop - 1/2) * value`` is ``value``
    where it fills and ``-value`` where it keeps, and ``min`` (``max`` for ``+inf``) with it
    gives exactly ``value`` or the value itself. A NaN in ``V`` stays NaN where it is filled (the
    one difference from a masked fill). In place; differentiable (the gradient passes where the
    value is kept)."""
    cap = drop.sub_(number(0.5, drop)).mul_(number(value, drop))
    return V.clamp_max_(cap) if value < 0 else V.clamp_min_(cap)


class MinedPairs(NamedTuple):
    """PML's pair tuple ``(a1, p, a2, n)``."""

    a1: torch.Tensor
    p: torch.Tensor
    a2: torch.Tensor
    n: torch.Tensor


def mined_pairs(block: Block, epsilon: float, similarity: bool = True) -> MinedPairs:
    """The pairs the hard-pair rule keeps, as PML's ``(a1, p, a2, n)`` (``Vn`` is overwritten).

    NaN similarities as PML's miner meets them (``similarity``: whether ``S`` is PML's matrix
    itself, else its negation, a distance): see :func:`nan_poisoned_sides`."""
    hard = hardest(block)  # NaN where a side holds one (amax and amin propagate it)
    nan_pos, nan_neg = hard.min_pos.isnan(), hard.max_neg.isnan()
    if bool((nan_pos | nan_neg).any()):  # one host read (the pair lists below read it anyway)
        block = block._replace(sp=block.sp.masked_fill(block.sp.isnan(), _INF), Vn=_nan_excluded_(block.Vn))
        hard = hardest(block)  # of the other pairs
        keeps_none = nan_poisoned_sides(nan_pos, nan_neg, similarity)  # then bounds no pair passes
        hard = Hardest(
            hard.min_pos.masked_fill(keeps_none[1], _INF), hard.max_neg.masked_fill(keeps_none[0], -_INF)
        )
    block = mine_(block, epsilon, hard)
    a2, n = block.kept_neg().nonzero(as_tuple=True)
    if block.pa is None or block.pj is None:
        a1, p = block.kept_pos().nonzero(as_tuple=True)
        return MinedPairs(a1, p, a2, n)
    kept = block.kept_pos()
    return MinedPairs(block.pa[kept], block.pj[kept], a2, n)


def nan_poisoned_sides(nan_pos: torch.Tensor, nan_neg: torch.Tensor, similarity: bool) -> torch.Tensor:
    """Which sides keep no pair at all because of NaN similarities, as PML's miner decides:
    ``(2, B)`` bool (rows: positive, negative side) from whether each anchor has a NaN positive
    and a NaN negative, ``(B,)`` each.

    PML's miner compares every pair with each anchor's hardest one, found by sorting with NaN
    last: a NaN pair is never kept (its comparisons are false); a NaN among the side sorted for
    its *largest* value becomes that value, and the other side then keeps nothing. For
    similarities that is a NaN negative (no positive kept); for distances (``S`` negated), a NaN
    positive (no negative kept). The other side's hardest value skips NaN."""
    none = torch.zeros_like(nan_pos)
    return torch.stack((nan_neg, none) if similarity else (none, nan_pos))


def _nan_excluded_(V: torch.Tensor) -> torch.Tensor:
    """``V`` with its NaN entries set to ``-inf`` (excluded pairs), in place."""
    return V.masked_fill_(V.isnan(), -_INF)


def _as_row(lam: Threshold, n: int, like: torch.Tensor) -> torch.Tensor:
    if torch.is_tensor(lam):
        return lam.to(dtype=like.dtype, device=like.device).expand(n)
    return torch.full((n,), float(lam), dtype=like.dtype, device=like.device)


# ------------------------------------------------------------------ weightings
class Weighting(NamedTuple):
    """One General Pair Weighting mode: how a side's exponents ``z`` become its loss.

    ``log_sum_exp``: the side loss is ``1/k * log(sum exp z)`` (else a sum of
    ``1/k * softplus(z)``); ``add_one``: the ``1 +`` term inside the log.
    """

    name: str
    log_sum_exp: bool
    add_one: bool


WEIGHTING_TABLE = {
    w.name: w
    for w in (
        Weighting("ms", log_sum_exp=True, add_one=True),
        Weighting("relative", log_sum_exp=True, add_one=False),
        Weighting("self", log_sum_exp=False, add_one=False),
    )
}
WEIGHTINGS = tuple(WEIGHTING_TABLE)


def get_weighting(weighting: str) -> Weighting:
    """The :class:`Weighting` named ``weighting``; ``ValueError`` for an unknown name."""
    if isinstance(weighting, Weighting):
        return weighting
    if weighting not in WEIGHTING_TABLE:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return WEIGHTING_TABLE[weighting]


def check_weighting(weighting: str) -> None:
    get_weighting(weighting)


class Side(NamedTuple):
    """One side of the loss: ``z = coef * (S - lam)``; ``coef`` is ``-alpha`` or ``beta``.
    Both sides stacked over a signed block (:func:`signed_sides`): ``coef`` ``(2, 1)``,
    ``lam`` ``(2, B)``, and every per-anchor quantity of the functions below ``(2, B)``."""

    coef: Threshold  # a float (a 0-d tensor inside the compiled negatives, (2, 1) stacked)
    lam: torch.Tensor  # (B,), or (2, B) stacked


class SidePair(NamedTuple):
    """Any per-side quantity, for the positive and the negative side."""

    pos: Any
    neg: Any


def sides(alpha: float, beta: float, lam_pos: torch.Tensor, lam_neg: torch.Tensor) -> SidePair:
    return SidePair(Side(-float(alpha), lam_pos), Side(float(beta), lam_neg))


class Shift(NamedTuple):
    """A side's stabilised exponents: ``z - shift = coef * (S - ref)``, all ``(B,)``
    (``(2, B)`` for stacked sides, ``ref`` signed).

    ``shift`` is the side's true maximum exponent over its kept pairs (``max(0, .)``
    with the ``1 +`` term; 0 for an empty side or ``"self"``); ``ref`` is the
    hardest similarity when the shift is taken from it, else the threshold.
    Computing ``S - ref`` first makes the hardest pair's exponent exactly 0 and
    every other one ``<= 0``, whatever the size of ``coef * S``.
    """

    ref: torch.Tensor
    shift: torch.Tensor


def side_shift(side: Side, hard: torch.Tensor, kept: torch.Tensor, weighting: Weighting) -> Shift:
    """The :class:`Shift` of a side whose hardest similarity is ``hard`` (``(B,)``)."""
    lam = side.lam
    if not weighting.log_sum_exp:
        return Shift(lam, torch.zeros_like(values(lam)))
    hard = values(hard)
    zmax = side.coef * (hard - values(lam))
    zero = number(0.0, zmax)
    use = kept & (zmax > zero) if weighting.add_one else kept
    if torch.is_grad_enabled() and lam.requires_grad:
        hard = hard + (lam - lam.detach())  # == hard exactly, and keeps the threshold's gradient
    return Shift(torch.where(use, hard, lam), torch.where(use, zmax, zero))


class PairTerms(NamedTuple):
    """A side's per-pair terms: ``R`` (``exp(z - shift)``, or ``sigmoid(z)`` for
    ``"self"``: then the pair weights) and the per-anchor sum ``acc`` of the
    side's loss terms (``sum exp(z - shift)``, or ``sum softplus(z)``)."""

    R: torch.Tensor
    acc: torch.Tensor


SOFTPLUS_LINEAR = 40.0  # softplus(z) taken as z above it (torch's default, 20, made its gradient
# exactly 1 there while the pair weight sigmoid(z) is 1 - 2e-9 in float64; above 40, e^-z is below
# float64's half epsilon and both are exact)


def side_values(
    V: torch.Tensor,
    side: Side,
    ref: torch.Tensor,
    weighting: Weighting,
    rows: Optional[torch.Tensor] = None,
    inplace: bool = False,
    anchor_dim: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The per-pair part of :func:`side_terms`: ``(R, terms)``, the summands of ``acc``
    (the same tensor for the log-sum-exp weightings). ``anchor_dim=1``: ``V`` is a
    reference-major ``(M, B)`` block, its anchors along the columns."""
    if rows is not None:
        level = ref[rows]
    else:
        level = ref[..., None] if anchor_dim == 0 else ref[None, :]
    z = torch.sub(V, level, out=V) if inplace else V - level
    coef = side.coef
    if torch.is_tensor(coef) and coef.ndim:  # stacked sides: a (2, 1) coef over (2, B, M)
        coef = coef[..., None]
    z = z.mul_(coef)
    if weighting.log_sum_exp:
        R = terms = exp_of_exponents_(z)
        return R, terms
    return torch.sigmoid(z), F.softplus(z, threshold=SOFTPLUS_LINEAR)


def _exp_floor(dtype: torch.dtype) -> Tuple[float, float]:
    """``(lo, cut)`` of :func:`exp_of_exponents_` for ``dtype``: ``lo = ln(tiny) + 1`` and
    ``cut = 2 exp(lo)``, ``tiny`` the smallest normal number."""
    lo = math.log(torch.finfo(dtype).tiny) + 1.0
    return lo, 2.0 * math.exp(lo)


_EXP_FLOORS = {dtype: _exp_floor(dtype) for dtype in (torch.float32, torch.float64)}  # compute dtypes


def exp_of_exponents_(z: torch.Tensor) -> torch.Tensor:
    """``exp(z)`` of a block's stabilised exponents ``z <= 0`` (``-inf`` on excluded pairs); on
    the CPU with every result below ``2 e tiny`` (``6.4e-38`` in float32) set to 0. In place
    where autograd allows.

    The CPU's vectorised ``exp`` takes a slow path for every result that is not a normal
    number: ``exp(-inf)`` of each excluded or mined-away pair costs 2.5-3.5x a normal one,
    and exponents that underflow into subnormals (pairs farther than ``87 / coef`` below the
    hardest one in float32) about 15x (eager and inductor alike). So there the exponents are
    first clamped to ``ln(tiny) + 1``, whose ``exp`` is normal, and results up to twice that
    are then zeroed: the exponentials are exact zeros or normal numbers. Every value above the
    cut is unchanged bit for bit; the dropped ones are invisible in the sums, which hold the
    hardest pair's ``exp(0) = 1`` or the ``1 +`` term; a pair weight moves by less than the
    cut. GPUs keep the plain ``exp`` (their arithmetic has no such slow path; the two extra
    passes would only cost there).
    """
    if not z.is_cpu:
        return z.exp_()
    lo, cut = _EXP_FLOORS[z.dtype]  # the compute dtypes (float32, float64)
    R = z.clamp_min_(lo).exp_()
    return torch.threshold(R, cut, 0.0) if R.requires_grad else torch.threshold_(R, cut, 0.0)


def side_terms(
    V: torch.Tensor,
    side: Side,
    ref: torch.Tensor,
    weighting: Weighting,
    rows: Optional[torch.Tensor] = None,
    inplace: bool = False,
) -> PairTerms:
    """A side's :class:`PairTerms` for the values ``V`` against the ``(B,)`` level ``ref``
    (``z - shift = coef * (V - ref)``, see :class:`Shift`).

    ``V`` is ``(B, M)`` dense, ``(2, B, M)`` for both sides stacked (:func:`signed_terms`:
    ``ref`` ``(2, B)``, ``coef`` ``(2, 1)``), or ``(P,)`` values of pairs whose anchor rows are
    ``rows``. Excluded pairs (``V = +-inf``) give ``R = 0``. ``inplace=True``
    overwrites ``V`` (no autograd).
    """
    R, terms = side_values(V, side, ref, weighting, rows, inplace)
    if rows is None:
        return PairTerms(R, terms.sum(-1))
    return PairTerms(R, torch.zeros_like(ref.detach()).index_add(0, rows, terms))


def negative_values(
    Vn: torch.Tensor,
    side: Side,
    ref: torch.Tensor,
    min_pos: torch.Tensor,
    epsilon: Optional[Threshold],
    weighting: Weighting,
    counts: bool,
    inplace: bool = False,
    anchor_dim: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The per-pair part of :func:`negative_terms`: ``(R, terms, kept)``, ``kept`` the
    block's kept pairs (bool, ``None`` unless ``counts``); ``anchor_dim`` as for
    :func:`side_values`."""
    if epsilon is not None:
        mine_negatives_(Vn, epsilon, min_pos, anchor_dim)
    kept = (Vn != -_INF) if counts else None
    return (*side_values(Vn, side, ref, weighting, inplace=inplace, anchor_dim=anchor_dim), kept)


def negative_terms(
    Vn: torch.Tensor,
    side: Side,
    ref: torch.Tensor,
    min_pos: torch.Tensor,
    epsilon: Optional[Threshold],
    weighting: Weighting,
    counts: bool,
    inplace: bool = False,
) -> Tuple[PairTerms, Optional[torch.Tensor]]:
    """The negative side of a ``(B, M)`` block: mined against each anchor's hardest
    positive ``min_pos`` over all references (if ``epsilon``; ``Vn`` is filled in
    place), its kept pairs counted per anchor (``None`` unless ``counts``), and its
    :class:`PairTerms` against the level ``ref`` (``inplace``: ``R`` in ``Vn``'s storage).

    The one function for the negatives of every block; the fused kernel may run it
    through ``torch.compile``, which turns its passes over the block into one.
    """
    R, terms, kept = negative_values(Vn, side, ref, min_pos, epsilon, weighting, counts, inplace)
    return PairTerms(R, terms.sum(-1)), None if kept is None else kept.sum(1)


class SideLoss(NamedTuple):
    """A side's per-anchor loss and the per-anchor scale of its pair weights
    (``w_ij = R_ij * scale_i``), both ``(B,)`` (``(2, B)`` for stacked sides)."""

    loss: torch.Tensor
    scale: torch.Tensor


def side_finish(acc: torch.Tensor, shift: Shift, coef: Threshold, weighting: Weighting) -> SideLoss:
    """A side's :class:`SideLoss` from its ``acc`` (summed over every block; ``(2, B)`` with a
    ``(2, 1)`` ``coef`` for stacked sides: ``(alpha, beta)``, positive, so that it is its own
    magnitude; a float ``coef`` is ``-alpha`` or ``beta``)."""
    k = coef if isinstance(coef, torch.Tensor) else abs(coef)
    if not weighting.log_sum_exp:
        return SideLoss(acc / k, torch.ones_like(acc))
    s = shift.shift
    if weighting.add_one:  # acc >= 1 whenever s > 0
        total = torch.exp(-s) + acc  # exp(-s) (1 + sum exp(z))
        lse = s + torch.log(total)
        return SideLoss(lse / k, values(total).reciprocal())  # exp(s - lse) = 1 / total
    # the hardest pair alone contributes exp(0) = 1; a NaN sum (a pair at +-inf on the harmful side,
    # inf - inf) is not taken for an empty side: NaN, as the "ms" weighting gives
    empty = acc <= 0
    lse = torch.where(empty, 0.0, s + torch.log(torch.where(empty, 1.0, acc)))
    return SideLoss(lse / k, torch.exp(s - values(lse)))


def weight_sum(
    acc: torch.Tensor, r_sum: Optional[torch.Tensor], scale: torch.Tensor, weighting: Weighting
) -> torch.Tensor:
    """Per-anchor sum of a side's pair weights ``R * scale``: ``R`` sums to ``acc``
    for the log-sum-exp weightings; for ``"self"`` (sigmoids) ``r_sum`` is the sum."""
    summed = acc if weighting.log_sum_exp else r_sum
    assert summed is not None, "the self weighting needs r_sum"
    return summed * scale


class MSTerms(NamedTuple):
    """Per-anchor results of the MS loss; all ``(B,)``."""

    losses: torch.Tensor
    num_pos: torch.Tensor
    num_neg: torch.Tensor
    pos_weight_sum: torch.Tensor
    neg_weight_sum: torch.Tensor


class BlockTerms(NamedTuple):
    """One block after mining, with both sides' :class:`PairTerms` and the shifts used."""

    block: Block
    terms: SidePair  # of PairTerms
    shifts: SidePair  # of Shift
    counts: Optional[SidePair]  # kept pairs per anchor (when asked for)


def side_shifts(
    side_pair: SidePair, hard: Hardest, epsilon: Optional[float], weighting: Weighting
) -> SidePair:
    """Both sides' :class:`Shift` from the hardest pairs over all references."""
    kept = kept_sides(hard, epsilon)
    return SidePair(
        side_shift(side_pair.pos, hard.min_pos, kept.pos, weighting),
        side_shift(side_pair.neg, hard.max_neg, kept.neg, weighting),
    )


def block_terms(
    block: Block,
    side_pair: SidePair,
    shifts: SidePair,
    hard: Hardest,
    *,
    weighting: Weighting,
    epsilon: Optional[float],
    inplace: bool = False,
    counts: bool = False,
    negatives: Callable[..., Tuple[PairTerms, Optional[torch.Tensor]]] = negative_terms,
) -> BlockTerms:
    """Mine (if ``epsilon``) and compute both sides' terms of one block.

    ``hard``/``shifts``: over all references (this block may be one of several);
    the ``acc`` of each side can be summed over blocks before
    :func:`side_finish`. ``inplace=True`` overwrites ``Vn`` (then ``block.Vn``
    holds the negative side's ``R``). ``counts=True`` counts the kept pairs.
    ``negatives``: :func:`negative_terms`, or the same function compiled.
    """
    if epsilon is not None:
        block = mine_positives(block, epsilon, hard.max_neg)
    num_pos = block.row_sum(block.kept_pos()) if counts else None  # before sp becomes R
    pos = side_terms(block.sp, side_pair.pos, shifts.pos.ref, weighting, rows=block.pa, inplace=inplace)
    neg, num_neg = negatives(
        block.Vn, side_pair.neg, shifts.neg.ref, hard.min_pos, epsilon, weighting, counts, inplace
    )
    return BlockTerms(block, SidePair(pos, neg), shifts, SidePair(num_pos, num_neg) if counts else None)


# ------------------------------------------------------------ both sides stacked
# A dense block's two sides as one (2, B, M) tensor of *hardness* U: U[0] = -S on the
# positive pairs, U[1] = S on the negative pairs, -inf elsewhere. Larger is harder on both
# sides, so one reduction gives both hardest pairs (h = (-min_pos, max_neg)), one comparison
# mines both sides, and each formula of a side holds for the stack with
# coef = (alpha, beta) and lam = (-lam_pos, lam_neg): alpha * (-S - (-lam)) is
# -alpha * (S - lam) exactly (negation is exact), and likewise every mining comparison, so the
# stack keeps the same pairs and forms the same exponents as the two sides one by one, in half
# the operator calls (the exponentials themselves may differ in the last bit: vector lanes).


_CONSTANTS: Dict[Tuple[Any, ...], torch.Tensor] = {}  # the constants of constant(), made once
_CONSTANTS_MAX = 64  # entries: a sweep of alpha/beta or of batch sizes adds one each


def constant(key: Tuple[Any, ...], like: torch.Tensor, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The tensor ``make()`` (on ``like``'s device), on the CPU made once per ``key`` and then
    reused: the small constants of every step (the signs of the stacked sides, self indices,
    thresholds, zero counts; an operator call each, at B=32 a few per cent of a step). Nothing
    in this package writes to them; callers handing one out say it is read-only. Made outside
    inference mode, so that the constant is a plain tensor that autograd may save whatever mode
    made it; a tracer's tensors (``like`` or the new one not a plain ``torch.Tensor``: fake
    tensors, proxies) and ``torch.compile``'s tracing take a fresh one. Not cached on GPUs (a
    fill there is one asynchronous launch; a cached one could be read on another stream or be
    captured into a CUDA graph unfilled). ``key`` names everything ``make`` depends on but the
    device (the CPU)."""
    if torch.compiler.is_compiling() or not like.is_cpu or type(like) is not torch.Tensor:
        return make()
    t = _CONSTANTS.get(key)
    if t is None:
        with torch.inference_mode(False):
            t = make()
        if type(t) is torch.Tensor:  # not made under a tracing mode
            if len(_CONSTANTS) >= _CONSTANTS_MAX:
                _CONSTANTS.clear()
            _CONSTANTS[key] = t
    return t


def _pair_of(first: Any, second: Any, like: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    """A ``(2, 1, ...)`` tensor of ``(first, second)`` in ``like``'s dtype and device, made by
    fills (no host-to-device copy, so no synchronisation on CUDA); a :func:`constant`."""

    def make() -> torch.Tensor:
        t = like.new_full(shape, second)
        t[0] = first
        return t

    return constant(("pair", first, second, like.dtype, shape), like, make)


_NUMBER_DTYPES = (torch.float32, torch.float64)  # dtypes whose ops round a Python number as a 0-d tensor


def number(value: Threshold, like: torch.Tensor) -> Threshold:
    """``value`` as the other operand of an elementwise operation on ``like``: eagerly on the
    CPU, for ``like`` in float32 or float64, a 0-d tensor of ``like``'s dtype (a :func:`constant`,
    read-only), else ``value`` itself. The same arithmetic: the operation rounds a Python number
    to ``like``'s dtype (its compute type there), as the 0-d tensor holds it; half precision
    computes with the number in float32, so it keeps the number. A Python number costs ~1.7 us
    more an operator call on the CPU (it is wrapped in a double tensor and converted)."""
    if (
        isinstance(value, torch.Tensor)
        or torch.compiler.is_compiling()
        or not like.is_cpu
        or like.dtype not in _NUMBER_DTYPES
    ):
        return value
    v = float(value)
    return constant(("number", v, like.dtype), like, lambda: torch.tensor(v, dtype=like.dtype))


def arange(n: int, like: torch.Tensor) -> torch.Tensor:
    """``torch.arange(n)`` (long) on ``like``'s device; a :func:`constant` (read-only)."""
    return constant(("arange", n), like, lambda: torch.arange(n, device=like.device))


def full(n: int, value: Union[int, float], dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """``torch.full((n,), value, dtype)`` on ``like``'s device; a :func:`constant` (read-only)."""
    return constant(("full", n, value, dtype), like, lambda: like.new_full((n,), value, dtype=dtype))


def signed_sides(alpha: float, beta: float, lam_pos: torch.Tensor, lam_neg: torch.Tensor) -> Side:
    """Both sides as one :class:`Side` over a signed block: ``coef`` ``(2, 1)`` =
    ``(alpha, beta)``, ``lam`` ``(2, B)`` = ``(-lam_pos, lam_neg)`` (one threshold tensor for
    both sides: one product with the signs, exact)."""
    coef = _pair_of(float(alpha), float(beta), lam_pos, (2, 1))
    if lam_pos is lam_neg:
        return Side(coef, lam_pos * signed_pair(lam_pos))
    return Side(coef, torch.stack((-lam_pos, lam_neg)))


def signed_block(
    S: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor, self_index: Optional[torch.Tensor]
) -> torch.Tensor:
    """The signed ``(2, B, M)`` block of ``S`` for label-defined pairs (see :func:`pair_masks`;
    ``self_index`` outside ``[0, M)`` or ``None``: no own copy). A new tensor; no autograd.

    In float passes (see :func:`fill_where_`): the labels' comparison is written as 1.0/0.0,
    and each side's values ``(-S, S)`` are capped by ``+-inf`` from it, ``+inf`` on the side's
    pairs and ``-inf`` off them (the positives' side keeps the same labels, the negatives'
    side the others). A NaN similarity stays NaN off its side's pairs too (a masked fill would
    write ``-inf`` there): its anchor's loss is NaN either way, as the pair is on one of its
    sides. The own copies are then set to ``-inf`` on both sides (a gather and a scatter).
    Blocks of fewer than :data:`FLOAT_MASK_ELEMENTS` values, and ``torch.compile``, take the
    boolean masks and a masked fill (fewer operator calls)."""
    B, M = S.shape
    if torch.compiler.is_compiling() or 2 * B * M < FLOAT_MASK_ELEMENTS:
        eq, own = _same_label_and_own(labels, ref_labels, self_index, M)
        # per side, not its pair: (~eq, eq) as eq XOR (True, False), one broadcast pointwise op
        # (a stack is a concatenation, which inductor materialises: on the CPU its bool stores
        # from int64 comparisons cost 3/4 of the compiled elementwise kernel at B=128)
        dropped = torch.logical_xor(eq, _pair_of(True, False, eq, (2, 1, 1)))
        if own is not None:
            dropped |= own
        return _signed_values(S).masked_fill_(dropped, -_INF)
    same = torch.eq(labels[:, None], ref_labels, out=S.new_empty((B, M)))
    caps = torch.mul(same.sub_(0.5), _pair_of(_INF, -_INF, S, (2, 1, 1)))  # +-inf: (same, other)
    U = _signed_values(S).clamp_max_(caps)
    if self_index is not None and M:
        _exclude_own_copies_(U, self_index)
    return U


def signed_from_masks(S: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """The signed ``(2, B, M)`` block of ``S`` for explicit masks (differentiable in ``S``)."""
    return torch.where(torch.stack((pos, neg)), _signed_values(S), -_INF)


def signed_pair(like: torch.Tensor) -> torch.Tensor:
    """The signs ``(-1, 1)`` of the stacked sides, ``(2, 1)`` in ``like``'s dtype and device."""
    return _pair_of(-1.0, 1.0, like, (2, 1))


def _signed_values(S: torch.Tensor) -> torch.Tensor:
    """``(-S, S)`` as one new ``(2, B, M)`` tensor (one product with the signs: exact)."""
    return S * _pair_of(-1.0, 1.0, S, (2, 1, 1))


class SignedTerms(NamedTuple):
    """Both sides of a signed block, stacked: ``(2, B, M)`` pair terms ``R`` (0 off the kept
    pairs), and ``(2, B)`` each: the hardest values ``h`` (``-min_pos``, ``max_neg``), the
    :class:`Shift` (``ref`` signed), the sums ``acc``, the kept pairs (when counted) and
    the :class:`SideLoss`."""

    R: torch.Tensor
    hard: torch.Tensor
    shift: Shift
    acc: torch.Tensor
    counts: Optional[torch.Tensor]
    loss: SideLoss


def signed_terms(
    U: torch.Tensor,
    side: Side,
    epsilon: Optional[float],
    weighting: Weighting,
    counts: bool = False,
    inplace: bool = False,
    keeps_none: Optional[torch.Tensor] = None,
) -> SignedTerms:
    """Mining (if ``epsilon``) and both sides' terms and losses of a signed block ``U``
    (:func:`signed_block`; ``side``: :func:`signed_sides`), as :func:`hardest`,
    :func:`kept_sides`, :func:`mine_`, :func:`side_shift`, :func:`side_terms` and
    :func:`side_finish` compute them per side. ``inplace=True`` overwrites ``U`` (no autograd).
    A half-precision ``U`` is mined in its own dtype (PML's miner compares in the similarities'
    dtype: ``S + eps`` rounds there) and its terms are formed in float32. ``keeps_none``
    ``(2, B)`` bool: sides the mining empties whatever their values (see
    :func:`nan_poisoned_sides`)."""
    if U.shape[-1]:
        h = values(U).amax(-1)
    else:  # no references
        h = U.new_full(U.shape[:-1], -_INF)
    if epsilon is None:
        kept = h != -_INF
    else:  # a side keeps a pair with U + eps > bound: exactly mine_'s comparisons, negated
        bound = -h.flip(0)  # each side's bound: the other side's hardest (min_pos, -max_neg)
        if keeps_none is not None:  # a bound no pair passes
            bound = bound.masked_fill(keeps_none, _INF)
        kept = ~((h + number(epsilon, h)) <= bound)
        U = mine_below_(U if inplace else U.clone(), epsilon, bound[..., None])
    if U.dtype != compute_dtype(U.dtype):  # exact: every half-precision value is a float32
        U, h = U.to(compute_dtype(U.dtype)), h.to(compute_dtype(U.dtype))
    num = (U != -_INF).sum(-1) if counts else None
    shift = side_shift(side, h, kept, weighting)
    terms = side_terms(U, side, shift.ref, weighting, inplace=inplace)
    return SignedTerms(terms.R, h, shift, terms.acc, num, side_finish(terms.acc, shift, side.coef, weighting))


def _dense(S: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, params: "MSParams") -> SignedTerms:
    """Both sides of a dense block with masks, stacked (differentiable in ``S`` and the thresholds;
    ``S`` in half precision is mined in it, as PML mines, see :func:`signed_terms`)."""
    B = S.shape[0]
    like = S.new_empty(0, dtype=compute_dtype(S.dtype))  # the thresholds' dtype
    side = signed_sides(
        params.alpha, params.beta, _as_row(params.lam_pos, B, like), _as_row(params.lam_neg, B, like)
    )
    w = get_weighting(params.weighting)
    U, keeps_none = signed_from_masks(S, pos, neg), None
    # NaN similarities as PML's miner meets them; a NaN sum (one pass, one host read: this is
    # not the sync-free fused path) says whether there is any (or +inf beside -inf)
    if params.epsilon is not None and bool(S.detach().sum().isnan()):
        nan = U.isnan()
        nan_pos, nan_neg = nan.any(-1).unbind(0)
        keeps_none = nan_poisoned_sides(nan_pos, nan_neg, params.similarity)
        U = U.masked_fill(nan, -_INF)
    return signed_terms(U, side, params.epsilon, w, counts=True, keeps_none=keeps_none)


def signed_weight_sums(t: SignedTerms, weighting: Weighting) -> torch.Tensor:
    """``(2, B)`` per-anchor sums of both sides' pair weights (see :func:`weight_sum`; not
    differentiable)."""
    r_sum = None if weighting.log_sum_exp else t.R.detach().sum(-1)
    return weight_sum(t.acc.detach(), r_sum, t.loss.scale, weighting)


class MSParams(NamedTuple):
    """The hyper-parameters of one MS computation on a dense block (see ``functional.ms_terms``)."""

    alpha: float = 2.0
    beta: float = 50.0
    lam_pos: Threshold = 0.5
    lam_neg: Threshold = 0.5
    weighting: str = "ms"
    epsilon: Optional[float] = None
    similarity: bool = True  # S is PML's matrix itself (else a distance, negated): NaN mining


def dense_terms(S: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, params: MSParams) -> MSTerms:
    """:class:`MSTerms` of a dense block with masks (differentiable in ``S`` and thresholds)."""
    t = _dense(S, pos, neg, params)
    assert t.counts is not None
    ws = signed_weight_sums(t, get_weighting(params.weighting))
    return MSTerms(t.loss.loss.sum(0), *t.counts.unbind(0), *ws.unbind(0))


@torch.no_grad()
def dense_pair_weights(
    S: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, params: MSParams
) -> PairWeights:
    """Dense :class:`PairWeights` of a block with masks."""
    t = _dense(S, pos, neg, params)  # R is 0 off the kept pairs
    return PairWeights(*(t.R * t.loss.scale[..., None]).unbind(0))


class RowSums(NamedTuple):
    """Each anchor's sum and count of positive and of negative similarities, ``(B,)`` each."""

    sum_pos: torch.Tensor
    count_pos: torch.Tensor
    sum_neg: torch.Tensor
    count_neg: torch.Tensor

    def __add__(self, other: "RowSums") -> "RowSums":  # type: ignore[override]  # blockwise sums
        return RowSums(*(a + b for a, b in zip(self, other)))


def block_row_sums(block: Block) -> RowSums:
    """The :class:`RowSums` of a block's (unmined) pairs."""
    kp, kn = block.kept_pos(), block.kept_neg()
    return RowSums(
        block.row_sum(block.sp.masked_fill(~kp, 0)),
        block.row_sum(kp),
        block.Vn.masked_fill(~kn, 0).sum(1),
        kn.sum(1),
    )


def anchor_centres(sums: RowSums, default: float) -> torch.Tensor:
    """Each anchor's centre ``(mean positive + mean negative similarity) / 2``.

    ``sums`` comes from :func:`block_row_sums` (possibly added up over blocks);
    an anchor without positives or without negatives gets ``default``.
    """
    sp, cp, sn, cn = sums
    ok = (cp > 0) & (cn > 0)
    centre = (sp / cp.clamp(min=1) + sn / cn.clamp(min=1)) / 2
    return torch.where(ok, centre, torch.full_like(centre, default))
