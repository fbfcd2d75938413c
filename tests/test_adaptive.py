"""AdaptiveMSLoss against hand-written per-anchor loops, MSLoss, and a short training run."""

import pytest
import torch
from helpers import make_batch, tol
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning.reducers import DoNothingReducer
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

from pml_ms_plus import losses

ALPHA, BETA, BASE, MARGIN = 2.0, 50.0, 0.5, 0.1


def per_anchor(value):
    return value["loss"]["losses"].reshape(-1)


def hand_loop(x, y, thresholds=None, margin=MARGIN, epsilon=None, distance="cosine"):
    """Per-anchor adaptive MS losses, written in the distance's own units.

    Similarity: positives pay exp(alpha * (lam + m - s)), negatives exp(beta * (s - (lam - m))).
    Distance:   positives pay exp(alpha * (d - (lam - m))), negatives exp(beta * ((lam + m) - d)).
    """
    if distance == "cosine":
        xn = torch.nn.functional.normalize(x, dim=1)
        mat = xn @ xn.T
    else:
        mat = torch.cdist(x, x)
    out = []
    for i in range(len(y)):
        is_pos = (y == y[i]).clone()
        is_pos[i] = False
        pos_all, neg_all = mat[i][is_pos], mat[i][y != y[i]]
        if thresholds is not None:
            lam = thresholds[y[i]]
        elif len(pos_all) and len(neg_all):
            lam = ((pos_all.mean() + neg_all.mean()) / 2).detach()
        else:
            lam = torch.tensor(BASE, dtype=x.dtype)
        pos, neg = pos_all, neg_all
        if epsilon is not None and len(pos_all) and len(neg_all):
            if distance == "cosine":
                pos = pos_all[pos_all - epsilon < neg_all.max()]
                neg = neg_all[neg_all + epsilon > pos_all.min()]
            else:
                pos = pos_all[pos_all + epsilon > neg_all.min()]
                neg = neg_all[neg_all - epsilon < pos_all.max()]
        if distance == "cosine":
            zp, zn = ALPHA * (lam + margin - pos), BETA * (neg - (lam - margin))
        else:
            zp, zn = ALPHA * (pos - (lam - margin)), BETA * ((lam + margin) - neg)
        value = torch.log1p(torch.exp(zp).sum()) / ALPHA + torch.log1p(torch.exp(zn).sum()) / BETA
        out.append(value)
    return torch.stack(out)


@pytest.mark.parametrize("epsilon", [None, 0.1])
@pytest.mark.parametrize("distance", ["cosine", "lp"])
def test_anchor_mode_by_hand(device, epsilon, distance):
    x, y = make_batch(3, n=20, dim=6, classes=4, device="cpu", dtype=torch.float64)
    dist = (
        pml_distances.CosineSimilarity()
        if distance == "cosine"
        else pml_distances.LpDistance(normalize_embeddings=False)
    )
    base = BASE if distance == "cosine" else 2.0
    loss_fn = losses.AdaptiveMSLoss(epsilon=epsilon, distance=dist, base=base, reducer=DoNothingReducer())
    xd = x.detach().to(device).requires_grad_(True)
    got = per_anchor(loss_fn(xd, y.to(device)))
    (g_got,) = torch.autograd.grad(got.sum(), xd)
    expected = hand_loop(x, y, epsilon=epsilon, distance=distance)
    (g_expected,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(got.cpu(), expected.detach(), **tol(torch.float64))
    torch.testing.assert_close(g_got.cpu(), g_expected, **tol(torch.float64))


@pytest.mark.parametrize("epsilon", [None, 0.1])
def test_learned_mode_by_hand_with_threshold_gradients(device, epsilon):
    x, y = make_batch(4, n=18, dim=6, classes=3, device="cpu", dtype=torch.float64)  # classes 0..2 of 5
    loss_fn = (
        losses.AdaptiveMSLoss(
            epsilon=epsilon, margin_mode="learned", num_classes=5, reducer=DoNothingReducer()
        )
        .double()
        .to(device)
    )
    with torch.no_grad():
        loss_fn.thresholds.copy_(torch.tensor([0.3, 0.45, 0.6, 0.2, 0.7], dtype=torch.float64))
    xd = x.detach().to(device).requires_grad_(True)
    got = per_anchor(loss_fn(xd, y.to(device)))
    g_x, g_t = torch.autograd.grad(got.sum(), (xd, loss_fn.thresholds))
    t = torch.tensor([0.3, 0.45, 0.6, 0.2, 0.7], dtype=torch.float64, requires_grad=True)
    expected = hand_loop(x, y, thresholds=t, epsilon=epsilon)
    e_x, e_t = torch.autograd.grad(expected.sum(), (x, t))
    torch.testing.assert_close(got.cpu(), expected.detach(), **tol(torch.float64))
    torch.testing.assert_close(g_x.cpu(), e_x, **tol(torch.float64))
    torch.testing.assert_close(g_t.cpu(), e_t, **tol(torch.float64))
    assert (g_t[:3] != 0).all() and (g_t[3:] == 0).all()  # only classes in the batch move


@pytest.mark.parametrize("use_ref", [False, True])
@pytest.mark.parametrize("distance", ["cosine", "lp"])
@pytest.mark.parametrize("epsilon", [None, 0.1])
def test_learned_with_zero_margin_equals_msloss(device, use_ref, distance, epsilon):
    dist = lambda: pml_distances.CosineSimilarity() if distance == "cosine" else pml_distances.LpDistance()  # noqa: E731
    x, y = make_batch(5, n=32, device=device)
    ref, ref_y = make_batch(6, n=20, device=device) if use_ref else (None, None)
    inputs = (x, ref) if use_ref else (x,)
    adaptive = losses.AdaptiveMSLoss(
        base=0.7, epsilon=epsilon, margin_mode="learned", margin=0, num_classes=6, distance=dist()
    ).to(device)
    plain = losses.MSLoss(base=0.7, epsilon=epsilon, distance=dist())
    a = adaptive(x, y, None, ref, ref_y)
    b = plain(x, y, None, ref, ref_y)
    torch.testing.assert_close(a, b)
    for ga, gb in zip(torch.autograd.grad(a, inputs), torch.autograd.grad(b, inputs)):
        torch.testing.assert_close(ga, gb)


def test_anchor_without_negatives_uses_base(device):
    x, _ = make_batch(8, n=6, dim=5, device="cpu", dtype=torch.float64)
    y = torch.zeros(6, dtype=torch.long)
    got = per_anchor(losses.AdaptiveMSLoss(reducer=DoNothingReducer())(x.to(device), y.to(device)))
    expected = hand_loop(x, y)  # no negatives: lambda = base, positive term only
    torch.testing.assert_close(got.detach().cpu(), expected.detach(), **tol(torch.float64))


def test_stats(device):
    x, y = make_batch(9, device=device)
    loss_fn = losses.AdaptiveMSLoss(collect_stats=True)
    loss_fn(x, y)
    xn = torch.nn.functional.normalize(x.detach(), dim=1)
    S = xn @ xn.T
    centres = []
    for i in range(len(y)):
        same = (y == y[i]).clone()
        same[i] = False
        centres.append(float((S[i][same].mean() + S[i][y != y[i]].mean()) / 2))
    centres = torch.tensor(centres)
    assert loss_fn.threshold_mean == pytest.approx(float(centres.mean()), rel=1e-5)
    assert loss_fn.threshold_std == pytest.approx(float(centres.std(unbiased=False)), rel=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(margin_mode="global"), "margin_mode"),
        (dict(margin=-0.1), "margin"),
        (dict(margin_mode="learned"), "num_classes"),
        (dict(margin_mode="learned", num_classes=0), "num_classes"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        losses.AdaptiveMSLoss(**kwargs)


def test_bad_labels_and_embeddings(device):
    loss_fn = losses.AdaptiveMSLoss(margin_mode="learned", num_classes=3).to(device)
    x, y = make_batch(1, n=12, classes=4, device=device)
    with pytest.raises(ValueError, match=r"\[0, num_classes=3\)"):
        loss_fn(x, y)
    with pytest.raises(ValueError, match=r"\[0, num_classes=3\)"):
        loss_fn(x, y - 1)
    bad = x.detach().clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        losses.AdaptiveMSLoss()(bad, y)


@pytest.mark.parametrize("label_dtype", [torch.uint16, torch.uint32, torch.int8, torch.bool])
def test_learned_mode_takes_labels_of_any_integer_dtype(device, label_dtype):
    """uint16-64 labels (class ids, as the other losses take them) raised in learned mode: their
    range check (min/max are not defined for those dtypes) and the threshold lookup (they do not
    index)."""
    x, y = make_batch(31, n=12, dim=6, classes=2, device=device)
    loss = losses.AdaptiveMSLoss(epsilon=0.1, margin_mode="learned", num_classes=2).to(device)
    want = loss(x, y)
    (want_grad,) = torch.autograd.grad(want, loss.thresholds)
    got = loss(x, y.to(label_dtype))
    (got_grad,) = torch.autograd.grad(got, loss.thresholds)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)


def test_inside_cross_batch_memory_and_distributed_wrapper(device):
    xbm = losses.CrossBatchMemory(
        losses.AdaptiveMSLoss(epsilon=0.1, margin_mode="learned", margin=0.0, num_classes=6),
        16,
        memory_size=64,
    ).to(device)
    plain = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), 16, memory_size=64).to(device)
    for step in range(4):
        x, y = make_batch(50 + step, n=24, dim=16, device=device)
        torch.testing.assert_close(xbm(x, y), plain(x, y))
    x, y = make_batch(60, dim=16, device=device)
    anchor_mode = losses.AdaptiveMSLoss()
    with pytest.warns(UserWarning):
        wrapped = DistributedLossWrapper(anchor_mode)(x, y)
    torch.testing.assert_close(wrapped, anchor_mode(x, y))


def blobs(n_classes=8, per_class=24, dim=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g)
    x = centres.repeat_interleave(per_class, 0) + 0.9 * torch.randn(n_classes * per_class, dim, generator=g)
    return x, torch.arange(n_classes).repeat_interleave(per_class)


def test_short_training_moves_thresholds_and_lowers_the_loss():
    torch.manual_seed(0)
    x, y = blobs()
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    loss_fn = losses.AdaptiveMSLoss(epsilon=0.1, margin_mode="learned", num_classes=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_opt = torch.optim.SGD(loss_fn.parameters(), lr=0.5)  # the loss optimizer
    start = loss_fn.thresholds.detach().clone()
    g = torch.Generator().manual_seed(1)
    history = []
    for _ in range(60):
        idx = torch.randperm(len(y), generator=g)[:64]
        value = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad()
        loss_opt.zero_grad()
        value.backward()
        opt.step()
        loss_opt.step()
        history.append(float(value.detach()))
    assert sum(history[-10:]) / 10 < 0.6 * sum(history[:10]) / 10
    assert (loss_fn.thresholds.detach() - start).abs().max() > 0.01
