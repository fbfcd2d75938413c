"""Helpers shared by the test modules: seeded batches and the one table of tolerances."""

import pytest
import torch
from pytorch_metric_learning import distances as pml_distances

TOLERANCES = {  # (rtol, atol) for comparing two computations of the same number in a dtype
    torch.float16: (2e-2, 2e-3),
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-9, 1e-12),
}


def tolerances(dtype):
    """(rtol, atol) for comparing against PML in ``dtype``."""
    return TOLERANCES[dtype]


def tol(dtype):
    """The tolerances of ``dtype`` as keyword arguments of ``torch.testing.assert_close``."""
    rtol, atol = TOLERANCES[dtype]
    return dict(rtol=rtol, atol=atol)


def assert_close(a, b, dtype):
    """``a`` equals ``b`` to the tolerances of ``dtype`` (compared in float64)."""
    torch.testing.assert_close(a.double(), b.double(), **tol(dtype))


def skip_if_half_unsupported(device, dtype):
    if dtype == torch.float16 and device.type == "cpu":
        try:
            torch.ones(2, 2, dtype=dtype) @ torch.ones(2, 2, dtype=dtype)
        except RuntimeError:
            pytest.skip("float16 matmul not supported on this CPU build")


def make_batch(seed, n=32, dim=16, classes=6, device="cpu", dtype=torch.float32, requires_grad=True):
    """A seeded batch where every class appears at least twice."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    labels = labels[torch.randperm(n, generator=g)]
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    x = x.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return x, labels.to(device)


def planted_nan(base, cells):
    """PML's distance ``base`` with NaN planted in chosen cells of its matrix (as a
    half-precision zero row's normalisation, 0/0, makes them)."""

    class PlantedNaN(base):
        def compute_mat(self, query_emb, ref_emb):
            mat = super().compute_mat(query_emb, ref_emb).clone()
            rows, cols = zip(*cells)
            mat[list(rows), list(cols)] = float("nan")
            return mat

    return PlantedNaN()


NAN_CELLS = {
    "a positive": [(0, 1)],
    "a negative": [(3, 6)],
    "every positive of two anchors": [(6, 7), (7, 6)],
    "mixed": [(0, 2), (1, 4), (4, 1), (5, 3), (2, 7)],
}
NAN_BASES = {"distance": pml_distances.LpDistance, "similarity": pml_distances.CosineSimilarity}


def nan_batch(device, epsilon):
    x, _ = make_batch(40 + int(epsilon * 10), n=8, dim=4, device=device)
    return x, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2], device=device)
