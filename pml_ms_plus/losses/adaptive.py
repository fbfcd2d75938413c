"""``AdaptiveMSLoss``: the MS loss with a per-anchor threshold."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .. import _checks
from .._blocks import anchor_centres
from .ms import MultiSimilarityLoss, Similarities
from .problem import MSProblem, Thresholds

MARGIN_MODES = ("anchor", "learned")


class AdaptiveMSLoss(MultiSimilarityLoss):
    """MS loss whose threshold adapts per anchor; everything else is ``MSLoss``.

    Anchor ``i`` has a centre ``lambda_i``; its positive term uses the threshold
    ``lambda_i + margin`` and its negative term ``lambda_i - margin`` (in
    similarity terms: positives are pushed above ``lambda_i + margin``,
    negatives below ``lambda_i - margin``; for a distance such as
    ``LpDistance`` the signs follow the distance, as ``distance.margin`` does).

    * ``margin_mode="anchor"``: ``lambda_i = (mean similarity to its positives
      + mean similarity to its negatives) / 2`` over all its valid pairs before
      mining, with no gradient through ``lambda_i``; an anchor without positives
      or without negatives uses ``base``. With an ``indices_tuple`` its pairs are
      the valid ones: a miner's tuple gives centres of the mined pairs, so
      ``AdaptiveMSLoss(epsilon=e)(x, y)`` and ``AdaptiveMSLoss()(x, y,
      MultiSimilarityMiner(e)(x, y))`` differ (for ``MSLoss`` they agree).
    * ``margin_mode="learned"``: one threshold per class, the parameter
      ``thresholds`` of shape ``(num_classes,)`` initialised to ``base``;
      anchor ``i`` uses its class's. Train it with a separate loss optimizer
      (PML's convention for losses with parameters). With ``margin=0`` it
      starts out equal to ``MSLoss(base=base)``.

    Mining, ``weighting``, distances, reducers and the fused path are those of
    :class:`MSLoss`. Recorded stats add ``threshold_mean`` and ``threshold_std``
    (of the centres used, in the distance's units).

    Args:
        alpha, beta, base, epsilon, weighting: as for :class:`MSLoss`.
        margin_mode: ``"anchor"`` or ``"learned"``.
        margin: the half-width around each anchor's centre (>= 0).
        num_classes: the number of classes (``"learned"`` only).
        **kwargs: :class:`MSLoss`'s keyword options and PML's.

    Raises:
        ValueError: an unknown ``margin_mode``, a negative ``margin``,
            ``"learned"`` without ``num_classes``; in ``forward``: a label
            outside ``[0, num_classes)`` in learned mode, and :class:`MSLoss`'s.

    Example:
        >>> x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
        >>> y = torch.arange(32) % 4
        >>> loss_fn = AdaptiveMSLoss(margin_mode="learned", num_classes=4, margin=0.0)
        >>> bool(torch.isclose(loss_fn(x, y), MSLoss()(x, y)))  # learned thresholds start at base
        True
    """

    def __init__(
        self,
        alpha: float = 2,
        beta: float = 50,
        base: float = 0.5,
        epsilon: Optional[float] = None,
        weighting: str = "ms",
        *,
        margin_mode: str = "anchor",
        margin: float = 0.1,
        num_classes: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        if margin_mode not in MARGIN_MODES:
            raise ValueError(f"margin_mode must be one of {MARGIN_MODES}, got {margin_mode!r}")
        _checks.non_negative("margin", margin)
        if margin_mode == "learned" and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ValueError(f"margin_mode='learned' needs num_classes as an int >= 1, got {num_classes!r}")
        super().__init__(alpha=alpha, beta=beta, base=base, epsilon=epsilon, weighting=weighting, **kwargs)
        self.margin_mode = margin_mode
        self.margin = float(margin)
        self.num_classes = num_classes
        if margin_mode == "learned":
            assert num_classes is not None  # checked above
            self.thresholds = torch.nn.Parameter(torch.full((num_classes,), float(base)))
        self.add_to_recordable_attributes(list_of_names=["margin"], is_stat=False)
        self.add_to_recordable_attributes(list_of_names=["threshold_mean", "threshold_std"], is_stat=True)

    def check_inputs(
        self,
        embeddings: torch.Tensor,
        labels: Optional[torch.Tensor],
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
        finite: bool = True,
    ) -> None:
        super().check_inputs(embeddings, labels, ref_emb, ref_labels, finite)
        if self.margin_mode != "learned":
            return
        if labels is None:
            raise ValueError("margin_mode='learned' needs labels")
        assert self.num_classes is not None  # learned mode has it
        if len(labels):
            # one host read; long: min/max are not defined for uint16-64
            low, high = torch.stack(labels.long().aminmax()).tolist()
            if low < 0 or high >= self.num_classes:
                raise ValueError(
                    f"labels must lie in [0, num_classes={self.num_classes}) for margin_mode='learned', "
                    f"got values in [{low}, {high}]"
                )

    def problem_thresholds(self, problem: MSProblem, sims: Similarities) -> Thresholds:
        """``centre -+ margin`` per anchor: the anchor's mid-point (``"anchor"``, from
        ``sims.row_sums()``, no gradient) or its class's learned threshold (``"learned"``)."""
        sign = self._sign()
        n = problem.num_anchors
        if self.margin_mode == "anchor":
            centre = anchor_centres(sims.row_sums(), default=sign * self.base).to(sims.dtype)
        else:
            assert problem.labels is not None  # checked: learned mode needs labels
            labels = problem.labels.to(
                device=self.thresholds.device, dtype=torch.long
            )  # (uint16-64 do not index)
            centre = sign * self.thresholds[labels].to(device=sims.device, dtype=sims.dtype)
        if self.collect_stats:
            with torch.no_grad():
                used = sign * centre
                self.threshold_mean = float(used.mean()) if n else 0.0
                self.threshold_std = float(used.std(unbiased=False)) if n else 0.0
        return Thresholds(centre + self.margin, centre - self.margin)
