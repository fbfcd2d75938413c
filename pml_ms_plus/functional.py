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
    if self_index is not None and eq.shape[1] > 0:
        valid = (self_index >= 0) & (self_index < eq.shape[1])
        col = self_index.clamp(0, eq.shape[1] - 1)[:, None]
        pos = eq.clone()
        pos.scatter_(1, col, eq.gather(1, col) & ~valid[:, None])
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


def hardest(
    S: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per anchor: the smallest positive and the largest negative similarity.

    Returns ``(min_pos, max_neg)`` of shape ``(B,)``; ``+inf`` / ``-inf`` for an
    anchor without positives / negatives.
    """
    inf = float("inf")
    return S.masked_fill(~pos, inf).amin(1), S.masked_fill(~neg, -inf).amax(1)


def mine_hard_pairs(
    S: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    epsilon: float,
    min_pos: Optional[torch.Tensor] = None,
    max_neg: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The MS paper's hard-pair rule, on masks.

    Keeps a negative when ``S + epsilon > min_pos`` and a positive when
    ``S - epsilon < max_neg`` (the hardest pairs over the unmined masks, which
    may be passed in when they were computed over a larger block). Arithmetic is
    in ``S``'s dtype, as in PML's miner, so the pair sets agree exactly.
    """
    if min_pos is None or max_neg is None:
        min_pos, max_neg = hardest(S, pos, neg)
    keep_pos = pos & ((S - epsilon) < max_neg[:, None])
    keep_neg = neg & ((S + epsilon) > min_pos[:, None])
    return keep_pos, keep_neg


def _as_row(lam: Threshold, n: int, like: torch.Tensor) -> torch.Tensor:
    if torch.is_tensor(lam):
        return lam.to(dtype=like.dtype, device=like.device).expand(n)
    return torch.full((n,), float(lam), dtype=like.dtype, device=like.device)


class Side(NamedTuple):
    """One side of the loss: ``z = coef * (S - lam)``; ``coef`` is ``-alpha`` or ``beta``."""

    coef: float
    lam: torch.Tensor  # (B,)

    def exponents(self, S: torch.Tensor) -> torch.Tensor:
        return self.coef * (S - self.lam[:, None])

    def max_exponent(self, min_pos: torch.Tensor, max_neg: torch.Tensor) -> torch.Tensor:
        """The largest exponent over the side's set, from the hardest pairs."""
        hard = min_pos if self.coef < 0 else max_neg
        return self.coef * (hard - self.lam)


def side_shift(zmax: torch.Tensor, weighting: str) -> torch.Tensor:
    """The stabilising shift of a side's log-sum-exp (never ``inf``)."""
    zmax = zmax.detach()
    if weighting == "ms":
        return zmax.clamp(min=0)  # the "1 +" term is exp(0)
    return torch.where(torch.isfinite(zmax), zmax, torch.zeros_like(zmax))


def side_partial(
    z: torch.Tensor, mask: torch.Tensor, shift: torch.Tensor, weighting: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial per-anchor sums of a side over a block of references.

    Returns ``(acc, count, weight_acc)``: ``acc`` is ``sum exp(z - shift)``
    (``"ms"``/``"relative"``) or ``sum softplus(z)`` (``"self"``); ``count`` the
    number of pairs; ``weight_acc`` the sum of ``sigmoid(z)`` for ``"self"``
    (zeros otherwise; the other weightings get their weight sums from ``acc``).
    """
    count = mask.sum(1)
    if weighting == "self":
        acc = F.softplus(z).masked_fill(~mask, 0).sum(1)
        with torch.no_grad():
            wacc = torch.sigmoid(z).masked_fill(~mask, 0).sum(1)
        return acc, count, wacc
    acc = (z - shift[:, None]).masked_fill(~mask, float("-inf")).exp().sum(1)
    return acc, count, torch.zeros_like(acc)


def side_finish(
    acc: torch.Tensor, count: torch.Tensor, shift: torch.Tensor, coef: float, weighting: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A side's per-anchor loss and log-normaliser from its accumulated sums.

    Returns ``(loss, lse)``; ``lse`` is what the pair weights ``exp(z - lse)``
    divide by (unused for ``"self"``).
    """
    k = abs(coef)
    if weighting == "self":
        return acc / k, torch.zeros_like(acc)
    if weighting == "ms":
        lse = shift + torch.log(torch.exp(-shift) + acc)
    else:
        nonempty = count > 0
        lse = torch.where(nonempty, shift + torch.log(torch.where(nonempty, acc, 1.0)), 0.0)
    return lse / k, lse


def side_weights(
    z: torch.Tensor, mask: torch.Tensor, lse: torch.Tensor, weighting: str
) -> torch.Tensor:
    """Dense GPW weights of one side: ``exp(z - lse)`` or ``sigmoid(z)``, 0 off the mask."""
    if weighting == "self":
        return torch.sigmoid(z).masked_fill(~mask, 0)
    return (z - lse[:, None]).masked_fill(~mask, float("-inf")).exp()


def weight_sums(
    acc: torch.Tensor, wacc: torch.Tensor, shift: torch.Tensor, lse: torch.Tensor, weighting: str
) -> torch.Tensor:
    """Per-anchor sum of a side's pair weights, from the accumulated sums."""
    if weighting == "self":
        return wacc
    return acc * torch.exp(shift - lse)


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


def sides(alpha: float, beta: float, lam_pos: torch.Tensor, lam_neg: torch.Tensor):
    return Side(-float(alpha), lam_pos), Side(float(beta), lam_neg)


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
    check_weighting(weighting)
    S = S.to(compute_dtype(S.dtype))
    B = S.shape[0]
    min_pos, max_neg = hardest(S.detach(), pos, neg)
    if epsilon is not None:
        pos, neg = mine_hard_pairs(S.detach(), pos, neg, epsilon, min_pos, max_neg)
    out = []
    for side, mask in zip(sides(alpha, beta, _as_row(lam_pos, B, S), _as_row(lam_neg, B, S)), (pos, neg)):
        shift = side_shift(side.max_exponent(min_pos, max_neg), weighting)
        acc, count, wacc = side_partial(side.exponents(S), mask, shift, weighting)
        loss, lse = side_finish(acc, count, shift, side.coef, weighting)
        out.append((loss, count, weight_sums(acc.detach(), wacc, shift, lse.detach(), weighting)))
    (lp, cp, wp), (ln, cn, wn) = out
    return MSTerms(lp + ln, cp, cn, wp, wn)


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
    check_weighting(weighting)
    S = S.to(compute_dtype(S.dtype))
    B = S.shape[0]
    min_pos, max_neg = hardest(S, pos, neg)
    if epsilon is not None:
        pos, neg = mine_hard_pairs(S, pos, neg, epsilon, min_pos, max_neg)
    weights = []
    for side, mask in zip(sides(alpha, beta, _as_row(lam_pos, B, S), _as_row(lam_neg, B, S)), (pos, neg)):
        shift = side_shift(side.max_exponent(min_pos, max_neg), weighting)
        z = side.exponents(S)
        acc, count, _ = side_partial(z, mask, shift, weighting)
        _, lse = side_finish(acc, count, shift, side.coef, weighting)
        weights.append(side_weights(z, mask, lse, weighting))
    return weights[0], weights[1]


def masked_row_sums(
    S: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum_pos, count_pos, sum_neg, count_neg)`` of each row of ``S`` over the masks."""
    return (
        S.masked_fill(~pos, 0).sum(1),
        pos.sum(1),
        S.masked_fill(~neg, 0).sum(1),
        neg.sum(1),
    )


def anchor_centres(
    sums: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], default: float
) -> torch.Tensor:
    """Each anchor's centre ``(mean positive + mean negative similarity) / 2``.

    ``sums`` comes from :func:`masked_row_sums` (possibly added up over blocks);
    an anchor without positives or without negatives gets ``default``.
    """
    sp, cp, sn, cn = sums
    ok = (cp > 0) & (cn > 0)
    centre = (sp / cp.clamp(min=1) + sn / cn.clamp(min=1)) / 2
    return torch.where(ok, centre, torch.full_like(centre, default))
