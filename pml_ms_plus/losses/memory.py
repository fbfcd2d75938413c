"""``CrossBatchMemory`` for the MS family (XBM, Wang et al., CVPR 2020)."""

from __future__ import annotations

import inspect
from typing import Optional, Tuple

import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .. import _checks
from .. import functional as F_ms
from .ms import MultiSimilarityLoss


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank, in rank order (no gradient)."""
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)


class CrossBatchMemory(pml_losses.CrossBatchMemory):
    """Cross-batch memory for ``MSLoss`` / ``AdaptiveMSLoss``, a drop-in for PML's.

    Each call enqueues the batch (detached) into a ring buffer of
    ``memory_size`` past embeddings, then computes the loss of the batch's
    anchors against the whole memory, the batch included, each anchor's own
    copy excluded. With ``loss=MSLoss(epsilon=e)`` and no ``miner``, mining and
    loss run on the ``batch x memory`` similarity block directly (no index
    tuples), in blocks of ``loss.chunk_size`` references: extra memory stays
    at a few ``(batch, chunk)`` float32 tensors (about 100 MB with the default
    chunk) whatever ``memory_size`` is.

    Differences from PML, by design:

    * an anchor's own copy is excluded *before* mining. PML's miner sees it as a
      positive, so an anchor with no other positive in memory gets
      ``min_pos = 1`` (cosine) and PML then mines every negative above
      ``1 - epsilon``; here that anchor has no pairs. With a ``miner`` given,
      PML's order (mine, then drop self pairs) is kept for exact parity.
    * ``start_iteration=K``: for the first K calls the loss is the in-batch loss
      ``loss(embeddings, labels)`` (the memory still fills); after that it is
      ``batch_weight * in_batch + memory_weight * memory_loss``. The XBM paper
      uses ``batch_weight=1, memory_weight=1, start_iteration=1000``; the
      defaults reproduce PML (memory loss only, from the first call).
    * the memory (embeddings, labels, write position, fill state, call counter)
      lives in buffers: ``state_dict()`` restores it exactly, ``.to(device)``
      moves it, and it stays float32 when embeddings arrive in half precision.
    * under an initialised ``torch.distributed`` group every rank all-gathers
      the batch (rank order) before enqueueing, so all ranks hold identical
      memories, and each rank's loss covers its own anchors (equal local batch
      sizes are required). Inside PML's ``DistributedLossWrapper``, which has
      gathered already, no second gather happens (PML's semantics apply).
    """

    def __init__(
        self,
        loss: MultiSimilarityLoss,
        embedding_size: int,
        memory_size: int = 1024,
        miner=None,
        *,
        start_iteration: int = 0,
        batch_weight: float = 0.0,
        memory_weight: float = 1.0,
    ):
        if not isinstance(loss, MultiSimilarityLoss):
            raise TypeError(
                "CrossBatchMemory takes a loss of the pml_ms_plus MS family (MSLoss, AdaptiveMSLoss), "
                f"got {type(loss).__name__}"
            )
        for name, value in (("embedding_size", embedding_size), ("memory_size", memory_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(start_iteration, bool) or not isinstance(start_iteration, int) or start_iteration < 0:
            raise ValueError(f"start_iteration must be an int >= 0, got {start_iteration!r}")
        _checks.non_negative("batch_weight", batch_weight)
        _checks.non_negative("memory_weight", memory_weight)
        super().__init__(loss, embedding_size, memory_size=memory_size, miner=miner)
        self.start_iteration = start_iteration
        self.batch_weight = batch_weight
        self.memory_weight = memory_weight
        self.add_to_recordable_attributes(
            list_of_names=["start_iteration", "batch_weight", "memory_weight"], is_stat=False
        )

    @staticmethod
    def supported_losses():
        return ["MultiSimilarityLoss", "AdaptiveMSLoss"]

    @classmethod
    def check_loss_support(cls, loss_name):
        pass  # the isinstance check in __init__ is the real one

    # --------------------------------------------------------------- the state
    def reset_queue(self) -> None:
        """Empty the memory (buffers: embeddings, labels, write position, fill flag, call counter)."""
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.long))
        self.register_buffer("queue_position", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.bool))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    @property
    def queue_idx(self) -> int:
        return int(self.queue_position)

    @queue_idx.setter
    def queue_idx(self, value) -> None:  # PML's reset_queue and records use this name
        if "queue_position" in self._buffers:
            self.queue_position.fill_(int(value))

    @property
    def has_been_filled(self) -> bool:
        return bool(self.filled)

    @has_been_filled.setter
    def has_been_filled(self, value) -> None:
        if "filled" in self._buffers:
            self.filled.fill_(bool(value))

    def memory(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The filled part of the memory: ``(embeddings, labels)``."""
        if self.has_been_filled:
            return self.embedding_memory, self.label_memory
        n = self.queue_idx
        return self.embedding_memory[:n], self.label_memory[:n]

    def add_to_memory(self, embeddings, labels, batch_size=None):
        n = len(embeddings)
        start = self.queue_idx
        self.curr_batch_idx = (
            torch.arange(start, start + n, device=self.embedding_memory.device) % self.memory_size
        )
        self.embedding_memory[self.curr_batch_idx] = embeddings.detach().to(self.embedding_memory)
        self.label_memory[self.curr_batch_idx] = labels.detach().to(self.label_memory)
        if start + n >= self.memory_size:
            self.has_been_filled = True
        self.queue_idx = (start + n) % self.memory_size

    # ----------------------------------------------------------------- forward
    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        self._check_inputs(embeddings, labels, indices_tuple, enqueue_mask)
        self.reset_stats()
        device = embeddings.device
        labels = labels.to(device)
        if self.embedding_memory.device != device:
            self.to(device)
        if enqueue_mask is not None:
            enqueue_mask = enqueue_mask.to(device)

        queue_emb, queue_labels, queue_mask, offset = embeddings, labels, enqueue_mask, 0
        if _is_distributed() and not self._inside_pml_wrapper():
            queue_emb, queue_labels, queue_mask, offset = self._gather(embeddings, labels, enqueue_mask)
        if queue_mask is not None:
            queue_emb, queue_labels = queue_emb[queue_mask], queue_labels[queue_mask]
        if len(queue_emb) > self.memory_size:
            raise ValueError(f"{len(queue_emb)} embeddings to enqueue exceed memory_size={self.memory_size}")

        if enqueue_mask is None:
            anchors, anchor_labels = embeddings, labels
            self_index = (
                self.queue_idx + offset + torch.arange(len(anchors), device=device)
            ) % self.memory_size
        else:
            anchors, anchor_labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
            self_index = torch.full((len(anchors),), -1, dtype=torch.long, device=device)
        self.add_to_memory(queue_emb, queue_labels)

        iteration = int(self.iteration)
        self.iteration += 1
        if iteration < self.start_iteration:
            return self.loss(embeddings, labels)
        loss = self._memory_loss(anchors, anchor_labels, self_index, indices_tuple, enqueue_mask is None)
        if self.memory_weight != 1:
            loss = self.memory_weight * loss
        if self.batch_weight:
            loss = loss + self.batch_weight * self.loss(embeddings, labels)
        return loss

    def _memory_loss(self, anchors, labels, self_index, indices_tuple, remove_self: bool):
        E_mem, L_mem = self.memory()
        dtype = torch.promote_types(anchors.dtype, E_mem.dtype)
        anchors, E_mem = anchors.to(dtype), E_mem.to(dtype)
        if len(E_mem) == 0 or len(anchors) == 0:
            return torch.sum(anchors * 0)
        if self.miner is None and indices_tuple is None:
            return self.loss._forward(
                anchors, labels, None, E_mem, L_mem, self_index=self_index, trusted_ref=True
            )
        # PML's order: pairs from the miner (or all pairs), then self pairs dropped
        shape = (len(anchors), len(E_mem))
        if self.miner is not None:
            pairs = self.miner(anchors, labels, E_mem, L_mem)
            pos, neg = F_ms.masks_from_pairs(
                lmu.convert_to_pairs(pairs, labels, L_mem), shape, anchors.device
            )
        else:
            pos, neg = F_ms.pair_masks(labels, L_mem)
        if remove_self:
            pos[torch.arange(len(anchors), device=pos.device), self_index] = False
        if indices_tuple is not None:  # PML concatenates the caller's pairs (memory indices)
            extra = lmu.convert_to_pairs(indices_tuple, labels)
            extra_pos, extra_neg = F_ms.masks_from_pairs(extra, shape, anchors.device)
            pos, neg = pos | extra_pos, neg | extra_neg
        return self.loss._forward(anchors, labels, None, E_mem, L_mem, masks=(pos, neg), trusted_ref=True)

    # ----------------------------------------------------------------- helpers
    def _check_inputs(self, embeddings, labels, indices_tuple, enqueue_mask) -> None:
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        if labels is None:
            raise ValueError("CrossBatchMemory needs labels")
        _checks.embeddings_and_labels(embeddings, labels, self.loss.check_finite)
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings have width {embeddings.shape[1]} but embedding_size={self.embedding_size}"
            )
        if enqueue_mask is not None:
            if not torch.is_tensor(enqueue_mask) or enqueue_mask.dtype != torch.bool:
                raise ValueError("enqueue_mask must be a bool tensor")
            if enqueue_mask.shape != (len(embeddings),):
                raise ValueError(
                    f"enqueue_mask has shape {tuple(enqueue_mask.shape)}, expected ({len(embeddings)},)"
                )
        elif len(embeddings) > self.memory_size:
            raise ValueError(f"batch of {len(embeddings)} exceeds memory_size={self.memory_size}")

    def _inside_pml_wrapper(self) -> bool:
        """True when PML's DistributedLossWrapper (which gathers already) is calling us."""
        from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

        frame = inspect.currentframe()
        for _ in range(12):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return False
            caller = frame.f_locals.get("self")
            if isinstance(caller, DistributedLossWrapper) and caller.loss is self:
                return True
        return False

    def _gather(
        self, embeddings, labels, enqueue_mask
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]:
        sizes = _all_gather(torch.tensor([len(embeddings)], device=embeddings.device))
        if bool((sizes != sizes[0]).any()):
            raise ValueError(f"CrossBatchMemory needs equal batch sizes on every rank, got {sizes.tolist()}")
        mask = None if enqueue_mask is None else _all_gather(enqueue_mask.to(torch.uint8)).bool()
        offset = torch.distributed.get_rank() * len(embeddings)
        return _all_gather(embeddings), _all_gather(labels), mask, offset
