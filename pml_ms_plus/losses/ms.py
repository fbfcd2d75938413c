"""``MSLoss``: PML's ``MultiSimilarityLoss`` with fused mining, GPW modes and stats."""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .. import _blocks, _checks, _kernel
from .. import functional as F_ms
from .problem import MSProblem, Thresholds

IndicesTuple = Tuple[torch.Tensor, ...]  # PML's (a, p, n) or (a1, p, a2, n)
_STATS = ["num_pos_pairs", "num_neg_pairs", "num_nonzero_anchors", "mean_pos_weight", "mean_neg_weight"]
_FAST_DISTANCES = (CosineSimilarity, DotProductSimilarity)


class MultiSimilarityLoss(pml_losses.MultiSimilarityLoss):
    r"""Multi-Similarity loss (Wang et al., CVPR 2019), a drop-in for PML's.

    For anchor :math:`i` with positive set :math:`P_i` and negative set
    :math:`N_i` (pairs from labels without self-comparisons, from
    ``indices_tuple``, or narrowed by the hard-pair rule when ``epsilon`` is
    set) and :math:`m(a, b)` the distance's margin (:math:`b - a` for
    similarities, :math:`a - b` for distances):

    .. math::

        L_i = \frac{1}{\alpha}\log\Big(1 + \sum_{j\in P_i} e^{\alpha\, m(S_{ij}, \lambda)}\Big)
            + \frac{1}{\beta}\log\Big(1 + \sum_{j\in N_i} e^{\beta\, m(\lambda, S_{ij})}\Big)

    with :math:`\lambda` = ``base``. Each anchor's loss goes to the PML reducer
    as an element loss, like PML. ``weighting="self"`` / ``"relative"`` select
    the other General Pair Weighting modes (see :mod:`pml_ms_plus.functional`).

    Args:
        alpha: the positive scale (> 0).
        beta: the negative scale (> 0).
        base: the similarity threshold :math:`\lambda`.
        epsilon: if not ``None``, the MS paper's hard-pair mining runs inside
            the loss whenever no ``indices_tuple`` is given (no index tuples are
            built); an explicit ``indices_tuple`` is used as it is.
        weighting: ``"ms"``, ``"self"`` or ``"relative"``.
        check_finite: raise ``ValueError`` on NaN/inf embeddings (default);
            ``False`` restores PyTorch's NaN-in, NaN-out behaviour.
        chunk_size: references per block on the fused path (default: from
            ``memory_budget``).
        memory_budget: bytes of extra memory the fused path may hold (default
            512 MiB): the whole batch x references block is computed once and
            kept for the backward when it fits three times; beyond that, blocks
            of 1/8 of the budget, as many kept as fit, the others recomputed.
        compile_blocks: run the elementwise math of large similarity blocks
            (over 2**16 pairs: memories, large batches) through ``torch.compile``
            (inductor: C++ on the CPU, needing a C++ compiler; Triton on a GPU):
            mining, exponentials and sums of a block's negatives in one pass
            instead of about eight. A one-time compilation per process (seconds);
            a filling memory does not recompile. Default ``False``: eager, the
            same function, the same pairs.
        fused: ``None`` (default) takes the fused path where it applies;
            ``False`` forces the dense autograd path; ``True`` requires the
            fused path (``ValueError`` where it does not apply). For debugging
            and benchmarking: both paths give the same numbers.
        **kwargs: PML's ``distance``, ``reducer``, ``embedding_regularizer``,
            ``collect_stats``.

    Raises:
        ValueError: ``alpha``/``beta`` not > 0, ``epsilon`` < 0, a non-finite
            ``base``, an unknown ``weighting``, a bad ``chunk_size`` or
            ``fused``; in ``forward``: NaN/inf embeddings, labels of the wrong
            length or dtype (integer or bool class ids), mismatched widths.

    Shape:
        ``embeddings``: ``(B, D)``; ``labels``: ``(B,)``; ``ref_emb``: ``(M, D)``;
        output: a scalar (per PML's reducer).

    The class is named ``MultiSimilarityLoss`` so PML's ``CrossBatchMemory``
    accepts it; it is exported as ``MSLoss`` too. Inner-product distances
    (``CosineSimilarity``, ``DotProductSimilarity``) with labels and no
    ``indices_tuple`` take the fused, chunked path of :mod:`pml_ms_plus._kernel`;
    everything else the dense autograd path. Both give PML's numbers.

    Recorded stats (``collect_stats=True``): ``num_pos_pairs``,
    ``num_neg_pairs``, ``num_nonzero_anchors``, ``mean_pos_weight``,
    ``mean_neg_weight``.

    Example:
        >>> from pytorch_metric_learning import losses as pml_losses, miners as pml_miners
        >>> x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
        >>> y = torch.arange(32) % 4
        >>> ours = MSLoss(epsilon=0.1)(x, y)
        >>> pml = pml_losses.MultiSimilarityLoss()(x, y, pml_miners.MultiSimilarityMiner(0.1)(x, y))
        >>> torch.allclose(ours, pml)
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
        check_finite: bool = True,
        chunk_size: Optional[int] = None,
        memory_budget: Optional[int] = None,
        compile_blocks: bool = False,
        fused: Optional[bool] = None,
        **kwargs: Any,
    ) -> None:
        _checks.positive("alpha", alpha)
        _checks.positive("beta", beta)
        _checks.finite_number("base", base)
        _checks.optional_non_negative("epsilon", epsilon)
        _blocks.check_weighting(weighting)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if memory_budget is not None and (
            isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 0
        ):
            raise ValueError(f"memory_budget must be an int >= 0 (bytes) or None, got {memory_budget!r}")
        if not isinstance(compile_blocks, bool):
            raise ValueError(f"compile_blocks must be True or False, got {compile_blocks!r}")
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        super().__init__(alpha=alpha, beta=beta, base=base, **kwargs)
        self.fused = fused
        self.epsilon = epsilon
        self.weighting = weighting
        self.check_finite = check_finite
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget
        self.compile_blocks = compile_blocks
        self.add_to_recordable_attributes(list_of_names=["epsilon"], is_stat=False)
        self.add_to_recordable_attributes(list_of_names=_STATS, is_stat=True)

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        embeddings: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        indices_tuple: Optional[IndicesTuple] = None,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
    ) -> Any:
        """PML's ``forward`` (checks, ``ref_emb``/``ref_labels`` defaulting, reducer), with
        this package's input checks first: ``ValueError`` naming the problem.

        The finite check's one host read is made here, in this frame: eagerly before PML's
        pipeline runs; under ``torch.compile``, when no module of the loss collects stats
        (its distance, reducer, regularizer: stats read the host anyway), after it, so that
        the graph breaks once, at its end, and the loss is one graph -- nothing has changed
        by then (without stats the loss holds no state), and the error is the same
        ``ValueError``.
        """
        self.check_inputs(embeddings, labels, ref_emb, ref_labels, finite=False)
        # the pairs' checks too before PML's pipeline, which resets the stats first; PML's tuple is
        # handed on as it came (compute_loss, a hook subclasses override, gets what PML's gets) and
        # make_problem turns it into masks: twice for explicit pairs, which take the dense path
        refs = embeddings if ref_emb is None else ref_emb
        if indices_tuple is not None:
            self._explicit_pairs(indices_tuple, embeddings, refs)
        else:
            self._check_label_defined(embeddings, labels, refs, labels if ref_emb is None else ref_labels)
        probe = _checks.finite_probe(embeddings, ref_emb) if self.check_finite else None
        # a non-finite probe (or an overflowing sum of finite values) takes the exact check; the
        # reads stay in this frame (a read in a nested call breaks the graph at every level);
        # compiled, the read is a branch on a 0-d bool tensor: dynamo breaks the graph there
        # without the warning a traced .item() prints
        defer = torch.compiler.is_compiling() and not any(
            getattr(m, "collect_stats", False) for m in self.modules()
        )  # (the module scan only while tracing: eager steps skip it)
        if probe is not None and not defer and not _checks.probe_is_finite(probe):
            self.check_inputs(embeddings, labels, ref_emb, ref_labels)
        loss = super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if probe is not None and defer and not torch.isfinite(probe):
            self.check_inputs(embeddings, labels, ref_emb, ref_labels)
        return loss

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: Optional[torch.Tensor],
        indices_tuple: Optional[IndicesTuple],
        ref_emb: torch.Tensor,
        ref_labels: Optional[torch.Tensor],
    ) -> Dict[str, Any]:
        """PML's hook, called by ``forward``: one :class:`MSProblem`, then its loss dict."""
        problem = self.make_problem(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return self._loss_dict(problem)

    def make_problem(
        self,
        embeddings: torch.Tensor,
        labels: Optional[torch.Tensor],
        indices_tuple: Optional[IndicesTuple] = None,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
    ) -> MSProblem:
        """The :class:`MSProblem` of PML's ``forward`` arguments (the edge of the pipeline).

        ``ref_emb=None`` means the batch itself. Self pairs are dropped as PML
        drops them: when ``ref_labels is labels`` (PML's loss) and, with fused
        mining (``epsilon``), when ``ref_emb is embeddings`` (PML's miner). An
        ``indices_tuple`` (PML's ``(a, p, n)`` or ``(a1, p, a2, n)``) becomes explicit pair
        masks here.

        Raises:
            ValueError: labels missing without an ``indices_tuple``; a
                ``ref_emb`` of another length without ``ref_labels``; a bad
                ``indices_tuple`` (see ``forward``) or a pair listed both as
                positive and as negative.
        """
        if ref_emb is None:
            ref_emb, ref_labels = embeddings, labels
        if indices_tuple is not None:
            masks = self._explicit_pairs(indices_tuple, embeddings, ref_emb)
            return MSProblem(embeddings, labels, ref_emb, ref_labels, pairs=masks, references_checked=True)
        self._check_label_defined(embeddings, labels, ref_emb, ref_labels)
        if ref_labels is None:  # PML's rule: the batch's labels, self pairs removed
            ref_labels = labels
        same = ref_labels is labels or (self.epsilon is not None and ref_emb is embeddings)
        self_index = _blocks.arange(len(embeddings), embeddings) if same else None  # read-only
        return MSProblem(
            embeddings,
            labels,
            ref_emb,
            ref_labels,
            self_index,
            references_checked=True,
            own_diagonal=same and ref_emb is embeddings,
        )

    @staticmethod
    def _explicit_pairs(
        indices_tuple: IndicesTuple, embeddings: torch.Tensor, refs: torch.Tensor
    ) -> _blocks.PairMasks:
        """The checked pair masks of a PML index tuple (``ValueError`` naming what is wrong)."""
        _checks.indices_tuple(indices_tuple, len(embeddings), len(refs))
        pairs = lmu.convert_to_pairs(indices_tuple, None, None)  # (labels: only for a missing tuple)
        return _blocks.masks_from_pairs(pairs, (len(embeddings), len(refs)), embeddings.device)

    @staticmethod
    def _check_label_defined(
        embeddings: torch.Tensor,
        labels: Optional[torch.Tensor],
        refs: torch.Tensor,
        ref_labels: Optional[torch.Tensor],
    ) -> None:
        """Pairs from labels need labels, and references of another length their own labels."""
        if labels is None:
            raise ValueError("labels are required when indices_tuple is None")
        _checks.reference_labels_given(len(embeddings), len(refs), ref_labels)

    def forward_problem(self, problem: MSProblem) -> torch.Tensor:
        """The reduced loss of a prepared :class:`MSProblem`, as ``forward`` reduces it.

        For wrappers that build problems themselves (``CrossBatchMemory``: the
        batch against its memory, with each anchor's own copy): the same
        per-anchor losses, embedding regularizer and reducer as ``forward``.
        """
        self.reset_stats()
        self._check_problem(problem)
        loss_dict = self._loss_dict(problem)
        self.add_embedding_regularization_to_loss_dict(loss_dict, problem.anchors)
        return self.reducer(loss_dict, problem.anchors, problem.labels)

    def terms(self, problem: MSProblem) -> F_ms.MSTerms:
        """Per-anchor :class:`~pml_ms_plus.functional.MSTerms` of a problem (fused or dense path)."""
        return self._terms_and_path(problem)[0]

    def _terms_and_path(self, problem: MSProblem) -> Tuple[F_ms.MSTerms, bool]:
        """:meth:`terms`, and whether the fused path computed them."""
        fused = self._use_fused(problem)
        return (self._fused_terms(problem) if fused else self._dense_terms(problem)), fused

    def _loss_dict(self, problem: MSProblem) -> Dict[str, Any]:
        if problem.num_anchors == 0 or problem.num_references == 0 or self._only_self_pair(problem):
            self._record(None)  # no pairs: PML's zero loss (no distance computed, as PML computes none)
            return self.zero_losses()
        terms, fused = self._terms_and_path(problem)
        # the dense path: PML's zero loss, the graph through the distance dropped; the fused path
        # (whose closed-form backward is finite) where the reducer hands the dict itself back
        if (not fused or self._hands_back_the_dict()) and self._kept_no_pair(problem, terms):
            self._record(None)
            return self.zero_losses()
        self._record(terms)
        losses = terms.losses
        if losses.dtype != problem.anchors.dtype:  # the compute dtype of half-precision anchors
            losses = losses.to(problem.anchors.dtype)
        if not isinstance(self.reducer, pml_reducers.ClassWeightedReducer):
            losses = losses[:, None]  # PML's shape, (B, 1); see the README for ClassWeightedReducer
        return {
            "loss": {
                "losses": losses,
                "indices": _blocks.arange(problem.num_anchors, problem.anchors),
                "reduction_type": "element",
            }
        }

    def _kept_no_pair(self, problem: MSProblem, terms: F_ms.MSTerms) -> bool:
        """Whether the dense path kept no pair at all: explicit pairs, none of them (an empty
        tuple, a miner that kept nothing), or a mining that dropped every pair. PML computes
        no distance then, and the loss must not reach it here either: a distance's backward
        at degenerate rows (``SNRDistance`` of a constant row, a zero row normalised in half
        precision) is ``0 * inf = NaN`` even for zero weights. One host read, made only where
        the pairs are explicit or mined (label-defined pairs are never all missing once
        :meth:`_only_self_pair` is ruled out); the fused path's closed-form backward is finite."""
        if problem.pairs is None and self.epsilon is None:
            return False
        return not bool((terms.num_pos.sum() + terms.num_neg.sum()) > 0)

    def _hands_back_the_dict(self) -> bool:
        """Whether the reducer returns the loss dict itself (PML's ``DoNothingReducer``): its form,
        PML's zero loss or element losses, is then seen, so the fused path counts the kept pairs
        to tell (one host read)."""
        return isinstance(self.reducer, pml_reducers.DoNothingReducer)

    @staticmethod
    def _only_self_pair(problem: MSProblem) -> bool:
        """One anchor against one reference, its own copy (a batch of one): no pair at all. The
        one host read is made for that shape alone."""
        if problem.num_anchors != 1 or problem.num_references != 1 or problem.self_index is None:
            return False
        return problem.pairs is None and int(problem.self_index[0]) == 0

    def check_inputs(
        self,
        embeddings: torch.Tensor,
        labels: Optional[torch.Tensor],
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
        finite: bool = True,
    ) -> None:
        """The checks of ``forward``: shapes, label dtypes and (``finite`` and ``check_finite``)
        finiteness; ``ValueError`` naming the problem. For wrappers that check a batch before
        they act on it (``CrossBatchMemory`` before enqueueing; under ``torch.distributed`` every
        rank's verdict is exchanged first, so that all refuse alike). ``AdaptiveMSLoss`` adds its
        label range (learned thresholds)."""
        _checks.batch_and_references(embeddings, labels, ref_emb, ref_labels, finite and self.check_finite)

    def _check_problem(self, problem: MSProblem) -> None:
        """The checks of ``forward``, for a problem built elsewhere."""
        refs = None if problem.references_checked or problem.in_batch else problem.references
        self.check_inputs(problem.anchors, problem.labels, refs, problem.ref_labels)

    # ------------------------------------------------------------ the two paths
    def _use_fused(self, problem: MSProblem) -> bool:
        d = self.distance
        applies = (
            type(d) in _FAST_DISTANCES
            and d.power == 1
            and problem.labels is not None
            and problem.ref_labels is not None
            and problem.pairs is None
        )
        if self.fused and not applies:
            raise ValueError(
                "fused=True: the fused path needs CosineSimilarity or DotProductSimilarity "
                "(power 1), labels and no indices_tuple"
            )
        return applies and self.fused is not False

    def _sign(self) -> float:
        """+1 for similarities, -1 for distances (see functional's orientation)."""
        return 1.0 if self.distance.is_inverted else -1.0

    def _fused_terms(self, problem: MSProblem) -> F_ms.MSTerms:
        d = self.distance
        embeddings, ref_emb = problem.anchors, problem.references
        dtype = _blocks.compute_dtype(embeddings.dtype)
        x = _blocks.cast(embeddings, dtype)
        # the anchors' 2-normalisation inside the kernel (closed-form backward); other p: PML's
        units = _kernel.unit_rows(x) if d.normalize_embeddings and d.p == 2 else None
        if units is None:
            x = d.maybe_normalize(x)
        x_sim = x if units is None else units.unit  # the anchors as the similarity sees them
        ref_norm_p = None
        if problem.in_batch:
            y, y_sim = x, x_sim
        elif d.normalize_embeddings and not ref_emb.requires_grad:
            y, ref_norm_p = ref_emb.to(dtype), d.p  # e.g. a memory: normalised block by block
            y_sim = y
        else:
            y = y_sim = d.maybe_normalize(ref_emb.to(dtype))
        if d.collect_stats:
            d.reset_stats()
            y_stats = y_sim if ref_norm_p is None else d.maybe_normalize(y)
            d.set_default_stats(embeddings, ref_emb, x_sim, y_stats)
        labels, ref_labels = problem.labels, problem.ref_labels
        assert labels is not None and ref_labels is not None  # the fused path needs labels
        self_index = problem.self_index
        if self_index is None:
            self_index = _blocks.full(len(x), -1, torch.long, x)
        sims = FusedSimilarities(
            x_sim,
            y_sim,
            labels,
            ref_labels,
            self_index,
            self.chunk_size,
            ref_norm_p,
        )
        lam = self.problem_thresholds(problem, sims)
        return _kernel.ms_terms_fused(
            x,
            y,
            labels,
            ref_labels,
            self_index,
            lam.pos,
            lam.neg,
            alpha=self.alpha,
            beta=self.beta,
            weighting=self.weighting,
            epsilon=self.epsilon,
            chunk_size=self.chunk_size,
            memory_budget=self.memory_budget,
            counts=self.collect_stats or (self.epsilon is not None and self._hands_back_the_dict()),
            ref_norm_p=ref_norm_p,
            anchor_units=units,
            compile_blocks=self.compile_blocks,
            own_diagonal=problem.own_diagonal and problem.in_batch,
        )

    def _dense_block(self, problem: MSProblem) -> DenseSimilarities:
        """``S`` (similarity orientation) and the pair masks of a problem."""
        mat = self.distance(problem.anchors, problem.references)
        S = mat if self.distance.is_inverted else -mat
        if problem.pairs is not None:
            pos, neg = problem.pairs
        else:
            assert problem.labels is not None, "make_problem requires labels without explicit pairs"
            pos, neg = _blocks.pair_masks(problem.labels, problem.ref_labels, problem.self_index)
        return DenseSimilarities(S, pos, neg)

    def _dense_inputs(self, problem: MSProblem) -> Tuple[DenseSimilarities, _blocks.MSParams]:
        """The dense block of a problem and the parameters of the dense block functions."""
        sims = self._dense_block(problem)
        lam = self.problem_thresholds(problem, sims)
        epsilon = self.epsilon if problem.pairs is None else None  # explicit pairs are used as given
        similarity = self.distance.is_inverted
        params = _blocks.MSParams(
            self.alpha, self.beta, lam.pos, lam.neg, self.weighting, epsilon, similarity
        )
        return sims, params

    def _dense_terms(self, problem: MSProblem) -> F_ms.MSTerms:
        sims, params = self._dense_inputs(problem)
        return _blocks.dense_terms(sims.S, sims.pos, sims.neg, params)

    def problem_thresholds(self, problem: MSProblem, sims: Similarities) -> Thresholds:
        """Per-anchor :class:`Thresholds` ``(B,)`` in similarity orientation: ``base`` here.

        Subclasses with adaptive thresholds override this; ``sims.row_sums()``
        gives each anchor's sums over its unmined pairs (see ``AdaptiveMSLoss``).
        """
        # a constant (read-only; see _blocks.constant): one operator call less per step
        lam = _blocks.full(problem.num_anchors, self._sign() * self.base, sims.dtype, problem.anchors)
        return Thresholds(lam, lam)

    # ----------------------------------------------------------------- extras
    def _record(self, terms: Optional[F_ms.MSTerms]) -> None:
        if not self.collect_stats:
            return
        if terms is None:
            self.num_pos_pairs = self.num_neg_pairs = self.num_nonzero_anchors = 0
            self.mean_pos_weight = self.mean_neg_weight = 0.0
            return
        with torch.no_grad():
            n_pos = int(terms.num_pos.sum())
            n_neg = int(terms.num_neg.sum())
            self.num_pos_pairs = n_pos
            self.num_neg_pairs = n_neg
            self.num_nonzero_anchors = int((terms.losses > 0).sum())
            self.mean_pos_weight = float(terms.pos_weight_sum.sum()) / max(1, n_pos)
            self.mean_neg_weight = float(terms.neg_weight_sum.sum()) / max(1, n_neg)

    @torch.no_grad()
    def mined_pairs(self, problem: MSProblem) -> _blocks.MinedPairs:
        """The pairs the hard-pair rule (``epsilon``) keeps in a problem of label-defined
        pairs, as PML's ``(a1, p, a2, n)``: the pairs ``forward`` mines inside (each anchor's
        own copy dropped first), as an index tuple. For wrappers that add pairs of their own
        to the mined ones (``CrossBatchMemory`` given an ``indices_tuple``).

        Raises:
            ValueError: without ``epsilon``, or for a problem with explicit pairs.

        Example:
            >>> from pml_ms_plus.miners import MultiSimilarityMiner
            >>> x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
            >>> y = torch.arange(16) % 4
            >>> loss = MSLoss(epsilon=0.1)
            >>> mined = loss.mined_pairs(loss.make_problem(x, y))
            >>> [len(t) for t in mined] == [len(t) for t in MultiSimilarityMiner(0.1)(x, y)]
            True
        """
        if self.epsilon is None or problem.pairs is not None:
            raise ValueError("mined_pairs needs epsilon and a problem of label-defined pairs")
        sims = self._dense_block(problem)
        block = _blocks.block_from_masks(sims.S.detach(), sims.pos, sims.neg)
        return _blocks.mined_pairs(block, self.epsilon, similarity=self.distance.is_inverted)

    @torch.no_grad()
    def pair_weights(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
    ) -> F_ms.PairWeights:
        """Dense GPW weights for a batch, as this loss sees it (same pairs, mining,
        thresholds and weighting as ``forward``).

        Returns:
            :class:`~pml_ms_plus.functional.PairWeights` ``(pos, neg)``, ``(B, M)``:
            ``pos = -dL_i/dS_ij`` on positive pairs, ``neg = dL_i/dS_ij`` on negative
            pairs (``S`` in similarity orientation), 0 elsewhere.

        Example:
            >>> x = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
            >>> w = MSLoss().pair_weights(x, torch.tensor([0, 0, 1]))
            >>> w.pos.shape, bool((w.neg >= 0).all())
            (torch.Size([3, 3]), True)
        """
        self.check_inputs(embeddings, labels, ref_emb, ref_labels)
        labels = labels.to(embeddings.device)
        if ref_emb is not None:
            if ref_labels is None:
                raise ValueError("pair_weights: ref_labels is required with ref_emb")
            ref_labels = ref_labels.to(ref_emb.device)
        problem = self.make_problem(embeddings, labels, None, ref_emb, ref_labels)
        sims, params = self._dense_inputs(problem)
        return _blocks.dense_pair_weights(sims.S, sims.pos, sims.neg, params)


class DenseSimilarities(NamedTuple):
    """The dense block of a problem: ``S`` ``(B, M)`` and its pair masks."""

    S: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return _blocks.compute_dtype(self.S.dtype)

    @property
    def device(self) -> torch.device:
        return self.S.device

    @torch.no_grad()
    def row_sums(self) -> _blocks.RowSums:
        """Each anchor's sums and counts of positive and negative similarities (unmined)."""
        S = self.S.detach().to(self.dtype)
        return _blocks.block_row_sums(_blocks.block_from_masks(S, self.pos, self.neg))


class FusedSimilarities(NamedTuple):
    """The similarities ``x @ y.T`` of the fused path, never materialised whole."""

    x: torch.Tensor
    y: torch.Tensor
    labels: torch.Tensor
    ref_labels: torch.Tensor
    self_index: torch.Tensor
    chunk_size: Optional[int]
    ref_norm_p: Optional[float]

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    def row_sums(self) -> _blocks.RowSums:
        """As :meth:`DenseSimilarities.row_sums`, block by block (no gradient)."""
        return _kernel.centre_sums(
            self.x.detach(),
            self.y.detach(),
            self.labels,
            self.ref_labels,
            self.self_index,
            chunk_size=self.chunk_size,
            ref_norm_p=self.ref_norm_p,
        )


Similarities = Union[DenseSimilarities, FusedSimilarities]


MSLoss = MultiSimilarityLoss
