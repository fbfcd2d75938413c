"""Argument and input checks shared by the PML adapters (clear ValueErrors)."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch


def positive(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def non_negative(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def finite_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def optional_non_negative(name: str, value: object) -> Optional[float]:
    return None if value is None else non_negative(name, value)


def embeddings_and_labels(
    embeddings: torch.Tensor,
    labels: Optional[torch.Tensor],
    check_finite: bool,
    name: str = "embeddings",
    labels_name: str = "labels",
) -> None:
    """Shape, dtype, length and finiteness checks for one embeddings/labels pair."""
    if not torch.is_tensor(embeddings) or embeddings.ndim != 2:
        shape = tuple(embeddings.shape) if torch.is_tensor(embeddings) else type(embeddings).__name__
        raise ValueError(f"{name} must be a 2D tensor (batch_size, embedding_size), got {shape}")
    if not embeddings.is_floating_point():  # integer, bool, complex: no similarity gradient
        raise ValueError(
            f"{name} must be a floating-point tensor, got dtype {embeddings.dtype}; convert with {name}.float()"
        )
    if labels is not None:
        if not torch.is_tensor(labels) or labels.ndim != 1:
            shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
            raise ValueError(f"{labels_name} must be a 1D tensor, got {shape}")
        label_dtype(labels, labels_name)
        if len(labels) != len(embeddings):
            raise ValueError(f"{labels_name} has {len(labels)} entries but {name} has {len(embeddings)} rows")
    if check_finite and embeddings.numel() and not all_finite(embeddings):
        raise ValueError(f"{name} contain NaN or inf (pass check_finite=False for NaN-in, NaN-out behaviour)")


def batch_and_references(
    embeddings: torch.Tensor,
    labels: Optional[torch.Tensor],
    ref_emb: Optional[torch.Tensor],
    ref_labels: Optional[torch.Tensor],
    check_finite: bool,
) -> None:
    """:func:`embeddings_and_labels` of the batch and, given, of the references, whose width
    must be the batch's."""
    embeddings_and_labels(embeddings, labels, check_finite)
    if ref_emb is not None:
        embeddings_and_labels(ref_emb, ref_labels, check_finite, "ref_emb", "ref_labels")
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ref_emb has width {ref_emb.shape[1]} but embeddings has width {embeddings.shape[1]}"
            )


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite, in one reduction where possible.

    A NaN or an infinity anywhere makes the sum NaN or infinite (IEEE arithmetic never
    returns to a finite value from either), so a finite sum proves every element finite;
    only a sum that overflowed (huge but finite values) needs the elementwise test. One
    pass and one host synchronisation instead of the five passes of ``isfinite(t).all()``.
    """
    if t.is_floating_point() and probe_is_finite(finite_probe(t)):
        return True
    return bool(torch.isfinite(t).all())


def finite_probe(*tensors: Optional[torch.Tensor]) -> torch.Tensor:
    """A 0-d tensor that is finite only if every element of the floating-point ``tensors``
    is (the sum of their sums, in float32 or wider; see :func:`all_finite`). Reading it is the
    check's one host synchronisation: a caller that reads it in its own frame gives
    ``torch.compile`` one graph break instead of one per nested call."""
    total: Optional[torch.Tensor] = None
    for t in tensors:
        if t is not None and t.is_floating_point():
            part = t.sum(dtype=torch.promote_types(t.dtype, torch.float32))
            total = part if total is None else total + part
    return torch.zeros(()) if total is None else total


def probe_is_finite(probe: torch.Tensor) -> bool:
    """Whether :func:`finite_probe`'s value is finite: its one host read (eager; a caller that
    ``torch.compile`` traces branches on ``torch.isfinite(probe)`` in its own frame instead, a
    quiet graph break where a traced ``.item()`` makes dynamo warn about capturing scalars)."""
    return math.isfinite(probe.item())


def label_dtype(labels: Optional[torch.Tensor], name: str = "labels") -> None:
    """Labels are class ids: an integer or bool tensor. Floating-point and complex
    labels are refused (a memory could not store them exactly; ``.long()`` them)."""
    if labels is None:
        return
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"{name} must be an integer or bool tensor (class ids), got dtype {labels.dtype}; "
            f"convert with {name}.long() if the values are whole numbers"
        )


def reference_labels_given(num_anchors: int, num_refs: int, ref_labels: Optional[torch.Tensor]) -> None:
    """PML's rule for label-defined pairs: references of another length than the anchors need
    their own labels (of the same length, the batch's labels are theirs)."""
    if ref_labels is None and num_refs != num_anchors:
        raise ValueError(f"ref_labels is required: ref_emb has {num_refs} rows, embeddings {num_anchors}")


_INDEX_DTYPES = (torch.int64, torch.int32)


def indices_tuple(indices_tuple: object, num_anchors: int, num_refs: Optional[int] = None) -> None:
    """A PML index tuple: 3 (triplets) or 4 (pairs) 1D int64/int32 tensors of matching
    lengths, anchor indices in ``[0, num_anchors)`` and, given ``num_refs``, the positive and
    negative ones in ``[0, num_refs)`` (one host read for all the ranges)."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError("indices_tuple must be (anchors, positives, negatives) or (a1, p, a2, n)")
    for t in indices_tuple:
        if not torch.is_tensor(t) or t.ndim != 1 or t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError("indices_tuple must hold 1D integer tensors")
        if t.dtype not in _INDEX_DTYPES:  # PML indexes with them: int8/int16 raise IndexError there,
            # and uint8 is read as a mask (another set of pairs)
            raise ValueError(
                f"indices_tuple must hold int64 or int32 tensors (as PML indexes with them), got {t.dtype}; "
                "convert with .long()"
            )
    groups = [indices_tuple] if len(indices_tuple) == 3 else [indices_tuple[:2], indices_tuple[2:]]
    for group in groups:
        if len({len(t) for t in group}) > 1:
            raise ValueError(f"indices_tuple: lengths differ, {[len(t) for t in group]}")
    anchors = indices_tuple[:1] if len(indices_tuple) == 3 else indices_tuple[0::2]
    ranges = [(t, num_anchors, "anchor", "") for t in anchors]
    if num_refs is not None:
        ranges += _reference_ranges(tuple(indices_tuple), num_refs, "")
    _index_ranges(ranges)


def reference_indices(indices_tuple: Tuple[torch.Tensor, ...], num_refs: int, refs: str = "") -> None:
    """The positive and negative indices of a checked PML index tuple lie in ``[0, num_refs)``
    (``refs``: what the references are, for the message)."""
    _index_ranges(_reference_ranges(indices_tuple, num_refs, refs))


def _reference_ranges(indices_tuple: Tuple[torch.Tensor, ...], num_refs: int, refs: str) -> List[Tuple]:
    pairs = len(indices_tuple) == 4
    named = zip(("positive", "negative"), indices_tuple[1::2] if pairs else indices_tuple[1:])
    return [(t, num_refs, name, refs) for name, t in named]


def _index_ranges(ranges: List[Tuple]) -> None:
    """Each ``(t, n, name, what)``: ``t``'s values in ``[0, n)``, read in one host transfer."""
    ranges = [r for r in ranges if len(r[0])]
    if not ranges:
        return
    device = ranges[0][0].device
    bounds = torch.stack([torch.stack(r[0].aminmax()).long().to(device) for r in ranges]).tolist()
    for (_, n, name, what), (lo, hi) in zip(ranges, bounds):
        if lo < 0 or hi >= n:
            raise ValueError(
                f"indices_tuple: {name} indices must lie in [0, {n}){what}, got values in [{lo}, {hi}]"
            )
