"""Statistics over seeds: mean ± std, a t-based 95% confidence interval, a paired t-test."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

TEST_NAME = "paired two-sided t-test over seeds (scipy.stats.ttest_rel)"
ALPHA = 0.05


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (n − 1); std 0 for one value."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def ci95(values: Sequence[float]) -> Optional[Tuple[float, float]]:
    """The 95% confidence interval of the mean, ``mean ± t(0.975, n−1)·std/√n``; None for n < 2."""
    n = len(values)
    if n < 2:
        return None
    stats = importlib.import_module("scipy.stats")  # scikit-learn depends on scipy

    mean, std = mean_std(values)
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


@dataclass
class Paired:
    n: int  # seeds both variants have
    diff: float  # mean of (variant − baseline) over those seeds
    p: float  # two-sided p-value

    @property
    def significant(self) -> bool:
        return self.p < ALPHA


def paired_test(values: Dict[int, float], baseline: Dict[int, float]) -> Optional[Paired]:
    """Paired t-test of ``values`` against ``baseline`` over the seeds both hold; None for < 2.

    Equal differences on every seed have no variance: p = 1 when they are all 0, else 0.
    """
    seeds = sorted(set(values) & set(baseline))
    if len(seeds) < 2:
        return None
    a = [values[s] for s in seeds]
    b = [baseline[s] for s in seeds]
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs)
    if max(diffs) - min(diffs) <= 1e-12 * max(1.0, abs(mean)):
        return Paired(len(seeds), mean, 1.0 if abs(mean) <= 1e-12 else 0.0)
    stats = importlib.import_module("scipy.stats")  # scikit-learn depends on scipy

    p = float(stats.ttest_rel(a, b).pvalue)
    return Paired(len(seeds), mean, p)
