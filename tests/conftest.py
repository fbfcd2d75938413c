"""The device/dtype grid shared by every parity test."""

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def tolerances(dtype):
    """(rtol, atol) for comparing against PML in ``dtype``."""
    return {
        torch.float16: (2e-2, 2e-3),
        torch.float32: (1e-5, 1e-6),
        torch.float64: (1e-9, 1e-12),
    }[dtype]


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
