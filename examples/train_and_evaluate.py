"""Train on digits 0-4, evaluate retrieval on the unseen digits 5-9 with PML's AccuracyCalculator.

python examples/train_and_evaluate.py [--epochs 20]
"""

import argparse

import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from sklearn.datasets import load_digits

from pml_ms_plus import losses


def embed(model, x):
    model.eval()
    with torch.no_grad():
        return torch.nn.functional.normalize(model(x), dim=1)


def main(epochs: int) -> dict:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train, test = y < 5, y >= 5
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_func = losses.MSLoss(epsilon=0.1, collect_stats=True)
    calc = AccuracyCalculator(
        include=("mean_average_precision_at_r", "precision_at_1"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    before = calc.get_accuracy(embed(model, x[test]), y[test])
    xt, yt = x[train], y[train]
    sampler = MPerClassSampler(yt, m=16, batch_size=80, length_before_new_iter=len(yt))
    for epoch in range(epochs):
        model.train()
        for idx in torch.tensor(list(sampler)).split(80):
            loss = loss_func(model(xt[idx]), yt[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(
            f"epoch {epoch:3d}  loss {loss.item():.4f}  pairs +{loss_func.num_pos_pairs}/-{loss_func.num_neg_pairs}"
            f"  mean weight +{loss_func.mean_pos_weight:.3f}/-{loss_func.mean_neg_weight:.3f}"
        )
    after = calc.get_accuracy(embed(model, x[test]), y[test])
    for name in before:
        print(f"{name}: untrained {before[name]:.3f} -> trained {after[name]:.3f}")
    return after


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    main(parser.parse_args().epochs)
