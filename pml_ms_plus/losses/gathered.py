"""``GatheredMSLoss``: an MS-family loss over the global batch of a data-parallel job."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.reducers import MeanReducer, MultipleReducers

from .. import _distributed
from .ms import MultiSimilarityLoss
from .problem import MSProblem

ANCHOR_MODES = ("auto", "local", "all")


def _means(reducer: Any) -> bool:
    """PML's ``MeanReducer``, or its ``MultipleReducers`` of them (what a loss with an embedding
    regularizer holds: one reducer per sub-loss, their results summed)."""
    if type(reducer) is MultipleReducers:
        return _means(reducer.default_reducer) and all(_means(r) for r in reducer.reducers.values())
    return type(reducer) is MeanReducer


def reduces_by_mean(loss: MultiSimilarityLoss) -> bool:
    """Whether ``loss`` reduces its per-anchor losses (and its embedding regularizer, if any) with
    PML's ``MeanReducer``: then the mean over ranks of per-rank means is the global mean."""
    reg = getattr(loss, "embedding_regularizer", None)
    return _means(loss.reducer) and (reg is None or _means(reg.reducer))


class GatheredMSLoss(torch.nn.Module):
    r"""An MS-family loss over the global batch of a data-parallel (DDP) job.

    Every rank passes its own share of the batch; the wrapper all-gathers embeddings (with their
    gradient) and labels, so the loss sees the batch of every rank, as one process would see the
    whole batch. With ``W`` ranks of ``B`` rows each (equal shares are required), ``N = W B``,
    and :math:`\ell_i` anchor ``i``'s MS loss against all ``N`` rows (its own copy excluded):

    * ``anchors="local"`` (the default under PML's ``MeanReducer``): rank ``r`` returns
      :math:`L_r = \frac1B\sum_{i \in r} \ell_i`, its own anchors against everyone's rows. The
      mean of the :math:`L_r` over ranks is the single-process loss :math:`\frac1N\sum_i \ell_i`,
      and with DDP's gradient averaging the parameter gradients equal the single-process ones
      exactly: the gather's backward sums, onto each row's owner, the gradients that every rank's
      loss puts on that row (a reduce-scatter), and DDP divides by ``W``. Cost per rank:
      ``B x N`` similarities.
    * ``anchors="all"`` (the default under any other reducer, e.g. ``AvgNonZeroReducer``, whose
      per-rank count of nonzero losses would not average to the global one): every rank computes
      the single-process loss of the whole gathered batch and returns it. Exact for any reducer;
      cost per rank ``N x N``.

    The wrapped loss's own parameters (``AdaptiveMSLoss(margin_mode="learned")``'s thresholds)
    get their gradients averaged over the ranks as soon as ``backward`` has accumulated them, as
    DDP does for a model's parameters: they receive the single-process gradient on every rank,
    so identically initialised thresholds stay identical. (The hooks are registered on the
    parameters when the wrapper is built and do nothing without a process group.)

    Each call first checks its share (shapes, label dtypes, a learned threshold's label range)
    and exchanges every rank's verdict with what decides the collectives that follow (rows,
    width, dtype, device type, whether the embeddings require grad: one all-gather of eight
    integers, read on the host): a bad share on any rank, or shares that differ, raise a clear
    ``ValueError`` on every rank alike instead of mismatched collectives. Then it gathers
    the embeddings and the labels (as int64: ranks may pass different integer dtypes), two
    all-gathers of ``B x D`` and ``B``.

    Without an initialised process group, or with one rank, ``forward`` is
    ``loss(embeddings, labels)``. Mining (``epsilon``), ``weighting``, adaptive thresholds,
    distances, the regularizer and the fused path are the wrapped loss's, applied to the global
    batch. ``CrossBatchMemory`` gathers by itself (``gather="auto"``): use it directly.

    Args:
        loss: an :class:`MSLoss` or :class:`AdaptiveMSLoss`.
        anchors: ``"auto"``, ``"local"`` or ``"all"`` (see above). ``"local"`` is refused
            unless the loss reduces by ``MeanReducer`` (it would not be exact).

    Raises:
        TypeError: a loss outside the MS family (for other PML losses use PML's
            ``DistributedLossWrapper``).
        ValueError: an unknown ``anchors``, or ``"local"`` with another reducer; in
            ``forward``: missing labels, unequal batch sizes, widths or dtypes on the ranks,
            and the wrapped loss's own input errors (raised on every rank alike: a rank's
            refused share, NaN/inf in the gathered rows).

    Shape:
        ``embeddings``: ``(B, D)`` (this rank's share); ``labels``: ``(B,)``; output: a scalar.

    Example:
        >>> from pml_ms_plus.losses import MSLoss
        >>> loss_fn = GatheredMSLoss(MSLoss(epsilon=0.1))  # one process: the in-batch loss
        >>> x, y = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 4
        >>> loss_fn.anchors, bool(torch.equal(loss_fn(x, y), MSLoss(epsilon=0.1)(x, y)))
        ('local', True)
    """

    def __init__(self, loss: MultiSimilarityLoss, *, anchors: str = "auto") -> None:
        from .memory import CrossBatchMemory

        if isinstance(loss, CrossBatchMemory):
            raise TypeError(
                "GatheredMSLoss: CrossBatchMemory all-gathers each batch by itself (gather='auto'); "
                "use it directly under DDP"
            )
        if not isinstance(loss, MultiSimilarityLoss):
            raise TypeError(
                "GatheredMSLoss takes a loss of the pml_ms_plus MS family (MSLoss, AdaptiveMSLoss), got "
                f"{type(loss).__name__}; for other PML losses use PML's DistributedLossWrapper"
            )
        if anchors not in ANCHOR_MODES:
            raise ValueError(f"anchors must be one of {ANCHOR_MODES}, got {anchors!r}")
        mean = reduces_by_mean(loss)
        if anchors == "local" and not mean:
            raise ValueError(
                f"anchors='local' needs PML's MeanReducer (the loss has {type(loss.reducer).__name__}): "
                "per-rank reductions would not average to the global one; use anchors='all' (or 'auto')"
            )
        super().__init__()
        self.loss = loss
        self.anchors = anchors if anchors != "auto" else ("local" if mean else "all")
        _distributed.average_gradients_in_backward(loss.parameters())

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Any:
        """This rank's share of the global loss (see the class docstring).

        Args:
            embeddings: ``(B, D)``, this rank's rows.
            labels: ``(B,)`` class ids.

        Returns:
            A scalar: ``L_r`` (``"local"``) or the whole batch's loss (``"all"``).
        """
        if _distributed.world_size() == 1:
            self._check_share(embeddings, labels, by_the_loss=False)  # the loss checks the rest
            return self.loss(embeddings, labels)
        # every rank's verdict on its share first (a rank that raised alone would leave the others
        # waiting in the gather); the finite check runs on the gathered rows, alike everywhere
        _distributed.agree_before_gathering(
            "GatheredMSLoss", self.loss, embeddings, lambda: self._check_share(embeddings, labels)
        )
        labels = labels.to(embeddings.device).long()  # class ids; one dtype on every rank for the gather
        everyone = _distributed.all_gather(embeddings, grad=True)
        everyone_labels = _distributed.all_gather(labels)
        if self.anchors == "all":
            loss = self.loss(everyone, everyone_labels)
        else:
            problem = MSProblem.against_gathered(
                embeddings, labels, everyone, everyone_labels, _distributed.rank()
            )
            loss = self.loss.forward_problem(problem)
        # every rank's backward reaches the gather and the loss's own parameters: their
        # collectives run on every rank alike
        return _distributed.reaching(loss, [everyone, *self.loss.parameters()])

    def _check_share(self, embeddings: torch.Tensor, labels: torch.Tensor, by_the_loss: bool = True) -> None:
        """This rank's share: a 2D tensor and a tensor of class ids; ``by_the_loss``: also as the
        loss checks them (finiteness aside)."""
        if not torch.is_tensor(labels):
            raise ValueError(
                f"GatheredMSLoss needs labels as a tensor of class ids, got {type(labels).__name__}"
            )
        if not torch.is_tensor(embeddings) or embeddings.dim() != 2:
            raise ValueError("GatheredMSLoss needs embeddings as a 2D tensor (B, D)")
        if by_the_loss:
            self.loss.check_inputs(embeddings, labels, finite=False)
