"""Data-parallel studies: ``torchrun --nproc_per_node N -m pml_ms_plus ablate ...``.

torchrun (or ``python -m torch.distributed.run``, one machine or many through its rendezvous)
starts one process per device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; this module
turns them into a process group (NCCL for ``--device cuda``, one GPU per process; gloo for the
CPU) with a timeout on every collective, and holds what the study needs on top of it:

* every rank draws each global batch with the same seeded sampler as one process would and
  takes its contiguous share (:meth:`Distributed.share`); the model runs in
  ``DistributedDataParallel``;
* the loss sees the global batch: the MS family through :class:`~pml_ms_plus.losses.GatheredMSLoss`
  (``CrossBatchMemory`` gathers by itself), every other PML loss (and any variant with a miner)
  through PML's ``DistributedLossWrapper`` / ``DistributedMinerWrapper``, whose loss is
  ``world_size`` times the global one: its gradients are exact for the network after DDP's
  averaging, and the loss's own parameters are divided back (:func:`sync_loss_gradients`);
* evaluation embeds the test set in shards and gathers it (:func:`gather_rows`); rank 0
  computes the metrics and broadcasts them; only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo and NCCL collectives


class DistributedError(ValueError):
    """A data-parallel launch that cannot work; the message names the problem."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel study."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes files and shows progress."""
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` rows: ``ceil(n / world_size)`` each, the last
        shares shorter (or empty). A global batch (``n`` divisible by the world size) splits evenly.

        Example:
            >>> d = Distributed(1, 2, 1, 2, "gloo", torch.device("cpu"))
            >>> d.share(80), d.share(5)
            (slice(40, 80, None), slice(3, 5, None))
        """
        size = -(-n // self.world_size)
        return slice(min(n, self.rank * size), min(n, (self.rank + 1) * size))


def world_size_from(environ: Mapping[str, str]) -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when it is not set)."""
    value = environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={value!r} is not a number") from None


def from_environment(
    device: str, timeout_s: float = DEFAULT_TIMEOUT_S, environ: Optional[Mapping[str, str]] = None
) -> Optional[Distributed]:
    """Join the process group that torchrun's environment describes, or ``None`` for one process.

    Args:
        device: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL, ``cuda:LOCAL_RANK``).
        timeout_s: seconds any collective may wait for the other ranks before it fails (a rank
            that died or hangs then ends the job instead of blocking it forever).
        environ: the environment (default ``os.environ``).

    Returns:
        :class:`Distributed`, or ``None`` when ``WORLD_SIZE`` is unset or 1.

    Raises:
        DistributedError: a malformed environment, ``cuda`` without enough GPUs on this machine,
            a non-positive timeout; ``torch.distributed`` errors of the rendezvous as they are.
    """
    env = os.environ if environ is None else environ
    world = world_size_from(env)
    if world <= 1:
        return None
    if not (timeout_s > 0):
        raise DistributedError(f"--dist-timeout must be > 0 seconds, got {timeout_s}")
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the study with torchrun "
            "(or python -m torch.distributed.run), which sets them"
        )
    rank, local = int(env["RANK"]), int(env["LOCAL_RANK"])
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("--device cuda: CUDA is not available")
        if local >= torch.cuda.device_count():
            raise DistributedError(
                f"--device cuda: LOCAL_RANK {local}, but this machine has {torch.cuda.device_count()} GPUs; "
                "start at most one process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(local)
        backend, dev = "nccl", torch.device("cuda", local)
    else:
        backend, dev = "gloo", torch.device("cpu")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Distributed(rank, world, local, local_world, backend, dev)


def shutdown(d: Optional[Distributed]) -> None:
    """Leave the process group (after a clean end; a failed job just exits)."""
    if d is not None and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Optional[Distributed]) -> None:
    """Wait for every rank (a no-op for one process)."""
    if d is not None:
        dist.barrier()


def broadcast(obj: Any, d: Optional[Distributed]) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; ``obj`` of the other ranks is ignored)."""
    if d is None:
        return obj
    box = [obj if d.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(error: Optional[BaseException], d: Optional[Distributed]) -> None:
    """Raise on every rank if this or any other rank failed (``error``), so that all stop alike.

    Every rank must call it (it is a collective). The error raised is this rank's own when it
    failed, else the first failing rank's message, naming that rank.

    Raises:
        The local ``error``, or :class:`DistributedError` with another rank's message.
    """
    if d is None:
        if error is not None:
            raise error
        return
    mine = None if error is None else f"{type(error).__name__}: {error}"
    reports: list = [None] * d.world_size
    dist.all_gather_object(reports, mine)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(reports) if m is not None]
    if failed:
        r, message = failed[0]
        raise DistributedError(f"rank {r} failed: {message}")


def mean(value: float, d: Optional[Distributed]) -> float:
    """The mean of ``value`` over the ranks."""
    if d is None:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t) / d.world_size


def gather_rows(local: torch.Tensor, n: int, d: Optional[Distributed]) -> torch.Tensor:
    """The ``n`` rows of which every rank holds its :meth:`Distributed.share`, in order, on every
    rank (on the CPU, as ``local`` came)."""
    if d is None:
        return local
    size = -(-n // d.world_size)
    padded = torch.zeros((size, *local.shape[1:]), dtype=local.dtype, device=d.device)
    padded[: len(local)] = local.to(d.device)
    parts = [torch.empty_like(padded) for _ in range(d.world_size)]
    dist.all_gather(parts, padded)
    pieces = []
    for r, part in enumerate(parts):
        share = Distributed(r, d.world_size, 0, 1, d.backend, d.device).share(n)
        pieces.append(part[: share.stop - share.start])
    return torch.cat(pieces).to(local.device)


def wrap_model(net: nn.Module, d: Distributed, sync_bn: bool = False) -> nn.parallel.DistributedDataParallel:
    """``net`` in ``DistributedDataParallel`` (its parameters are broadcast from rank 0).

    BatchNorm layers that train compute their statistics on each rank's share of the batch;
    ``sync_bn`` (CUDA) turns them into ``SyncBatchNorm``, with the statistics of the global batch.
    Frozen BatchNorm (``freeze_bn``, eval mode) uses its running statistics either way.
    """
    if sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    ids = [d.local_rank] if d.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(net, device_ids=ids)


class DistributedLoss(NamedTuple):
    """The loss (and miner) a rank calls, and ``scale``: its value is ``scale`` times the
    global loss (``world_size`` under PML's wrapper, else 1)."""

    loss: Any
    miner: Any
    scale: float


def distribute_loss(loss: Any, miner: Any, d: Optional[Distributed]) -> DistributedLoss:
    """The loss and miner of a variant, made to see the global batch.

    * ``MSLoss`` / ``AdaptiveMSLoss`` without a miner: ``GatheredMSLoss`` (exact gradients,
      learned thresholds averaged in ``backward``).
    * ``CrossBatchMemory`` of this package (``gather`` not False): as it is; it all-gathers.
    * anything else: PML's ``DistributedLossWrapper`` (and ``DistributedMinerWrapper`` for the
      miner), on the gathered batch; its value is ``world_size`` times the global loss.
    """
    from ..losses import CrossBatchMemory, GatheredMSLoss, MultiSimilarityLoss

    if d is None:
        return DistributedLoss(loss, miner, 1.0)
    if isinstance(loss, CrossBatchMemory) and loss.gather is not False:
        return DistributedLoss(loss, miner, 1.0)
    if isinstance(loss, MultiSimilarityLoss) and miner is None:
        return DistributedLoss(GatheredMSLoss(loss), None, 1.0)
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper

    wrapped_miner = DistributedMinerWrapper(miner) if miner is not None else None
    return DistributedLoss(DistributedLossWrapper(loss), wrapped_miner, float(d.world_size))


def sync_loss_gradients(params: Iterable[torch.nn.Parameter], scale: float, d: Optional[Distributed]) -> None:
    """For a loss under PML's wrapper: average its own parameters' gradients over the ranks and
    divide by ``scale`` (every rank computed ``scale`` times the global loss), so they equal the
    single-process gradients and stay identical on every rank. A no-op when ``scale`` is 1 (the
    MS family averages its parameters' gradients in ``backward`` already)."""
    if d is None or scale == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(d.world_size * scale)
