"""MSLoss against PML's MultiSimilarityLoss, hand-written loops, and bad input."""

import copy
import math

import pytest
import torch
from helpers import (
    NAN_BASES,
    NAN_CELLS,
    assert_close,
    make_batch,
    nan_batch,
    planted_nan,
    skip_if_half_unsupported,
    tol,
)
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers

from pml_ms_plus import _checks, losses, miners
from pml_ms_plus import functional as F_ms

DISTANCES = {
    "cosine": lambda: pml_distances.CosineSimilarity(),
    "dot": lambda: pml_distances.DotProductSimilarity(),
    "lp": lambda: pml_distances.LpDistance(),
    "lp_raw": lambda: pml_distances.LpDistance(normalize_embeddings=False),
}

REDUCERS = {
    "mean": lambda: pml_reducers.MeanReducer(),
    "avg_non_zero": lambda: pml_reducers.AvgNonZeroReducer(),
    "sum": lambda: pml_reducers.SumReducer(),
    "threshold": lambda: pml_reducers.ThresholdReducer(low=0.05, high=3.0),
    "per_anchor": lambda: pml_reducers.PerAnchorReducer(),
    "class_weighted": lambda: pml_reducers.ClassWeightedReducer(torch.linspace(0.5, 2.0, 6)),
}

TUPLES = ["all_pairs", "ms_miner", "pair_margin_miner", "triplets"]


def pml_tuple(kind, distance, x, y, ref=None, ref_y=None):
    if kind == "all_pairs":
        return None
    if kind == "ms_miner":
        miner = pml_miners.MultiSimilarityMiner(0.1, distance=distance)
    elif kind == "pair_margin_miner":
        miner = pml_miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8, distance=distance)
    else:
        miner = pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets="all", distance=distance)
    return miner(x, y, ref, ref_y)


def value_and_grads(loss_fn, inputs, *args):
    value = loss_fn(*args)
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    return value.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("use_ref", [False, True])
@pytest.mark.parametrize("kind", TUPLES)
@pytest.mark.parametrize("dist", list(DISTANCES))
def test_parity_with_pml_over_distances_and_tuples(device, dtype, use_ref, kind, dist):
    skip_if_half_unsupported(device, dtype)
    seed = 100 * list(DISTANCES).index(dist) + 10 * TUPLES.index(kind) + int(use_ref)  # fixed, reproducible
    x, y = make_batch(seed, device=device, dtype=dtype)
    ref, ref_y = make_batch(seed + 1, n=24, device=device, dtype=dtype) if use_ref else (None, None)
    inputs = (x, ref) if use_ref else (x,)
    tup = pml_tuple(kind, DISTANCES[dist](), x.detach(), y, None if ref is None else ref.detach(), ref_y)
    expected, g_expected = value_and_grads(
        pml_losses.MultiSimilarityLoss(distance=DISTANCES[dist]()), inputs, x, y, tup, ref, ref_y
    )
    got, g_got = value_and_grads(losses.MSLoss(distance=DISTANCES[dist]()), inputs, x, y, tup, ref, ref_y)
    assert got.dtype == expected.dtype
    assert_close(got, expected, dtype)
    for a, b in zip(g_got, g_expected):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", TUPLES)
@pytest.mark.parametrize("reducer", list(REDUCERS))
@pytest.mark.parametrize("dist", ["cosine", "lp"])
def test_parity_with_pml_over_reducers(device, dtype, kind, reducer, dist):
    x, y = make_batch(7, device=device, dtype=dtype)
    tup = pml_tuple(kind, DISTANCES[dist](), x.detach(), y)
    kw = lambda: dict(distance=DISTANCES[dist](), reducer=REDUCERS[reducer]())  # noqa: E731
    pml_loss = pml_losses.MultiSimilarityLoss(**kw())
    if reducer == "class_weighted":
        # PML's MS loss emits (B, 1) element losses, which its ClassWeightedReducer
        # broadcasts against (B,) weights: mean(l) * mean(w). The intended reduction,
        # mean_i(l_i * w[y_i]), is computed here from PML's per-anchor losses.
        weights = torch.linspace(0.5, 2.0, 6).to(device=device, dtype=dtype)
        pml_loss = pml_losses.MultiSimilarityLoss(
            distance=DISTANCES[dist](), reducer=pml_reducers.DoNothingReducer()
        )

        def per_class(*args):
            per_anchor = pml_loss(*args)["loss"]["losses"].reshape(-1)
            return (per_anchor * weights[y]).mean()

        expected, (g_expected,) = value_and_grads(per_class, (x,), x, y, tup)
    else:
        expected, (g_expected,) = value_and_grads(pml_loss, (x,), x, y, tup)
    got, (g_got,) = value_and_grads(losses.MSLoss(**kw()), (x,), x, y, tup)
    assert_close(got, expected, dtype)
    assert_close(g_got, g_expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("use_ref", [False, True])
@pytest.mark.parametrize("dist", list(DISTANCES))
def test_fused_mining_equals_miner_then_loss(device, masks, dtype, use_ref, dist):
    skip_if_half_unsupported(device, dtype)
    x, y = make_batch(11, device=device, dtype=dtype)
    ref, ref_y = make_batch(12, n=40, device=device, dtype=dtype) if use_ref else (None, None)
    inputs = (x, ref) if use_ref else (x,)
    xd, rd = x.detach(), None if ref is None else ref.detach()
    pml_pairs = pml_miners.MultiSimilarityMiner(0.1, distance=DISTANCES[dist]())(xd, y, rd, ref_y)
    our_pairs = miners.MultiSimilarityMiner(0.1, distance=DISTANCES[dist]())(xd, y, rd, ref_y)
    pml_value, pml_grads = value_and_grads(
        pml_losses.MultiSimilarityLoss(distance=DISTANCES[dist]()), inputs, x, y, pml_pairs, ref, ref_y
    )
    two_step, two_grads = value_and_grads(
        losses.MSLoss(distance=DISTANCES[dist]()), inputs, x, y, our_pairs, ref, ref_y
    )
    fused, fused_grads = value_and_grads(
        losses.MSLoss(epsilon=0.1, distance=DISTANCES[dist]()), inputs, x, y, None, ref, ref_y
    )
    for value, grads in ((two_step, two_grads), (fused, fused_grads)):
        assert_close(value, pml_value, dtype)
        for a, b in zip(grads, pml_grads):
            assert_close(a, b, dtype)


def paper_loop(feats, labels, epsilon=0.1, alpha=2.0, beta=50.0, base=0.5):
    """The MS paper's per-anchor loop, written out by hand."""
    feats = torch.nn.functional.normalize(feats, dim=1)
    sim = feats @ feats.T
    total = feats.new_zeros(())
    n = len(labels)
    for i in range(n):
        same = (labels == labels[i]).clone()
        same[i] = False
        pos_all = sim[i][same]
        neg_all = sim[i][labels != labels[i]]
        if len(pos_all) == 0 or len(neg_all) == 0:
            continue
        neg = neg_all[neg_all + epsilon > torch.min(pos_all)]
        pos = pos_all[pos_all - epsilon < torch.max(neg_all)]
        if len(neg) < 1 or len(pos) < 1:
            continue
        pos_loss = 1.0 / alpha * torch.log(1 + torch.sum(torch.exp(-alpha * (pos - base))))
        neg_loss = 1.0 / beta * torch.log(1 + torch.sum(torch.exp(beta * (neg - base))))
        total = total + pos_loss + neg_loss
    return total / n


@pytest.mark.parametrize("seed", range(4))
def test_against_the_papers_loop(device, seed):
    x, y = make_batch(100 + seed, n=40, classes=8, device=device, dtype=torch.float64)
    expected, (g_expected,) = value_and_grads(paper_loop, (x,), x, y)
    got, (g_got,) = value_and_grads(losses.MSLoss(epsilon=0.1), (x,), x, y)
    assert_close(got, expected, torch.float64)
    assert_close(g_got, g_expected, torch.float64)


def by_hand(S, labels, weighting, alpha=2.0, beta=50.0, lam=0.5):
    """Per-anchor losses of the three GPW modes, one anchor and one pair at a time."""
    out = []
    n = len(labels)
    for i in range(n):
        pos = [S[i][j] for j in range(n) if j != i and labels[j] == labels[i]]
        neg = [S[i][j] for j in range(n) if labels[j] != labels[i]]
        zp = [alpha * (lam - s) for s in pos]
        zn = [beta * (s - lam) for s in neg]
        if weighting == "self":
            value = sum(math.log1p(math.exp(z)) for z in zp) / alpha
            value += sum(math.log1p(math.exp(z)) for z in zn) / beta
        else:
            value = 0.0
            if zp:
                value += math.log(sum(math.exp(z) for z in zp)) / alpha
            if zn:
                value += math.log(sum(math.exp(z) for z in zn)) / beta
        out.append(value)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("weighting", ["self", "relative"])
def test_gpw_modes_by_hand(device, weighting):
    # one class with a single member: that anchor has no positives
    labels = torch.tensor([0, 0, 1, 1, 1, 2], device=device)
    x, _ = make_batch(5, n=6, dim=4, device=device, dtype=torch.float64)
    loss_fn = losses.MSLoss(weighting=weighting, reducer=pml_reducers.DoNothingReducer())
    got = loss_fn(x, labels)["loss"]["losses"]
    assert got.shape == (6, 1)  # PML's element-loss shape
    S = torch.nn.functional.normalize(x.detach(), dim=1) @ torch.nn.functional.normalize(x.detach(), dim=1).T
    expected = by_hand(S.cpu().tolist(), labels.cpu().tolist(), weighting).to(device)
    torch.testing.assert_close(got.detach()[:, 0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weighting", ["ms", "self", "relative"])
@pytest.mark.parametrize("epsilon", [None, 0.1])
def test_pair_weights_are_the_loss_derivative(device, weighting, epsilon):
    x, y = make_batch(3, n=24, device=device, dtype=torch.float64)
    S = torch.nn.functional.normalize(x.detach(), dim=1) @ torch.nn.functional.normalize(x.detach(), dim=1).T
    S.requires_grad_(True)
    pos, neg = F_ms.pair_masks(y)
    kw = dict(weighting=weighting, epsilon=epsilon)
    per_anchor = F_ms.ms_anchor_losses(S, pos, neg, **kw)
    (dS,) = torch.autograd.grad(per_anchor.sum(), S)
    w_pos, w_neg = F_ms.pair_weights(S.detach(), pos, neg, **kw)
    assert (w_pos >= 0).all() and (w_neg >= 0).all()
    torch.testing.assert_close(dS, w_neg - w_pos, rtol=1e-10, atol=1e-12)
    # the loss method builds the same matrices from embeddings
    mw_pos, mw_neg = losses.MSLoss(**kw).pair_weights(x.detach(), y)
    torch.testing.assert_close(mw_pos, w_pos)
    torch.testing.assert_close(mw_neg, w_neg)


@pytest.mark.parametrize("weighting", ["ms", "self", "relative"])
def test_stats(device, weighting):
    x, y = make_batch(21, device=device)
    loss_fn = losses.MSLoss(epsilon=0.1, weighting=weighting, collect_stats=True)
    value = loss_fn(x, y)
    a1, p, a2, n = miners.MultiSimilarityMiner(0.1)(x.detach(), y)
    assert loss_fn.num_pos_pairs == len(a1) > 0
    assert loss_fn.num_neg_pairs == len(a2) > 0
    per_anchor = losses.MSLoss(epsilon=0.1, weighting=weighting, reducer=pml_reducers.DoNothingReducer())(
        x, y
    )
    per_anchor = per_anchor["loss"]["losses"]
    assert loss_fn.num_nonzero_anchors == int((per_anchor > 0).sum())
    w_pos, w_neg = loss_fn.pair_weights(x.detach(), y)
    assert loss_fn.mean_pos_weight == pytest.approx(float(w_pos.sum()) / len(a1), rel=1e-4)
    assert loss_fn.mean_neg_weight == pytest.approx(float(w_neg.sum()) / len(a2), rel=1e-4)
    assert torch.isfinite(value)


def test_fixes_pmls_single_pair_zero(device):
    x, _ = make_batch(1, n=4, dim=5, device=device, dtype=torch.float64)
    tup = tuple(torch.tensor([v], device=device) for v in (0, 1, 0, 2))
    assert float(pml_losses.MultiSimilarityLoss()(x, None, tup).detach()) == 0.0
    got = losses.MSLoss()(x, None, tup)
    xn = torch.nn.functional.normalize(x.detach(), dim=1)
    s01, s02 = float(xn[0] @ xn[1]), float(xn[0] @ xn[2])
    per_anchor0 = math.log1p(math.exp(2 * (0.5 - s01))) / 2 + math.log1p(math.exp(50 * (s02 - 0.5))) / 50
    assert float(got.detach()) == pytest.approx(per_anchor0 / 4, rel=1e-10)


@pytest.mark.parametrize("case", ["all_distinct_mined", "single", "empty_tuple"])
def test_no_pairs_gives_zero_that_backpropagates(device, case):
    if case == "single":
        x, y = make_batch(2, n=1, device=device)
        loss_fn, tup = losses.MSLoss(), None
    else:
        x, y = make_batch(2, n=8, classes=8, device=device)
        loss_fn = losses.MSLoss(epsilon=0.1)
        tup = (
            None
            if case == "all_distinct_mined"
            else tuple(torch.tensor([], dtype=torch.long) for _ in range(4))
        )
    value = loss_fn(x, y, tup)
    assert float(value.detach()) == 0.0
    value.backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("case", ["empty pair tuple", "empty triplet tuple", "mined away"])
@pytest.mark.parametrize("dist", ["snr, a constant row", "lp in float16, a zero row"])
def test_no_pairs_at_degenerate_rows_give_pmls_zero_gradient(device, dist, case):
    """No pair at all, and a distance whose backward is not finite at one row (``SNRDistance``
    of a constant row: variance 0; ``LpDistance`` normalising a zero row in float16: 0/0): PML
    computes no distance and gives zero gradients; so does the loss now (before, it
    backpropagated zero weights through the distance: NaN in every row)."""
    if dist.startswith("snr"):
        distance, dtype = pml_distances.SNRDistance, torch.float64
        rows = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [3.0, 1.0, 2.0], [2.0, 2.0, 2.0]]
    else:
        skip_if_half_unsupported(device, torch.float16)
        distance, dtype = pml_distances.LpDistance, torch.float16
        rows = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [3.0, -1.0, 2.0], [2.0, 1.0, -2.0]]
    x = torch.tensor(rows, dtype=dtype, device=device, requires_grad=True)
    none = torch.zeros(0, dtype=torch.long, device=device)
    y, tup, epsilon = torch.tensor([0, 0, 1, 1], device=device), None, None
    if case == "mined away":  # no positives: PML's miner keeps no negative either
        y, epsilon = torch.arange(4, device=device), 0.1
        pairs = pml_miners.MultiSimilarityMiner(0.1, distance=distance())(x.detach(), y)
        assert [len(t) for t in pairs] == [0, 0, 0, 0]
    else:
        tup = (none,) * (4 if case == "empty pair tuple" else 3)
        pairs = tup
    got = losses.MSLoss(epsilon=epsilon, distance=distance())(x, y, tup)
    want = pml_losses.MultiSimilarityLoss(distance=distance())(x, y, pairs)
    (g_got,) = torch.autograd.grad(got, x)
    (g_want,) = torch.autograd.grad(want, x)
    assert float(got.detach()) == float(want.detach()) == 0.0
    assert torch.equal(g_got, g_want) and not g_got.any()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=0), "alpha"),
        (dict(alpha=-1.0), "alpha"),
        (dict(beta=0), "beta"),
        (dict(epsilon=-0.1), "epsilon"),
        (dict(weighting="binomial"), "weighting"),
        (dict(base=float("nan")), "base"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(memory_budget=-1), "memory_budget"),
        (dict(memory_budget=1.5), "memory_budget"),
        (dict(compile_blocks="yes"), "compile_blocks"),
        (dict(compile_blocks=1), "compile_blocks"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        losses.MSLoss(**kwargs)


@pytest.mark.parametrize("fn", ["ms_terms", "pair_weights", "multi_similarity_loss"])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=-2.0), "alpha must be a finite number > 0"),
        (dict(beta=0.0), "beta must be a finite number > 0"),
        (dict(epsilon=-0.1), "epsilon must be a finite number >= 0"),
    ],
)
def test_functional_refuses_what_the_loss_refuses(fn, kwargs, message):
    """The functional entry points check the scales and the margin as the loss and the miner do
    (a negative ``alpha`` used to run: its losses were meaningless, -inf once the stacked sides
    took ``coef`` as its own magnitude; ``multi_similarity_loss`` returned -inf and NaN for
    ``alpha`` -2 and ``beta`` 0, and all three took a negative ``epsilon``)."""
    S = torch.rand(3, 4, generator=torch.Generator().manual_seed(5))
    pos, neg = F_ms.pair_masks(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1, 0]))
    x, y = torch.randn(3, 4, generator=torch.Generator().manual_seed(6)), torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match=message):
        if fn == "multi_similarity_loss":
            F_ms.multi_similarity_loss(x, y, **kwargs)
        else:
            getattr(F_ms, fn)(S, pos, neg, **kwargs)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda x, y: (x, y.float(), {}), "labels must be an integer or bool tensor"),  # ran: a number
        (lambda x, y: (x[0], y, {}), "embeddings must be a 2D tensor"),  # an IndexError
        (lambda x, y: (x.long(), y, {}), "must be a floating-point tensor"),
        (lambda x, y: (x, y[:2], {}), "labels has 2 entries but embeddings has 3 rows"),
        (lambda x, y: (x, y, dict(ref_emb=x[:, :2], ref_labels=y)), "ref_emb has width 2"),  # a RuntimeError
        (lambda x, y: (x, y, dict(ref_emb=x)), "ref_labels is required"),
        (lambda x, y: (x, y, dict(base=float("inf"))), "base must be a finite number"),
    ],
)
def test_functional_loss_refuses_bad_input_as_the_loss_does(make, message):
    x, y = torch.randn(3, 4, generator=torch.Generator().manual_seed(6)), torch.tensor([0, 0, 1])
    emb, labels, kwargs = make(x, y)
    with pytest.raises(ValueError, match=message):
        F_ms.multi_similarity_loss(emb, labels, **kwargs)


def test_bad_miner_epsilon():
    with pytest.raises(ValueError, match="epsilon"):
        miners.MultiSimilarityMiner(epsilon=-1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings(device, bad):
    x, y = make_batch(4, device=device, requires_grad=False)
    x[3, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        losses.MSLoss()(x, y)
    ref, ref_y = make_batch(5, device=device, requires_grad=False)
    ref[0, 0] = bad
    with pytest.raises(ValueError, match="ref_emb contain NaN"):
        losses.MSLoss()(x.nan_to_num(), y, ref_emb=ref, ref_labels=ref_y)
    # the opt-out gives PyTorch's NaN-in, NaN-out
    assert not torch.isfinite(losses.MSLoss(check_finite=False)(x, y))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_check_is_exact(device, dtype):
    """The finite check sums the tensor first: a NaN or inf anywhere (even +inf beside -inf)
    is caught, and finite values whose sum overflows (bfloat16, float32, float64: the sum runs
    in float32 or wider) are not mistaken for infinities."""
    skip_if_half_unsupported(device, dtype)
    x = torch.full((4, 3), torch.finfo(dtype).max, dtype=dtype, device=device)
    assert _checks.all_finite(x)
    if dtype in (torch.float32, torch.float64):  # the loss runs (no ValueError), as PML's does
        y = torch.tensor([0, 0, 1, 1], device=device)
        torch.testing.assert_close(
            losses.MSLoss()(x, y), pml_losses.MultiSimilarityLoss()(x, y), equal_nan=True
        )
    for bad in ([float("nan")], [float("inf")], [-float("inf")], [float("inf"), -float("inf")]):
        y = torch.zeros(4, 3, dtype=dtype, device=device)
        y.view(-1)[: len(bad)] = torch.tensor(bad, dtype=dtype)
        assert not _checks.all_finite(y), bad
    assert _checks.all_finite(torch.arange(5, device=device))  # integer tensors are finite


def test_label_length_mismatch(device):
    x, y = make_batch(4, device=device)
    with pytest.raises(ValueError, match="labels has 31 entries but embeddings has 32 rows"):
        losses.MSLoss()(x, y[:-1])


@pytest.mark.parametrize(
    "kwargs, dtype",
    [
        (dict(reducer=pml_reducers.DivisorReducer()), torch.float32),  # was KeyError: 'divisor'
        (dict(distance=pml_distances.LpDistance()), torch.bfloat16),  # was cdist's NotImplementedError
        (dict(epsilon=0.1), torch.float32),
        ({}, torch.float64),
    ],
)
def test_a_batch_of_one_gives_pmls_zero_loss(device, kwargs, dtype):
    """One anchor, its own copy the only reference: no pair. PML returns its zero loss without
    computing a distance; ours computed the distance matrix and per-anchor losses, which a
    reducer expecting PML's zero loss (DivisorReducer) or a distance without the dtype (cdist
    in bfloat16 on the CPU) refused."""
    x = torch.randn(1, 4, device=device, dtype=dtype, requires_grad=True)
    y = torch.tensor([0], device=device)
    pml_kwargs = {k: v for k, v in kwargs.items() if k != "epsilon"}
    want = pml_losses.MultiSimilarityLoss(**pml_kwargs)(x, y)
    got = losses.MSLoss(**kwargs)(x, y)
    (grad,) = torch.autograd.grad(got, x)
    assert float(got.detach()) == float(want.detach()) == 0.0 and torch.equal(grad, torch.zeros_like(x))


def _index_tuple(device, dtype=torch.long, **change):
    t = {"a1": [0, 1, 2], "p": [1, 0, 3], "a2": [0, 2, 4], "n": [2, 4, 0]}
    t.update(change)
    return tuple(torch.tensor(t[k], device=device).to(dtype) for k in ("a1", "p", "a2", "n"))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: _index_tuple(d, torch.float32), "1D integer tensors"),  # was cast: 1.7 became 1
        (lambda d: _index_tuple(d, torch.bool), "1D integer tensors"),
        (lambda d: _index_tuple(d, torch.uint8), "int64 or int32 tensors.*got torch.uint8"),  # PML: a mask
        (lambda d: _index_tuple(d, torch.int8), "int64 or int32 tensors.*got torch.int8"),  # PML: IndexError
        (lambda d: _index_tuple(d, torch.int16), "int64 or int32 tensors.*got torch.int16"),
        (
            lambda d: _index_tuple(d, p=[1, 0, 5]),
            r"positive indices must lie in \[0, 5\), got values in \[0, 5\]",
        ),
        (lambda d: _index_tuple(d, n=[2, -1, 0]), r"negative indices must lie in \[0, 5\)"),  # PML wraps it
        (lambda d: _index_tuple(d, a1=[0, 1, 9]), r"anchor indices must lie in \[0, 5\)"),
        (lambda d: _index_tuple(d)[:3][:2], "must be"),
        (lambda d: F_ms.pair_masks(torch.tensor([0, 0, 1, 1, 2], device=d)), "must be"),  # masks: not PML's
        (lambda d: _index_tuple(d, a2=[0, 2]), "lengths differ"),
    ],
)
def test_a_bad_indices_tuple_is_refused_naming_it(device, make, message):
    """MSLoss checks an explicit ``indices_tuple`` as the memory does: before, a float tuple was
    cast to long (PML raises ``IndexError``), an out-of-range index raised indexing's own error
    and a negative one wrapped around, as in PML; uint8/int8/int16 tuples were cast to long (PML
    reads uint8 as a mask and raises ``IndexError`` for the others)."""
    x = torch.randn(5, 4, device=device)
    y = torch.tensor([0, 0, 1, 1, 2], device=device)
    with pytest.raises(ValueError, match=message):
        losses.MSLoss()(x, y, make(device))
    ok = _index_tuple(device, torch.int32)  # int32 indices, as PML takes them
    expected = pml_losses.MultiSimilarityLoss()(x, y, _index_tuple(device))
    torch.testing.assert_close(losses.MSLoss()(x, y, ok), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unfused_mining_in_half_precision_keeps_pmls_pairs(device, dtype):
    """``fused=False`` mines PML's distance matrix in its own dtype, as PML's miner does: a
    negative at ``S_n + eps`` that rounds onto the positive's ``S_p`` in half precision (but
    lies above it in float32) is dropped by PML, and was kept here (the block was cast to
    float32 before mining). The same triple twice, in orthogonal coordinates, so that PML's
    single-pair rule does not apply."""
    skip_if_half_unsupported(device, dtype)
    half = torch.tensor([0.39990234375, 0.300048828125], dtype=dtype)  # S_p, S_n of anchor 0
    assert not bool(half[1] + 0.1 > half[0]) and bool(half[1].float() + 0.1 > half[0].float())
    p, n = half.tolist()
    x = torch.tensor([[1, 0], [p, 0], [n, 0], [0, 1], [0, p], [0, n]], dtype=dtype, device=device)
    y = torch.tensor([0, 0, 1, 2, 2, 3], device=device)
    dist = lambda: pml_distances.DotProductSimilarity(normalize_embeddings=False)  # noqa: E731
    pairs = pml_miners.MultiSimilarityMiner(0.1, distance=dist())(x, y)
    want = pml_losses.MultiSimilarityLoss(base=0.3, distance=dist())(x, y, pairs)
    ours = losses.MSLoss(base=0.3, epsilon=0.1, distance=dist(), fused=False, collect_stats=True)
    got = ours(x, y)
    assert (ours.num_pos_pairs, ours.num_neg_pairs) == (len(pairs[0]), len(pairs[2]))
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-2, atol=1e-3)  # PML sums in `dtype`


@pytest.mark.parametrize("base", ["distance", "similarity"])
@pytest.mark.parametrize("cells", ["a positive", "a negative", "every positive of two anchors", "mixed"])
def test_nan_similarities_give_pmls_mined_loss(device, base, cells):
    """``MSLoss(epsilon)`` on a matrix with NaN cells (the dense path: PML's distance) mines as
    PML's miner does (see the miner's test) and gives PML's loss on those pairs, finite, with
    its gradients; before, the NaN pairs were kept and the loss was NaN."""
    x, y = nan_batch(device, 0.1)
    dist = lambda: planted_nan(NAN_BASES[base], NAN_CELLS[cells])  # noqa: E731
    ours = losses.MSLoss(epsilon=0.1, distance=dist(), collect_stats=True)
    pairs = pml_miners.MultiSimilarityMiner(0.1, distance=dist())(x.detach(), y)
    got, (g_got,) = value_and_grads(ours, (x,), x, y)
    want, (g_want,) = value_and_grads(
        lambda a, b: pml_losses.MultiSimilarityLoss(distance=dist())(a, b, pairs), (x,), x, y
    )
    assert (ours.num_pos_pairs, ours.num_neg_pairs) == (len(pairs[0]), len(pairs[2]))
    assert torch.isfinite(got)
    assert_close(got, want, torch.float32)
    assert_close(g_got, g_want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_does_not_overflow(device, dtype):
    skip_if_half_unsupported(device, dtype)
    x, y = make_batch(9, n=64, device=device, dtype=torch.float32, requires_grad=False)
    for eps in (None, 0.1):
        reference = losses.MSLoss(beta=100, epsilon=eps)(x.to(dtype).float(), y)
        xh = x.to(dtype).requires_grad_(True)
        value = losses.MSLoss(beta=100, epsilon=eps)(xh, y)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(xh.grad).all()
        assert float(value.detach()) == pytest.approx(float(reference.detach()), rel=1e-2)


@pytest.mark.parametrize("fused", [None, False])
def test_a_first_call_under_inference_mode_leaves_later_training_steps_working(device, fused):
    """The block code reuses small constant tensors made on first use: one made under
    inference mode would be an inference tensor, which autograd refuses to save later."""
    g = torch.Generator().manual_seed(83)
    x = torch.randn(12, 6, generator=g).to(device)
    y = (torch.arange(12) % 3).to(device)
    loss = losses.MSLoss(alpha=2.5, beta=45.0, epsilon=0.1, fused=fused)  # constants no other test made
    with torch.inference_mode():
        loss(x, y)
    xr = x.clone().requires_grad_(True)
    xp = x.clone().requires_grad_(True)
    loss(xr, y).backward()
    pml = pml_losses.MultiSimilarityLoss(alpha=2.5, beta=45.0)
    pml(xp, y, pml_miners.MultiSimilarityMiner(0.1)(xp, y)).backward()
    torch.testing.assert_close(xr.grad, xp.grad, rtol=1e-5, atol=1e-7)


def test_the_batch_as_its_own_references_with_other_labels_drops_the_own_copy_as_pml(device):
    """``ref_emb=embeddings`` with other ``ref_labels`` and ``epsilon``: PML's miner drops each
    anchor's own copy from both sides, also where its reference label makes it a negative (the
    small-batch path once kept it there, dropping the diagonal from the positives alone)."""
    g = torch.Generator().manual_seed(89)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64).to(device)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3], device=device)
    y_ref = torch.tensor([1, 0, 1, 2, 2, 3, 3, 0], device=device)
    for fused in (None, False):
        ours, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        got = losses.MSLoss(epsilon=0.1, fused=fused)(ours, y, ref_emb=ours, ref_labels=y_ref)
        pairs = pml_miners.MultiSimilarityMiner(0.1)(theirs, y, theirs, y_ref)
        want = pml_losses.MultiSimilarityLoss()(theirs, y, pairs, theirs, y_ref)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        got.backward()
        want.backward()
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("epsilon", [None, 0.1])
@pytest.mark.parametrize("own", ["none", "permuted"])
def test_an_in_batch_problem_keeps_its_own_self_index(device, own, epsilon):
    """An ``MSProblem`` whose references are its anchors, built by hand with a ``self_index``
    other than ``arange(B)`` (``-1``: no copies, or a permutation), is computed with those
    copies on the fused path as on the dense one (the diagonal shortcut is ``make_problem``'s)."""
    from pml_ms_plus.losses.problem import MSProblem

    g = torch.Generator().manual_seed(97)
    x = torch.randn(10, 5, generator=g, dtype=torch.float64).to(device)
    y = (torch.arange(10) % 3).to(device)
    index = torch.full((10,), -1) if own == "none" else torch.arange(10).view(5, 2).flip(1).reshape(-1)
    index = index.to(device)
    values = [
        losses.MSLoss(epsilon=epsilon, fused=fused).forward_problem(MSProblem(x, y, x, y, index))
        for fused in (None, False)
    ]
    torch.testing.assert_close(values[0], values[1], rtol=1e-9, atol=1e-12)


def test_autocast_runs_the_reductions_in_float32(device):
    x, y = make_batch(10, n=64, device=device, dtype=torch.float32)
    reference = losses.MSLoss(beta=100, epsilon=0.1)(x, y)
    for dtype in (torch.bfloat16, torch.float16):
        if device.type == "cpu" and dtype == torch.float16:
            continue  # CPU autocast covers bfloat16
        with torch.autocast(device.type, dtype=dtype):
            value = losses.MSLoss(beta=100, epsilon=0.1)(x, y)
        assert torch.isfinite(value)
        assert float(value.detach()) == pytest.approx(float(reference.detach()), rel=1e-3)


def test_pml_cross_batch_memory_accepts_msloss_step_after_step(device):
    torch.manual_seed(0)
    ours = pml_losses.CrossBatchMemory(
        losses.MSLoss(), 16, memory_size=64, miner=pml_miners.MultiSimilarityMiner(0.1)
    ).to(device)
    theirs = pml_losses.CrossBatchMemory(
        pml_losses.MultiSimilarityLoss(), 16, memory_size=64, miner=pml_miners.MultiSimilarityMiner(0.1)
    ).to(device)
    for step in range(6):
        x, y = make_batch(200 + step, n=24, device=device, dtype=torch.float32)
        a, (ga,) = value_and_grads(ours, (x,), x, y)
        b, (gb,) = value_and_grads(theirs, (x,), x, y)
        assert_close(a, b, torch.float32)
        assert_close(ga, gb, torch.float32)
    assert type(losses.MSLoss()).__name__ == "MultiSimilarityLoss"


def test_pml_distributed_wrapper_accepts_msloss(device):
    from pytorch_metric_learning.utils import distributed as pml_dist

    x, y = make_batch(30, device=device)
    wrapped = pml_dist.DistributedLossWrapper(losses.MSLoss(epsilon=0.1))
    with pytest.warns(UserWarning):
        value = wrapped(x, y)
    assert float(value.detach()) == pytest.approx(float(losses.MSLoss(epsilon=0.1)(x, y).detach()))


# ---------------------------------------------------------------- robustness regressions
def easy_batch(device, dtype, n_classes=6, per_class=3, dim=8, seed=7):
    """Positives almost identical, negatives far apart: hard-pair mining removes every pair."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(
        torch.randn(n_classes, dim, generator=g, dtype=torch.float64), dim=1
    )
    x = centres.repeat_interleave(per_class, 0) + 1e-3 * torch.randn(n_classes * per_class, dim, generator=g)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    return x.to(device=device, dtype=dtype).requires_grad_(True), y.to(device)


def pml_mined(x, y, epsilon, **kw):
    pairs = pml_miners.MultiSimilarityMiner(epsilon)(x.detach(), y)
    return pml_losses.MultiSimilarityLoss(**kw)(x, y, pairs)


@pytest.mark.parametrize("dtype, beta", [(torch.float32, 200.0), (torch.float64, 1000.0)])
@pytest.mark.parametrize("base", [0.0, 0.3])
def test_mined_away_anchors_give_zero_not_minus_inf(device, dtype, beta, base):
    # beta * (hardest negative - base) beyond exp's range once every pair is mined away
    x, y = easy_batch(device, dtype)
    got, (g_got,) = value_and_grads(losses.MSLoss(epsilon=0.1, beta=beta, base=base), (x,), x, y)
    want, (g_want,) = value_and_grads(lambda *a: pml_mined(*a, 0.1, beta=beta, base=base), (x,), x, y)
    assert torch.isfinite(got) and torch.isfinite(g_got).all()
    assert_close(got, want, dtype)
    assert_close(g_got, g_want, dtype)
    w_pos, w_neg = losses.MSLoss(epsilon=0.1, beta=beta, base=base).pair_weights(x.detach(), y)
    assert torch.isfinite(w_pos).all() and torch.isfinite(w_neg).all()
    adaptive = losses.AdaptiveMSLoss(epsilon=0.1, beta=beta, base=base, margin=0.0, margin_mode="anchor")
    value = adaptive(x, y)
    (g,) = torch.autograd.grad(value, x)
    assert torch.isfinite(value) and torch.isfinite(g).all()
    memory = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1, beta=beta, base=base), 8, memory_size=36)
    value = memory.to(device=device, dtype=dtype)(x, y)
    (g,) = torch.autograd.grad(value, x)
    assert torch.isfinite(value) and torch.isfinite(g).all()


@pytest.mark.parametrize("epsilon", [None, 0.1])
@pytest.mark.parametrize("scale, beta", [(1e3, 1e3), (1e2, 1e4), (30.0, 1e5)])
def test_large_exponents_in_float32_match_float64(device, epsilon, scale, beta):
    x, y = make_batch(11, n=24, dim=8, classes=4, device=device, dtype=torch.float64)
    with torch.no_grad():
        x *= scale
    dist = lambda: pml_distances.DotProductSimilarity(normalize_embeddings=False)  # noqa: E731
    x32 = x.detach().float().requires_grad_(True)

    def ours(inp):
        return losses.MSLoss(distance=dist(), beta=beta, epsilon=epsilon)(inp, y)

    got, (g_got,) = value_and_grads(ours, (x32,), x32)
    want, (g_want,) = value_and_grads(ours, (x,), x)
    if epsilon is None:  # PML in float64 is the reference of the unmined loss
        pml, (g_pml,) = value_and_grads(
            pml_losses.MultiSimilarityLoss(distance=dist(), beta=beta), (x,), x, y
        )
        torch.testing.assert_close(want, pml, rtol=1e-9, atol=0)
        torch.testing.assert_close(g_want, g_pml, rtol=1e-9, atol=1e-9)
    assert torch.isfinite(got) and torch.isfinite(g_got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-4, atol=1e-3 * float(g_want.abs().max()))


@pytest.mark.parametrize("weighting", ["ms", "self", "relative"])
@pytest.mark.parametrize("epsilon", [None, 0.1])
@pytest.mark.parametrize("use_ref", [False, True])
def test_second_order_gradients_are_exact(device, weighting, epsilon, use_ref):
    x, y = make_batch(13, n=10, dim=4, classes=3, device=device, dtype=torch.float64)
    ref, ref_y = make_batch(14, n=7, dim=4, classes=3, device=device, dtype=torch.float64)
    loss_fn = losses.MSLoss(epsilon=epsilon, weighting=weighting, fused=True)

    def f(a, r):
        return loss_fn(a, y, None, r, ref_y) if use_ref else loss_fn(a, y)

    assert torch.autograd.gradgradcheck(f, (x, ref if use_ref else x.detach()))
    # torch.func transforms agree with autograd
    args = (ref, ref_y) if use_ref else ()
    (expected,) = torch.autograd.grad(loss_fn(x, y, None, *args), x)
    got = torch.func.grad(lambda a: loss_fn(a, y, None, *args))(x)
    torch.testing.assert_close(got, expected)
    # a Hessian-vector product through the fused path equals the dense path's
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    hvp = []
    for fused in (True, False):
        fn = losses.MSLoss(epsilon=epsilon, weighting=weighting, fused=fused)
        (g,) = torch.autograd.grad(fn(x, y, None, *args), x, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), x)
        hvp.append(h)
    torch.testing.assert_close(hvp[0], hvp[1], **tol(torch.float64))


@pytest.mark.parametrize("epsilon", [None, 0.1])
def test_second_order_gradients_match_pml(device, epsilon):
    x, y = make_batch(15, n=12, dim=4, classes=3, device=device, dtype=torch.float64)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)

    def hvp(fn):
        (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
        return torch.autograd.grad((g * v).sum(), x)[0]

    ours = hvp(lambda a: losses.MSLoss(epsilon=epsilon)(a, y))
    if epsilon is None:
        theirs = hvp(lambda a: pml_losses.MultiSimilarityLoss()(a, y))
    else:
        pairs = pml_miners.MultiSimilarityMiner(epsilon)(x.detach(), y)
        theirs = hvp(lambda a: pml_losses.MultiSimilarityLoss()(a, y, pairs))
    torch.testing.assert_close(ours, theirs, **tol(torch.float64))


EMPTY_CASES = ["no_anchors", "no_references", "no_anchors_with_references"]


def empty_inputs(case, device):
    x, y = make_batch(16, n=8, dim=4, classes=2, device=device)
    e = torch.zeros(0, 4, device=device, requires_grad=True)
    ey = torch.zeros(0, dtype=torch.long, device=device)
    if case == "no_anchors":
        return (e, ey, None, None), e
    if case == "no_references":
        return (x, y, e.detach(), ey), x
    return (e, ey, x.detach(), y), e


@pytest.mark.parametrize("epsilon", [None, 0.1])
@pytest.mark.parametrize("dist", ["cosine", "lp"])
@pytest.mark.parametrize("case", EMPTY_CASES)
def test_empty_inputs_give_pmls_zero(device, case, dist, epsilon):
    args, leaf = empty_inputs(case, device)
    got = losses.MSLoss(epsilon=epsilon, distance=DISTANCES[dist]())(*args[:2], None, *args[2:])
    want = pml_losses.MultiSimilarityLoss(distance=DISTANCES[dist]())(*args[:2], None, *args[2:])
    assert float(got.detach()) == float(want.detach()) == 0.0
    (g,) = torch.autograd.grad(got, leaf)
    assert g.shape == leaf.shape and not g.any()
    ours = miners.MultiSimilarityMiner(0.1)(args[0].detach(), args[1], *args[2:])
    theirs = pml_miners.MultiSimilarityMiner(0.1)(args[0].detach(), args[1], *args[2:])
    assert [len(t) for t in ours] == [len(t) for t in theirs] == [0, 0, 0, 0]
    assert all(t.dtype == torch.long for t in ours)


def pair_set(tup):
    return {tuple(p) for p in torch.stack(tup[:2], 1).tolist()}, {
        tuple(p) for p in torch.stack(tup[2:], 1).tolist()
    }


@pytest.mark.parametrize("epsilon", [None, 0.1])
@pytest.mark.parametrize("combo", ["same_x_cloned_y", "cloned_x_same_y", "other_x_same_y", "other_x_other_y"])
def test_self_comparisons_follow_pmls_rule(device, epsilon, combo):
    # PML drops self pairs when ref_labels is labels; its miner also when ref_emb is embeddings
    x, y = make_batch(17, n=12, dim=4, classes=3, device=device, dtype=torch.float64)
    other, _ = make_batch(18, n=12, dim=4, classes=3, device=device, dtype=torch.float64)
    ref, ref_y = {
        "same_x_cloned_y": (x, y.clone()),
        "cloned_x_same_y": (x.detach().clone(), y),
        "other_x_same_y": (other, y),
        "other_x_other_y": (other, y[torch.randperm(12, generator=torch.Generator().manual_seed(3))]),
    }[combo]
    inputs = tuple(t for t in ((x,) if ref is x else (x, ref)) if t.requires_grad)
    got, g_got = value_and_grads(losses.MSLoss(epsilon=epsilon), inputs, x, y, None, ref, ref_y)
    pairs = None
    xd = x.detach()
    ref_d = xd if ref is x else ref.detach()  # keep "ref_emb is embeddings" for the miner
    # same labels, other embeddings: PML's miner counts (i, i) as a positive AND a negative
    # candidate, and PML's loss then refuses its pairs; ours drops (i, i) as PML's loss does
    pml_contradicts = ref_y is y and ref is not x
    miner = miners if pml_contradicts else pml_miners
    if epsilon is not None:
        pairs = miner.MultiSimilarityMiner(epsilon)(xd, y, ref_d, ref_y)
    want, g_want = value_and_grads(pml_losses.MultiSimilarityLoss(), inputs, x, y, pairs, ref, ref_y)
    assert_close(got, want, torch.float64)
    for a, b in zip(g_got, g_want):
        assert_close(a, b, torch.float64)
    ours = miners.MultiSimilarityMiner(0.1)(xd, y, ref_d, ref_y)
    theirs = pml_miners.MultiSimilarityMiner(0.1)(xd, y, ref_d, ref_y)
    if pml_contradicts:
        pos, neg = pair_set(theirs)
        assert pos & neg  # PML's miner: a pair both positive and negative (PML >= 2.7's loss refuses it)
        own = {(i, i) for i in range(len(y))}
        assert not (pair_set(ours)[0] | pair_set(ours)[1]) & own
    else:
        assert pair_set(ours) == pair_set(theirs)


@pytest.mark.parametrize("label_dtype", [torch.int8, torch.int16, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("epsilon", [None, 0.1])
def test_integer_and_bool_labels_give_pmls_numbers(device, label_dtype, epsilon):
    x, y = make_batch(19, n=16, dim=4, classes=2 if label_dtype == torch.bool else 5, device=device)
    y_cast = y.to(label_dtype)
    got = losses.MSLoss(epsilon=epsilon)(x, y_cast)
    want = (
        pml_losses.MultiSimilarityLoss()(x, y)
        if epsilon is None
        else pml_losses.MultiSimilarityLoss()(x, y, pml_miners.MultiSimilarityMiner(epsilon)(x.detach(), y))
    )
    assert_close(got, want, torch.float32)
    ours = miners.MultiSimilarityMiner(0.1)(x.detach(), y_cast)
    theirs = pml_miners.MultiSimilarityMiner(0.1)(x.detach(), y)
    assert [len(t) for t in ours] == [len(t) for t in theirs]


@pytest.mark.parametrize("label_dtype", [torch.float32, torch.float64, torch.complex64])
def test_floating_point_labels_are_refused_everywhere(device, label_dtype):
    x, y = make_batch(20, n=8, dim=4, device=device)
    yf = y.to(label_dtype)
    for call in (
        lambda: losses.MSLoss()(x, yf),
        lambda: losses.MSLoss(epsilon=0.1)(x, y, None, x.detach(), yf),
        lambda: miners.MultiSimilarityMiner()(x.detach(), yf),
        lambda: losses.CrossBatchMemory(losses.MSLoss(), 4, memory_size=16)(x, yf),
    ):
        with pytest.raises(ValueError, match="integer or bool tensor"):
            call()


@pytest.mark.parametrize("emb_dtype", [torch.int64, torch.bool, torch.complex64], ids=str)
def test_embeddings_that_are_not_floating_point_are_refused_everywhere(device, emb_dtype):
    """Integer, bool and complex embeddings: a ValueError naming the dtype, from the losses
    and the memory alike (before, the losses raised torch's own errors, and the memory cast
    them to float32, enqueued them and computed a loss)."""
    x, y = make_batch(23, n=8, dim=4, device=device)
    xi = (x.detach() * 4).to(emb_dtype)
    memory = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), 4, memory_size=16).to(device)
    before = copy.deepcopy(memory.state_dict())
    for call in (
        lambda: losses.MSLoss()(xi, y),
        lambda: losses.MSLoss(epsilon=0.1)(xi, y),
        lambda: losses.MSLoss(epsilon=0.1)(x, y, None, xi, y),
        lambda: losses.AdaptiveMSLoss()(xi, y),
        lambda: memory(xi, y),
    ):
        with pytest.raises(ValueError, match=f"must be a floating-point tensor, got dtype {emb_dtype}"):
            call()
    for key, value in memory.state_dict().items():
        assert torch.equal(before[key], value), key


def test_self_weighting_gradient_is_the_pair_weight_past_softplus_default_threshold():
    """``"self"``: dL/dS of a negative is its weight ``sigmoid(z)``. With torch's softplus
    threshold (20) autograd gave exactly 1 for z > 20, 1.4e-11 off ``sigmoid(25)`` in float64,
    while ``pair_weights`` gave ``sigmoid(z)``."""
    beta, lam = 50.0, 0.5
    S = torch.tensor([[0.2, lam + 25.0 / beta, lam + 30.0 / beta]], dtype=torch.float64, requires_grad=True)
    pos, neg = torch.tensor([[True, False, False]]), torch.tensor([[False, True, True]])
    t = F_ms.ms_terms(S, pos, neg, beta=beta, weighting="self")
    (grad,) = torch.autograd.grad(t.losses.sum(), S)
    want = torch.sigmoid(
        torch.tensor([25.0, 30.0], dtype=torch.float64)
    )  # by hand: (1/beta) * beta * sigmoid
    torch.testing.assert_close(grad[0, 1:], want, rtol=0, atol=1e-15)
    weights = F_ms.pair_weights(S.detach(), pos, neg, beta=beta, weighting="self")
    torch.testing.assert_close(weights.neg[0, 1:], want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("weighting", ["ms", "relative", "self"])
@pytest.mark.parametrize("side", ["negative_at_plus_inf", "positive_at_minus_inf"])
def test_a_similarity_at_inf_on_the_harmful_side_gives_no_finite_loss(weighting, side):
    """A negative pair at +inf or a positive at -inf (a dot product that overflowed): the formula
    and PML give +inf; ours NaN (the side's shift is inf - inf, see the README), and never a
    finite number -- ``"relative"`` took the NaN sum for an empty side and returned a finite loss
    without that side."""
    inf = float("inf")
    S = (
        torch.tensor([[0.2, 0.9, inf]])
        if side == "negative_at_plus_inf"
        else torch.tensor([[-inf, 0.9, 0.1]])
    )
    pos, neg = torch.tensor([[True, False, False]]), torch.tensor([[False, True, True]])
    assert not torch.isfinite(F_ms.ms_terms(S, pos, neg, weighting=weighting).losses).any()
    # through the loss, the fused and the dense path: unnormalised dot products that overflow
    x = torch.tensor([[1e20, 0.0], [1e20, 1.0], [0.5, 0.5], [0.4, 0.6]])
    y = torch.tensor([0, 1, 0, 1]) if side == "negative_at_plus_inf" else torch.tensor([0, 0, 1, 1])
    if side == "positive_at_minus_inf":
        x[1, 0] = -1e20
    dot = pml_distances.DotProductSimilarity(normalize_embeddings=False)
    assert not torch.isfinite(pml_losses.MultiSimilarityLoss(distance=dot)(x, y))
    for fused in (None, False):
        loss = losses.MSLoss(distance=dot, weighting=weighting, fused=fused)(x, y)
        assert not torch.isfinite(loss), (fused, loss)


@pytest.mark.parametrize("fused", [None, False])
def test_do_nothing_reducer_when_the_mining_keeps_no_pair_gives_pmls_zero_loss(device, fused):
    """No positive pair in the batch, so the mining keeps no negative either: PML (miner + loss)
    returns its zero loss dict; the fused path returned (B, 1) element zeros (the dense path
    PML's dict), so what ``DoNothingReducer`` handed back depended on the path."""
    x, y = make_batch(28, n=5, dim=4, device=device)
    y = torch.arange(5, device=device)
    reducer = pml_reducers.DoNothingReducer
    tup = pml_miners.MultiSimilarityMiner(0.1)(x, y)
    assert [len(t) for t in tup] == [0, 0, 0, 0]
    want = pml_losses.MultiSimilarityLoss(reducer=reducer())(x, y, tup)["loss"]
    got = losses.MSLoss(epsilon=0.1, reducer=reducer(), fused=fused)(x, y)["loss"]
    assert got == want == {"losses": 0, "indices": None, "reduction_type": "already_reduced"}
    # and where the mining keeps pairs, the element losses (the fused path counts them to tell)
    y = torch.arange(5, device=device) % 2
    tup = pml_miners.MultiSimilarityMiner(0.1)(x, y)
    want = pml_losses.MultiSimilarityLoss(reducer=reducer())(x, y, tup)["loss"]
    got = losses.MSLoss(epsilon=0.1, reducer=reducer(), fused=fused)(x, y)["loss"]
    assert got["reduction_type"] == want["reduction_type"] == "element"
    assert_close(got["losses"], want["losses"], torch.float32)


def test_do_nothing_reducer_gives_pmls_shape(device):
    x, y = make_batch(21, n=10, dim=4, device=device)
    got = losses.MSLoss(reducer=pml_reducers.DoNothingReducer())(x, y)["loss"]["losses"]
    want = pml_losses.MultiSimilarityLoss(reducer=pml_reducers.DoNothingReducer())(x, y)["loss"]["losses"]
    assert got.shape == want.shape
    assert_close(got, want, torch.float32)


def test_fused_switch(device):
    x, y = make_batch(22, n=10, dim=4, device=device, dtype=torch.float64)
    values = [losses.MSLoss(epsilon=0.1, fused=f)(x, y) for f in (None, True, False)]
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(values[0], values[2], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="fused=True"):
        losses.MSLoss(fused=True, distance=pml_distances.LpDistance())(x, y)
    with pytest.raises(ValueError, match="fused must be"):
        losses.MSLoss(fused="yes")
