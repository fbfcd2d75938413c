"""Training one variant with one seed, and retrieval evaluation on the held-out classes.

One loop serves the toy sets (batches drawn in the main process) and the image benchmarks
(batches decoded by DataLoader workers): optimizer with separate rates for the network, its
embedding layer and the loss's own parameters, a warm-up and schedule per step, autocast
(bf16, or fp16 with a GradScaler), evaluation every ``eval_every`` epochs and a checkpoint
after every epoch.

Under torchrun (``RunContext.dist``) the same loop runs data-parallel: each rank draws the same
global batches and trains on its share, the model in DDP and the loss over the global batch
(:mod:`.distributed`); evaluation embeds the test set in shards; rank 0 alone writes the
checkpoint, which is the same file a single process writes (the unwrapped network and loss).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from torch import nn

from . import checkpoint
from . import distributed as ddp
from .config import Variant, build_loss
from .data import Data
from .distributed import Distributed
from .images import ImageData, ImageFiles, Split, transforms
from .metrics import METRICS, evaluate
from .model import build_model

__all__ = ["METRICS", "RunResult", "RunContext", "run", "evaluate", "seed_everything"]
AnyData = Union[Data, ImageData]


@dataclass
class RunResult:
    metrics: Dict[str, float]
    losses: List[float]  # mean training loss per epoch
    seconds: float
    epoch: int = 0  # the epoch whose evaluation ``metrics`` is (0: not trained)
    evaluations: List[Dict[str, float]] = field(default_factory=list)  # {"epoch": e, metric: value}
    resumed_from: int = 0  # epochs restored from a checkpoint


@dataclass
class RunContext:
    """How a run is carried out (none of it changes its numbers)."""

    device: torch.device = torch.device("cpu")
    backbone: Any = None  # backbones.Backbone for the image data sets
    checkpoint: Optional[str] = None  # file of this run's checkpoint
    resume: bool = False  # continue from ``checkpoint`` if it exists
    on_epoch: Optional[Callable[[int, float], None]] = None
    on_start: Optional[Callable[[int], None]] = None  # images still to train on
    on_step: Optional[Callable[[int], None]] = None  # images in the step just done
    log: Callable[[str], None] = lambda line: None
    dist: Optional[Distributed] = None  # torchrun's process group: data-parallel (same numbers)
    sync_bn: bool = False  # under ``dist``: SyncBatchNorm (CUDA) instead of per-rank statistics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # PML's MPerClassSampler draws from numpy's global generator
    torch.manual_seed(seed)


def autocast(device: torch.device, amp: str) -> Any:
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# ---------------------------------------------------------------- batches


def sampler_state(sampler: MPerClassSampler) -> torch.Tensor:
    """The order of the sampler's class list, which it shuffles in place every epoch."""
    keys = list(sampler.labels_to_indices.keys())
    where = {k: i for i, k in enumerate(keys)}
    return torch.tensor([where[k] for k in sampler.labels], dtype=torch.long)


def set_sampler_state(sampler: MPerClassSampler, order: torch.Tensor) -> None:
    keys = list(sampler.labels_to_indices.keys())
    sampler.labels = [keys[i] for i in order.tolist()]


class ToyBatches:
    """The toy sets: ``m`` per class from PML's sampler, inputs made in the main process.

    Data-parallel, every rank makes the whole global batch (the generator advances as in one
    process) and yields its share."""

    def __init__(self, data: Data, settings: Dict, seed: int, dist: Optional[Distributed] = None):
        self.data = data
        self.share = dist.share(settings["batch_size"]) if dist is not None else slice(None)
        self.bs = settings["batch_size"]
        self.sampler = MPerClassSampler(
            data.train_y, settings["m"], batch_size=self.bs, length_before_new_iter=len(data.train_y)
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_per_epoch = len(self.sampler) // self.bs

    def epoch(self, epoch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(iter(self.sampler)))
        for i in range(0, len(order) - self.bs + 1, self.bs):
            idx = order[i : i + self.bs]
            yield self.data.make_batch(idx, self.generator)[self.share], self.data.train_y[idx][self.share]

    def state_dict(self) -> Dict:
        return {"generator": self.generator.get_state(), "sampler": sampler_state(self.sampler)}

    def load_state_dict(self, state: Dict) -> None:
        self.generator.set_state(state["generator"])
        set_sampler_state(self.sampler, state["sampler"])


class _SeededSampler(torch.utils.data.Sampler):
    """PML's ``MPerClassSampler`` order, each index paired with a seed for its augmentation.

    With ``share`` (a slice of a batch of ``batch_size``), only that share of every global batch:
    a rank decodes its own images, with the seeds one process would give them."""

    def __init__(self, base: MPerClassSampler, seed: int, batch_size: int, share: slice = slice(None)):
        self.base, self.seed, self.epoch = base, seed, 0
        self.bs, self.share = batch_size, share
        self.per_batch = len(range(batch_size)[share])

    def __len__(self) -> int:
        return len(self.base) // self.bs * self.per_batch

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        order = list(iter(self.base))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        seeds = torch.randint(0, 2**62, (len(order),), generator=g).tolist()
        pairs = list(zip(order, seeds))
        mine = [
            p for i in range(0, len(pairs) - self.bs + 1, self.bs) for p in pairs[i : i + self.bs][self.share]
        ]
        return iter(mine)


def _loader(dataset: Any, settings: Dict, device: torch.device, **kwargs: Any) -> torch.utils.data.DataLoader:
    workers = settings["workers"]
    return torch.utils.data.DataLoader(
        dataset,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        **kwargs,
    )


class ImageBatches:
    """An image benchmark's training set, decoded and augmented in DataLoader workers."""

    def __init__(
        self,
        data: ImageData,
        settings: Dict,
        seed: int,
        device: torch.device,
        dist: Optional[Distributed] = None,
    ):
        bs = settings["batch_size"]
        base = MPerClassSampler(
            data.train.labels, settings["m"], batch_size=bs, length_before_new_iter=len(data.train)
        )
        share = dist.share(bs) if dist is not None else slice(None)
        self.sampler = _SeededSampler(base, seed, bs, share)
        dataset = ImageFiles(data.train, transforms(settings["image_size"], train=True))
        self.loader = _loader(
            dataset, settings, device, batch_size=self.sampler.per_batch, sampler=self.sampler, drop_last=True
        )
        self.steps_per_epoch = len(base) // bs

    def epoch(self, epoch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.epoch = epoch
        yield from self.loader

    def state_dict(self) -> Dict:
        return {"sampler": sampler_state(self.sampler.base)}

    def load_state_dict(self, state: Dict) -> None:
        set_sampler_state(self.sampler.base, state["sampler"])


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def embed(
    model: Optional[nn.Module],
    x: torch.Tensor,
    device: torch.device,
    batch: int = 1024,
    amp: str = "none",
    dist: Optional[Distributed] = None,
) -> torch.Tensor:
    """The embeddings of ``x`` (``model`` None: the flattened inputs), on the CPU; with ``dist``
    every rank embeds its share and every rank gets all of them."""
    if model is None:
        return x.flatten(1)
    n = len(x)
    if dist is not None:
        x = x[dist.share(n)]
    model.eval()
    with autocast(device, amp):
        out = [model(x[i : i + batch].to(device)).float().cpu() for i in range(0, max(1, len(x)), batch)]
    return ddp.gather_rows(torch.cat(out), n, dist)


@torch.no_grad()
def embed_images(
    model: nn.Module, split: Split, settings: Dict, device: torch.device, dist: Optional[Distributed] = None
) -> torch.Tensor:
    """The embeddings of an image split (evaluation transforms), on the CPU; with ``dist`` every
    rank embeds its share and every rank gets all of them."""
    n = len(split)
    if dist is not None:
        share = dist.share(n)
        split = Split(split.paths[share], split.labels[share])
    model.eval()
    dataset = ImageFiles(split, transforms(settings["image_size"], train=False))
    loader = _loader(
        dataset,
        dict(settings, workers=min(settings["workers"], 8)),
        device,
        batch_size=2 * settings["batch_size"],
    )
    out = [torch.zeros(0, settings["embedding_size"])]
    with autocast(device, settings["amp"]):
        for x, _ in loader:
            out.append(model(x.to(device, non_blocking=True)).float().cpu())
    return ddp.gather_rows(torch.cat(out), n, dist)


@contextlib.contextmanager
def _rng_untouched() -> Iterator[None]:
    """Random states (torch, numpy, Python) as they were before the block: computing the
    metrics (rank 0 alone, when data-parallel) cannot shift the training's random draws."""
    state = checkpoint.rng_state()
    try:
        yield
    finally:
        checkpoint.set_rng_state(state)


def _metrics(compute: Callable[[], Dict[str, float]], dist: Optional[Distributed]) -> Dict[str, float]:
    """``compute()`` on rank 0 (the only one when data-parallel), broadcast to every rank."""
    metrics = None
    if dist is None or dist.is_main:
        with _rng_untouched():
            metrics = compute()
    return ddp.broadcast(metrics, dist)


def evaluate_model(
    model: Optional[nn.Module],
    data: AnyData,
    settings: Dict,
    device: torch.device,
    dist: Optional[Distributed] = None,
) -> Dict[str, float]:
    """Retrieval on the held-out classes (``model`` None: the raw inputs of a toy set).

    With ``dist`` every rank embeds a share of the test set, the embeddings are gathered, rank 0
    computes the metrics and every rank returns them."""
    if isinstance(data, ImageData):
        assert model is not None
        if data.query is not None and data.gallery is not None:
            q = embed_images(model, data.query, settings, device, dist)
            g = embed_images(model, data.gallery, settings, device, dist)
            query, gallery = data.query, data.gallery
            return _metrics(lambda: evaluate(q, query.labels, g, gallery.labels, device=device), dist)
        test = data.test
        assert test is not None
        t = embed_images(model, test, settings, device, dist)
        return _metrics(lambda: evaluate(t, test.labels, device=device), dist)
    x = embed(model, data.test_x, device, amp=settings["amp"], dist=dist)
    return _metrics(lambda: evaluate(x, data.test_y, device=device), dist)


# ---------------------------------------------------------------- optimisation


def head_module(model: nn.Module) -> nn.Module:
    """The embedding layer: ``model.embed``, else the last linear layer."""
    head = getattr(model, "embed", None)
    if isinstance(head, nn.Module):
        return head
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def make_optimizer(model: nn.Module, settings: Dict) -> torch.optim.Optimizer:
    head = {id(p) for p in head_module(model).parameters()}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head]
    top = [p for p in head_module(model).parameters() if p.requires_grad]
    lr, head_lr = settings["lr"], settings["head_lr"] or settings["lr"]
    groups = [g for g in ({"params": body, "lr": lr}, {"params": top, "lr": head_lr}) if g["params"]]
    wd = settings["weight_decay"]
    name = settings["optimizer"]
    if name == "adam":
        return torch.optim.Adam(groups, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=wd)
    return torch.optim.SGD(groups, momentum=0.9, weight_decay=wd)


def lr_factor(settings: Dict, steps_per_epoch: int) -> Callable[[int], float]:
    """The rate's factor at a step: linear warm-up over ``warmup_epochs``, then the schedule
    (constant; cosine to 0 over the remaining steps; ×``lr_gamma`` after each of ``lr_steps``)."""
    warm = int(round(settings["warmup_epochs"] * steps_per_epoch))
    total = settings["epochs"] * steps_per_epoch
    schedule, gamma = settings["schedule"], settings["lr_gamma"]
    boundaries = [e * steps_per_epoch for e in settings["lr_steps"]]

    def factor(step: int) -> float:
        f = 1.0
        if schedule == "cosine":
            span = max(1, total - warm)
            f = 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, step - warm) / span)))
        elif schedule == "step":
            f = gamma ** sum(step >= b for b in boundaries)
        if step < warm:
            f *= (step + 1) / warm
        return f

    return factor


# ---------------------------------------------------------------- a run


def run(
    variant: Variant, data: AnyData, seed: int, settings: Dict, ctx: Optional[RunContext] = None
) -> RunResult:
    """Train (unless a floor) and evaluate; the same inputs give the same numbers."""
    ctx = ctx or RunContext()
    start = time.perf_counter()
    seed_everything(seed)
    if variant.kind == "raw":
        metrics = evaluate_model(None, data, settings, ctx.device, ctx.dist)
        return RunResult(metrics, [], time.perf_counter() - start, 0, [{"epoch": 0, **metrics}])
    if isinstance(data, ImageData):
        model = ctx.backbone.build(settings["embedding_size"], settings["freeze_bn"])
    else:
        model = build_model(data, settings["embedding_size"])
    model = model.to(ctx.device)
    if variant.kind != "train":
        metrics = evaluate_model(model, data, settings, ctx.device, ctx.dist)
        return RunResult(metrics, [], time.perf_counter() - start, 0, [{"epoch": 0, **metrics}])
    return train(model, variant, data, seed, settings, ctx, start)


def select(evaluations: List[Dict[str, float]], settings: Dict) -> Dict[str, float]:
    """The reported evaluation: the last, or (``select = "best"``) the best by ``select_metric``."""
    if settings["select"] == "best":
        key = settings["select_metric"]
        return max(evaluations, key=lambda e: (e[key], -e["epoch"]))
    return evaluations[-1]


_LOSS_ATTRS = ("queue_idx", "has_been_filled")  # PML's CrossBatchMemory keeps these outside its state dict


def train(
    model: nn.Module,
    variant: Variant,
    data: AnyData,
    seed: int,
    settings: Dict,
    ctx: RunContext,
    start: float,
) -> RunResult:
    device, dist = ctx.device, ctx.dist
    main = dist is None or dist.is_main
    # ``net`` and ``loss_state`` are what a checkpoint holds (the same with or without torchrun);
    # ``model`` and ``loss_fn`` are what a step calls (DDP and the loss over the global batch)
    net = model
    loss_state, miner = build_loss(variant, settings["embedding_size"], data.num_train_classes)
    loss_state = loss_state.to(device)
    if dist is not None:
        wrapped = ddp.wrap_model(net, dist, ctx.sync_bn)
        model, net = wrapped, wrapped.module
    loss_fn, miner, loss_scale = ddp.distribute_loss(loss_state, miner, dist)
    optimizer = make_optimizer(net, settings)
    loss_params = [p for p in loss_state.parameters() if p.requires_grad]
    loss_optimizer = torch.optim.SGD(loss_params, lr=settings["loss_lr"]) if loss_params else None
    batches: Union[ToyBatches, ImageBatches]
    if isinstance(data, ImageData):
        batches = ImageBatches(data, settings, seed, device, dist)
    else:
        batches = ToyBatches(data, settings, seed, dist)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(settings, batches.steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type) if settings["amp"] == "fp16" else None
    epochs = settings["epochs"]
    losses: List[float] = []
    evaluations: List[Dict[str, float]] = []
    first = 0
    state = checkpoint.load(ctx.checkpoint) if ctx.resume and ctx.checkpoint and main else None
    state = ddp.broadcast(state, dist)  # rank 0's file (other machines need not see it)
    if state is not None:
        try:
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            loss_state.load_state_dict(state["loss"])
            for k, v in state["loss_attrs"].items():
                setattr(loss_state, k, v)
            if loss_optimizer is not None:
                loss_optimizer.load_state_dict(state["loss_optimizer"])
            if scaler is not None:
                scaler.load_state_dict(state["scaler"])
            batches.load_state_dict(state["batches"])
            checkpoint.set_rng_state(state["rng"])
            first, losses, evaluations = (
                int(state["epoch"]),
                list(state["losses"]),
                list(state["evaluations"]),
            )
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
            # a file that loads but is not a checkpoint of this run (another tool's, an older format)
            raise checkpoint.CheckpointError(
                f"cannot resume from checkpoint {ctx.checkpoint}: it is not one of this tool's for this run "
                f"({type(exc).__name__}: {exc}); delete it to restart that run"
            ) from None
        ctx.log(f"resuming {variant.name} / seed {seed} from its checkpoint after epoch {first}/{epochs}")
    world = dist.world_size if dist is not None else 1
    if ctx.on_start:
        ctx.on_start((epochs - first) * batches.steps_per_epoch * settings["batch_size"])
    for epoch in range(first, epochs):
        model.train()
        loss_fn.train()
        total = torch.zeros((), dtype=torch.float64, device=device)
        steps = 0
        for x, y in batches.epoch(epoch):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with autocast(device, settings["amp"]):
                emb = model(x)
                pairs = miner(emb, y) if miner is not None else None
                loss = loss_fn(emb, y, pairs) if pairs is not None else loss_fn(emb, y)
            optimizer.zero_grad()
            if loss_optimizer:
                loss_optimizer.zero_grad()
            if scaler is not None:
                scaler.scale(loss).backward()
                ddp.sync_loss_gradients(loss_params, loss_scale, dist)
                scaler.step(optimizer)
                if loss_optimizer:
                    scaler.step(loss_optimizer)
                scaler.update()
            else:
                loss.backward()
                ddp.sync_loss_gradients(loss_params, loss_scale, dist)
                optimizer.step()
                if loss_optimizer:
                    loss_optimizer.step()
            scheduler.step()
            total += loss.detach().double()
            steps += 1
            if ctx.on_step:
                ctx.on_step(len(y) * world)
        # the mean over ranks of each rank's share is the global loss (PML's wrapper: scale times it)
        losses.append(ddp.mean(float(total) / max(1, steps), dist) / loss_scale)
        done = epoch + 1
        every = settings["eval_every"]
        if done == epochs or (every and done % every == 0):
            metrics = evaluate_model(net, data, settings, device, dist)
            evaluations.append({"epoch": done, **metrics})
            ctx.log(
                f"eval: {variant.name} / seed {seed} / epoch {done}/{epochs}: "
                + "  ".join(f"{label} {metrics[m]:.3f}" for m, label in METRICS.items())
            )
        if ctx.checkpoint and main:
            checkpoint.save(
                ctx.checkpoint,
                {
                    "epoch": done,
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "loss": loss_state.state_dict(),
                    "loss_attrs": {k: getattr(loss_state, k) for k in _LOSS_ATTRS if hasattr(loss_state, k)},
                    "loss_optimizer": loss_optimizer.state_dict() if loss_optimizer else {},
                    "scaler": scaler.state_dict() if scaler is not None else {},
                    "batches": batches.state_dict(),
                    "rng": checkpoint.rng_state(),
                    "losses": losses,
                    "evaluations": evaluations,
                },
            )
        if ctx.on_epoch:
            ctx.on_epoch(epoch, losses[-1])
    chosen = select(evaluations, settings)
    metrics = {m: chosen[m] for m in METRICS}
    return RunResult(metrics, losses, time.perf_counter() - start, int(chosen["epoch"]), evaluations, first)
