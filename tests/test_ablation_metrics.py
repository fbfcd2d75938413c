"""Recall@K (PML's AccuracyCalculator, subclassed) against a brute-force reference; the seed statistics."""

import math

import numpy as np
import pytest
import torch

from pml_ms_plus.ablation import metrics, stats


def brute_recall(query, query_y, ref, ref_y, k, same_source):
    """Cosine k-NN by hand: the fraction of (non-lone) queries with a same-class item among the k nearest."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    r = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    sims = q @ r.T
    hits, n = 0, 0
    for i in range(len(q)):
        order = [j for j in np.argsort(-sims[i], kind="stable") if not (same_source and j == i)]
        others = [j for j in order if ref_y[j] == query_y[i]]
        if not others:
            continue  # a lone query: left out, as PML does
        n += 1
        hits += any(ref_y[j] == query_y[i] for j in order[:k])
    return hits / n


@pytest.mark.parametrize("same_source", [True, False])
def test_recall_at_k_equals_brute_force(same_source):
    g = np.random.default_rng(0)
    query = g.standard_normal((60, 8)).astype(np.float32)
    query_y = g.integers(0, 12, 60)
    if same_source:
        ref, ref_y = query, query_y
        got = metrics.evaluate(torch.from_numpy(query), torch.from_numpy(query_y))
    else:
        ref = g.standard_normal((90, 8)).astype(np.float32)
        ref_y = g.integers(0, 14, 90)  # some query classes may be absent: lone queries
        got = metrics.evaluate(
            torch.from_numpy(query), torch.from_numpy(query_y), torch.from_numpy(ref), torch.from_numpy(ref_y)
        )
    for k in metrics.RECALL_KS:
        want = brute_recall(query, query_y, ref, ref_y, k, same_source)
        assert got[f"recall_at_{k}"] == pytest.approx(want, abs=1e-12), k
    assert got["recall_at_1"] == pytest.approx(got["precision_at_1"])
    assert set(got) == set(metrics.METRICS)


def test_recall_needs_k_of_8_even_with_two_per_class():
    """PML's max_bin_count k would be 1 here (2 items per class): k is raised to 8."""
    g = np.random.default_rng(1)
    x = torch.from_numpy(g.standard_normal((40, 4)).astype(np.float32))
    y = torch.arange(40) // 2
    got = metrics.evaluate(x, y)
    want = brute_recall(x.numpy(), y.numpy(), x.numpy(), y.numpy(), 8, True)
    assert got["recall_at_8"] == pytest.approx(want)
    assert got["recall_at_8"] > got["recall_at_1"]


def test_ci95_and_paired_test():
    values = [0.50, 0.52, 0.55]
    lo, hi = stats.ci95(values)
    mean, std = stats.mean_std(values)
    half = 4.302652729911275 * std / math.sqrt(3)  # t(0.975, 2)
    assert (lo, hi) == pytest.approx((mean - half, mean + half))
    assert stats.ci95([0.5]) is None
    from scipy.stats import ttest_rel

    a, b = {0: 0.50, 1: 0.60, 2: 0.58}, {0: 0.40, 1: 0.47, 2: 0.49, 3: 0.9}
    t = stats.paired_test(a, b)
    assert t.n == 3 and t.diff == pytest.approx((0.10 + 0.13 + 0.09) / 3)
    assert t.p == pytest.approx(ttest_rel([0.50, 0.60, 0.58], [0.40, 0.47, 0.49]).pvalue)
    assert stats.paired_test({0: 1.0}, {0: 0.5}) is None  # one shared seed
    assert stats.paired_test({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}).p == 1.0  # identical
