"""Image backbones: a torchvision (or timm) classifier whose last layer becomes a linear embedding.

``--backbone NAME`` is a ``torchvision.models`` classification model (default ``resnet50``) or
``timm:NAME``. ``--pretrained imagenet`` takes the library's own ImageNet weights (downloaded by
that library, on the user's machine, once, into its cache); ``PATH`` loads a local state dict with
``torch.load(..., weights_only=True)``; ``none`` starts from random weights (drawn per seed).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .config import ConfigError


class BackboneError(ConfigError):
    """A backbone or weights file that cannot be used; the message names it."""


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


class EmbeddingNet(nn.Module):
    """``trunk`` (a classifier without its last layer) -> ``embed`` (linear, ``embedding_size``).

    With ``freeze_bn`` every BatchNorm layer keeps its (pretrained) running statistics, i.e.
    stays in eval mode while the rest trains, and its affine parameters are not trained, as
    the MS code and *A Metric Learning Reality Check* do.
    """

    def __init__(self, trunk: nn.Module, in_features: int, embedding_size: int, freeze_bn: bool):
        super().__init__()
        self.trunk = trunk
        self.embed = nn.Linear(in_features, embedding_size)
        self.freeze_bn = freeze_bn
        if freeze_bn:
            for m in self.trunk.modules():
                if _is_bn(m):
                    for p in m.parameters():
                        p.requires_grad_(False)

    def train(self, mode: bool = True) -> "EmbeddingNet":
        super().train(mode)
        if self.freeze_bn:
            for m in self.trunk.modules():
                if _is_bn(m):
                    m.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.trunk(x)
        if isinstance(f, (tuple, list)):  # e.g. GoogLeNet / Inception outputs with aux logits
            f = f[0]
        return f.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.features(x))


def _last_linear(model: nn.Module) -> Tuple[str, nn.Linear]:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise BackboneError(f"{type(model).__name__} has no linear classifier to replace")
    return found[-1]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _torchvision_models() -> Any:
    try:
        torchvision = importlib.import_module("torchvision")  # an optional dependency: typed Any
    except ImportError as exc:
        raise BackboneError(
            f"image data sets need torchvision (pip install 'pml-ms-plus[vision]'): {exc}"
        ) from None
    return torchvision.models


def _make(name: str, imagenet: bool) -> nn.Module:
    """The library's classifier for ``name``, with ImageNet weights or random ones."""
    if name.startswith("timm:"):
        try:
            timm = importlib.import_module("timm")
        except ImportError:
            raise BackboneError(f"--backbone {name}: timm is not installed (pip install timm)") from None
        arch = name[len("timm:") :]
        try:
            return timm.create_model(arch, pretrained=imagenet)
        except Exception as exc:
            raise BackboneError(f"--backbone {name}: timm cannot create it: {exc}") from None
    models = _torchvision_models()
    known = models.list_models(module=models)
    if name not in known:
        raise BackboneError(
            f"unknown --backbone {name!r}: use a torchvision.models classification model "
            f"(e.g. resnet18, resnet50, convnext_tiny, vit_b_16; {len(known)} in all) or timm:NAME"
        )
    if not imagenet:
        return models.get_model(name, weights=None)
    try:
        weights = models.get_model_weights(name).DEFAULT
    except Exception as exc:
        raise BackboneError(
            f"--backbone {name}: torchvision has no ImageNet weights for it ({exc})"
        ) from None
    try:
        return models.get_model(name, weights=weights)  # torchvision downloads them (once, cached)
    except Exception as exc:
        raise BackboneError(
            f"--pretrained imagenet: torchvision could not load {weights} for {name}: {exc} "
            "(offline? download them once, or pass a local state dict as --pretrained PATH)"
        ) from None


def _strip(model: Any, name: str) -> Tuple[nn.Module, int]:
    """Remove the classifier: ``(trunk, feature width)``."""
    if name.startswith("timm:"):
        width = int(model.num_features)
        model.reset_classifier(0)
        return model, width
    if getattr(model, "aux_logits", False):  # Inception / GoogLeNet: main output only
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    head_name, head = _last_linear(model)
    _replace(model, head_name, nn.Identity())
    return model, head.in_features


def _classifier_keys(model: Any, name: str) -> List[str]:
    if name.startswith("timm:"):
        clf = model.get_classifier()
        prefix = next((n for n, m in model.named_modules() if m is clf), None)
        return [k for k in model.state_dict() if prefix and k.startswith(prefix + ".")]
    head_name, _ = _last_linear(model)
    aux = ("AuxLogits.", "aux1.", "aux2.")
    return [k for k in model.state_dict() if k.startswith(head_name + ".") or k.startswith(aux)]


def _names(keys: List[str]) -> str:
    return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from ``path`` with ``torch.load(weights_only=True)``; BackboneError if it is none."""
    if not os.path.isfile(path):
        raise BackboneError(f"--pretrained {path}: no such file (use imagenet, none, or a state dict file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackboneError(
            f"--pretrained {path}: not a weights file torch.load(weights_only=True) can read ({first})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise BackboneError(
            f"--pretrained {path}: not a state dict (a mapping of parameter names to tensors)"
        )
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module.") :]: v for k, v in state.items()}
    if any(k.startswith("trunk.") for k in state):  # an EmbeddingNet of this tool: its trunk
        state = {k[len("trunk.") :]: v for k, v in state.items() if k.startswith("trunk.")}
    return state


def _load_into(model: nn.Module, name: str, state: Dict[str, torch.Tensor], path: str) -> None:
    """Load ``state`` into the full classifier; its classifier keys may be absent or of another
    shape (the classifier is replaced); any other difference is refused, naming the keys."""
    own = model.state_dict()
    skip = set(_classifier_keys(model, name))
    missing = [k for k in own if k not in state and k not in skip and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and k not in skip and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches (file vs model): {_names(shapes)}")
        raise BackboneError(f"--pretrained {path} does not fit {name}: " + "; ".join(parts))
    model.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=False)


@dataclass
class Backbone:
    """What every run of a study starts from: the trunk's initial weights (None: random, per seed)."""

    name: str
    pretrained: str
    in_features: int
    initial: Optional[Dict[str, torch.Tensor]]

    def build(self, embedding_size: int, freeze_bn: bool) -> EmbeddingNet:
        """A fresh network; the head (and with ``pretrained = none`` the trunk) draws from torch's
        current random state, so seed first."""
        trunk, width = _strip(_make(self.name, imagenet=False), self.name)
        if self.initial is not None:
            trunk.load_state_dict(self.initial)
        return EmbeddingNet(trunk, width, embedding_size, freeze_bn)


def prepare(name: str, pretrained: str) -> Backbone:
    """Resolve the backbone and its weights once, before any training: unknown names, missing
    timm, unavailable ImageNet weights and weights files that do not fit fail here."""
    if pretrained == "none":
        trunk, width = _strip(_make(name, imagenet=False), name)
        return Backbone(name, pretrained, width, None)
    if pretrained == "imagenet":
        trunk, width = _strip(_make(name, imagenet=True), name)
    else:
        state = load_state_dict(pretrained)
        model = _make(name, imagenet=False)
        _load_into(model, name, state, pretrained)
        trunk, width = _strip(model, name)
    initial = {k: v.detach().clone() for k, v in trunk.state_dict().items()}
    return Backbone(name, pretrained, width, initial)


def library_versions(name: str) -> Dict[str, str]:
    out = {}
    for lib in ("torchvision", "timm") if name.startswith("timm:") else ("torchvision",):
        try:
            out[lib] = importlib.import_module(lib).__version__
        except ImportError:
            pass
    return out
