"""Private ``torch.distributed`` helpers shared by the losses: the rank-order gather (with or
without a gradient), the ranks' agreement on their inputs, and the averaging of a loss's own
parameter gradients.

Every collective here is issued by every rank in the same order (the callers guarantee it: the
same calls on every rank, the same number of rows), so none of them can pair up wrongly.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.distributed as dist
from pytorch_metric_learning.reducers import DoNothingReducer
from torch.autograd.function import once_differentiable


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised (with any number of ranks)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of ranks of the default group; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default group; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def _gather_parts(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class _AllGatherWithGrad(torch.autograd.Function):
    """Rank-order concatenation whose backward hands every rank the sum, over all ranks, of the
    gradients of its own rows (a reduce-scatter: NCCL's where it exists, else all-reduce + slice).
    Differentiable once: the collectives of the backward are not differentiated, so a second
    differentiation through it (a gradient penalty) raises instead of giving wrong numbers."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        ctx.rows = t.shape[0]
        return _gather_parts(t.detach())

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor]:
        n, me = ctx.rows, dist.get_rank()
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = torch.empty((n, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter(out, list(grad.split(n)))
            return (out,)
        total = grad.clone()
        dist.all_reduce(total)
        return (total[me * n : (me + 1) * n],)


def all_gather(t: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
    """``t`` of every rank concatenated in rank order (equal first dimensions required).

    With ``grad=True`` the result carries a gradient back to each rank's own ``t``: the sum of
    the gradients that every rank's loss puts on those rows.
    """
    if grad and t.requires_grad:
        out: torch.Tensor = _AllGatherWithGrad.apply(t)
        return out
    return _gather_parts(t.detach())


_EMBEDDING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # codes 0-3; -1: other
_DEVICE_TYPES = ("cpu", "cuda")  # codes 0-1; -1: other


def _collective_device(like: Any) -> torch.device:
    """Where a small collective's tensor lives: under NCCL (CUDA tensors only) on the current
    CUDA device whatever ``like`` is; else beside ``like`` (a tensor), or on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return like.device if torch.is_tensor(like) else torch.device("cpu")


def _code(value: Any, table: Tuple[Any, ...]) -> int:
    return table.index(value) if value in table else -1


# what every rank must agree on: (column name for the message, how a code reads back)
_AGREED = (
    ("batch sizes", None),
    ("embedding widths", None),
    ("embedding dtypes", lambda c: str(_EMBEDDING_DTYPES[c]).replace("torch.", "") if c >= 0 else "other"),
    ("devices", lambda c: _DEVICE_TYPES[c] if c >= 0 else "other"),
    ("enqueue masks (given or not)", lambda c: bool(c)),
    ("index tuples (given or not)", lambda c: bool(c)),
    ("embeddings requiring grad (or not)", lambda c: bool(c)),
)


def agree_on_inputs(
    who: str, embeddings: Any, error: Optional[Exception], *, masked: bool = False, tupled: bool = False
) -> None:
    """Every rank's verdict on its own input, exchanged before anything is gathered: one
    all-gather of eight integers per rank (refused; rows, width, dtype, device type, ``masked``:
    an enqueue mask given, ``tupled``: an index tuple given, whether the embeddings require
    grad), read on the host.

    Raises on every rank alike when any rank's input was refused (``error``, that rank's own
    check: it raises its own error, the others a ``ValueError`` naming the rank), or
    ``ValueError`` when the ranks differ in any of the seven -- each decides the collectives that
    follow (their sizes, an extra gather of the mask, an exchange of outcomes, a backward that
    all-reduces), so that no rank goes on alone into a collective its peers never join (it would
    wait there until the process group's timeout, or gloo aborts the process), and no rank's state
    (a memory) changes while another's does not."""
    if error is None:
        rows, width = embeddings.shape
        verdict = [
            0,
            rows,
            width,
            _code(embeddings.dtype, _EMBEDDING_DTYPES),
            _code(embeddings.device.type, _DEVICE_TYPES),
            int(masked),
            int(tupled),
            int(embeddings.requires_grad),
        ]
    else:
        verdict = [1] + [-1] * len(_AGREED)
    table = _gather_parts(torch.tensor([verdict], device=_collective_device(embeddings))).tolist()
    refused = [r for r, row in enumerate(table) if row[0]]
    if error is not None:
        raise error
    if refused:
        ranks = ", ".join(map(str, refused))
        raise ValueError(
            f"{who}: the input of rank {ranks} was refused (its error there names the problem); "
            "every rank refuses this call"
        )
    for column, (what, read) in enumerate(_AGREED, start=1):
        codes = [row[column] for row in table]
        if len(set(codes)) > 1:
            shown = codes if read is None else [read(c) for c in codes]
            raise ValueError(f"{who} needs equal {what} on every rank, got {shown}")


def agree_on_outcome(who: str, failure: Optional[Exception], like: torch.Tensor) -> Optional[Exception]:
    """Every rank's outcome of a step that may fail on one rank alone, exchanged (one all-gather
    of one integer per rank, read on the host): this rank's own ``failure``, else a ``ValueError``
    naming the ranks that failed, else ``None`` -- the same verdict on every rank, for a caller
    that then undoes the step everywhere or nowhere (``like``: a tensor of the step, for the
    collective's device)."""
    flag = torch.tensor([int(failure is not None)], device=_collective_device(like))
    failed = [r for r, f in enumerate(_gather_parts(flag).tolist()) if f]
    if failure is not None or not failed:
        return failure
    ranks = ", ".join(map(str, failed))
    return ValueError(
        f"{who}: the call failed on rank {ranks} (its error there names the problem); every rank refuses it"
    )


def _input_error(check: Callable[[], None]) -> Optional[Exception]:
    """The exception that ``check()`` raises (a ``ValueError`` naming the problem, or whatever
    else a check meets), or ``None``: a rank's verdict on its own input for
    :func:`agree_on_inputs`, which every rank must reach."""
    try:
        check()
    except Exception as error:  # any: a rank that raised alone would leave the others waiting
        return error
    return None


def agree_before_gathering(
    who: str,
    loss: torch.nn.Module,
    embeddings: Any,
    check: Callable[[], None],
    *,
    masked: bool = False,
    tupled: bool = False,
) -> None:
    """What a wrapper does before it gathers: refuse a loss that does not reduce to a tensor
    (:func:`check_reduces_to_a_tensor`), run this rank's ``check`` of its input, and exchange the
    verdicts (:func:`agree_on_inputs`): every rank goes on, or every rank raises."""
    check_reduces_to_a_tensor(who, loss)
    agree_on_inputs(who, embeddings, _input_error(check), masked=masked, tupled=tupled)


_AVERAGED: Dict[int, "weakref.ref[torch.Tensor]"] = {}  # id -> the parameter (ids of dead ones are reused)


def _average_hook(param: torch.Tensor) -> None:
    if param.grad is not None and is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(param.grad)
        param.grad.div_(dist.get_world_size())


def check_reduces_to_a_tensor(who: str, loss: torch.nn.Module) -> None:
    """Refuse (on every rank alike: the loss's configuration) a loss whose reducer hands the loss
    dict back (PML's ``DoNothingReducer``): a rank whose loss is PML's zero loss then holds a dict
    with no graph, and its backward would skip the collectives its peers' run (see
    :func:`reaching`, which needs a tensor)."""
    if isinstance(getattr(loss, "reducer", None), DoNothingReducer):
        raise ValueError(
            f"{who} under torch.distributed needs a loss that reduces to a tensor, not DoNothingReducer's "
            "dict (a rank with no pair would hold no graph, and its peers' backward would wait for it)"
        )


def reaching(loss: Any, tensors: Iterable[torch.Tensor]) -> Any:
    """``loss`` plus zero times each of ``tensors`` that requires grad (in ``loss``'s dtype): the
    same value, and a graph that reaches every one of them, so that each rank's backward runs the
    collectives behind them -- the averaging all-reduce of a loss's own parameters
    (:func:`average_gradients_in_backward`), the reduce of a gathered batch's gradient
    (:func:`all_gather` with ``grad``) -- also on a rank whose loss did not involve them (no
    anchors; a dense loss whose mining kept no pair, PML's zero loss of the anchors alone), which
    would otherwise leave its peers waiting there. A loss that is not a tensor (the dict of
    ``DoNothingReducer``) is returned as it is."""
    if not isinstance(loss, torch.Tensor):
        return loss
    for t in tensors:
        if t.requires_grad:
            loss = loss + (t * 0).sum().to(loss.dtype)
    return loss


def average_gradients_in_backward(params: Iterable[torch.nn.Parameter]) -> None:
    """Average each parameter's gradient over the ranks as soon as ``backward`` has accumulated
    it (what DDP does for a model's parameters), under a process group of more than one rank;
    a no-op otherwise. Registered once per parameter, however often it is asked for."""
    for p in params:
        known = _AVERAGED.get(id(p))
        if p.requires_grad and (known is None or known() is not p):
            p.register_post_accumulate_grad_hook(_average_hook)
            _AVERAGED[id(p)] = weakref.ref(p)
