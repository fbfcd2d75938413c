"""Study settings and variants: the default grid, TOML configs, import-path resolution."""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config that cannot be used; the message names the problem."""


DEFAULT_SETTINGS: Dict[str, Any] = dict(
    dataset="digits",
    data_root=None,  # the image data sets' folder (or its parent)
    seeds=3,
    epochs=None,  # None: the data kind's default (DATA_KIND_DEFAULTS)
    batch_size=80,
    m=None,
    lr=None,  # the network (image data sets: the backbone)
    head_lr=None,  # the embedding layer; None: lr
    loss_lr=1e-2,  # the loss's own parameters (learned thresholds), SGD
    optimizer="adam",
    weight_decay=0.0,
    warmup_epochs=0.0,  # linear warm-up from 0, per step
    schedule="constant",  # constant | cosine | step (lr_steps, lr_gamma)
    lr_steps=[],
    lr_gamma=0.1,
    amp="none",  # none | bf16 | fp16 (fp16 with a GradScaler)
    eval_every=0,  # evaluate every N epochs; 0: after the last epoch only (always evaluated)
    select="last",  # last | best (the best evaluation by select_metric: selected on the test set)
    select_metric="mean_average_precision_at_r",
    baseline=None,  # the variant the others are tested against; None: the first trained variant
    embedding_size=None,
    # image data sets only (None for the toy sets)
    backbone=None,
    pretrained=None,
    image_size=None,
    freeze_bn=None,
    workers=None,
)
# the defaults that differ between the toy sets and the image benchmarks
DATA_KIND_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "toy": dict(epochs=15, m=16, lr=1e-3, embedding_size=64),
    "image": dict(
        epochs=40,
        m=5,
        lr=3e-5,
        embedding_size=512,
        backbone="resnet50",
        pretrained="imagenet",
        image_size=224,
        freeze_bn=True,
        workers=min(8, os.cpu_count() or 1),
    ),
}
IMAGE_ONLY = ("data_root", "backbone", "pretrained", "image_size", "freeze_bn", "workers")
CHOICES = dict(
    optimizer=("adam", "adamw", "sgd"),
    schedule=("constant", "cosine", "step"),
    amp=("none", "bf16", "fp16"),
    select=("last", "best"),
)
# settings that do not change a run's numbers: left out of the config hash
NOT_HASHED = ("seeds", "data_root", "workers", "baseline")
KINDS = ("raw", "untrained", "train")


@dataclass
class Variant:
    """One row of the study: a floor (``raw``/``untrained``) or a trained loss."""

    name: str
    kind: str = "train"
    loss: Optional[str] = None
    loss_kwargs: Dict[str, Any] = field(default_factory=dict)
    miner: Optional[str] = None
    miner_kwargs: Dict[str, Any] = field(default_factory=dict)
    memory: Optional[str] = None
    memory_kwargs: Dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, {})}


def _v(name: str, loss: Optional[str] = None, kind: str = "train", **kw: Any) -> "Variant":
    return Variant(name=name, kind=kind, loss=loss, **kw)


MS = "pml_ms_plus.losses.MSLoss"
ADAPTIVE = "pml_ms_plus.losses.AdaptiveMSLoss"
DEFAULT_VARIANTS: List[Variant] = [
    _v("raw-input kNN", kind="raw"),
    _v("untrained network", kind="untrained"),
    _v("PML MS (all pairs)", "pytorch_metric_learning.losses.MultiSimilarityLoss"),
    _v(
        "PML MS + PML miner",
        "pytorch_metric_learning.losses.MultiSimilarityLoss",
        miner="pytorch_metric_learning.miners.MultiSimilarityMiner",
        miner_kwargs={"epsilon": 0.1},
    ),
    _v("MSLoss(eps=0.1)", MS, loss_kwargs={"epsilon": 0.1}),
    _v("MSLoss(eps=0.1, self)", MS, loss_kwargs={"epsilon": 0.1, "weighting": "self"}),
    _v("MSLoss(eps=0.1, relative)", MS, loss_kwargs={"epsilon": 0.1, "weighting": "relative"}),
    _v("MSLoss (no mining)", MS),
    _v("Adaptive (anchor)", ADAPTIVE, loss_kwargs={"epsilon": 0.1, "margin_mode": "anchor"}),
    _v(
        "Adaptive (learned)",
        ADAPTIVE,
        loss_kwargs={"epsilon": 0.1, "margin_mode": "learned", "num_classes": "auto"},
    ),
    _v(
        "XBM + MSLoss(eps=0.1)",
        MS,
        loss_kwargs={"epsilon": 0.1},
        memory="pml_ms_plus.losses.CrossBatchMemory",
        memory_kwargs={"memory_size": 320, "start_iteration": 50, "batch_weight": 1.0},
    ),
    _v("PML Contrastive", "pytorch_metric_learning.losses.ContrastiveLoss"),
]

MAX_SEEDS = 10_000  # runs per variant: more is a typo (the to-do list is built up front)

_SETTING_TYPES: Dict[str, Any] = dict(
    dataset=str,
    data_root=(str, None),
    seeds=int,
    epochs=int,
    batch_size=int,
    m=int,
    lr=float,
    head_lr=(float, None),
    loss_lr=float,
    optimizer=str,
    weight_decay=float,
    warmup_epochs=float,
    schedule=str,
    lr_steps=list,
    lr_gamma=float,
    amp=str,
    eval_every=int,
    select=str,
    select_metric=str,
    baseline=(str, None),
    embedding_size=int,
    backbone=str,
    pretrained=str,
    image_size=int,
    freeze_bn=bool,
    workers=int,
)


def _base(kind: str) -> Tuple[type, str]:
    """``(class, its public name)`` that a ``loss`` / ``miner`` / ``memory`` path must subclass."""
    from pytorch_metric_learning import losses, miners

    return {
        "loss": (losses.BaseMetricLossFunction, "pytorch_metric_learning.losses.BaseMetricLossFunction"),
        "miner": (miners.BaseMiner, "pytorch_metric_learning.miners.BaseMiner"),
        "memory": (losses.BaseLossWrapper, "pytorch_metric_learning.losses.BaseLossWrapper"),
    }[kind]


def import_path(path: str, what: str, kind: Optional[str] = None) -> Any:
    """The object named by ``package.module.Name`` (or ``package.Name``).

    The top-level name must be a package: a plain top-level module (``this``,
    ``antigravity``, ``os``) cannot hold a PML loss and is refused before
    anything is imported. With ``kind`` (``loss``, ``miner``, ``memory``) the
    object must be a subclass of the matching PML base class.
    """
    if not isinstance(path, str) or "." not in path or not all(p.isidentifier() for p in path.split(".")):
        raise ConfigError(f"{what}: {path!r} is not an import path like 'package.module.Name'")
    module_name, _, attr = path.rpartition(".")
    top = module_name.partition(".")[0]
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: found without importing it
    except Exception as exc:
        raise ConfigError(f"{what}: cannot import module {module_name!r} ({exc})") from None
    if spec is None:
        raise ConfigError(f"{what}: cannot import module {module_name!r} (no module named {top!r})")
    if spec.submodule_search_locations is None:
        raise ConfigError(f"{what}: {path!r}: {top!r} is a module, not a package; give 'package.module.Name'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"{what}: cannot import module {module_name!r} ({exc})") from None
    if not hasattr(module, attr):
        raise ConfigError(f"{what}: module {module_name!r} has no {attr!r}")
    obj = getattr(module, attr)
    if kind is not None:
        base, base_name = _base(kind)
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise ConfigError(f"{what}: {path!r} is not a subclass of {base_name}")
    return obj


def load_config(path: str) -> Tuple[Dict[str, Any], Optional[List["Variant"]]]:
    """``(settings, variants)`` from a TOML file; ``variants`` is None when it lists none.

    Format: an optional ``[study]`` table with any of the settings, then
    ``[[variant]]`` tables with ``name``, ``kind`` (``train``, ``raw``,
    ``untrained``), ``loss`` / ``miner`` / ``memory`` import paths and their
    ``*_kwargs`` tables.
    """
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read config {path}: it is not UTF-8 text ({exc})") from None
    unknown = set(raw) - {"study", "variant"}
    if unknown:
        raise ConfigError(
            f"config {path}: unknown top-level keys {sorted(unknown)} (expected 'study', 'variant')"
        )
    settings = raw.get("study", {})
    if not isinstance(settings, dict):
        raise ConfigError(f"config {path}: [study] must be a table")
    variants = raw.get("variant")
    if variants is None:
        return settings, None
    if not isinstance(variants, list) or not variants:
        raise ConfigError(f"config {path}: 'variant' must be a non-empty array of tables ([[variant]])")
    out = []
    for i, v in enumerate(variants):
        if not isinstance(v, dict):
            raise ConfigError(f"config {path}: variant #{i + 1} must be a table")
        fields = set(Variant.__dataclass_fields__)
        bad = set(v) - fields
        if bad:
            raise ConfigError(f"config {path}: variant #{i + 1} has unknown keys {sorted(bad)}")
        if "name" not in v:
            raise ConfigError(f"config {path}: variant #{i + 1} has no 'name'")
        out.append(Variant(**v))
    return settings, out


def resolve_settings(base: Dict[str, Any], *overrides: Dict[str, Any]) -> Dict[str, Any]:
    """``base`` updated by each override in turn (None values skipped), type-checked, with the
    data kind's defaults (toy set or image benchmark) filled in; ConfigError names a bad setting."""
    from .images import IMAGE_DATASETS
    from .metrics import METRICS

    settings = dict(base)
    given = set()
    for o in overrides:
        for key, value in o.items():
            if value is None:
                continue
            if key not in _SETTING_TYPES:
                raise ConfigError(f"unknown study setting {key!r} (known: {sorted(_SETTING_TYPES)})")
            settings[key] = value
            given.add(key)
    if not isinstance(settings.get("dataset"), str):
        raise ConfigError(f"setting 'dataset' must be str, got {settings.get('dataset')!r}")
    image = settings["dataset"] in IMAGE_DATASETS
    if not image:
        extra = sorted(k for k in IMAGE_ONLY if settings.get(k) is not None)
        if extra:
            raise ConfigError(
                f"setting {extra[0]!r} applies to the image data sets ({', '.join(IMAGE_DATASETS)}) only; "
                f"dataset {settings['dataset']!r} has its own small network"
            )
    for key, value in DATA_KIND_DEFAULTS["image" if image else "toy"].items():
        if settings.get(key) is None:
            settings[key] = value
    for key, kind in _SETTING_TYPES.items():
        value = settings.get(key)
        optional = isinstance(kind, tuple)
        kind = kind[0] if optional else kind
        if value is None and (optional or (not image and key in IMAGE_ONLY)):
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ConfigError(f"setting {key!r} must be {kind.__name__}, got {value!r}")
        settings[key] = value
    for key in ("seeds", "epochs", "batch_size", "m", "embedding_size"):
        if settings[key] < 1:
            raise ConfigError(f"setting {key!r} must be >= 1, got {settings[key]}")
    if settings["seeds"] > MAX_SEEDS:
        raise ConfigError(f"setting 'seeds' must be at most {MAX_SEEDS:,}, got {settings['seeds']:,}")
    for key in ("lr", "loss_lr", "head_lr", "lr_gamma"):
        value = settings[key]
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"setting {key!r} must be a finite number > 0, got {value}")
    for key in ("weight_decay", "warmup_epochs"):
        if not (math.isfinite(settings[key]) and settings[key] >= 0):
            raise ConfigError(f"setting {key!r} must be a finite number >= 0, got {settings[key]}")
    for key, choices in CHOICES.items():
        if settings[key] not in choices:
            raise ConfigError(f"setting {key!r} must be one of {', '.join(choices)}, got {settings[key]!r}")
    if settings["select_metric"] not in METRICS:
        raise ConfigError(
            f"setting 'select_metric' must be one of {', '.join(METRICS)}, got {settings['select_metric']!r}"
        )
    if settings["eval_every"] < 0:
        raise ConfigError(
            f"setting 'eval_every' must be >= 0 (0: after the last epoch only), got {settings['eval_every']}"
        )
    steps = settings["lr_steps"]
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in steps) or any(
        b <= a for a, b in zip(steps, steps[1:])
    ):
        # a step after the last epoch is allowed (never reached): a recipe can be shortened with --epochs
        raise ConfigError(f"setting 'lr_steps' must be increasing epochs >= 1, got {steps!r}")
    if settings["schedule"] == "step" and not steps:
        raise ConfigError(
            "schedule 'step' needs lr_steps (the epochs after which the rate is multiplied by lr_gamma)"
        )
    if steps and settings["schedule"] != "step":
        raise ConfigError(f'lr_steps is set but schedule is {settings["schedule"]!r}; use schedule = "step"')
    if image:
        if settings["image_size"] < 16:
            raise ConfigError(f"setting 'image_size' must be >= 16, got {settings['image_size']}")
        if settings["workers"] < 0:
            raise ConfigError(f"setting 'workers' must be >= 0, got {settings['workers']}")
        if not settings["backbone"] or not settings["pretrained"]:
            raise ConfigError("settings 'backbone' and 'pretrained' must be non-empty")
    return settings


def check_variants(variants: List[Variant]) -> None:
    for i, v in enumerate(variants):
        if not isinstance(v.name, str) or not v.name.strip():
            raise ConfigError(f"variant #{i + 1}: name must be a non-empty string, got {v.name!r}")
        if not v.name.isprintable() or "|" in v.name:  # a row of summary.md's tables each
            raise ConfigError(
                f"variant #{i + 1}: name {v.name!r} holds a character that is not printable (a line "
                "break, a tab, another control or format character) or '|' (the column separator of "
                "summary.md's tables)"
            )
    names = [v.name for v in variants]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"variant names must be unique, repeated: {dupes}")
    for v in variants:
        what = f"variant {v.name!r}"
        if v.kind not in KINDS:
            raise ConfigError(f"{what}: kind must be one of {KINDS}, got {v.kind!r}")
        for key in ("loss_kwargs", "miner_kwargs", "memory_kwargs"):
            if not isinstance(getattr(v, key), dict):
                raise ConfigError(f"{what}: {key} must be a table")
        if v.kind == "train" and not v.loss:
            raise ConfigError(f"{what}: a trained variant needs 'loss'")


def build_loss(v: Variant, embedding_size: int, num_classes: int) -> Tuple[Any, Any]:
    """``(loss, miner)`` for a trained variant; the memory, if any, wraps the loss."""
    what = f"variant {v.name!r}"
    loss, miner = _loss_and_miner(v, num_classes)
    if v.memory:
        cls = import_path(v.memory, f"{what} memory", "memory")
        try:
            loss = cls(loss, embedding_size, miner=miner, **v.memory_kwargs)
        except Exception as exc:
            raise ConfigError(f"{what} memory: {exc}") from None
        miner = None
    return loss, miner


def check_on_a_batch(v: Variant, embedding_size: int, num_classes: int, batch_size: int, m: int) -> None:
    """Run a trained variant's miner and loss once, forward and backward, on a batch shaped like
    the study's (``batch_size`` random embeddings, ``m`` per class), so that keyword arguments a
    constructor took without checking them (PML's losses accept ``alpha = "two"``) fail before
    any training, as a :class:`ConfigError`. The memory, if any, is left out: it is checked when
    built, and under torchrun its call would gather across the ranks."""
    import torch

    loss, miner = _loss_and_miner(v, num_classes)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(batch_size, embedding_size, generator=g).requires_grad_(True)
    labels = torch.arange(batch_size // m).repeat_interleave(m)
    try:
        pairs = miner(emb, labels) if miner is not None else None
        value = loss(emb, labels, pairs) if pairs is not None else loss(emb, labels)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            value.backward()
    except Exception as exc:
        raise ConfigError(
            f"variant {v.name!r}: its {'miner and ' if miner is not None else ''}loss failed on a batch of "
            f"{batch_size} random embeddings: {type(exc).__name__}: {exc}"
        ) from None


def _loss_and_miner(v: Variant, num_classes: int) -> Tuple[Any, Any]:
    """The loss and the miner of a trained variant, as configured (no memory)."""
    what = f"variant {v.name!r}"
    kwargs = copy.deepcopy(v.loss_kwargs)
    if kwargs.get("num_classes") == "auto":
        kwargs["num_classes"] = num_classes
    if not v.loss:
        raise ConfigError(f"{what}: a trained variant needs 'loss'")
    loss = _construct(import_path(v.loss, f"{what} loss", "loss"), kwargs, f"{what} loss")
    from ..losses import AdaptiveMSLoss

    if (
        isinstance(loss, AdaptiveMSLoss)
        and loss.margin_mode == "learned"
        and (loss.num_classes or 0) < num_classes
    ):
        raise ConfigError(
            f"{what} loss: num_classes={loss.num_classes} is smaller than the {num_classes} training classes "
            '(learned thresholds need one per class; use num_classes = "auto")'
        )
    miner = None
    if v.miner:
        miner = _construct(import_path(v.miner, f"{what} miner", "miner"), v.miner_kwargs, f"{what} miner")
    return loss, miner


def _construct(cls: Any, kwargs: Dict[str, Any], what: str) -> Any:
    try:
        return cls(**kwargs)
    except Exception as exc:
        raise ConfigError(f"{what}: {exc}") from None


# the settings a floor's numbers depend on: raw inputs need only the data, an untrained
# network also its embedding size and (image data sets) its backbone and input size; a trained
# variant depends on every setting but those in NOT_HASHED
FLOOR_SETTINGS = {
    "raw": ("dataset",),
    "untrained": ("dataset", "embedding_size", "backbone", "pretrained", "image_size"),
}


def variant_hash(v: Variant, settings: Dict[str, Any]) -> str:
    """A short hash of everything that determines a variant's numbers except the seed."""
    keys = list(FLOOR_SETTINGS.get(v.kind, [k for k in settings if k not in NOT_HASHED]))
    if "dataset_sha256" in settings and "dataset_sha256" not in keys:  # a user's .npz: its contents
        keys.append("dataset_sha256")
    relevant = {k: settings.get(k) for k in sorted(keys)}
    blob = json.dumps({"variant": v.as_dict(), "settings": relevant}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]
