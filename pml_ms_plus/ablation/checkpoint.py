"""Per-run checkpoints: an interrupted run resumes after its last finished epoch (``--resume``).

After every epoch a run saves its network, optimizers, schedule, gradient scaler, loss state
(learned thresholds, a memory's queue), random states and its history so far to
``OUT/checkpoints/<variant>-seed<N>-<config hash>.pt``; the file is removed once the run's row is
in ``results.csv``. Files are written atomically and read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .report import TEMP_PREFIX, write_atomic

DIRNAME = "checkpoints"


def directory(out: str) -> str:
    return os.path.join(out, DIRNAME)


def path(out: str, variant: str, seed: int, config_hash: str) -> str:
    # no leading dot: a name such as ".tmp-x" would look like a temporary file (or a hidden one)
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", variant).lstrip("._").rstrip("_")[:40] or "variant"
    tag = hashlib.sha1(variant.encode()).hexdigest()[:6]  # names that slug alike stay apart
    return os.path.join(directory(out), f"{slug}-{tag}-seed{seed}-{config_hash}.pt")


def existing(out: str) -> List[str]:
    """The checkpoints of unfinished runs in ``out``."""
    folder = directory(out)
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if n.endswith(".pt") and not n.startswith(TEMP_PREFIX))


def remove_stale_temps(out: str) -> List[str]:
    folder = directory(out)
    removed = []
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.startswith(TEMP_PREFIX) and name.endswith(".pt"):
                os.unlink(os.path.join(folder, name))
                removed.append(os.path.join(DIRNAME, name))
    return removed


def rng_state() -> Dict[str, Any]:
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    keys = np.asarray(keys)
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": [int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy"]["keys"].numpy().astype(np.uint32)
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(("MT19937", keys, state["numpy"]["pos"], int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(file: str, state: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(file), exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(file, buf.getvalue())


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (truncated, or not one of this tool's)."""


def load(file: str) -> Optional[Dict[str, Any]]:
    """The checkpoint at ``file``, or None if there is none."""
    if not os.path.isfile(file):
        return None
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {file} ({exc}); delete it to restart that run"
        ) from None


def remove(out: str, file: str) -> None:
    if os.path.exists(file):
        os.unlink(file)
    folder = directory(out)
    if os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)
