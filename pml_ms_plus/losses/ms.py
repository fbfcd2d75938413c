"""``MSLoss``: PML's ``MultiSimilarityLoss`` with fused mining, GPW modes and stats."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .. import _checks, _kernel
from .. import functional as F_ms

_STATS = ["num_pos_pairs", "num_neg_pairs", "num_nonzero_anchors", "mean_pos_weight", "mean_neg_weight"]
_FAST_DISTANCES = (CosineSimilarity, DotProductSimilarity)


class MultiSimilarityLoss(pml_losses.MultiSimilarityLoss):
    """Multi-Similarity loss (Wang et al., CVPR 2019), a drop-in for PML's.

    For anchor ``i`` with positive set ``P_i`` and negative set ``N_i`` (pairs
    from labels without self-comparisons, from ``indices_tuple``, or narrowed by
    the hard-pair rule when ``epsilon`` is set), with ``m(a, b)`` the distance's
    margin (``b - a`` for similarities)::

        L_i = 1/alpha * log(1 + sum_P exp(alpha * m(S_ij, base)))
            + 1/beta  * log(1 + sum_N exp(beta  * m(base, S_ij)))

    Each anchor's loss goes to the PML reducer as an element loss, like PML.
    ``weighting="self"`` / ``"relative"`` select the other General Pair
    Weighting modes (see :mod:`pml_ms_plus.functional`).

    Args:
        alpha, beta: positive and negative scales (> 0).
        base: the similarity threshold lambda.
        epsilon: if not ``None``, the MS paper's hard-pair mining runs inside
            the loss whenever no ``indices_tuple`` is given (no index tuples are
            built); an explicit ``indices_tuple`` is used as it is.
        weighting: ``"ms"``, ``"self"`` or ``"relative"``.
        check_finite: raise ``ValueError`` on NaN/inf embeddings (default);
            ``False`` restores PyTorch's NaN-in, NaN-out behaviour.
        chunk_size: references per block on the fused path (default
            ``2**22 // batch_size``); bounds the extra memory.
        fused: ``None`` (default) takes the fused path where it applies;
            ``False`` forces the dense autograd path; ``True`` requires the
            fused path (``ValueError`` where it does not apply). For debugging
            and benchmarking: both paths give the same numbers.
        **kwargs: PML's ``distance``, ``reducer``, ``embedding_regularizer``,
            ``collect_stats``.

    The class is named ``MultiSimilarityLoss`` so PML's ``CrossBatchMemory``
    accepts it; it is exported as ``MSLoss`` too. Inner-product distances
    (``CosineSimilarity``, ``DotProductSimilarity``) with labels and no
    ``indices_tuple`` take the fused, chunked path of :mod:`pml_ms_plus._kernel`;
    everything else the dense autograd path. Both give PML's numbers.

    Recorded stats (``collect_stats=True``): ``num_pos_pairs``,
    ``num_neg_pairs``, ``num_nonzero_anchors``, ``mean_pos_weight``,
    ``mean_neg_weight``.
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
        fused: Optional[bool] = None,
        **kwargs,
    ):
        _checks.positive("alpha", alpha)
        _checks.positive("beta", beta)
        _checks.finite_number("base", base)
        _checks.optional_non_negative("epsilon", epsilon)
        F_ms.check_weighting(weighting)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        super().__init__(alpha=alpha, beta=beta, base=base, **kwargs)
        self.fused = fused
        self.epsilon = epsilon
        self.weighting = weighting
        self.check_finite = check_finite
        self.chunk_size = chunk_size
        self.add_to_recordable_attributes(list_of_names=["epsilon"], is_stat=False)
        self.add_to_recordable_attributes(list_of_names=_STATS, is_stat=True)

    # ----------------------------------------------------------------- forward
    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return self._forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _forward(
        self,
        embeddings: torch.Tensor,
        labels: Optional[torch.Tensor],
        indices_tuple=None,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
        self_index: Optional[torch.Tensor] = None,
        masks: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        trusted_ref: bool = False,
    ) -> torch.Tensor:
        """PML's forward, plus the inputs the memory wrapper needs.

        ``self_index``: column of each anchor's own copy in ``ref_emb``;
        ``masks``: explicit ``(pos, neg)`` masks instead of labels/tuples;
        ``trusted_ref``: ``ref_emb`` was checked already (a memory of checked batches).
        """
        self.reset_stats()
        self._check_inputs(embeddings, labels, None if trusted_ref else ref_emb, ref_labels)
        if labels is not None:
            labels = labels.to(embeddings.device)
        if ref_emb is None:
            ref_emb, ref_labels = embeddings, labels
        elif ref_labels is not None:
            ref_labels = ref_labels.to(ref_emb.device)
        loss_dict = self.compute_loss(
            embeddings, labels, indices_tuple, ref_emb, ref_labels, self_index=self_index, masks=masks
        )
        self.add_embedding_regularization_to_loss_dict(loss_dict, embeddings)
        return self.reducer(loss_dict, embeddings, labels)

    def _check_inputs(self, embeddings, labels, ref_emb, ref_labels):
        _checks.embeddings_and_labels(embeddings, labels, self.check_finite)
        if ref_emb is not None:
            _checks.embeddings_and_labels(ref_emb, ref_labels, self.check_finite, "ref_emb", "ref_labels")
            if ref_emb.shape[1] != embeddings.shape[1]:
                raise ValueError(
                    f"ref_emb has width {ref_emb.shape[1]} but embeddings has width {embeddings.shape[1]}"
                )

    def compute_loss(
        self, embeddings, labels, indices_tuple, ref_emb, ref_labels, self_index=None, masks=None
    ):
        if ref_labels is None and labels is not None and indices_tuple is None and masks is None:
            if len(ref_emb) != len(embeddings):
                raise ValueError(
                    f"ref_labels is required: ref_emb has {len(ref_emb)} rows, embeddings {len(embeddings)}"
                )
            ref_labels = labels  # PML's rule: the batch's labels, self pairs removed
        if len(embeddings) == 0 or len(ref_emb) == 0:  # no pairs: PML's zero loss
            self._record(None)
            return self.zero_losses()
        if self_index is None and masks is None and indices_tuple is None:
            self_index = self._self_index(embeddings, labels, ref_emb, ref_labels)
        if self._use_fused(labels, ref_labels, indices_tuple, masks):
            terms = self._fused_terms(embeddings, labels, ref_emb, ref_labels, self_index)
        else:
            problem = self._dense_problem(
                embeddings, labels, indices_tuple, ref_emb, ref_labels, self_index, masks
            )
            terms = F_ms.ms_terms(*problem[:3], **problem[3])
        self._record(terms)
        losses = terms.losses.to(embeddings.dtype)
        if not isinstance(self.reducer, pml_reducers.ClassWeightedReducer):
            losses = losses[:, None]  # PML's shape, (B, 1); see the README for ClassWeightedReducer
        return {
            "loss": {
                "losses": losses,
                "indices": torch.arange(len(embeddings), device=embeddings.device),
                "reduction_type": "element",
            }
        }

    def _self_index(self, embeddings, labels, ref_emb, ref_labels) -> Optional[torch.Tensor]:
        """Each anchor's own column when the references are the batch itself, PML's rule.

        PML's loss drops self pairs when ``ref_labels is labels`` (after its
        ``ref_emb``/``ref_labels`` defaulting); PML's miner, whose pairs the fused
        mining (``epsilon``) reproduces, ignores them when ``ref_emb is
        embeddings`` too.
        """
        same = ref_labels is labels or (self.epsilon is not None and ref_emb is embeddings)
        return torch.arange(len(embeddings), device=embeddings.device) if same else None

    # ------------------------------------------------------------ the two paths
    def _use_fused(self, labels, ref_labels, indices_tuple, masks) -> bool:
        d = self.distance
        applies = (
            type(d) in _FAST_DISTANCES
            and d.power == 1
            and labels is not None
            and ref_labels is not None
            and indices_tuple is None
            and masks is None
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

    def _fused_terms(self, embeddings, labels, ref_emb, ref_labels, self_index) -> F_ms.MSTerms:
        d = self.distance
        dtype = F_ms.compute_dtype(embeddings.dtype)
        x = d.maybe_normalize(embeddings.to(dtype))
        ref_norm_p = None
        if ref_emb is embeddings:
            y = x
        elif d.normalize_embeddings and not ref_emb.requires_grad:
            y, ref_norm_p = ref_emb.to(dtype), d.p  # e.g. a memory: normalised block by block
        else:
            y = d.maybe_normalize(ref_emb.to(dtype))
        if d.collect_stats:
            d.reset_stats()
            d.set_default_stats(embeddings, ref_emb, x, y if ref_norm_p is None else d.maybe_normalize(y))
        if self_index is None:
            self_index = torch.full((len(x),), -1, dtype=torch.long, device=x.device)

        def centre_sums():
            return _kernel.centre_sums(
                x.detach(), y.detach(), labels, ref_labels, self_index, self.chunk_size, ref_norm_p
            )

        lam_pos, lam_neg = self._thresholds(labels, len(x), x.dtype, x.device, centre_sums)
        return _kernel.ms_terms_fused(
            x,
            y,
            labels,
            ref_labels,
            self_index,
            lam_pos,
            lam_neg,
            alpha=self.alpha,
            beta=self.beta,
            weighting=self.weighting,
            epsilon=self.epsilon,
            chunk_size=self.chunk_size,
            counts=self.collect_stats,
            ref_norm_p=ref_norm_p,
        )

    def _dense_problem(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, self_index, masks):
        """``(S, pos, neg, kwargs)`` for :func:`functional.ms_terms` (similarity orientation)."""
        mat = self.distance(embeddings, ref_emb)
        S = mat if self.distance.is_inverted else -mat
        epsilon = None
        if masks is not None:
            pos, neg = masks
        elif indices_tuple is not None:
            pairs = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
            pos, neg = F_ms.masks_from_pairs(pairs, tuple(S.shape), S.device)
        else:
            if labels is None or ref_labels is None:
                raise ValueError(
                    "labels (and ref_labels with ref_emb) are required when indices_tuple is None"
                )
            pos, neg = F_ms.pair_masks(labels, ref_labels, self_index)
            epsilon = self.epsilon

        def centre_sums():
            with torch.no_grad():
                return F_ms.block_row_sums(
                    F_ms.block_from_masks(S.detach().to(F_ms.compute_dtype(S.dtype)), pos, neg)
                )

        lam_pos, lam_neg = self._thresholds(
            labels, S.shape[0], F_ms.compute_dtype(S.dtype), S.device, centre_sums
        )
        kwargs = dict(
            alpha=self.alpha,
            beta=self.beta,
            lam_pos=lam_pos,
            lam_neg=lam_neg,
            weighting=self.weighting,
            epsilon=epsilon,
        )
        return S, pos, neg, kwargs

    def _thresholds(
        self,
        labels: Optional[torch.Tensor],
        n: int,
        dtype: torch.dtype,
        device: torch.device,
        centre_sums: Callable,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-anchor thresholds ``(lam_pos, lam_neg)``, ``(B,)``, similarity orientation.

        ``centre_sums()`` returns
        :func:`functional.block_row_sums` over the unmined pairs (used by
        subclasses with adaptive thresholds).
        """
        lam = torch.full((n,), self._sign() * self.base, dtype=dtype, device=device)
        return lam, lam

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
    def pair_weights(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Dense GPW weights ``(w_pos, w_neg)``, ``(B, M)``, for a batch, as this loss sees it.

        Same pairs, mining, thresholds and weighting as ``forward``;
        ``w_pos = -dL_i/dS_ij`` on positive pairs, ``w_neg = dL_i/dS_ij`` on
        negative pairs (``S`` in similarity orientation), 0 elsewhere.
        """
        self._check_inputs(embeddings, labels, ref_emb, ref_labels)
        labels = labels.to(embeddings.device)
        if ref_emb is None:
            ref_emb, ref_labels = embeddings, labels
        elif ref_labels is None:
            raise ValueError("pair_weights: ref_labels is required with ref_emb")
        else:
            ref_labels = ref_labels.to(ref_emb.device)
        self_index = self._self_index(embeddings, labels, ref_emb, ref_labels)
        S, pos, neg, kwargs = self._dense_problem(
            embeddings, labels, None, ref_emb, ref_labels, self_index, None
        )
        return F_ms.pair_weights(S, pos, neg, **kwargs)


MSLoss = MultiSimilarityLoss
