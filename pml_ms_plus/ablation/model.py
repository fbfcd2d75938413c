"""Small embedding networks: a CNN for the digit canvases, an MLP head for feature vectors."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two 3x3 conv layers, global max pooling (the digits sit anywhere on the canvas)
    and a linear embedding, for 1 x H x W inputs."""

    def __init__(self, embedding_size: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(1),
        )
        self.embed = nn.Linear(64, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.features(x).flatten(1))


class MLPHead(nn.Module):
    """A two-layer MLP over (frozen) feature vectors, standardised with training statistics."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, input_dim: int, embedding_size: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.net = nn.Sequential(nn.Linear(input_dim, 256), nn.ReLU(), nn.Linear(256, embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def build_model(data: Any, embedding_size: int) -> nn.Module:
    if data.image:
        return SmallCNN(embedding_size)
    mean = data.train_x.mean(0)
    std = data.train_x.std(0).clamp(min=1e-6)
    return MLPHead(data.input_dim, embedding_size, mean, std)
