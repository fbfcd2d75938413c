"""``MultiSimilarityMiner``: PML's MS miner, same pairs, without sorting."""

from __future__ import annotations

from typing import Any, Optional

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.miners import BaseMiner

from . import _blocks, _checks


class MultiSimilarityMiner(BaseMiner):
    """The MS paper's hard-pair mining, as a PML miner.

    For each anchor, with ``S`` in similarity orientation (``-distance`` for
    ``LpDistance``), keeps the positives with ``S - epsilon < max_neg`` and the
    negatives with ``S + epsilon > min_pos``, where ``max_neg`` / ``min_pos`` are
    the anchor's hardest negative / positive similarity. One pass over the
    ``(B, M)`` block; no sorting. Returns the same set of pairs as PML's
    ``MultiSimilarityMiner`` as ``(a1, p, a2, n)`` long tensors, ordered by
    anchor then reference.

    Args:
        epsilon: the mining margin (>= 0).
        **kwargs: PML's ``distance`` (default ``CosineSimilarity``), ``collect_stats``.

    Raises:
        ValueError: a negative ``epsilon``; labels that are not integer or bool.

    Example:
        >>> from pytorch_metric_learning import miners as pml_miners
        >>> x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
        >>> y = torch.arange(16) % 3
        >>> ours = MultiSimilarityMiner(0.1)(x, y)
        >>> pml = pml_miners.MultiSimilarityMiner(0.1)(x, y)
        >>> sorted(zip(ours.a2.tolist(), ours.n.tolist())) == sorted(zip(pml[2].tolist(), pml[3].tolist()))
        True
    """

    def __init__(self, epsilon: float = 0.1, **kwargs: Any) -> None:
        _checks.non_negative("epsilon", epsilon)
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.add_to_recordable_attributes(name="epsilon", is_stat=False)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
    ) -> Any:
        """PML's ``forward``, with the labels checked first (PML's resets the stats): class ids,
        and ``ref_labels`` given with a ``ref_emb`` of another length (without them, as in PML,
        the references' labels are the batch's and each anchor's pair with its own row ``i`` is
        dropped)."""
        _checks.label_dtype(labels, "labels")
        _checks.label_dtype(ref_labels, "ref_labels")
        if ref_emb is not None:
            _checks.reference_labels_given(len(embeddings), len(ref_emb), ref_labels)
        return super().forward(embeddings, labels, ref_emb, ref_labels)

    def mine(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor,
        ref_labels: Optional[torch.Tensor],
    ) -> _blocks.MinedPairs:
        # (forward checked the labels; PML's forward calls this hook)
        if ref_labels is None:  # (forward checked the lengths) the batch's labels, as PML pairs them
            ref_labels = labels
        if len(embeddings) == 0 or len(ref_emb) == 0:
            empty = torch.zeros(0, dtype=torch.long, device=embeddings.device)
            return _blocks.MinedPairs(empty, empty.clone(), empty.clone(), empty.clone())
        mat = self.distance(embeddings, ref_emb)
        S = mat if self.distance.is_inverted else -mat
        self_index = None
        # self pairs are dropped when the references are the batch itself: the same
        # embeddings tensor (PML's miner's rule) or the same labels tensor (PML's
        # pair rule; PML's miner would count such a pair as positive and negative at once)
        if embeddings is ref_emb or ref_labels is labels:
            self_index = torch.arange(len(embeddings), device=embeddings.device)
        block = _blocks.block_from_labels(S, labels, ref_labels.to(labels.device), self_index, inplace=True)
        return _blocks.mined_pairs(block, self.epsilon, similarity=self.distance.is_inverted)

    def get_default_distance(self) -> CosineSimilarity:
        return CosineSimilarity()
