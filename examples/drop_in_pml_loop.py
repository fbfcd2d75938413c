"""A plain PML training loop where MSLoss replaces PML's MultiSimilarityLoss + miner.

    python examples/drop_in_pml_loop.py [--steps 200] [--memory]

With --memory the loss is wrapped in cross-batch memory (XBM): swapping PML's
CrossBatchMemory import for ours is the only change a PML user makes.
"""

import argparse

import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from sklearn.datasets import load_digits

from pml_ms_plus import losses


def main(steps: int, memory: bool) -> float:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_func = losses.MSLoss(epsilon=0.1)  # was: PML loss + MultiSimilarityMiner(0.1)
    if memory:
        # the XBM paper's schedule: in-batch loss only for a warm-up, then batch + memory
        loss_func = losses.CrossBatchMemory(
            loss_func, embedding_size=32, memory_size=800,
            start_iteration=min(50, steps // 2), batch_weight=1.0, memory_weight=1.0,
        )  # fmt: skip
    sampler = MPerClassSampler(y, m=8, batch_size=80, length_before_new_iter=80 * steps)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=80, sampler=sampler)
    for step, (xb, yb) in enumerate(loader):
        loss = loss_func(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    if memory:  # the memory is part of the checkpoint: a resumed run continues with the same losses
        state = {"model": model.state_dict(), "loss": loss_func.state_dict()}
        print(f"checkpoint holds {len(state['loss']['embedding_memory'])} memory entries")
    print(f"final loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--memory", action="store_true", help="wrap the loss in CrossBatchMemory")
    args = parser.parse_args()
    main(args.steps, args.memory)
