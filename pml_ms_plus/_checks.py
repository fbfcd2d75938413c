"""Argument and input checks shared by the PML adapters (clear ValueErrors)."""

from __future__ import annotations

import math
from typing import Optional

import torch


def positive(name: str, value) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def non_negative(name: str, value) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def finite_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def optional_non_negative(name: str, value) -> Optional[float]:
    return None if value is None else non_negative(name, value)


def embeddings_and_labels(
    embeddings: torch.Tensor,
    labels: Optional[torch.Tensor],
    check_finite: bool,
    name: str = "embeddings",
    labels_name: str = "labels",
) -> None:
    """Shape, length and finiteness checks for one embeddings/labels pair."""
    if not torch.is_tensor(embeddings) or embeddings.ndim != 2:
        shape = tuple(embeddings.shape) if torch.is_tensor(embeddings) else type(embeddings).__name__
        raise ValueError(f"{name} must be a 2D tensor (batch_size, embedding_size), got {shape}")
    if labels is not None:
        if not torch.is_tensor(labels) or labels.ndim != 1:
            shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
            raise ValueError(f"{labels_name} must be a 1D tensor, got {shape}")
        if len(labels) != len(embeddings):
            raise ValueError(f"{labels_name} has {len(labels)} entries but {name} has {len(embeddings)} rows")
    if check_finite and embeddings.numel() and not bool(torch.isfinite(embeddings).all()):
        raise ValueError(f"{name} contain NaN or inf (pass check_finite=False for NaN-in, NaN-out behaviour)")
