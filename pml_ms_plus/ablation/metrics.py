"""Retrieval metrics: PML's ``AccuracyCalculator`` extended with the MS paper's Recall@K."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator, try_getting_not_lone_labels

RECALL_KS = (1, 2, 4, 8)
METRICS: Dict[str, str] = {
    "mean_average_precision_at_r": "MAP@R",
    "r_precision": "R-precision",
    "precision_at_1": "P@1",
    **{f"recall_at_{k}": f"R@{k}" for k in RECALL_KS},
    "NMI": "NMI",
}


def recall_at_k(knn_labels: torch.Tensor, query_labels: torch.Tensor, k: int) -> float:
    """The fraction of queries with an item of their own class among their ``k`` nearest
    references (``knn_labels``: the references' labels in order of distance, the query itself
    already excluded)."""
    hit = (knn_labels[:, :k] == query_labels[:, None]).any(dim=1)
    return float(hit.double().mean())


class RetrievalCalculator(AccuracyCalculator):
    """PML's calculator plus ``recall_at_1/2/4/8`` (extended by subclassing, as PML documents).

    Recall@K follows the MS paper: a query counts as a hit when any of its ``K`` nearest
    neighbours (the query itself excluded) shares its class. Queries whose class has no other
    item among the references are left out, as PML does for P@1 and MAP@R. ``k`` is raised to at
    least 8 neighbours (PML's ``max_bin_count`` can be smaller on data sets with few images per
    class, e.g. SOP); MAP@R and R-precision still stop at R.
    """

    def _recall(
        self, k: int, knn_labels: Any, query_labels: Any, not_lone_query_mask: Any, **kwargs: Any
    ) -> float:
        knn, labels = try_getting_not_lone_labels(knn_labels, query_labels, not_lone_query_mask)
        if knn is None:
            return float("nan")
        return recall_at_k(knn, labels, k)

    def calculate_recall_at_1(self, **kwargs: Any) -> float:
        return self._recall(1, **kwargs)

    def calculate_recall_at_2(self, **kwargs: Any) -> float:
        return self._recall(2, **kwargs)

    def calculate_recall_at_4(self, **kwargs: Any) -> float:
        return self._recall(4, **kwargs)

    def calculate_recall_at_8(self, **kwargs: Any) -> float:
        return self._recall(8, **kwargs)

    def requires_knn(self) -> List[str]:
        return super().requires_knn() + [f"recall_at_{k}" for k in RECALL_KS]

    def determine_k(self, bin_counts: Any, num_reference_embeddings: int, ref_includes_query: bool) -> int:
        k = super().determine_k(bin_counts, num_reference_embeddings, ref_includes_query)
        return max(k, min(max(RECALL_KS), num_reference_embeddings - int(ref_includes_query)))


def faiss_device(device: torch.device) -> torch.device:
    """``cuda`` when the study runs there and faiss has GPU support (faiss-gpu), else ``cpu``."""
    if device.type != "cuda":
        return torch.device("cpu")
    import faiss

    has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    return device if has_gpu else torch.device("cpu")


def evaluate(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    reference: Optional[torch.Tensor] = None,
    reference_labels: Optional[torch.Tensor] = None,
    device: Optional[torch.device] = None,
) -> Dict[str, float]:
    """Every metric of ``METRICS`` on L2-normalised embeddings (cosine retrieval), faiss k-NN.

    Without ``reference`` each query is retrieved among the other queries (the query itself
    excluded); with it (In-Shop) queries are retrieved in the reference (gallery) set.
    """
    dev = faiss_device(device or torch.device("cpu"))
    calc = RetrievalCalculator(include=tuple(METRICS), k="max_bin_count", device=dev)
    q = torch.nn.functional.normalize(query.float(), dim=1)
    if reference is None:
        acc = calc.get_accuracy(q, query_labels)
    else:
        r = torch.nn.functional.normalize(reference.float(), dim=1)
        acc = calc.get_accuracy(q, query_labels, r, reference_labels, ref_includes_query=False)
    return {name: float(acc[name]) for name in METRICS}
