"""CrossBatchMemory under torch.distributed: 2 CPU processes on gloo."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pml_ms_plus import losses

WORLD, LOCAL, DIM, MEMORY, STEPS = 2, 12, 8, 40, 5


def full_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    # classes come in pairs inside each rank's half, so every anchor has a true positive
    labels = torch.cat([torch.arange(LOCAL) // 2 + 10 * r + step % 3 for r in range(WORLD)]) % 9
    return torch.randn(WORLD * LOCAL, DIM, generator=g, dtype=torch.float64), labels


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

        native = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY).double()
        wrapped_inner = losses.CrossBatchMemory(
            losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY, gather=False
        ).double()
        wrapped = DistributedLossWrapper(wrapped_inner)
        records = []
        for step in range(STEPS):
            x, y = full_batch(step)
            local = x[rank * LOCAL : (rank + 1) * LOCAL].clone().requires_grad_(True)
            local_y = y[rank * LOCAL : (rank + 1) * LOCAL]
            value = native(local, local_y)
            (grad,) = torch.autograd.grad(value, local)
            before = wrapped_inner.queue_idx
            wrapped(local.detach(), local_y)
            records.append(
                dict(
                    loss=value.detach(),
                    grad=grad,
                    memory=native.embedding_memory.clone(),
                    labels=native.label_memory.clone(),
                    queue_idx=native.queue_idx,
                    wrapped_advance=(wrapped_inner.queue_idx - before) % MEMORY,
                )
            )
        # the default gather="auto" inside PML's wrapper would gather twice: refused clearly
        misused = DistributedLossWrapper(
            losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY).double()
        )
        try:
            misused(local.detach(), local_y)
            records.append("no error")
        except ValueError as exc:
            records.append(str(exc))
        torch.save(records, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_ranks_share_one_memory_and_match_a_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]

    single = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY).double()
    for step in range(STEPS):
        x, y = full_batch(step)
        x.requires_grad_(True)
        expected = single(x, y)
        (expected_grad,) = torch.autograd.grad(expected, x)
        r0, r1 = ranks[0][step], ranks[1][step]
        # identical memories on every rank, slot by slot, and equal to the single process's
        assert torch.equal(r0["memory"], r1["memory"]) and torch.equal(r0["labels"], r1["labels"])
        torch.testing.assert_close(r0["memory"], single.embedding_memory)
        assert r0["queue_idx"] == r1["queue_idx"] == single.queue_idx
        # each rank's loss covers its own anchors: their mean is the global loss,
        # and DDP's gradient averaging gives the single-process gradient
        torch.testing.assert_close((r0["loss"] + r1["loss"]) / WORLD, expected.detach())
        for r, rec in enumerate((r0, r1)):
            torch.testing.assert_close(rec["grad"] / WORLD, expected_grad[r * LOCAL : (r + 1) * LOCAL])
        # inside PML's DistributedLossWrapper (gather=False) the batch is gathered once, not twice
        assert r0["wrapped_advance"] == WORLD * LOCAL
    for r in range(WORLD):
        assert "gathered already" in ranks[r][-1] and "gather=False" in ranks[r][-1]
