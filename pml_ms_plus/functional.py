r"""The Multi-Similarity loss as plain tensor functions (no PML classes).

Every function here works on a *similarity* block ``S`` of shape ``(B, M)``
(anchors x references; larger means more similar) with positive and negative
pair masks. For anchor :math:`i` with positive set :math:`P_i`, negative set
:math:`N_i` and thresholds :math:`\lambda^+_i, \lambda^-_i` (both ``base`` by
default), the MS loss (Wang et al., CVPR 2019) is

.. math::

    L_i = \frac{1}{\alpha}\log\Big(1 + \sum_{j\in P_i} e^{-\alpha (S_{ij}-\lambda^+_i)}\Big)
        + \frac{1}{\beta}\log\Big(1 + \sum_{j\in N_i} e^{\beta (S_{ij}-\lambda^-_i)}\Big)

``weighting`` selects the General Pair Weighting mode: ``"ms"`` (above),
``"relative"`` (the log-sum-exps without the ``1 +``, 0 for an empty set) or
``"self"`` (:math:`\sum_j \frac{1}{k}\,\mathrm{softplus}(z_{ij})`, binomial
deviance). With ``epsilon`` the MS paper's hard-pair rule first narrows the
sets: a positive is kept when :math:`S_{ij} - \epsilon < \max_{N_i} S`, a
negative when :math:`S_{ij} + \epsilon > \min_{P_i} S`.

The GPW weight of a pair is the magnitude of the derivative of the anchor loss
with respect to its similarity, so :math:`\partial L_i/\partial S_{ij} =
w^-_{ij} - w^+_{ij}`. Everything runs in float32 or wider, with log-sum-exps
shifted by their true maximum (finite for every finite input).

For a distance such as ``LpDistance`` pass ``S = -D`` and thresholds ``-base``.
"""

from __future__ import annotations

import math  # noqa: F401  (used by the examples)
from typing import Any, Optional

import torch

from . import _blocks, _checks, _kernel
from ._blocks import WEIGHTINGS, MSParams, MSTerms, PairMasks, PairWeights, Threshold

__all__ = [
    "WEIGHTINGS",
    "MSTerms",
    "PairMasks",
    "PairWeights",
    "pair_masks",
    "ms_terms",
    "ms_anchor_losses",
    "pair_weights",
    "multi_similarity_loss",
]

REDUCTIONS = ("mean", "sum", "none")


def pair_masks(
    labels: torch.Tensor,
    ref_labels: Optional[torch.Tensor] = None,
    self_index: Optional[torch.Tensor] = None,
) -> PairMasks:
    """Positive and negative pair masks from labels.

    Args:
        labels: ``(B,)`` integer or bool class ids of the anchors.
        ref_labels: ``(M,)`` class ids of the references; ``None``: the anchors
            themselves, with each anchor's self pair removed.
        self_index: ``(B,)`` long, the column of each anchor's own copy among
            the references (excluded from both sides); values outside
            ``[0, M)`` mean "no copy".

    Returns:
        :class:`PairMasks` ``(pos, neg)``, each ``(B, M)`` bool:
        ``pos[i, j] = labels[i] == ref_labels[j]`` and ``neg[i, j] =
        labels[i] != ref_labels[j]``, both false at ``j == self_index[i]``.

    Example:
        >>> pos, neg = pair_masks(torch.tensor([0, 0, 1]))
        >>> pos.int().tolist(), neg.int().tolist()
        ([[0, 1, 0], [1, 0, 0], [0, 0, 0]], [[0, 0, 1], [0, 0, 1], [1, 1, 0]])
    """
    return _blocks.pair_masks(labels, ref_labels, self_index)


def ms_terms(
    S: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    lam_pos: Threshold = 0.5,
    lam_neg: Threshold = 0.5,
    weighting: str = "ms",
    epsilon: Optional[float] = None,
) -> MSTerms:
    """Per-anchor MS losses and pair statistics (differentiable in ``S`` and the thresholds).

    Args:
        S: ``(B, M)`` similarities.
        pos: ``(B, M)`` bool positive mask (self pairs already removed).
        neg: ``(B, M)`` bool negative mask.
        alpha: the positive scale (> 0).
        beta: the negative scale (> 0).
        lam_pos: the positive side's threshold, a float or a ``(B,)`` tensor.
        lam_neg: the negative side's threshold, a float or a ``(B,)`` tensor.
        weighting: ``"ms"``, ``"self"`` or ``"relative"``.
        epsilon: the hard-pair mining margin; ``None``: no mining.

    Returns:
        :class:`MSTerms` of ``(B,)`` tensors: ``losses``, ``num_pos`` and
        ``num_neg`` (pairs kept after mining), ``pos_weight_sum`` and
        ``neg_weight_sum`` (sums of the GPW weights).

    Raises:
        ValueError: for an unknown ``weighting``, an ``alpha`` or ``beta`` not a number > 0, an
            ``epsilon`` < 0.

    Example:
        >>> S = torch.tensor([[1.0, 0.8, 0.1], [0.8, 1.0, 0.6], [0.1, 0.6, 1.0]])
        >>> pos, neg = pair_masks(torch.tensor([0, 0, 1]))
        >>> t = ms_terms(S, pos, neg)
        >>> t.num_pos.tolist(), t.num_neg.tolist()
        ([1, 1, 0], [1, 1, 2])
        >>> by_hand = 0.5 * math.log1p(math.exp(-2 * (0.8 - 0.5))) + 0.02 * math.log1p(math.exp(50 * (0.1 - 0.5)))
        >>> round(float(t.losses[0]), 6) == round(by_hand, 6)
        True
    """
    return _blocks.dense_terms(S, pos, neg, _params(alpha, beta, lam_pos, lam_neg, weighting, epsilon))


def _params(
    alpha: float,
    beta: float,
    lam_pos: Threshold,
    lam_neg: Threshold,
    weighting: str,
    epsilon: Optional[float],
) -> MSParams:
    """The checked :class:`MSParams` of the dense functions (``ValueError`` naming a scale not > 0
    or a negative ``epsilon``, as ``MSLoss`` and the miner refuse them)."""
    _checks.positive("alpha", alpha)
    _checks.positive("beta", beta)
    _checks.optional_non_negative("epsilon", epsilon)
    return MSParams(alpha, beta, lam_pos, lam_neg, weighting, epsilon)


def ms_anchor_losses(S: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Per-anchor MS losses ``(B,)``: ``ms_terms(S, pos, neg, **kwargs).losses``.

    Example:
        >>> S = torch.tensor([[1.0, 0.9], [0.9, 1.0]])
        >>> pos, neg = pair_masks(torch.tensor([0, 1]))
        >>> ms_anchor_losses(S, pos, neg, beta=10.0)  # 1/10 * log(1 + exp(10 * (0.9 - 0.5)))
        tensor([0.4018, 0.4018])
    """
    return ms_terms(S, pos, neg, **kwargs).losses


def pair_weights(
    S: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    lam_pos: Threshold = 0.5,
    lam_neg: Threshold = 0.5,
    weighting: str = "ms",
    epsilon: Optional[float] = None,
) -> PairWeights:
    """Dense GPW pair weights (no gradient): the derivative of each anchor's loss.

    Args:
        S, pos, neg, alpha, beta, lam_pos, lam_neg, weighting, epsilon: as
            for :func:`ms_terms`.

    Returns:
        :class:`PairWeights` ``(pos, neg)``, each ``(B, M)``, non-negative:
        ``pos[i, j] = -dL_i/dS_ij`` on (mined) positive pairs and
        ``neg[i, j] = dL_i/dS_ij`` on (mined) negative pairs, 0 elsewhere.

    Example:
        >>> S = torch.tensor([[1.0, 0.9], [0.9, 1.0]])
        >>> w = pair_weights(S, *pair_masks(torch.tensor([0, 1])), beta=10.0)
        >>> w.neg
        tensor([[0.0000, 0.9820],
                [0.9820, 0.0000]])
    """
    return _blocks.dense_pair_weights(S, pos, neg, _params(alpha, beta, lam_pos, lam_neg, weighting, epsilon))


def multi_similarity_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_emb: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: Optional[float] = None,
    weighting: str = "ms",
    reduction: str = "mean",
) -> torch.Tensor:
    """The MS loss of a batch under cosine similarity, reduced like ``torch.nn.functional``.

    Equals ``MSLoss(alpha, beta, base, epsilon, weighting)(embeddings, labels)``
    (PML's ``MeanReducer``: the mean over anchors) for ``reduction="mean"``; it
    runs the fused, chunked kernel.

    Args:
        embeddings: ``(B, D)`` anchors.
        labels: ``(B,)`` integer or bool class ids.
        ref_emb: ``(M, D)`` references (default: the batch, self pairs removed).
        ref_labels: ``(M,)`` class ids of ``ref_emb`` (required with it).
        alpha, beta, base, epsilon, weighting: as for
            :class:`pml_ms_plus.losses.MSLoss`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-anchor ``(B,)``).

    Returns:
        The loss: a scalar, or ``(B,)`` for ``reduction="none"``.

    Raises:
        ValueError: as ``MSLoss`` raises them (NaN/inf aside: NaN in, NaN out, as
            ``torch.nn.functional``): ``alpha``/``beta`` not > 0, ``epsilon`` < 0, a
            non-finite ``base``, an unknown ``weighting`` or ``reduction``, embeddings that are
            not a 2D floating-point tensor, labels that are not class ids or of another length,
            a ``ref_emb`` of another width, or without ``ref_labels`` (required here, whatever
            its length).

    Example:
        >>> from pml_ms_plus.losses import MSLoss
        >>> x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
        >>> y = torch.arange(32) % 4
        >>> bool(torch.isclose(multi_similarity_loss(x, y, epsilon=0.1), MSLoss(epsilon=0.1)(x, y)))
        True
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _blocks.get_weighting(weighting)
    _params(alpha, beta, base, base, weighting, epsilon)
    _checks.finite_number("base", base)
    if ref_emb is not None and ref_labels is None:
        raise ValueError("ref_labels is required with ref_emb, one per row")
    _checks.batch_and_references(embeddings, labels, ref_emb, ref_labels, False)
    x = embeddings.to(_blocks.compute_dtype(embeddings.dtype))
    units = _kernel.unit_rows(x)  # normalised inside the kernel (closed-form backward)
    if ref_emb is None:
        y, ref_labels, self_index = x, labels, torch.arange(len(x), device=x.device)
    else:
        assert ref_labels is not None  # checked above
        y = torch.nn.functional.normalize(ref_emb.to(x.dtype), dim=1)
        self_index = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
    lam = torch.full((len(x),), float(base), dtype=x.dtype, device=x.device)
    terms = _kernel.ms_terms_fused(
        x,
        y,
        labels.to(x.device),
        ref_labels.to(x.device),
        self_index,
        lam,
        lam,
        alpha=alpha,
        beta=beta,
        weighting=weighting,
        epsilon=epsilon,
        counts=False,
        anchor_units=units,
    )
    losses = terms.losses.to(embeddings.dtype)
    if reduction == "none":
        return losses
    if len(losses) == 0:
        return embeddings.sum() * 0
    return losses.mean() if reduction == "mean" else losses.sum()
