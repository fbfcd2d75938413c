"""Differential fuzzing against PML: random batches, label patterns, distances, reducers,
tuples and hyper-parameters over wide ranges, including the extremes.

Deterministic by default (``derandomize``: the same examples in every run). Profiles,
chosen with the environment variable ``PML_MS_PLUS_FUZZ``:

* ``ci`` (default): a few dozen examples per property, seconds in all;
* ``long``: 2,000 examples per property, for a long run before a release:
  ``PML_MS_PLUS_FUZZ=long pytest tests/test_fuzz.py``.
"""

import contextlib
import os

import pytest
import torch
from helpers import tol
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_ms_plus import _blocks, losses, miners

_COMMON = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True)
settings.register_profile("ci", max_examples=40, **_COMMON)
settings.register_profile("long", max_examples=2000, **_COMMON)
settings.load_profile(os.environ.get("PML_MS_PLUS_FUZZ", "ci"))

DISTANCES = {
    "cosine": lambda: pml_distances.CosineSimilarity(),
    "dot": lambda: pml_distances.DotProductSimilarity(),
    "dot_raw": lambda: pml_distances.DotProductSimilarity(normalize_embeddings=False),
    "lp": lambda: pml_distances.LpDistance(),
    "lp_raw": lambda: pml_distances.LpDistance(normalize_embeddings=False),
    "lp1": lambda: pml_distances.LpDistance(p=1),
    "lp_squared": lambda: pml_distances.LpDistance(power=2),
    "snr": lambda: pml_distances.SNRDistance(),
}
REDUCERS = {
    "mean": lambda: pml_reducers.MeanReducer(),
    "avg_non_zero": lambda: pml_reducers.AvgNonZeroReducer(),
    "sum": lambda: pml_reducers.SumReducer(),
    "threshold": lambda: pml_reducers.ThresholdReducer(low=0.01),
    "do_nothing": lambda: pml_reducers.DoNothingReducer(),
}
LABEL_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8, torch.bool]


def make_labels(pattern, n, g, dtype):
    if pattern == "all_equal":
        y = torch.zeros(n, dtype=torch.int64)
    elif pattern == "all_distinct":
        y = torch.randperm(max(n, 1), generator=g)[:n]
    elif pattern == "singletons":  # pairs of classes and a few singletons
        y = torch.arange(n) // 2
        y[torch.randperm(n, generator=g)[: n // 3]] += 1000
    else:
        y = torch.randint(0, 3, (n,), generator=g)
    if dtype == torch.bool:
        return (y % 2).bool()
    if dtype in (torch.uint8, torch.int8):
        return (y % 100).to(dtype)
    if dtype == torch.int64 and pattern == "huge":
        return y * (2**61) - 2**62
    return y.to(dtype)


@st.composite
def problems(
    draw, dists=tuple(DISTANCES), tuple_kinds=("none", "none", "ms_miner", "pair_margin", "triplets")
):
    """A batch, optional references, labels, a distance, hyper-parameters and a tuple kind."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    n = draw(st.integers(0, 12))
    # dim >= 2: in one dimension every cosine is exactly +-1, and mining at exact ties may split
    # differently on the fused path (S in blocks, another summation order; see the README)
    dim = draw(st.integers(2, 5))
    pattern = draw(st.sampled_from(["random", "all_equal", "all_distinct", "singletons", "huge"]))
    label_dtype = draw(st.sampled_from(LABEL_DTYPES))
    refs = draw(st.sampled_from(["none", "other", "same_x_cloned_y", "cloned_x_same_y", "empty"]))
    scale = draw(st.sampled_from([1e-2, 1.0, 10.0]))
    x = (scale * torch.randn(n, dim, generator=g, dtype=torch.float64)).requires_grad_(True)
    y = make_labels(pattern, n, g, label_dtype)
    ref = ref_y = None
    if refs == "other":
        m = draw(st.integers(0, 10))
        ref = (scale * torch.randn(m, dim, generator=g, dtype=torch.float64)).requires_grad_(True)
        ref_y = make_labels(pattern, m, g, label_dtype)
        if m and n and draw(st.booleans()):  # shared classes
            ref_y[: min(m, n)] = y[: min(m, n)]
    elif refs == "same_x_cloned_y":
        ref, ref_y = x, y.clone()
    elif refs == "cloned_x_same_y":
        ref, ref_y = x.detach().clone(), y
    elif refs == "empty":
        ref, ref_y = torch.zeros(0, dim, dtype=torch.float64), y[:0]
    dist = draw(st.sampled_from(list(dists)))
    is_similarity = DISTANCES[dist]().is_inverted
    return dict(
        x=x,
        y=y,
        ref=ref,
        ref_y=ref_y,
        refs=refs,
        dist=dist,
        alpha=draw(st.sampled_from([0.1, 1.0, 2.0, 10.0, 50.0])),
        beta=draw(st.sampled_from([0.5, 10.0, 50.0, 200.0, 1000.0])),
        base=draw(st.sampled_from([-0.5, 0.0, 0.3, 0.5, 0.9] if is_similarity else [0.0, 0.5, 1.0, 2.0])),
        epsilon=draw(st.sampled_from([None, None, 0.0, 0.1, 0.5])),
        reducer=draw(st.sampled_from(list(REDUCERS))),
        tuple_kind=draw(st.sampled_from(list(tuple_kinds))),
        float_masks=draw(st.booleans()),  # the eager form of the masks (see float_masks)
    )


@contextlib.contextmanager
def float_masks(on):
    """The float-pass form of the label masks and the mining on every block (``on``), else the
    boolean one on every block; these problems are smaller than ``_blocks.FLOAT_MASK_ELEMENTS``."""
    saved = _blocks.FLOAT_MASK_ELEMENTS
    _blocks.FLOAT_MASK_ELEMENTS = 0 if on else 2**62
    try:
        yield
    finally:
        _blocks.FLOAT_MASK_ELEMENTS = saved


def reduced(value):
    """A scalar from any reducer's output (DoNothingReducer returns the loss dict)."""
    if isinstance(value, dict):
        losses_ = value["loss"]["losses"]
        return losses_.sum() if torch.is_tensor(losses_) else torch.as_tensor(float(losses_))
    return value


def grads(value, inputs):
    if not value.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    return [
        torch.zeros_like(t) if g is None else g
        for t, g in zip(inputs, torch.autograd.grad(value, inputs, allow_unused=True))
    ]


def inputs_of(p):
    out = [p["x"]]
    if p["ref"] is not None and p["ref"] is not p["x"] and p["ref"].requires_grad:
        out.append(p["ref"])
    return out


def pml_tuple(p, mine_x, mine_ref):
    kind = p["tuple_kind"]
    d = DISTANCES[p["dist"]]()
    if kind == "ms_miner":
        miner = pml_miners.MultiSimilarityMiner(0.1, distance=d)
    elif kind == "pair_margin":
        miner = pml_miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8, distance=d)
    else:
        miner = pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets="all", distance=d)
    return miner(mine_x, p["y"], mine_ref, p["ref_y"])


def run(loss_fn, p, tup):
    value = reduced(loss_fn(p["x"], p["y"], tup, p["ref"], p["ref_y"]))
    return value.detach(), grads(value, inputs_of(p))


@given(problems())
def test_loss_matches_pml_in_float64(p):
    x = p["x"]
    mine_x = x.detach()
    mine_ref = None if p["ref"] is None else (mine_x if p["ref"] is x else p["ref"].detach())
    tup = None
    if p["tuple_kind"] != "none":
        try:
            tup = pml_tuple(p, mine_x, mine_ref)
        except Exception:  # PML's miner refuses the input: nothing to compare
            assume(False)
    eps = p["epsilon"] if tup is None else None
    kw = dict(alpha=p["alpha"], beta=p["beta"], base=p["base"])
    pml_pairs = tup
    if eps is not None:
        # the reference of fused mining: PML's miner, then PML's loss
        same_labels_other_x = p["ref_y"] is p["y"] and p["ref"] is not None and p["ref"] is not x
        miner_mod = miners if same_labels_other_x else pml_miners  # PML contradicts itself there
        pml_pairs = miner_mod.MultiSimilarityMiner(eps, distance=DISTANCES[p["dist"]]())(
            mine_x, p["y"], mine_ref, p["ref_y"]
        )
    try:
        want, g_want = run(
            pml_losses.MultiSimilarityLoss(
                distance=DISTANCES[p["dist"]](), reducer=REDUCERS[p["reducer"]](), **kw
            ),
            p,
            pml_pairs,
        )
    except Exception:  # PML refuses the input
        assume(False)
    # PML's own result must be a number (e.g. SNRDistance of constant rows is NaN)
    assume(torch.isfinite(want).all() and all(torch.isfinite(g).all() for g in g_want))
    # documented difference: PML returns 0 for at most one pair per side
    if pml_pairs is None:
        ref_y = p["y"] if p["ref"] is None else p["ref_y"]  # PML's defaulting, identity kept
        assume(ref_y is None or not all(len(t) <= 1 for t in lmu.get_all_pairs_indices(p["y"], ref_y)))
    else:
        assume(not all(len(t) <= 1 for t in _as_pairs(pml_pairs)))
    ours = losses.MSLoss(distance=DISTANCES[p["dist"]](), reducer=REDUCERS[p["reducer"]](), epsilon=eps, **kw)
    with float_masks(p["float_masks"]):
        got, g_got = run(ours, p, tup)
    assert torch.isfinite(got).all() and all(torch.isfinite(g).all() for g in g_got)
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.reshape(-1), want.reshape(-1).to(got.dtype), rtol=1e-6, atol=1e-9 * scale)
    for a, b in zip(g_got, g_want):
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9 * scale)


def _as_pairs(tup):
    if len(tup) == 3:
        a, p_, n = tup
        return a, p_, a, n
    return tup


@given(problems())
def test_miner_matches_pml(p):
    x = p["x"].detach()
    ref = None if p["ref"] is None else (x if p["ref"] is p["x"] else p["ref"].detach())
    assume(not (p["ref_y"] is p["y"] and ref is not None and ref is not x))  # PML contradicts itself
    eps = p["epsilon"] if p["epsilon"] is not None else 0.1
    d = DISTANCES[p["dist"]]
    if len(x) and (ref is None or len(ref)):
        assume(torch.isfinite(d()(x, x if ref is None else ref)).all())  # a distance that is a number
    try:
        theirs = pml_miners.MultiSimilarityMiner(eps, distance=d())(x, p["y"], ref, p["ref_y"])
    except Exception:
        assume(False)
    ours = miners.MultiSimilarityMiner(eps, distance=d())(x, p["y"], ref, p["ref_y"])
    for a, b in ((ours[:2], theirs[:2]), (ours[2:], theirs[2:])):
        got = sorted(zip(*(t.tolist() for t in a)))
        want = sorted(zip(*(t.tolist() for t in b)))
        assert got == want


@given(problems(tuple_kinds=("none",)))
def test_float32_stays_finite_and_close_to_float64(p):
    """Wide exponents in float32: finite, and equal to the same loss in float64."""
    p32 = dict(p)
    x32 = p["x"].detach().float().requires_grad_(True)
    p32["x"] = x32
    if p["ref"] is p["x"]:
        p32["ref"] = x32
    elif p["ref"] is not None:
        p32["ref"] = p["ref"].detach().float().requires_grad_(p["ref"].requires_grad)
    kw = dict(alpha=p["alpha"], beta=p["beta"], base=p["base"], epsilon=p["epsilon"])
    make = lambda: losses.MSLoss(distance=DISTANCES[p["dist"]](), **kw)  # noqa: E731
    want, g_want = run(make(), p, None)
    assume(torch.isfinite(want).all() and all(torch.isfinite(g).all() for g in g_want))
    got, g_got = run(make(), p32, None)
    assert torch.isfinite(got).all() and all(torch.isfinite(g).all() for g in g_got)
    # float32 rounds S by ~1e-7 |S|, which moves exponents by that times alpha or beta and
    # can flip a mining comparison: compare values only where that is far below the tolerance
    if p["epsilon"] is not None or p["x"].numel() == 0:
        return
    ref = p["x"] if p["ref"] is None else p["ref"]
    if ref.numel() == 0:
        return
    smax = float(DISTANCES[p["dist"]]()(p["x"].detach(), ref.detach()).abs().max())
    if max(p["alpha"], p["beta"]) * (smax + abs(p["base"])) < 1e3:
        torch.testing.assert_close(got.double().reshape(-1), want.reshape(-1), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("weighting", ["ms", "self", "relative"])
@given(p=problems(dists=("cosine", "dot", "dot_raw"), tuple_kinds=("none",)))
def test_every_weighting_is_finite_and_the_paths_agree(weighting, p):
    """Fused and dense paths agree (values and gradients) for every weighting and input."""
    kw = dict(alpha=p["alpha"], beta=p["beta"], base=p["base"], epsilon=p["epsilon"], weighting=weighting)
    out = []
    for fused in (None, False):
        fn = losses.MSLoss(distance=DISTANCES[p["dist"]](), fused=fused, **kw)
        out.append(run(fn, p, None))
    (a, ga), (b, gb) = out
    assert torch.isfinite(a).all() and all(torch.isfinite(g).all() for g in ga)
    torch.testing.assert_close(a, b, **tol(torch.float64))
    # gradients through the normalisation of tiny rows (|x| ~ 1e-2) carry 1/|x| times the
    # rounding of S, which the two paths round differently (block columns scaled vs normalised)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(
            u, v, rtol=1e-6, atol=1e-9 * max(1.0, float(v.abs().max()) if v.numel() else 1)
        )
