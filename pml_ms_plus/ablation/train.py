"""Training one variant with one seed, and retrieval evaluation on the held-out classes."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from .config import Variant, build_loss
from .data import Data
from .model import build_model

METRICS = {
    "mean_average_precision_at_r": "MAP@R",
    "r_precision": "R-precision",
    "precision_at_1": "P@1",
    "NMI": "NMI",
}


@dataclass
class RunResult:
    metrics: Dict[str, float]
    losses: List[float]  # mean training loss per epoch
    seconds: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # PML's MPerClassSampler draws from numpy's global generator
    torch.manual_seed(seed)


@torch.no_grad()
def embed(model: Optional[torch.nn.Module], x: torch.Tensor, device, batch: int = 1024) -> torch.Tensor:
    if model is None:
        return x.flatten(1)
    model.eval()
    out = [model(x[i : i + batch].to(device)).cpu() for i in range(0, len(x), batch)]
    return torch.cat(out)


def evaluate(embeddings: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """MAP@R, R-precision, P@1 (k-NN with faiss, query = reference minus itself) and NMI,
    on L2-normalised embeddings (cosine retrieval)."""
    calc = AccuracyCalculator(include=tuple(METRICS), k="max_bin_count", device=torch.device("cpu"))
    emb = torch.nn.functional.normalize(embeddings.float(), dim=1)
    acc = calc.get_accuracy(emb, labels)
    return {name: float(acc[name]) for name in METRICS}


def run(
    variant: Variant,
    data: Data,
    seed: int,
    settings: Dict,
    device: torch.device,
    on_epoch: Optional[Callable[[int, float], None]] = None,
) -> RunResult:
    """Train (unless a floor) and evaluate; the same inputs give the same numbers."""
    start = time.perf_counter()
    seed_everything(seed)
    if variant.kind == "raw":
        return RunResult(
            evaluate(embed(None, data.test_x, device), data.test_y), [], time.perf_counter() - start
        )
    model = build_model(data, settings["embedding_size"]).to(device)
    losses: List[float] = []
    if variant.kind == "train":
        losses = train(model, variant, data, seed, settings, device, on_epoch)
    metrics = evaluate(embed(model, data.test_x, device), data.test_y)
    return RunResult(metrics, losses, time.perf_counter() - start)


def train(model, variant, data, seed, settings, device, on_epoch=None) -> List[float]:
    loss_fn, miner = build_loss(variant, settings["embedding_size"], data.num_train_classes)
    loss_fn = loss_fn.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    loss_optimizer = torch.optim.SGD(loss_params, lr=settings["loss_lr"]) if loss_params else None
    sampler = MPerClassSampler(
        data.train_y,
        settings["m"],
        batch_size=settings["batch_size"],
        length_before_new_iter=len(data.train_y),
    )
    generator = torch.Generator().manual_seed(seed)
    bs = settings["batch_size"]
    history = []
    for epoch in range(settings["epochs"]):
        model.train()
        order = torch.tensor(list(iter(sampler)))
        total, steps = 0.0, 0
        for i in range(0, len(order) - bs + 1, bs):
            idx = order[i : i + bs]
            x = data.make_batch(idx, generator).to(device)
            y = data.train_y[idx].to(device)
            emb = model(x)
            pairs = miner(emb, y) if miner is not None else None
            loss = loss_fn(emb, y, pairs) if pairs is not None else loss_fn(emb, y)
            optimizer.zero_grad()
            if loss_optimizer:
                loss_optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss_optimizer:
                loss_optimizer.step()
            total += float(loss.detach())
            steps += 1
        history.append(total / max(1, steps))
        if on_epoch:
            on_epoch(epoch, history[-1])
    return history
