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


@pytest.fixture(params=["boolean masks", "float masks"])
def masks(request, monkeypatch):
    """Both eager forms of the label masks and of the mining on every block size (see
    ``_blocks.FLOAT_MASK_ELEMENTS``): boolean masks with masked fills, or the float passes of
    ``_blocks.fill_where_`` (the form of blocks of 2**12 values and more)."""
    from pml_ms_plus import _blocks

    monkeypatch.setattr(_blocks, "FLOAT_MASK_ELEMENTS", 2**62 if request.param == "boolean masks" else 0)
    return request.param
