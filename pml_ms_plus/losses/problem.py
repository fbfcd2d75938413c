"""The one typed problem every MS computation is: anchors against references."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .._blocks import PairMasks


@dataclass(frozen=True)
class MSProblem:
    """Anchors against references, with the pairs defined by labels or given explicitly.

    Built once at the edge (``MSLoss.make_problem`` from PML's ``forward``
    arguments, ``CrossBatchMemory`` from a batch and its memory, ``GatheredMSLoss`` and the
    memory's in-batch term from the batch of every rank) and handed to
    ``MSLoss.forward_problem``; in-batch, ``ref_emb``, cross-batch memory and
    gathered batches differ only in what they put here.

    Attributes:
        anchors: ``(B, D)`` embeddings whose losses are computed.
        labels: ``(B,)`` class ids (``None`` only with ``pairs``).
        references: ``(M, D)`` embeddings the anchors are compared with.
        ref_labels: ``(M,)`` class ids of the references (``None`` only with ``pairs``).
        self_index: ``(B,)`` long: the column of each anchor's own copy among the
            references, excluded from both sides (``-1``: none); ``None``: no copies.
        pairs: explicit :class:`~pml_ms_plus.functional.PairMasks` ``(B, M)``
            instead of label-defined pairs (mining does not run on explicit pairs).
        references_checked: the references were validated already (a memory of
            checked batches), so the loss does not check them again.
        own_diagonal: ``references is anchors`` and ``self_index`` is ``arange(B)`` (each
            anchor's own copy is its own row; ``MSLoss.make_problem`` sets it): the small-batch
            path then drops the diagonal instead of comparing every column with ``self_index``.
    """

    anchors: torch.Tensor
    labels: Optional[torch.Tensor]
    references: torch.Tensor
    ref_labels: Optional[torch.Tensor]
    self_index: Optional[torch.Tensor] = None
    pairs: Optional[PairMasks] = None
    references_checked: bool = False
    own_diagonal: bool = False

    @classmethod
    def against_gathered(
        cls,
        anchors: torch.Tensor,
        labels: torch.Tensor,
        gathered: torch.Tensor,
        gathered_labels: torch.Tensor,
        rank: int,
    ) -> "MSProblem":
        """One rank's share of a data-parallel batch: its ``B`` anchors against the batch of every
        rank, concatenated in rank order (``gathered``: ``(world * B, D)``), each anchor's own copy
        (row ``rank * B + i``) excluded on both sides exactly as in-batch. The references are
        checked (finite, label dtype) by the loss, on every rank alike.

        Example:
            >>> g = torch.Generator().manual_seed(0)
            >>> x, y = torch.randn(4, 3, generator=g), torch.tensor([0, 0, 1, 1])
            >>> everyone = torch.cat([torch.randn(4, 3, generator=g), x])  # rank 0's rows, then ours (rank 1)
            >>> MSProblem.against_gathered(x, y, everyone, torch.cat([y, y]), rank=1).self_index
            tensor([4, 5, 6, 7])
        """
        n = anchors.shape[0]
        self_index = rank * n + torch.arange(n, device=anchors.device)
        return cls(anchors, labels, gathered, gathered_labels, self_index)

    @property
    def num_anchors(self) -> int:
        return self.anchors.shape[0]

    @property
    def num_references(self) -> int:
        return self.references.shape[0]

    @property
    def in_batch(self) -> bool:
        """The references are the anchors themselves (the same tensor)."""
        return self.references is self.anchors


class Thresholds(NamedTuple):
    """Per-anchor thresholds ``(B,)`` of the positive and the negative side, in similarity
    orientation (``-distance`` for a distance such as ``LpDistance``)."""

    pos: torch.Tensor
    neg: torch.Tensor
