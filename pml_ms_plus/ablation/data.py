"""Offline data sets in the zero-shot retrieval protocol: train on some classes, retrieve unseen ones."""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

CANVAS = 14  # digits are placed on a 14x14 canvas
NOISE = 0.1
EVAL_PLACEMENT_SEED = 12345
DATASETS = ("digits", "synthetic")


class DataError(ValueError):
    """A data set that cannot be used; the message names the problem."""


@dataclass
class Data:
    name: str
    description: str
    train_x: torch.Tensor  # raw inputs of the training classes
    train_y: torch.Tensor  # 0..C-1
    test_x: torch.Tensor  # inputs of the held-out classes, as evaluated
    test_y: torch.Tensor
    image: bool  # True: (N, 1, H, W) after ``make_batch``
    make_batch: Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # train indices -> model inputs

    @property
    def num_train_classes(self) -> int:
        return int(self.train_y.max()) + 1

    @property
    def input_dim(self) -> int:
        return int(np.prod(self.test_x.shape[1:]))


def place_on_canvas(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Put each ``(8, 8)`` image at a random position of a ``(14, 14)`` canvas, add noise."""
    n, h, w = images.shape
    oy = torch.randint(0, CANVAS - h + 1, (n,), generator=generator)
    ox = torch.randint(0, CANVAS - w + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]
    canvas = torch.zeros(n, CANVAS, CANVAS)
    canvas[torch.arange(n)[:, None, None], rows, cols] = images
    canvas += NOISE * torch.randn(canvas.shape, generator=generator)
    return canvas[:, None]


def _split(x: np.ndarray, y: np.ndarray, train_classes: Any) -> tuple:
    classes = np.unique(y)
    if train_classes is None:
        train_classes = classes[: len(classes) // 2]
    train_classes = np.unique(np.asarray(train_classes))
    is_train = np.isin(y, train_classes)
    n_train, n_test = len(np.unique(y[is_train])), len(np.unique(y[~is_train]))
    if n_train < 2:
        raise DataError(f"need at least 2 training classes, got {n_train}")
    if n_test < 2:
        raise DataError(f"need at least 2 held-out classes to evaluate, got {n_test}")
    _, train_y = np.unique(y[is_train], return_inverse=True)
    return (
        torch.as_tensor(x[is_train], dtype=torch.float32),
        torch.as_tensor(train_y, dtype=torch.long),
        torch.as_tensor(x[~is_train], dtype=torch.float32),
        torch.as_tensor(y[~is_train], dtype=torch.long),
    )


def digits() -> Data:
    """scikit-learn's bundled digits; train 0-4, retrieve 5-9, on a noisy 14x14 canvas.

    Training images are placed anew each time they are drawn; the evaluation
    images are placed once, with a fixed seed.
    """
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = (raw.images / 16.0).astype(np.float32)
    train_x, train_y, test_img, test_y = _split(images, raw.target, train_classes=[0, 1, 2, 3, 4])
    test_x = place_on_canvas(test_img, torch.Generator().manual_seed(EVAL_PLACEMENT_SEED))
    return Data(
        "digits",
        "sklearn digits, 8x8 placed at random on a 14x14 canvas with noise 0.1; train 0-4, evaluate 5-9",
        train_x,
        train_y,
        test_x,
        test_y,
        True,
        lambda idx, g: place_on_canvas(train_x[idx], g),
    )


def synthetic(seed: int = 0) -> Data:
    """A seeded many-class set with confusable class groups and shared nuisance directions.

    300 classes of 20 points in 64 dimensions: 60 groups of 5 nearby classes in
    a 16-dimensional signal subspace, plus 48 nuisance dimensions of large
    variance shared by every class, all rotated at random. Classes 0-149 train,
    150-299 are retrieved.
    """
    g = np.random.default_rng(seed)
    n_groups, per_group, per_class, signal, nuisance = 60, 5, 20, 16, 48
    n_classes = n_groups * per_group
    groups = 2.5 * g.standard_normal((n_groups, signal))
    centres = np.repeat(groups, per_group, axis=0) + 0.8 * g.standard_normal((n_classes, signal))
    y = np.repeat(np.arange(n_classes), per_class)
    sig = centres[y] + 0.5 * g.standard_normal((len(y), signal))
    nuis = 2.0 * g.standard_normal((len(y), nuisance))
    rotation, _ = np.linalg.qr(g.standard_normal((signal + nuisance, signal + nuisance)))
    x = (np.concatenate([sig, nuis], axis=1) @ rotation).astype(np.float32)
    return _features(
        "synthetic",
        "synthetic: 300 classes in 60 confusable groups, 48 shared nuisance dims; train 0-149",
        x,
        y,
        np.arange(n_classes // 2),
    )


def _features(name: str, description: str, x: np.ndarray, y: np.ndarray, train_classes: Any) -> Data:
    """A feature-vector data set (the model is an MLP head; batches are plain rows)."""
    train_x, train_y, test_x, test_y = _split(x, y, train_classes)
    return Data(name, description, train_x, train_y, test_x, test_y, False, lambda idx, g: train_x[idx])


def from_npz(path: str) -> Data:
    """A user's features: ``x`` (N x D float), ``y`` (N int), optional ``train_classes``."""
    if os.path.isfile(path) and not zipfile.is_zipfile(path):  # numpy would blame pickles or a .npy
        raise DataError(
            f"cannot read {path}: not an .npz archive (a zip of arrays, as numpy.savez writes); "
            "save the features with numpy.savez(path, x=..., y=...)"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:  # unreadable or not an npz
        raise DataError(f"cannot read {path}: {exc}") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path} has no array '{key}' (found: {sorted(arrays) or 'none'})")
    x, y = arrays["x"], arrays["y"]
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: 'x' must be a 2D numeric array, got shape {x.shape} and dtype {x.dtype}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'y' must be a 1D integer array, got shape {y.shape} and dtype {y.dtype}")
    if len(x) != len(y):
        raise DataError(f"{path}: 'x' has {len(x)} rows but 'y' has {len(y)} labels")
    if np.iscomplexobj(x):
        raise DataError(f"{path}: 'x' is complex ({x.dtype}); give real-valued features")
    if not np.isfinite(x).all():
        raise DataError(f"{path}: 'x' contains NaN or inf")
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)
    if not np.isfinite(x32).all():
        raise DataError(
            f"{path}: 'x' has values beyond the float32 range (|x| > {np.finfo(np.float32).max:.3g}), "
            "which become inf; rescale the features"
        )
    name = os.path.basename(path)
    description = f"{name}: {x.shape[1]}-d features, {len(np.unique(y))} classes"
    return _features(name, description, x32, y, arrays.get("train_classes"))


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB pieces)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(2**20), b""):
            digest.update(piece)
    return digest.hexdigest()


def load(name_or_path: str) -> Data:
    """``digits``, ``synthetic``, or a path to an ``.npz`` file."""
    if name_or_path == "digits":
        return digits()
    if name_or_path == "synthetic":
        return synthetic()
    if name_or_path.endswith(".npz"):
        if not os.path.isfile(name_or_path):
            raise DataError(f"no such file: {name_or_path}")
        return from_npz(name_or_path)
    raise DataError(f"unknown dataset {name_or_path!r}: use one of {DATASETS} or a path to an .npz file")


def min_class_count(data: Data) -> Optional[int]:
    return int(torch.bincount(data.train_y).min()) if len(data.train_y) else None
