"""The same loop with cross-batch memory (XBM): swap PML's CrossBatchMemory import for ours.

python examples/cross_batch_memory.py [--steps 200]
"""

import argparse

import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from sklearn.datasets import load_digits

from pml_ms_plus import losses


def main(steps: int) -> float:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # the XBM paper's schedule: in-batch loss only for a warm-up, then batch + memory
    loss_func = losses.CrossBatchMemory(
        losses.MSLoss(epsilon=0.1),
        embedding_size=32,
        memory_size=800,
        start_iteration=min(50, steps // 2),
        batch_weight=1.0,
        memory_weight=1.0,
    )
    sampler = MPerClassSampler(y, m=8, batch_size=80, length_before_new_iter=80 * steps)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=80, sampler=sampler)
    for step, (xb, yb) in enumerate(loader):
        loss = loss_func(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  memory filled: {loss_func.has_been_filled}")
    torch.save(loss_func.state_dict(), "/dev/null")  # the memory checkpoints with the model
    print(f"final loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)
