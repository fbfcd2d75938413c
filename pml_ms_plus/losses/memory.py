"""``CrossBatchMemory`` for the MS family (XBM, Wang et al., CVPR 2020)."""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.reducers import DoNothingReducer
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .. import _checks, _distributed
from .._blocks import masks_from_pairs
from .gathered import reduces_by_mean
from .ms import MultiSimilarityLoss
from .problem import MSProblem


class _HostState(NamedTuple):
    """The memory's write position, fill flag and call counter, on the host."""

    position: int
    filled: bool
    iteration: int


class _Undo(NamedTuple):
    """What a failing call puts back: the slots it overwrites and their old contents, the host
    state, and the embeddings buffer it started from."""

    slots: torch.Tensor
    embeddings: torch.Tensor
    labels: torch.Tensor
    host: _HostState
    buffer: torch.Tensor


class _BufferUse:
    """Whether an earlier call's graph may still read the memory's buffers, which must then not
    change in place (the fused kernel saves the references and their labels for its backward;
    autograd refuses that backward once they changed, or, for tensors saved through hooks that
    skip its version check, reads the new contents). Two signals; either one means "in use":

    * the views of the buffers handed to the loss (tensor objects of their own) are alive: a
      graph that saved them keeps them (PyTorch keeps a tensor's Python object while autograd
      holds it) — before its backward, and after a backward with ``retain_graph=True`` while the
      loss lives; a backward that frees the graph, or dropping the loss, ends it;
    * the call's loss lives and its backward has not started (a hook on the loss): graphs that
      hold the buffers through other objects (a compiled graph, a derived view, saved-tensor
      hooks) until their first backward.

    Not covered: a graph that holds the buffers through other objects *and* either is
    backpropagated again after a retained backward, or outlives the loss object the call
    returned (``total = total + xbm(x, y)`` keeps the graph but drops that object)."""

    def __init__(self, *views: torch.Tensor) -> None:
        self._views = [weakref.ref(v) for v in views]
        self._loss: Optional["weakref.ref[torch.Tensor]"] = None
        self._started = False

    def watch(self, loss: torch.Tensor) -> None:
        """Also watch the call's ``loss`` (requiring grad) until its backward starts."""
        self._loss = weakref.ref(loss)
        loss.register_hook(self._start)

    def _start(self, grad: torch.Tensor) -> None:
        self._started = True

    def in_use(self) -> bool:
        waiting = self._loss is not None and not self._started and self._loss() is not None
        return waiting or any(v() is not None for v in self._views)

    def __reduce__(self) -> Tuple[Any, ...]:
        """A copy (pickle, ``torch.save`` of the whole module, ``deepcopy``) watches nothing: its
        buffers are new tensors, which no graph of the original reads (weak references cannot be
        pickled)."""
        return (_BufferUse, ())


class CrossBatchMemory(pml_losses.CrossBatchMemory):
    """Cross-batch memory for ``MSLoss`` / ``AdaptiveMSLoss``, a drop-in for PML's.

    Each call enqueues the batch (detached) into a ring buffer of
    ``memory_size`` past embeddings, then computes the loss of the batch's
    anchors against the whole memory, the batch included, each anchor's own
    copy excluded. With ``loss=MSLoss(epsilon=e)`` and no ``miner``, mining and
    loss run on the ``batch x memory`` similarity block directly (no index
    tuples), in blocks of ``loss.chunk_size`` references: extra memory stays
    at a few ``(batch, chunk)`` float32 tensors (about 100 MB with the default
    chunk) whatever ``memory_size`` is. Given an ``indices_tuple`` there, the
    loss's mining plays PML's miner: the tuple is appended to the pairs it
    keeps (:meth:`MSLoss.mined_pairs`), as PML appends it to its miner's.

    Differences from PML, by design:

    * an anchor's own copy is excluded *before* mining. PML's miner sees it as a
      positive, so an anchor with no other positive in memory gets
      ``min_pos = 1`` (cosine) and PML then mines every negative above
      ``1 - epsilon``; here that anchor has no pairs. With a ``miner`` given,
      PML's order (mine, then drop self pairs) is kept for exact parity.
    * ``start_iteration=K``: for the first K calls the loss is the in-batch loss
      ``loss(embeddings, labels)`` (the memory still fills; an ``indices_tuple``,
      whose references are memory slots, is not used then); after that it is
      ``batch_weight * in_batch + memory_weight * memory_loss``. The XBM paper
      uses ``batch_weight=1, memory_weight=1, start_iteration=1000``; the
      defaults reproduce PML (memory loss only, from the first call).
    * the memory (embeddings, labels, write position, fill state, call counter)
      lives in buffers: ``state_dict()`` restores it exactly, ``.to(device)``
      moves it, and it stays float32 when embeddings arrive in half precision
      (PML's memory takes their dtype); float64 embeddings make it float64, as PML's.
    * ``gather="auto"`` (default): under an initialised ``torch.distributed``
      group with more than one rank, every rank all-gathers the batch (rank
      order) before enqueueing, so all ranks hold identical memories, and each
      rank's loss covers its own anchors (equal local batch sizes are
      required); the in-batch term (warm-up, ``batch_weight``) is then each
      rank's anchors against the batch of every rank, with its gradient
      (:meth:`MSProblem.against_gathered`), and the loss's own parameters
      (learned thresholds) get their gradients averaged over the ranks in
      ``backward``. Under PML's ``MeanReducer`` and DDP's gradient averaging
      the gradients equal those of one process with the whole batch.
      Inside PML's ``DistributedLossWrapper``, which gathers
      already, pass ``gather=False`` (PML's semantics then apply); a batch that
      is identical on every rank is refused as "gathered already".
      ``gather=True`` requires a process group.
    * a call that raises (bad input, a bad ``indices_tuple``, a failing miner)
      leaves the memory, its position and its call counter as they were.
    * labels are class ids (integer or bool tensors), stored as int64.

    Args:
        loss: an :class:`MSLoss` or :class:`AdaptiveMSLoss`.
        embedding_size: the width ``D`` of the embeddings.
        memory_size: the number of past embeddings kept.
        miner: an optional PML miner (PML's order: mine, then drop self pairs).
        start_iteration: warm-up calls with the in-batch loss only.
        batch_weight: weight of the in-batch loss after warm-up.
        memory_weight: weight of the memory loss.
        gather: ``"auto"``, ``True`` or ``False`` (see above).

    Raises:
        TypeError: a loss outside the MS family.
        ValueError: bad sizes, weights or ``gather``; in ``forward``: NaN/inf,
            a width other than ``embedding_size``, a batch larger than the
            memory, a bad ``indices_tuple`` or ``enqueue_mask``.

    Example:
        >>> from pml_ms_plus.losses import MSLoss
        >>> xbm = CrossBatchMemory(MSLoss(epsilon=0.1), embedding_size=8, memory_size=64)
        >>> g = torch.Generator().manual_seed(0)
        >>> for _ in range(3):
        ...     loss = xbm(torch.randn(16, 8, generator=g), torch.arange(16) % 4)
        >>> xbm.queue_idx, xbm.has_been_filled, bool(loss > 0)
        (48, False, True)
    """

    def __init__(
        self,
        loss: MultiSimilarityLoss,
        embedding_size: int,
        memory_size: int = 1024,
        miner: Optional[torch.nn.Module] = None,
        *,
        start_iteration: int = 0,
        batch_weight: float = 0.0,
        memory_weight: float = 1.0,
        gather: Union[str, bool] = "auto",
    ) -> None:
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
        if gather not in ("auto", True, False):
            raise ValueError(f"gather must be 'auto', True or False, got {gather!r}")
        if isinstance(loss.reducer, DoNothingReducer) and (memory_weight != 1 or batch_weight):
            raise ValueError(
                "memory_weight != 1 and batch_weight weigh and add reduced losses: the loss's "
                "DoNothingReducer returns the loss dict (give the loss a reducer, e.g. MeanReducer)"
            )
        super().__init__(loss, embedding_size, memory_size=memory_size, miner=miner)
        self.gather = gather
        self.register_load_state_dict_pre_hook(self._label_state_hook)
        self.start_iteration = start_iteration
        self.batch_weight = batch_weight
        self.memory_weight = memory_weight
        if gather is not False:
            _distributed.average_gradients_in_backward(loss.parameters())
        self.add_to_recordable_attributes(
            list_of_names=["start_iteration", "batch_weight", "memory_weight"], is_stat=False
        )

    @staticmethod
    def supported_losses() -> List[str]:
        return ["MultiSimilarityLoss", "AdaptiveMSLoss"]

    @classmethod
    def check_loss_support(cls, loss_name: str) -> None:
        pass  # the isinstance check in __init__ is the real one

    # --------------------------------------------------------------- the state
    def reset_queue(self) -> None:
        """Empty the memory (buffers: embeddings, labels, write position, fill flag, call counter)."""
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.long))
        self.register_buffer("queue_position", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.bool))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self._host: Optional[_HostState] = _HostState(0, False, 0)
        self._use: Optional[_BufferUse] = None

    def _host_state(self) -> "_HostState":
        """The write position, fill flag and call counter as Python values: read from the
        buffers once after a ``load_state_dict``, then kept on the host, so a step needs
        no device-to-host copy for them (the buffers are written alongside, for checkpoints)."""
        if self._host is None:
            self._host = _HostState(int(self.queue_position), bool(self.filled), int(self.iteration))
        return self._host

    def _set_host_state(self, state: "_HostState") -> None:
        self._host = state
        self.queue_position.fill_(state.position)
        self.filled.fill_(state.filled)
        self.iteration.fill_(state.iteration)

    @property
    def queue_idx(self) -> int:
        return self._host_state().position

    @queue_idx.setter
    def queue_idx(self, value: int) -> None:  # PML's reset_queue and records use this name
        if "queue_position" in self._buffers:
            self._set_host_state(self._host_state()._replace(position=int(value)))

    @property
    def has_been_filled(self) -> bool:
        return self._host_state().filled

    @has_been_filled.setter
    def has_been_filled(self, value: bool) -> None:
        if "filled" in self._buffers:
            self._set_host_state(self._host_state()._replace(filled=bool(value)))

    def memory(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The filled part of the memory: ``(embeddings, labels)``."""
        if self.has_been_filled:
            return self.embedding_memory, self.label_memory
        n = self.queue_idx
        return self.embedding_memory[:n], self.label_memory[:n]

    def add_to_memory(
        self, embeddings: torch.Tensor, labels: torch.Tensor, batch_size: Optional[int] = None
    ) -> None:
        n = len(embeddings)
        start = self.queue_idx
        stored = torch.promote_types(embeddings.dtype, torch.float32)  # as PML: float64 stays float64
        if self.embedding_memory.dtype != stored and self.embedding_memory.is_floating_point():
            # PML's memory takes the embeddings' dtype; this one float32 or wider (half precision and
            # autocast keep a float32 memory): a new tensor, so a graph holding the old one keeps it
            self.register_buffer("embedding_memory", self.embedding_memory.to(stored))
        self._release_buffers()
        self.curr_batch_idx = (
            torch.arange(start, start + n, device=self.embedding_memory.device) % self.memory_size
        )
        self.embedding_memory[self.curr_batch_idx] = embeddings.detach().to(self.embedding_memory)
        self.label_memory[self.curr_batch_idx] = labels.detach().to(self.label_memory)
        if start + n >= self.memory_size:
            self.has_been_filled = True
        self.queue_idx = (start + n) % self.memory_size

    def _release_buffers(self) -> None:
        """Before the buffers are written in place (enqueueing, loading a state): if an earlier
        call's graph may still read them (two calls, one backward: gradient accumulation; a
        backward with ``retain_graph=True``; a backward after a ``load_state_dict``), it keeps
        them as they were and the writes go to copies."""
        if self._use is not None and self._use.in_use():
            self.register_buffer("embedding_memory", self.embedding_memory.clone())
            self.register_buffer("label_memory", self.label_memory.clone())
        self._use = None

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: Optional[Tuple[torch.Tensor, ...]] = None,
        enqueue_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        gathered = self._gathers()
        world = torch.distributed.get_world_size() if gathered else 1
        if gathered:  # every rank's verdict first: all refuse alike, or none (see agree_on_inputs)
            _distributed.agree_before_gathering(
                "CrossBatchMemory",
                self.loss,
                embeddings,
                lambda: self._check_inputs(embeddings, labels, indices_tuple, enqueue_mask, world),
                masked=enqueue_mask is not None,
                tupled=indices_tuple is not None,
            )
        else:
            self._check_inputs(embeddings, labels, indices_tuple, enqueue_mask, world)
        self.reset_stats()
        device = embeddings.device
        labels = labels.to(device=device, dtype=torch.long)  # class ids, as the memory stores them
        if self.embedding_memory.device != device:
            self.to(device)
        if enqueue_mask is not None:
            enqueue_mask = enqueue_mask.to(device)

        queue_emb, queue_labels, queue_mask, offset = embeddings, labels, enqueue_mask, 0
        if gathered:
            queue_emb, queue_labels, queue_mask, offset = self._gather(embeddings, labels, enqueue_mask)
        batch_emb, batch_labels = queue_emb, queue_labels  # every rank's batch (with its gradient)
        if queue_mask is not None:
            queue_emb, queue_labels = queue_emb[queue_mask], queue_labels[queue_mask]
        if len(queue_emb) > self.memory_size:  # (gathered: the same count on every rank)
            raise ValueError(f"{len(queue_emb)} embeddings to enqueue exceed memory_size={self.memory_size}")

        if enqueue_mask is None:
            anchors, anchor_labels = embeddings, labels
            self_index = (
                self.queue_idx + offset + torch.arange(len(anchors), device=device)
            ) % self.memory_size
        else:
            anchors, anchor_labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
            self_index = torch.full((len(anchors),), -1, dtype=torch.long, device=device)

        undo = self._snapshot(len(queue_emb))
        failure: Optional[Exception] = None
        try:  # anything that fails from here on leaves the memory as it was
            self.add_to_memory(queue_emb, queue_labels)
            iteration = self._host_state().iteration
            self._set_host_state(self._host_state()._replace(iteration=iteration + 1))
            if iteration < self.start_iteration:
                loss = self._in_batch_loss(embeddings, labels, batch_emb, batch_labels, gathered)
            else:
                loss = self._memory_loss(
                    anchors, anchor_labels, self_index, indices_tuple, enqueue_mask is None
                )
                if gathered and enqueue_mask is not None and reduces_by_mean(self.loss):
                    # ranks hold different numbers of anchors: each rank's mean weighted by its
                    # share, so that the mean over ranks is the mean over every anchor, as in one
                    # process
                    anchors_everywhere = len(batch_emb) - len(queue_emb)
                    if anchors_everywhere:
                        loss = loss * (world * len(anchors) / anchors_everywhere)
                if self.memory_weight != 1:
                    loss = self.memory_weight * loss
                if self.batch_weight:
                    in_batch = self._in_batch_loss(embeddings, labels, batch_emb, batch_labels, gathered)
                    loss = loss + self.batch_weight * in_batch
            if gathered:  # every rank's backward reaches the gathered batch where the in-batch
                # term uses it, and the loss's own parameters: their collectives run everywhere
                reached = list(self.loss.parameters())
                if iteration < self.start_iteration or self.batch_weight:
                    reached.append(batch_emb)
                loss = _distributed.reaching(loss, reached)
        except Exception as exc:
            failure = exc
        except BaseException:  # (an interrupt: no agreement, the other ranks are on their own)
            self._restore(undo)
            raise
        if gathered and (indices_tuple is not None or self.miner is not None):
            # pairs from a caller's tuple or a miner may be refused on one rank alone (a tuple
            # whose pair the mined pairs list on the other side): every rank's outcome exchanged,
            # so that all keep the enqueued batch or none does
            failure = _distributed.agree_on_outcome("CrossBatchMemory", failure, embeddings)
        if failure is not None:
            self._restore(undo)
            raise failure
        if self._use is not None and isinstance(loss, torch.Tensor) and loss.requires_grad:
            self._use.watch(loss)  # what the caller backpropagates
        return loss

    def _in_batch_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        batch_emb: torch.Tensor,
        batch_labels: torch.Tensor,
        gathered: bool,
    ) -> torch.Tensor:
        """``loss(embeddings, labels)``; gathered: this rank's anchors against every rank's batch."""
        if not gathered:
            return self.loss(embeddings, labels)
        problem = MSProblem.against_gathered(
            embeddings, labels, batch_emb, batch_labels, torch.distributed.get_rank()
        )
        return self.loss.forward_problem(problem)

    def _memory_loss(
        self,
        anchors: torch.Tensor,
        labels: torch.Tensor,
        self_index: torch.Tensor,
        indices_tuple: Optional[Tuple[torch.Tensor, ...]],
        remove_self: bool,
    ) -> torch.Tensor:
        E_mem, L_mem = self.memory()
        dtype = torch.promote_types(anchors.dtype, E_mem.dtype)
        anchors, E_mem = anchors.to(dtype), E_mem.to(dtype).view_as(E_mem)  # tensors of their own
        L_mem = L_mem.view_as(L_mem)
        self._use = _BufferUse(E_mem, L_mem)  # whether a graph keeps them (see add_to_memory)
        if len(E_mem) == 0 or len(anchors) == 0:
            return torch.sum(anchors * 0)
        if self.miner is None and indices_tuple is None:
            problem = MSProblem(anchors, labels, E_mem, L_mem, self_index, references_checked=True)
        else:  # PML's order: a tuple first, then pairs (once, here)
            tup = self._indices_tuple(anchors, labels, E_mem, L_mem, indices_tuple, remove_self, self_index)
            masks = masks_from_pairs(lmu.convert_to_pairs(tup, labels, L_mem), (len(anchors), len(E_mem)))
            problem = MSProblem(anchors, labels, E_mem, L_mem, pairs=masks, references_checked=True)
        return self.loss.forward_problem(problem)

    def _indices_tuple(
        self,
        anchors: torch.Tensor,
        labels: torch.Tensor,
        E_mem: torch.Tensor,
        L_mem: torch.Tensor,
        indices_tuple: Optional[Tuple[torch.Tensor, ...]],
        remove_self: bool,
        self_index: torch.Tensor,
    ) -> Tuple[torch.Tensor, ...]:
        """The tuple PML's ``CrossBatchMemory`` builds, in PML's order: the miner's tuple
        (or all pairs), then self comparisons dropped (a whole triplet whose positive
        is the anchor's own copy), then the caller's tuple appended in the same form.
        Without a miner, a loss with ``epsilon`` is the miner: the pairs its own mining keeps
        (own copies dropped first, as without a tuple; :meth:`MSLoss.mined_pairs`)."""
        if self.miner is not None:
            tup = self.miner(anchors, labels, E_mem, L_mem)
        elif self.loss.epsilon is not None:
            problem = MSProblem(anchors, labels, E_mem, L_mem, self_index, references_checked=True)
            tup = tuple(self.loss.mined_pairs(problem))
        else:
            tup = lmu.get_all_pairs_indices(labels, L_mem)
        if remove_self:
            tup = lmu.remove_self_comparisons(tup, self_index, self.memory_size)
        if indices_tuple is not None:
            if len(indices_tuple) == 3 and len(tup) == 4:
                indices_tuple = lmu.convert_to_pairs(indices_tuple, labels)
            elif len(indices_tuple) == 4 and len(tup) == 3:
                indices_tuple = lmu.convert_to_triplets(indices_tuple, labels)
            tup = c_f.concatenate_indices_tuples(tup, indices_tuple)
        return tup

    # ----------------------------------------------------------------- helpers
    def _filled_length_after(self, n: int) -> int:
        """How many memory slots hold entries once ``n`` more are enqueued."""
        return self.memory_size if self.has_been_filled else min(self.memory_size, self.queue_idx + n)

    def _snapshot(self, n: int) -> "_Undo":
        """What enqueueing ``n`` entries overwrites, to undo a call that fails (and the buffer
        itself: a call in another dtype writes to a converted copy, see add_to_memory)."""
        slots = (self.queue_idx + torch.arange(n, device=self.embedding_memory.device)) % self.memory_size
        return _Undo(
            slots,
            self.embedding_memory[slots].clone(),
            self.label_memory[slots].clone(),
            self._host_state(),
            self.embedding_memory,
        )

    def _restore(self, undo: "_Undo") -> None:
        with torch.no_grad():
            if self.embedding_memory.dtype != undo.buffer.dtype:  # converted: the untouched original
                self.register_buffer("embedding_memory", undo.buffer)
            else:
                self.embedding_memory[undo.slots] = undo.embeddings
            self.label_memory[undo.slots] = undo.labels
            self._set_host_state(undo.host)

    def _check_inputs(
        self,
        embeddings: torch.Tensor,
        labels: Optional[torch.Tensor],
        indices_tuple: Optional[Tuple[torch.Tensor, ...]],
        enqueue_mask: Optional[torch.Tensor],
        world: int,
    ) -> None:
        """This rank's call, before anything changes (``world``: the ranks whose batches it
        enqueues): the loss's checks of the batch (shapes, dtypes, finiteness, a learned
        threshold's label range), the width, the mask, the tuple (its indices against the
        memory as filled after this call)."""
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        if labels is None:
            raise ValueError("CrossBatchMemory needs labels")
        self.loss.check_inputs(embeddings, labels)
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
        if indices_tuple is not None:  # (no mask: every row of every rank is enqueued)
            _checks.indices_tuple(indices_tuple, len(embeddings))
            filled = self._filled_length_after(world * len(embeddings))
            _checks.reference_indices(indices_tuple, filled, " (the filled memory)")

    def _gathers(self) -> bool:
        """Whether this call all-gathers the batch across ranks (see ``gather``)."""
        if self.gather is False:
            return False
        if not _distributed.is_distributed():
            if self.gather is True:
                raise ValueError("gather=True needs an initialised torch.distributed process group")
            return False
        return torch.distributed.get_world_size() > 1

    def _gather(
        self, embeddings: torch.Tensor, labels: torch.Tensor, enqueue_mask: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]:
        world = torch.distributed.get_world_size()  # (equal shares: agreed on in forward)
        all_emb = _distributed.all_gather(embeddings, grad=True)  # enqueued detached
        if len(embeddings) and self._same_rows_on_every_rank(all_emb.view(world, len(embeddings), -1)):
            raise ValueError(
                "every rank passed the same batch: it looks gathered already (PML's "
                "DistributedLossWrapper does that); construct CrossBatchMemory(..., gather=False) there"
            )
        mask = None if enqueue_mask is None else _distributed.all_gather(enqueue_mask.to(torch.uint8)).bool()
        offset = torch.distributed.get_rank() * len(embeddings)
        # labels as int64, the memory's dtype: ranks may pass different integer dtypes
        return all_emb, _distributed.all_gather(labels.long()), mask, offset

    @staticmethod
    def _same_rows_on_every_rank(parts: torch.Tensor) -> bool:
        """Whether every rank holds the same rows in some order (``parts``: world x B x D),
        as after PML's ``DistributedLossWrapper``, which puts each rank's own rows first, and
        rank 0 holds at least two different rows (a gathered batch of a collapsed model, every
        row alike, is not told from a real one: not refused). Rows are put in the order of one
        fixed projection, then compared exactly (rows of equal projections may be paired wrongly
        then, and a gathered batch go unnoticed: never a distinct one refused)."""
        parts = parts.detach()
        direction = torch.linspace(1.0, 2.0, parts.shape[-1], dtype=parts.dtype, device=parts.device)
        order = (parts @ direction).argsort(dim=1)
        rows = parts.gather(1, order[..., None].expand_as(parts))
        if bool((rows[0] == rows[0, :1]).all()):  # one row, or a collapsed batch
            return False
        return bool((rows == rows[:1]).all())

    # ---------------------------------------------------- PML checkpoints
    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """``torch.nn.Module.load_state_dict``; a state dict of PML's ``CrossBatchMemory``
        (the memory without its write position and fill state) gets a clear error under
        ``strict=True`` saying how to load it."""
        ours = ("queue_position", "filled", "iteration")
        if strict and "embedding_memory" in state_dict and not any(k in state_dict for k in ours):
            raise RuntimeError(
                "this looks like a state dict of PML's CrossBatchMemory, which does not save the write "
                "position or the fill state: load it with load_state_dict(state, strict=False), then set "
                "queue_idx and has_been_filled to the values PML's memory had"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @staticmethod
    def _label_state_hook(
        module: "CrossBatchMemory",
        state_dict: Dict[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing: List[str],
        unexpected: List[str],
        errors: List[str],
    ) -> None:
        """Check this memory's entries of a state dict before anything is copied: each buffer's
        shape, integer labels (class ids), a write position in ``[0, memory_size)``, a
        non-negative call counter. On a problem the entries of this module and of its children
        are replaced by their current values (so nothing of them changes: torch would copy the
        well-formed ones before raising) and the problem is reported (``load_state_dict``
        raises). The host copy of the position, fill flag and counter is re-read from the
        buffers after any load. A graph still waiting for its backward keeps the buffers it
        read (the load, even a refused one, writes in place: into copies then)."""
        module._host = None
        module._release_buffers()
        problems = module._state_problems(state_dict, prefix)
        stored = state_dict.get(prefix + "embedding_memory")
        if not problems and torch.is_tensor(stored) and stored.is_floating_point():
            dtype = torch.promote_types(stored.dtype, torch.float32)  # the rule of add_to_memory
            if dtype != module.embedding_memory.dtype:  # a float64 memory loads unrounded
                module.register_buffer("embedding_memory", module.embedding_memory.to(dtype))
        if problems:
            current = module.state_dict(prefix=prefix, keep_vars=True)
            for key in [k for k in state_dict if k in current]:
                state_dict[key] = current[key]
            errors.extend(problems)

    def _state_problems(self, state_dict: Mapping[str, Any], prefix: str) -> List[str]:
        """What is wrong with this memory's entries in ``state_dict`` (see the hook above): the
        shapes of its buffers and of its loss's (and miner's) parameters and buffers, then the
        values of its own."""
        problems = []
        for key, current in self.state_dict(prefix=prefix, keep_vars=True).items():
            value = state_dict.get(key)
            if value is None:
                continue
            if not torch.is_tensor(value) or value.shape != current.shape:
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                problems.append(f"{key} has shape {shape}, this memory's is {tuple(current.shape)}")
        if problems:
            return problems
        labels = state_dict.get(prefix + "label_memory")
        if labels is not None and labels.is_floating_point() and not bool((labels == labels.round()).all()):
            problems.append(f"{prefix}label_memory holds non-integer labels; pml_ms_plus stores class ids")
        for name in ("queue_position", "iteration"):
            value = state_dict.get(prefix + name)
            if value is not None and (value.is_floating_point() or value.is_complex()):
                problems.append(f"{prefix}{name} has dtype {value.dtype}; it is a count (an integer tensor)")
        if problems:
            return problems
        position = state_dict.get(prefix + "queue_position")
        if position is not None and not 0 <= int(position) < self.memory_size:
            problems.append(
                f"{prefix}queue_position is {int(position)}, outside [0, {self.memory_size}) (the memory size)"
            )
        iteration = state_dict.get(prefix + "iteration")
        if iteration is not None and int(iteration) < 0:
            problems.append(f"{prefix}iteration is {int(iteration)}, a call counter must be >= 0")
        return problems
