"""GatheredMSLoss in one process (the 2-process gloo checks under DDP are in test_distributed.py)."""

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.reducers import AvgNonZeroReducer

from pml_ms_plus import losses
from pml_ms_plus.losses import GatheredMSLoss, MSProblem

LOCAL, CLASSES = 10, 4


def global_batch(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * LOCAL, 6, generator=g, dtype=torch.float64)
    return x, torch.randint(0, CLASSES, (2 * LOCAL,), generator=g)


def test_one_process_is_the_plain_loss():
    x, y = global_batch(501)
    inner = losses.AdaptiveMSLoss(epsilon=0.1, margin_mode="learned", num_classes=CLASSES).double()
    torch.testing.assert_close(GatheredMSLoss(inner)(x, y), inner(x, y), rtol=0, atol=0)


def test_against_gathered_excludes_each_anchors_own_copy():
    x, y = global_batch(502)
    rank1 = MSProblem.against_gathered(x[LOCAL:], y[LOCAL:], x, y, rank=1)
    assert torch.equal(rank1.self_index, torch.arange(LOCAL, 2 * LOCAL))
    loss = losses.MSLoss(epsilon=0.1).double()
    halves = [
        loss.forward_problem(MSProblem.against_gathered(x[s], y[s], x, y, rank=r))
        for r, s in enumerate((slice(0, LOCAL), slice(LOCAL, None)))
    ]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, loss(x, y))


def test_refusals():
    with pytest.raises(TypeError, match="DistributedLossWrapper"):
        GatheredMSLoss(pml_losses.ContrastiveLoss())
    with pytest.raises(TypeError, match="use it directly"):
        GatheredMSLoss(losses.CrossBatchMemory(losses.MSLoss(), 4, memory_size=8))
    with pytest.raises(ValueError, match="anchors must be one of"):
        GatheredMSLoss(losses.MSLoss(), anchors="some")
    with pytest.raises(ValueError, match="MeanReducer.*AvgNonZeroReducer"):
        GatheredMSLoss(losses.MSLoss(reducer=AvgNonZeroReducer()), anchors="local")
    assert GatheredMSLoss(losses.MSLoss(reducer=AvgNonZeroReducer())).anchors == "all"
    with pytest.raises(ValueError, match="labels as a tensor"):
        GatheredMSLoss(losses.MSLoss())(torch.randn(4, 3), None)
