"""The fused, chunked kernel agrees with the dense functional path."""

import shutil
import subprocess
import sys

import pytest
import torch
from helpers import make_batch, tol
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers

from pml_ms_plus import _blocks, _kernel, losses
from pml_ms_plus import functional as F_ms


@pytest.fixture(params=["dense", "listed", "listed, anchor-major", "listed, sparse gradients"])
def layout(request, monkeypatch):
    """Both layouts of a block's positives (see ``_blocks.Block``) on the same small problems;
    listed blocks of other references are stored reference-major unless told otherwise
    (``_kernel.REFERENCE_MAJOR``, see ``_Problem.product``). "sparse gradients": every
    gradient block of the backward goes through its sparse copy (``_kernel._weights_operand``,
    on a CPU with MKL; elsewhere the case repeats "listed"), whatever its size and density.
    "listed" and "listed, anchor-major" run their eager passes over tiles of a few hundred
    bytes (``_kernel.TILE_BYTES``: one to a few references or anchors per tile, the last tile
    narrower), "listed, sparse gradients" over whole blocks (these blocks are smaller than the
    default tile)."""
    monkeypatch.setattr(_kernel, "DENSE_ELEMENTS", 2**62 if request.param == "dense" else 0)
    monkeypatch.setattr(_kernel, "REFERENCE_MAJOR", request.param != "listed, anchor-major")
    if request.param in ("listed", "listed, anchor-major"):
        monkeypatch.setattr(_kernel, "TILE_BYTES", 400)
    if request.param == "listed, sparse gradients":
        monkeypatch.setattr(_kernel, "SPARSE_MIN_ELEMENTS", 0)
        monkeypatch.setattr(_kernel, "_sparse_density_limit", lambda dim: 1.0)
    return request.param


def dense_and_fused(device, weighting, epsilon, chunk_size, self_copies, seed=0, n=24, m=37, budget=None):
    x, y = make_batch(seed, n=n, dim=8, classes=5, device=device, dtype=torch.float64)
    ref, ref_y = make_batch(seed + 1, n=m, dim=8, classes=5, device=device, dtype=torch.float64)
    if self_copies:  # anchors' own copies sit in the references, as in a memory
        self_index = torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:n].to(device)
        with torch.no_grad():
            ref[self_index] = x
        ref_y = ref_y.clone()
        ref_y[self_index] = y
    else:
        self_index = torch.full((n,), -1, device=device)
    xn = torch.nn.functional.normalize(x, dim=1)
    rn = torch.nn.functional.normalize(ref, dim=1)
    g = torch.Generator().manual_seed(seed + 2)
    lam_pos = (0.5 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).to(device).requires_grad_(True)
    lam_neg = (0.5 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).to(device).requires_grad_(True)
    upstream = torch.rand(n, generator=g, dtype=torch.float64).to(device)  # unequal anchor weights
    kw = dict(alpha=2.0, beta=50.0, weighting=weighting, epsilon=epsilon)
    inputs = (x, ref, lam_pos, lam_neg)

    pos, neg = F_ms.pair_masks(y, ref_y, self_index)
    dense = F_ms.ms_terms(xn @ rn.T, pos, neg, lam_pos=lam_pos, lam_neg=lam_neg, **kw)
    g_dense = torch.autograd.grad((dense.losses * upstream).sum(), inputs, retain_graph=True)
    fused = _kernel.ms_terms_fused(
        xn, rn, y, ref_y, self_index, lam_pos, lam_neg, chunk_size=chunk_size, memory_budget=budget, **kw
    )
    g_fused = torch.autograd.grad((fused.losses * upstream).sum(), inputs)
    return dense, g_dense, fused, g_fused


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 36, 37, 1000])
@pytest.mark.parametrize("epsilon", [None, 0.1])
@pytest.mark.parametrize("weighting", ["ms", "self", "relative"])
@pytest.mark.parametrize("self_copies", [False, True])
def test_fused_equals_dense(device, layout, chunk_size, epsilon, weighting, self_copies):
    dense, g_dense, fused, g_fused = dense_and_fused(device, weighting, epsilon, chunk_size, self_copies)
    for a, b in zip(fused, dense):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-8)
    for a, b in zip(g_fused, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "reducer",
    [
        lambda: pml_reducers.MeanReducer(),
        lambda: pml_reducers.AvgNonZeroReducer(),
        lambda: pml_reducers.ThresholdReducer(low=0.3),
        lambda: pml_reducers.ClassWeightedReducer(torch.tensor([0.2, 1.0, 3.0, 0.5, 2.0, 1.5])),
    ],
)
@pytest.mark.parametrize("chunk_size, budget", [(None, None), (1, None), (7, None), (None, 0), (7, 0)])
def test_loss_fast_path_equals_general_path(device, layout, reducer, chunk_size, budget):
    x, y = make_batch(4, n=40, device=device, dtype=torch.float32)
    ref, ref_y = make_batch(5, n=33, device=device, dtype=torch.float32)
    for ref_args in ((), (ref, ref_y)):
        inputs = (x,) + ref_args[:1]
        fast = losses.MSLoss(epsilon=0.1, chunk_size=chunk_size, memory_budget=budget, reducer=reducer())
        value = fast(x, y, None, *ref_args)
        grads = torch.autograd.grad(value, inputs)
        # the same problem through the dense autograd path
        expected = losses.MSLoss(epsilon=0.1, reducer=reducer(), fused=False)(x, y, None, *ref_args)
        expected_grads = torch.autograd.grad(expected, inputs)
        torch.testing.assert_close(value, expected, **tol(torch.float32))
        for a, b in zip(grads, expected_grads):
            torch.testing.assert_close(a, b, **tol(torch.float32))


COLUMN = 24 * 8  # bytes of one reference column of the (24, 37) float64 block below
BUDGETS = {  # (chunk_size, memory_budget): what the plan does with the 37 references
    "default: one block, kept": (None, None),
    "nothing kept, one column per block": (None, 0),
    "a budget of one column": (None, COLUMN),
    "exactly one block fits": (None, 3 * 37 * COLUMN),
    "one byte short: blocks, all kept": (None, 3 * 37 * COLUMN - 1),
    "first block kept, two recomputed": (13, 3 * 13 * COLUMN),
    "blocks of 5, none kept": (5, 2 * 5 * COLUMN),
}


@pytest.mark.parametrize("case", list(BUDGETS))
@pytest.mark.parametrize("epsilon", [None, 0.1])
@pytest.mark.parametrize("weighting", ["ms", "self", "relative"])
def test_fused_equals_dense_over_budgets(device, layout, case, epsilon, weighting):
    chunk_size, budget = BUDGETS[case]
    dense, g_dense, fused, g_fused = dense_and_fused(
        device, weighting, epsilon, chunk_size, self_copies=True, budget=budget
    )
    for a, b in zip(fused, dense):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-8)
    for a, b in zip(g_fused, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("B, M", [(1, 1), (24, 37), (256, 16384), (256, 65536), (256, 262144), (256, 2**20)])
@pytest.mark.parametrize("budget", [0, 1000, 2**20, 2**29, 2**31])
def test_block_plans_stay_inside_the_budget(B, M, budget):
    plan = _kernel.plan_blocks(B, M, 4, None, budget)
    block = 4 * B * plan.cols
    n_blocks = -(-M // plan.cols)
    assert 1 <= plan.cols <= M and 0 <= plan.keep <= n_blocks
    assert plan.one_pass == (plan.keep < n_blocks)  # recomputed blocks: the one-pass forward
    assert plan.dense == (B * plan.cols <= _kernel.DENSE_ELEMENTS)
    assert plan.stacked == (plan.dense and n_blocks == plan.keep == 1)  # the small-batch path
    kept, working = (2, 1) if plan.dense else (1, 2)  # block copies: per kept block, working ones
    assert plan.keep == 0 or (kept * plan.keep + working) * block <= budget
    if 3 * 4 * B * M <= budget:
        assert (plan.cols, plan.keep) == (M, 1)  # the whole block, computed once
    elif plan.cols > 1:
        assert 8 * block <= budget  # working blocks of at most 1/8 of the budget


def test_default_budget_keeps_the_memory_cases_of_the_benchmark():
    for M in (16384, 65536, 262144):  # batch 256, float32: every block kept with 512 MiB
        plan = _kernel.plan_blocks(256, M, 4, None, _kernel.DEFAULT_MEMORY_BUDGET)
        assert plan.keep == -(-M // plan.cols)


def fused_against_dense(x, ref, y, ref_y, self_index, weighting, epsilon, chunk_size, budget, seed=0):
    """The kernel's losses, stats and gradients (unequal anchor weights) next to the dense path's."""
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    lam = (0.5 + 0.1 * torch.randn(2, n, generator=g, dtype=torch.float64)).to(x).requires_grad_(True)
    upstream = torch.rand(n, generator=g, dtype=torch.float64).to(x)
    kw = dict(alpha=2.0, beta=50.0, weighting=weighting, epsilon=epsilon)
    pos, neg = F_ms.pair_masks(y, ref_y, self_index)
    dense = F_ms.ms_terms(x @ ref.T, pos, neg, lam_pos=lam[0], lam_neg=lam[1], **kw)
    g_dense = torch.autograd.grad((dense.losses * upstream).sum(), (x, ref, lam))
    fused = _kernel.ms_terms_fused(
        x, ref, y, ref_y, self_index, lam[0], lam[1], chunk_size=chunk_size, memory_budget=budget, **kw
    )
    g_fused = torch.autograd.grad((fused.losses * upstream).sum(), (x, ref, lam))
    for a, b in zip((*fused, *g_fused), (*dense, *g_dense)):
        assert torch.isfinite(a.double()).all()
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("chunk_size, budget", [(3, 0), (3, 3 * 24 * 8), (None, 24 * 8)])
@pytest.mark.parametrize("epsilon", [None, 0.1])
@pytest.mark.parametrize("weighting", ["ms", "self", "relative"])
def test_one_pass_forward_on_similarities_far_beyond_exp_range(
    device, chunk_size, budget, epsilon, weighting
):
    """Raw embeddings of norm ~30: exponents of thousands, so a log-sum-exp level that rose
    across blocks without rescaling the running sum would overflow or vanish. References in
    ascending order of similarity to the anchors' mean make the level rise block after block."""
    x, y = make_batch(30, n=24, dim=8, classes=5, device=device, dtype=torch.float64)
    ref, ref_y = make_batch(31, n=37, dim=8, classes=5, device=device, dtype=torch.float64)
    with torch.no_grad():
        x.mul_(10)
        order = torch.argsort(ref @ x.mean(0))
    ref = (ref.detach()[order] * 10).requires_grad_(True)
    self_index = torch.full((24,), -1, device=device)
    fused_against_dense(x, ref, y, ref_y[order], self_index, weighting, epsilon, chunk_size, budget)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairs_far_below_the_hardest_get_zero_not_subnormal_weights(device, layout, dtype):
    """A negative 1.9 below an anchor's hardest one has the exponent ``-1.9 beta``: with beta 50
    in float32 (-95) and 386 in float64 (-733) its exp is subnormal, which the CPU's ``exp``
    computes ~15x slower. On the CPU those terms (and every one below ``2 e tiny``) are 0: the
    pair weights and the loss's gradient in those similarities are exactly 0 (not subnormal),
    in the dense path and in the kernel's two-pass plans; on every device loss and gradients
    equal PML's."""
    beta = 50.0 if dtype == torch.float32 else 386.0
    tiny = torch.finfo(dtype).tiny
    # on the unit circle: a and its positive; h, the hardest negative (0.9 to a); f opposite a
    angles = torch.tensor([0.0, 0.1415, 0.451, torch.pi], dtype=torch.float64)
    emb = torch.stack((angles.cos(), angles.sin()), 1).to(device=device, dtype=dtype)
    y = torch.tensor([0, 0, 1, 2], device=device)
    S = (emb @ emb.T).requires_grad_(True)
    pos, neg = F_ms.pair_masks(y)
    assert (-87.4 if dtype == torch.float32 else -708.4) > beta * (S[0, 3] - S[0, 2]).item() > -744.0
    w = F_ms.pair_weights(S.detach(), pos, neg, beta=beta)
    (g_S,) = torch.autograd.grad(F_ms.ms_anchor_losses(S, pos, neg, beta=beta).sum(), S)
    # the kernel: f as a reference only, met by the anchors a, a', h as a far negative
    refs = emb.clone().requires_grad_(True)
    lam = torch.full((3,), 0.5, device=device, dtype=dtype)
    own = torch.arange(3, device=device)
    g_refs = []
    for chunk_size in (None, 1):
        fused = _kernel.ms_terms_fused(
            emb[:3], refs, y[:3], y, own, lam, lam, alpha=2.0, beta=beta, chunk_size=chunk_size
        )
        g_refs.append(torch.autograd.grad(fused.losses.sum(), refs)[0])
    if device.type == "cpu":
        assert (w.neg[:2, 3] == 0).all() and (w.neg[:2, 2] > 0).all()
        for part in w:
            assert not ((part != 0) & (part.abs() < tiny)).any(), "a subnormal pair weight"
        assert (g_S[:2, 3] == 0).all() and not ((g_S != 0) & (g_S.abs() < tiny)).any()
        for g_ref in g_refs:
            assert (g_ref[3] == 0).all() and (g_ref[2] != 0).any()

    x = emb.clone().requires_grad_(True)
    x_pml = emb.clone().requires_grad_(True)
    ours = losses.MSLoss(beta=beta)(x, y)
    pml = pml_losses.MultiSimilarityLoss(beta=beta)(x_pml, y)
    ours.backward()
    pml.backward()
    torch.testing.assert_close(ours, pml, **tol(dtype))
    torch.testing.assert_close(x.grad, x_pml.grad, **tol(dtype))


REFERENCE_CLASSES = {  # 30 references; anchors of classes 9, 0, 7 and 3 (own copy at 29)
    "three classes": [0] * 10 + [7] * 19 + [3],
    "one class": [7] * 30,  # anchors of class 7 have no negatives, the others no positives
}


@pytest.mark.parametrize("classes", list(REFERENCE_CLASSES))
@pytest.mark.parametrize("budget", [0, 3 * 5 * 20 * 8])  # nothing kept; the first block kept
@pytest.mark.parametrize("epsilon", [None, 0.1, 2.0])
@pytest.mark.parametrize("weighting", ["ms", "self", "relative"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_one_pass_forward_with_empty_and_mined_away_sides(device, classes, budget, epsilon, weighting, scale):
    """Anchors without positives (class 9; class 3, whose only reference is its own copy),
    without negatives ("one class"), with positives in the first block only (class 0), and
    epsilon=2, which mines whole sides away; ``scale`` 30 puts a mined-away side's hardest
    negative hundreds of units above its threshold (its exponent far beyond exp's range)."""
    x, _ = make_batch(32, n=20, dim=8, device=device, dtype=torch.float64)
    ref, _ = make_batch(33, n=30, dim=8, device=device, dtype=torch.float64)
    with torch.no_grad():
        xn = (torch.nn.functional.normalize(x, dim=1) * scale).requires_grad_(True)
        rn = (torch.nn.functional.normalize(ref, dim=1) * scale).requires_grad_(True)
    ref_y = torch.tensor(REFERENCE_CLASSES[classes], device=device)
    y = torch.tensor([9, 9, 0, 0, 7, 7, 7, 3] + [0, 7] * 6, device=device)
    self_index = torch.full((20,), -1, device=device)
    self_index[7] = 29
    plan = _kernel.plan_blocks(20, 30, 8, 5, budget)
    assert plan.one_pass and plan.keep == (budget > 0)
    fused_against_dense(xn, rn, y, ref_y, self_index, weighting, epsilon, 5, budget)


@pytest.mark.parametrize("epsilon", [None, 0.1, 0.125])
@pytest.mark.parametrize("weighting", ["ms", "self", "relative"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("one_threshold", [False, True])
def test_stacked_sides_compute_the_per_side_numbers_exactly(
    device, masks, epsilon, weighting, seed, one_threshold
):
    """``signed_terms`` (both sides as one (2, B, M) tensor, the small-batch path and the dense
    functional path) against the per-side functions the large blocks use: the hardest pairs,
    mining, counts and shifts bit for bit, the exponentials to the last bit, on similarities that are multiples of 1/16, so that with epsilon = 1/8 the mining comparisons
    meet exact ties; an anchor without positives, own copies inside and outside the block;
    ``one_threshold``: one tensor for both sides' thresholds (``signed_sides`` signs it by a
    product instead of a stack; the small-batch kernel's case); ``masks``: the boolean and the
    float-pass forms of the label masks and of the mining."""
    g = torch.Generator().manual_seed(40 + seed)
    B, M = 9, 13
    S = (torch.randint(-16, 17, (B, M), generator=g).float() / 16).to(device)
    labels = torch.randint(0, 3, (B,), generator=g).to(device)
    ref_labels = torch.randint(0, 3, (M,), generator=g).to(device)
    labels[0] = 7  # an anchor without positives
    self_index = torch.randint(-1, M, (B,), generator=g).to(device)
    lam_pos = (0.5 + torch.randint(-4, 5, (B,), generator=g) / 16).to(device)
    lam_neg = (0.5 + torch.randint(-4, 5, (B,), generator=g) / 16).to(device)
    if one_threshold:
        lam_neg = lam_pos
    w = _blocks.get_weighting(weighting)
    alpha, beta = 2.0, 50.0

    # per side
    block = _blocks.block_from_labels(S.clone(), labels, ref_labels, self_index, dense=True)
    hard = _blocks.hardest(block)
    side_pair = _blocks.sides(alpha, beta, lam_pos, lam_neg)
    shifts = _blocks.side_shifts(side_pair, hard, epsilon, w)
    bt = _blocks.block_terms(block, side_pair, shifts, hard, weighting=w, epsilon=epsilon, counts=True)
    finish = [_blocks.side_finish(t.acc, sh, sd.coef, w) for t, sh, sd in zip(bt.terms, shifts, side_pair)]

    # stacked
    U = _blocks.signed_block(S.clone(), labels, ref_labels, self_index)
    st = _blocks.signed_terms(U, _blocks.signed_sides(alpha, beta, lam_pos, lam_neg), epsilon, w, counts=True)

    def same(a, b):
        assert torch.equal(a, b), (a, b)

    same(st.hard, torch.stack((-hard.min_pos, hard.max_neg)))
    same(st.counts, torch.stack(bt.counts))
    same(st.shift.ref, torch.stack((-shifts.pos.ref, shifts.neg.ref)))
    same(st.shift.shift, torch.stack((shifts.pos.shift, shifts.neg.shift)))
    assert torch.equal(st.R == 0, torch.stack((bt.terms.pos.R, bt.terms.neg.R)) == 0)  # the same pairs
    # the exponentials may round differently in the last bit (vector lanes vs the scalar tail)
    close = dict(rtol=2e-7, atol=0)
    torch.testing.assert_close(st.R, torch.stack((bt.terms.pos.R, bt.terms.neg.R)), **close)
    torch.testing.assert_close(st.acc, torch.stack((bt.terms.pos.acc, bt.terms.neg.acc)), **close)
    torch.testing.assert_close(st.loss.loss, torch.stack([f.loss for f in finish]), **close)
    torch.testing.assert_close(st.loss.scale, torch.stack([f.scale for f in finish]), **close)
    assert st.counts[0, 0] == 0 and (st.counts.sum(1) > 0).all()


@pytest.mark.parametrize("chunk_size, budget", [(None, None), (5, None), (None, 0)])
@pytest.mark.parametrize("epsilon", [None, 0.1])
def test_anchors_as_references_get_the_gradient_of_both_roles(device, layout, chunk_size, budget, epsilon):
    """In-batch (``y is x``) the backward forms one product, ``(G + G^T) x`` (one block), or
    adds the references' part to the anchors' (several blocks, one pass): the same losses and
    gradients as passing the references as a separate view of the same tensor."""
    x, y = make_batch(50, n=20, dim=6, classes=4, device=device, dtype=torch.float64)
    lam = torch.full((20,), 0.5, dtype=torch.float64, device=device)
    upstream = torch.rand(20, generator=torch.Generator().manual_seed(51), dtype=torch.float64).to(device)
    kw = dict(alpha=2.0, beta=50.0, epsilon=epsilon, chunk_size=chunk_size, memory_budget=budget)
    own = torch.arange(20, device=device)
    results = []
    for view in (False, True):  # the same tensor; the same values as another input
        xn = torch.nn.functional.normalize(x, dim=1)
        out = _kernel.ms_terms_fused(xn, xn.view_as(xn) if view else xn, y, y, own, lam, lam, **kw)
        results.append((out.losses, *torch.autograd.grad((out.losses * upstream).sum(), x)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("view", [False, True])
def test_references_normalised_in_the_kernel_refuse_gradients_even_in_batch(device, view):
    """``ref_norm_p`` treats ``1 / |y_j|`` as a constant, so ``y`` must not need a gradient:
    passing the anchors themselves as ``y`` (the in-batch shortcut) is refused like a view."""
    x, y = make_batch(52, n=8, dim=4, classes=2, device=device)
    lam = torch.full((8,), 0.5, device=device)
    own = torch.arange(8, device=device)
    refs = x.view_as(x) if view else x
    out = _kernel.ms_terms_fused(x, refs, y, y, own, lam, lam, alpha=2.0, beta=50.0, ref_norm_p=2)
    with pytest.raises(RuntimeError, match="normalised inside the kernel"):
        out.losses.sum().backward()


def test_chunk_columns():
    assert _kernel.chunk_columns(256, None) == 2**22 // 256
    assert _kernel.chunk_columns(256, 3) == 3
    assert _kernel.chunk_columns(10**9, None) == 1


@pytest.mark.parametrize("chunk_size", [None, 1, 6])
def test_references_normalised_block_by_block(device, layout, chunk_size):
    x, y = make_batch(8, n=20, dim=8, device=device, dtype=torch.float64)
    ref, ref_y = make_batch(9, n=30, dim=8, device=device, dtype=torch.float64, requires_grad=False)
    xn = torch.nn.functional.normalize(x, dim=1)
    self_index = torch.full((20,), -1, device=device)
    lam = torch.full((20,), 0.5, dtype=torch.float64, device=device)
    kw = dict(alpha=2.0, beta=50.0, epsilon=0.1, chunk_size=chunk_size)
    upfront = _kernel.ms_terms_fused(
        xn, torch.nn.functional.normalize(ref, dim=1), y, ref_y, self_index, lam, lam, **kw
    )
    (g_upfront,) = torch.autograd.grad(upfront.losses.sum(), x, retain_graph=True)
    on_the_fly = _kernel.ms_terms_fused(xn, ref, y, ref_y, self_index, lam, lam, ref_norm_p=2, **kw)
    (g_on_the_fly,) = torch.autograd.grad(on_the_fly.losses.sum(), x)
    torch.testing.assert_close(on_the_fly.losses, upfront.losses)
    torch.testing.assert_close(g_on_the_fly, g_upfront)


def test_second_backward_recomputes_the_kept_block(device, layout):
    x, y = make_batch(12, n=32, device=device, dtype=torch.float64)
    value = losses.MSLoss(epsilon=0.1)(x, y)
    (first,) = torch.autograd.grad(value, x, retain_graph=True)
    (second,) = torch.autograd.grad(value, x)
    torch.testing.assert_close(first, second)


def test_errors_inside_the_fused_forward_are_not_taken_for_a_transform():
    """The fused node falls back to its ``setup_context`` form only when ``torch.func`` refuses
    the ``ctx`` form; an error of the forward itself (here: references of another width, past
    the loss's checks) reaches the caller as it was raised, once."""
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 3, dtype=torch.float64)
    labels, ref_labels = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 2, 0, 1])
    lam = torch.full((6,), 0.5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as raised:
        _kernel.ms_terms_fused(
            x, y, labels, ref_labels, torch.full((6,), -1), lam, lam, alpha=2.0, beta=50.0, epsilon=0.1
        )
    assert raised.value.__context__ is None  # not re-raised from inside the fallback


@pytest.mark.parametrize("seed", range(5))
def test_same_label_pairs_equal_the_dense_comparison(device, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 7, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).to(device)
    ref_labels = torch.randint(2, 12, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g).to(device)
    rows, cols = _blocks.same_label_pairs(labels, ref_labels)
    expected = (labels[:, None] == ref_labels[None, :]).nonzero(as_tuple=True)
    assert torch.equal(rows, expected[0]) and torch.equal(cols, expected[1])


# ------------------------------------------------ the small-batch path: no host synchronisation
SMALL_BATCH_LOSSES = {
    "ms, mining": dict(epsilon=0.1),
    "ms": dict(),
    "self, mining": dict(epsilon=0.1, weighting="self"),
    "relative, mining": dict(epsilon=0.1, weighting="relative"),
}


@pytest.mark.parametrize("dim", [16, 512])
@pytest.mark.parametrize("case", list(SMALL_BATCH_LOSSES))
def test_small_batch_path_traces_as_one_graph(case, dim):
    """``torch.compile(fullgraph=True)`` refuses any graph break: a host synchronisation
    (``.item()``, ``bool(t)``, ``nonzero``, data-dependent shapes) or a Python value
    read from a tensor anywhere in the loss's forward or in its fused backward. The
    finite check is such a read, by design, and is switched off here. Two widths: the
    backward's sparse-product choice depends on it (and must not be traced)."""
    loss = losses.MSLoss(check_finite=False, **SMALL_BATCH_LOSSES[case])
    x, y = make_batch(21, n=32, dim=dim, classes=8)
    compiled = torch.compile(lambda e, t: loss(e, t), backend="eager", fullgraph=True)
    value = compiled(x, y)
    (grad,) = torch.autograd.grad(value, x)
    expected = losses.MSLoss(check_finite=False, fused=False, **SMALL_BATCH_LOSSES[case])(x, y)
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(value, expected, **tol(torch.float32))
    torch.testing.assert_close(grad, expected_grad, **tol(torch.float32))


def test_finite_check_splits_the_compiled_loss_once():
    """With the finite check on (the default) ``torch.compile`` breaks the graph at its one
    host read, in ``forward``'s own frame and, compiled, after the loss: one graph (the whole
    loss) and two frames, where a read nested three calls deep compiled a frame (and a cache
    lookup per step) for each call level, and a read before the loss split it into two graphs.
    The values equal eager; a NaN is still refused with the same error."""
    from torch._dynamo.utils import counters  # dynamo's own frame counters (test-only)

    loss = losses.MSLoss(epsilon=0.1)
    x, y = make_batch(23, n=32, dim=16, classes=8)
    torch._dynamo.reset()
    counters.clear()
    value = torch.compile(loss, backend="eager")(x, y)
    assert counters["frames"]["ok"] == 2, dict(counters["frames"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch.testing.assert_close(value, losses.MSLoss(epsilon=0.1)(x, y), **tol(torch.float32))
    bad = x.detach().clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="embeddings contain NaN or inf"):
        torch.compile(loss, backend="eager")(bad, y)


def test_finite_check_compiles_without_a_warning():
    """The finite check's host read is a deliberate graph break: compiling the default loss
    prints no warning about it (a traced ``.item()`` made dynamo warn that scalar outputs
    could be captured, which cannot apply to a check that must reach the host). Dynamo warns
    once per process, so a fresh one compiles here."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from pml_ms_plus import losses\n"
        "g = torch.Generator().manual_seed(26)\n"
        "x = torch.randn(16, 8, generator=g)\n"
        "y = torch.arange(4).repeat_interleave(4)\n"
        "torch.compile(losses.MSLoss(epsilon=0.1), backend='eager')(x, y)\n"
        "print('compiled')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr
    assert "capture_scalar_outputs" not in run.stderr and "Graph break" not in run.stderr, run.stderr


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("collector", ["loss", "distance", "reducer"])
def test_refused_embeddings_leave_the_stats_alone(compiled, collector):
    """Eagerly, and compiled when any module of the loss collects stats (which read the host
    anyway), the finite check reads its probe before PML's pipeline resets or records
    anything: a refused call leaves the last call's stats as they were."""
    from pytorch_metric_learning.distances import CosineSimilarity

    kw = dict(
        loss=dict(collect_stats=True),
        distance=dict(distance=CosineSimilarity(collect_stats=True)),
        reducer=dict(reducer=pml_reducers.MeanReducer(collect_stats=True)),
    )[collector]
    loss = losses.MSLoss(epsilon=0.1, **kw)
    module = dict(loss=loss, distance=loss.distance, reducer=loss.reducer)[collector]
    x, y = make_batch(24, n=16, dim=8, classes=4)
    loss(x, y)
    names = list(module._record_these_stats)  # PML's list of a module's stat attributes
    before = {n: getattr(module, n) for n in names}
    assert names and any(v != 0 for v in before.values()), before
    bad = x.detach().clone()
    bad[0, 0] = float("inf")
    torch._dynamo.reset()
    fn = torch.compile(loss, backend="eager") if compiled else loss
    with pytest.raises(ValueError, match="embeddings contain NaN or inf"):
        fn(bad, y)
    assert {n: getattr(module, n) for n in names} == before


@pytest.mark.parametrize("case", ["index_out_of_range", "pair_both_sides", "ref_emb_without_labels"])
def test_refused_pairs_leave_the_stats_alone(case):
    """The pairs' checks (an index tuple, a pair both positive and negative, ``ref_emb`` of
    another length without ``ref_labels``) ran inside PML's pipeline, after it had reset the
    stats: a refused call zeroed the last call's stats. Now they run before it, as the finite
    check does."""
    loss = losses.MSLoss(epsilon=0.1, collect_stats=True)
    x, y = make_batch(27, n=16, dim=8, classes=4)
    loss(x, y)
    names = list(loss._record_these_stats)  # PML's list of a module's stat attributes
    before = {n: getattr(loss, n) for n in names}
    assert any(v != 0 for v in before.values()), before
    i = torch.tensor([0, 1])
    args, message = {
        "index_out_of_range": ((x, y, (i + 16, i, i)), "anchor indices must lie in"),
        "pair_both_sides": ((x, y, (i, i + 2, i, i + 2)), "both as positive and as negative"),
        "ref_emb_without_labels": ((x, y, None, x[:5]), "ref_labels is required"),
    }[case]
    with pytest.raises(ValueError, match=message):
        loss(*args)
    assert {n: getattr(loss, n) for n in names} == before


def test_anchors_without_gradient_may_change_before_the_backward():
    """The kernel keeps the raw anchors for the backward only when they need a gradient: frozen
    anchors reused by the caller after the forward (trained references) backpropagate, with
    the gradient of the anchors as they were."""
    x, y = make_batch(25, n=16, dim=8, classes=4, requires_grad=False)
    ref, ref_y = make_batch(26, n=20, dim=8, classes=4)
    (want,) = torch.autograd.grad(losses.MSLoss(epsilon=0.1)(x, y, None, ref, ref_y), ref)
    value = losses.MSLoss(epsilon=0.1)(x, y, None, ref, ref_y)
    x.add_(1.0)
    (got,) = torch.autograd.grad(value, ref)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_small_batch_path_does_not_synchronise_with_the_host(device):
    if device.type != "cuda":
        pytest.skip("torch.cuda.set_sync_debug_mode exists on CUDA only (the CPU proof is the graph test)")
    loss = losses.MSLoss(epsilon=0.1, check_finite=False)
    x, y = make_batch(22, n=64, dim=32, classes=8, device=device)
    loss(x, y).backward()  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss(x, y).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


needs_inductor = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler"
)


@needs_inductor
@pytest.mark.parametrize("case", ["kept", "one pass", "memory, normalised in the kernel"])
@pytest.mark.parametrize("weighting", ["ms", "self", "relative"])
@pytest.mark.parametrize("reference_major", [True, False])
def test_compiled_blocks_equal_eager(device, monkeypatch, case, weighting, reference_major):
    """``compile_blocks=True`` runs the negatives of listed blocks through inductor: the same
    pairs (counts equal exactly), losses, weight sums and gradients as eager, on the kept
    path, the one-pass path (its backward recomputes through the compiled function too) and
    with references normalised block by block; blocks stored anchor-major, and reference-major
    (on the CPU: compiled elementwise over the ``(M, B)`` storage, summed eagerly)."""
    monkeypatch.setattr(_kernel, "DENSE_ELEMENTS", 0)  # every block listed: compiled
    monkeypatch.setattr(_kernel, "REFERENCE_MAJOR", reference_major)
    seen = []
    is_rm = _kernel._reference_major
    monkeypatch.setattr(_kernel, "_reference_major", lambda b: seen.append(is_rm(b)) or seen[-1])
    calls = []
    compiled_fn = _kernel._compiled_negative_terms
    monkeypatch.setattr(_kernel, "_compiled_negative_terms", lambda *a: calls.append(1) or compiled_fn(*a))
    x, y = make_batch(40, n=24, dim=8, classes=5, device=device)
    ref, ref_y = make_batch(41, n=37, dim=8, classes=5, device=device, requires_grad=case == "kept")
    raw = case.startswith("memory")
    lam = torch.full((24,), 0.5, device=device, requires_grad=True)
    self_index = torch.full((24,), -1, device=device)
    budget = 0 if case == "one pass" else None
    inputs = (x, ref, lam) if case == "kept" else (x, lam)
    for epsilon in (None, 0.1):
        out = []
        for compiled in (False, True):
            xn = torch.nn.functional.normalize(x, dim=1)
            refs = ref if raw else torch.nn.functional.normalize(ref, dim=1)
            terms = _kernel.ms_terms_fused(
                xn, refs, y, ref_y, self_index, lam, lam, alpha=2.0, beta=50.0, weighting=weighting,
                epsilon=epsilon, chunk_size=7, memory_budget=budget, ref_norm_p=2 if raw else None,
                compile_blocks=compiled,
            )  # fmt: skip
            grads = torch.autograd.grad((terms.losses * torch.linspace(0.2, 2, 24)).sum(), inputs)
            out.append((terms, grads))
            assert bool(calls) == compiled
            calls.clear()
        (eager, g_eager), (comp, g_comp) = out
        assert any(seen) == (reference_major and device.type == "cpu") and seen  # the layout under test
        seen.clear()
        assert torch.equal(eager.num_pos, comp.num_pos) and torch.equal(eager.num_neg, comp.num_neg)
        # atol: under "relative" each side's weights sum to 1, so dL/dlam is 1 - 1, rounding noise
        for a, b in zip((*comp, *g_comp), (*eager, *g_eager)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_inductor
def test_compiled_loss_equals_pml(tmp_path, monkeypatch):
    """``torch.compile(MSLoss(epsilon=0.1))`` through inductor (generated C++ here, from an empty
    cache) gives PML's miner + loss in value and gradient, as eager does."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x, y = make_batch(23, n=32, dim=16, classes=8)
    compiled = torch.compile(losses.MSLoss(epsilon=0.1))
    value = compiled(x, y)
    (grad,) = torch.autograd.grad(value, x)
    miner, pml = pml_miners.MultiSimilarityMiner(0.1), pml_losses.MultiSimilarityLoss()
    expected = pml(x, y, miner(x, y))
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(value, expected, **tol(torch.float32))
    torch.testing.assert_close(grad, expected_grad, **tol(torch.float32))


# ------------------------------------------------------- anchors normalised in the kernel
def _rows_of_every_size(device, dtype):
    """Ordinary rows, a zero row, rows below and just above ``normalize``'s eps (1e-12)."""
    x, _ = make_batch(60, n=9, dim=5, classes=3, device=device, dtype=dtype, requires_grad=False)
    x = x.clone()
    x[1] = 0.0
    x[2] *= 1e-14 / float(x[2].norm())  # norm below eps: normalize divides by eps
    if dtype == torch.float64:
        x[3] *= 3e-12 / float(x[3].norm())  # norm above eps, tiny
    return x.requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unit_rows_are_normalize_exactly_and_backpropagate_like_it(device, dtype):
    x = _rows_of_every_size(device, dtype)
    units = _kernel.unit_rows(x)
    want = torch.nn.functional.normalize(x, dim=1)
    assert torch.equal(units.unit, want.detach())  # the same operations: the same bits
    assert not units.unit.requires_grad and units.norm.shape == (9, 1)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(61), dtype=dtype).to(device)
    (g_want,) = torch.autograd.grad(want, x, g)
    g_got = _kernel.unit_rows_backward(g.clone(), units.unit, units.norm)
    torch.testing.assert_close(g_got, g_want, **tol(dtype))
    assert torch.equal(g_got[1], g[1] / 1e-12)  # a zero row: the clamp's constant divides


@pytest.mark.parametrize("chunk_size, budget", [(None, None), (4, None), (None, 0), (None, 2000)])
@pytest.mark.parametrize("epsilon", [None, 0.1])
@pytest.mark.parametrize("in_batch", [True, False])
def test_anchors_normalised_in_the_kernel_equal_autograds_normalisation(
    device, layout, chunk_size, budget, epsilon, in_batch
):
    """``anchor_units``: ``x`` raw, its unit rows given: the losses of the unit rows and, through
    the closed-form backward, autograd's gradient of ``normalize`` -- in-batch (both roles) and
    against other references, on every block plan, with unequal upstream weights."""
    x = _rows_of_every_size(device, torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2], device=device)
    ref, ref_y = make_batch(62, n=11, dim=5, classes=3, device=device, dtype=torch.float64)
    lam = torch.full((9,), 0.5, dtype=torch.float64, device=device)
    upstream = torch.rand(9, generator=torch.Generator().manual_seed(63), dtype=torch.float64).to(device)
    kw = dict(alpha=2.0, beta=50.0, epsilon=epsilon, chunk_size=chunk_size, memory_budget=budget)
    own = torch.arange(9, device=device) if in_batch else torch.full((9,), -1, device=device)
    refs_y = y if in_batch else ref_y
    inputs = (x,) if in_batch else (x, ref)

    xn = torch.nn.functional.normalize(x, dim=1)
    rn = xn if in_batch else torch.nn.functional.normalize(ref, dim=1)
    want = _kernel.ms_terms_fused(xn, rn, y, refs_y, own, lam, lam, **kw)
    g_want = torch.autograd.grad((want.losses * upstream).sum(), inputs)
    e = x.view_as(x)
    rn = e if in_batch else torch.nn.functional.normalize(ref, dim=1)
    got = _kernel.ms_terms_fused(e, rn, y, refs_y, own, lam, lam, anchor_units=_kernel.unit_rows(e), **kw)
    g_got = torch.autograd.grad((got.losses * upstream).sum(), inputs)
    torch.testing.assert_close(got.losses, want.losses, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("weighting", ["ms", "self", "relative"])
@pytest.mark.parametrize("epsilon", [None, 0.1])
def test_own_copies_on_the_diagonal_equal_the_self_index(device, weighting, epsilon):
    """``own_diagonal``: in-batch, the own copies dropped as the diagonal give the losses, counts,
    weight sums and gradients of the comparison with ``self_index = arange(B)``."""
    x, y = make_batch(66, n=14, dim=6, classes=3, device=device, dtype=torch.float64)
    g = torch.Generator().manual_seed(67)
    lam = (0.5 + 0.1 * torch.randn(2, 14, generator=g, dtype=torch.float64)).to(device).requires_grad_(True)
    upstream = torch.rand(14, generator=g, dtype=torch.float64).to(device)
    own = torch.arange(14, device=device)
    kw = dict(alpha=2.0, beta=50.0, weighting=weighting, epsilon=epsilon)
    results = []
    for diagonal in (False, True):
        xn = torch.nn.functional.normalize(x, dim=1)
        out = _kernel.ms_terms_fused(xn, xn, y, y, own, lam[0], lam[1], own_diagonal=diagonal, **kw)
        results.append((*out, *torch.autograd.grad((out.losses * upstream).sum(), (x, lam))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_fake_tensor_trace_leaves_the_eager_block_math_working():
    """Tracing the dense block math with fake tensors (``make_fx``) must not leave a fake tensor
    among the block code's reused constants: an eager call after the trace still computes."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, y = make_batch(71, n=6, dim=3, classes=2)
    S = x @ x.T
    pos, neg = F_ms.pair_masks(y)
    kw = dict(alpha=3.5, beta=7.5)  # constants no other test made

    def fn(S, pos, neg):
        return F_ms.ms_terms(S, pos, neg, **kw).losses

    make_fx(fn, tracing_mode="fake")(S, pos, neg)
    got = fn(S, pos, neg)
    want = F_ms.ms_terms(S.double(), pos, neg, **kw).losses
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_loss_graph_holds_no_normalisation_node():
    """``MSLoss`` on the fused path normalises the anchors inside its one autograd node: the
    graph from the loss to the embeddings holds no ``normalize`` nodes (three with autograd's)."""
    x, y = make_batch(64, n=16, dim=8, classes=4)

    def node_names(fn):
        seen, todo = set(), [fn]
        while todo:
            f = todo.pop()
            if f is not None and f not in seen:
                seen.add(f)
                todo.extend(nxt for nxt, _ in f.next_functions)
        return sorted(type(f).__name__ for f in seen)

    names = node_names(losses.MSLoss(epsilon=0.1)(x, y).grad_fn)
    assert not [n for n in names if n.startswith(("Div", "LinalgVectorNorm", "ClampMin"))], names
    assert "_FusedMSBackward" in names
    # p != 2 keeps PML's (autograd) normalisation
    from pytorch_metric_learning.distances import CosineSimilarity

    names = node_names(losses.MSLoss(distance=CosineSimilarity(p=3))(x, y).grad_fn)
    assert "LinalgVectorNormBackward0" in names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("epsilon", [0.0, 0.1, 1e-30])
@pytest.mark.parametrize("flush_denormal", [False, True])
def test_negatives_are_mined_as_the_comparison_mines_them(device, masks, dtype, epsilon, flush_denormal):
    """``mine_negatives_`` (both forms: the comparison and a masked fill, and the float passes
    of the comparison written as 1.0/0.0 capping each value) drops exactly the pairs with ``S + epsilon <= min_pos``, PML's comparison, on exact ties
    (``S + epsilon`` rounding to ``min_pos``, at 0 and at ``+-0``), tiny values that round alike,
    denormals flushed to zero or not, excluded pairs (``-inf``), anchors without positives
    (``min_pos = +inf``), and the non-finite values of ``check_finite=False`` (``+inf``
    similarities, NaN of either sign in ``min_pos`` and in the block); differentiable in place."""
    if flush_denormal and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        inf, nan = float("inf"), float("nan")
        g = torch.Generator().manual_seed(70)
        V = (torch.rand(10, 40, generator=g, dtype=torch.float64) * 1.2 - 0.2).to(dtype)
        tiny = torch.tensor([1e-40, -1e-40, 1e-300, 0.0, -0.0, 5e-9, -5e-9, 1e-7], dtype=torch.float64)
        V[:, :8] = tiny.to(dtype)
        V[0, 10] = V[1, 11] = -inf
        min_pos = (torch.rand(10, generator=g, dtype=torch.float64) * 0.5 + 0.2).to(dtype)
        min_pos[2] = inf
        min_pos[3] = (V[3, 20] + epsilon).item()  # ties: S + epsilon == min_pos for column 20 ...
        min_pos[4] = (V[4, 0] + epsilon).item()  # ... and for the tiny values near 0
        min_pos[5], min_pos[6] = 0.0, -0.0  # ties at zero (epsilon 0), either sign
        min_pos[7], min_pos[8] = nan, torch.copysign(torch.tensor(nan), torch.tensor(-1.0)).item()
        V[2, 30] = V[9, 31] = inf  # +inf against +inf (a tie) and against a finite min_pos
        V[9, 32] = nan
        V, min_pos = V.to(device), min_pos.to(device)
        want = V.masked_fill((V + epsilon) <= min_pos[:, None], -inf)
        assert ((V + epsilon) == min_pos[:, None]).any(), "the ties are there"
        got = _blocks.mine_negatives_(V.clone(), epsilon, min_pos)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        leaf = V.clone().requires_grad_(True)
        out = _blocks.mine_negatives_(leaf.clone(), epsilon, min_pos)
        (grad,) = torch.autograd.grad(out[:, :30].exp().sum(), leaf)  # the finite columns
        expected = torch.where(want == -inf, 0.0, want.exp()).to(dtype)
        expected[:, 30:] = 0
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    finally:
        torch.set_flush_denormal(False)


# ------------------------------------------------------- sparse gradient products (CPU)
def _clustered(seed, labels, dim=512, classes=256, noise=0.07):
    """Rows around their label's centre (one set of centres for every call), as trained
    embeddings: cosine ~0.3 within a class, ~0 across; the mining keeps ~1% of the pairs."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(30))
    centres = torch.nn.functional.normalize(centres, dim=1)
    noise_rows = torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(seed))
    return centres[labels] + noise * noise_rows


@pytest.mark.parametrize("case", ["in-batch B=1024", "memory B=64 M=16,384"])
def test_sparse_gradient_products_of_trained_like_embeddings_equal_pml(device, monkeypatch, case):
    """With the default thresholds, blocks of 2**20 pairs whose mining keeps ~1% of them take the
    sparse products on the CPU (and the dense ones elsewhere), and the loss and gradient equal
    PML's miner + loss (in-batch) and PML's CrossBatchMemory (memory)."""
    layouts = []
    operand = _kernel._weights_operand

    def spy(G, dim):
        W = operand(G, dim)
        layouts.append(W.layout)
        return W

    monkeypatch.setattr(_kernel, "_weights_operand", spy)
    dim = 512
    g = torch.Generator().manual_seed(31)
    if case.startswith("in-batch"):
        y = torch.randperm(1024, generator=g) % 256
        x = _clustered(32, y).requires_grad_(True)
        ours = losses.MSLoss(epsilon=0.1)
        pml_miner, pml_loss = pml_miners.MultiSimilarityMiner(0.1), pml_losses.MultiSimilarityLoss()
        value, expected = ours(x.to(device), y.to(device)), pml_loss(x, y, pml_miner(x, y))
    else:
        mem_y = torch.randint(0, 256, (16384,), generator=g)
        mem = torch.nn.functional.normalize(_clustered(33, mem_y), dim=1)
        y = torch.randperm(256, generator=g)[:16].repeat_interleave(4)
        x = _clustered(34, y).requires_grad_(True)
        pml_xbm = pml_losses.CrossBatchMemory(
            pml_losses.MultiSimilarityLoss(), dim, 16384, miner=pml_miners.MultiSimilarityMiner(0.1)
        )
        ours_xbm = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), dim, 16384).to(device)
        for xbm in (pml_xbm, ours_xbm):
            with torch.no_grad():
                xbm.embedding_memory.copy_(mem)
                xbm.label_memory.copy_(mem_y)
            xbm.has_been_filled = True
        value, expected = ours_xbm(x.to(device), y.to(device)), pml_xbm(x, y)
    (grad,) = torch.autograd.grad(value, x)
    (expected_grad,) = torch.autograd.grad(expected, x)
    assert expected.item() > 0 and expected_grad.abs().sum() > 0  # pairs were mined
    torch.testing.assert_close(value.cpu(), expected, **tol(torch.float32))
    torch.testing.assert_close(grad.cpu(), expected_grad, **tol(torch.float32))
    sparse = device.type == "cpu" and torch.backends.mkl.is_available()
    assert layouts == [torch.sparse_csr if sparse else torch.strided]


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="sparse copies need MKL")
def test_sparse_products_show_no_torch_notice_and_leave_warnings_alone():
    """In a fresh process (torch's notices fire once per process), with Python's default warning
    filters: building the sparse copies shows none of torch's sparse notices, and a user's
    warning shown once is shown again at most once (silencing torch's one-time notice on the
    first copy resets Python's warning registry, as any change of the filters does), not at
    every step."""
    script = """
import warnings, torch
from pml_ms_plus import _kernel
def user():
    warnings.warn("a user notice")
G = torch.zeros(1024, 1024)
G[::7, ::13] = 1.0
for _ in range(5):
    user()
    W = _kernel._weights_operand(G, 512)
    assert W.layout == torch.sparse_csr
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("a user notice") <= 2, run.stderr
    assert "sparse" not in run.stderr.lower(), run.stderr


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="sparse copies need MKL")
def test_a_misleading_row_sample_costs_no_list_of_nonzeros(monkeypatch):
    """A block dense but on exactly the rows its density sample reads is counted in full before
    its nonzeros are listed: it stays dense, and no index of 8 bytes per entry (twice a float32
    block) is allocated for nothing."""
    listed = []
    nonzero = torch.Tensor.nonzero
    monkeypatch.setattr(
        torch.Tensor, "nonzero", lambda t, *a, **k: listed.append(t.numel()) or nonzero(t, *a, **k)
    )
    G = torch.ones(1024, 1024)
    G[:: 1024 // (_kernel._DENSITY_SAMPLE // 1024)] = 0.0  # the sampled rows
    assert _kernel._weights_operand(G, 512) is G
    assert listed == []
    G = (torch.rand(1024, 1024, generator=torch.Generator().manual_seed(5)) < 0.02).float()
    # truly sparse (2%): listed once, and the copy equals the block
    W = _kernel._weights_operand(G, 512)
    assert listed == [G.numel()] and torch.equal(W.to_dense(), G)


@pytest.mark.parametrize("case", ["memory-like, reference-major", "in-batch, anchor-major"])
@pytest.mark.parametrize("epsilon", [None, 0.1])
@pytest.mark.parametrize("weighting", ["ms", "relative"])
def test_tiled_eager_passes_equal_whole_block_passes(monkeypatch, case, epsilon, weighting):
    """Blocks larger than ``_kernel.TILE_BYTES`` (2 MB) run their eager elementwise passes tile by
    tile: column tiles of a reference-major block (64 anchors x 20,000 references, the last tile
    narrower), row tiles of an anchor-major one (1,100 anchors in-batch: three tiles of 476 rows,
    the last narrower). Losses, gradients, the per-anchor thresholds' gradients and the pair
    counts equal those of the passes over whole blocks (``TILE_BYTES`` beyond any block)."""
    if case.startswith("memory"):
        x, y = make_batch(41, n=64, dim=16, classes=10)
        ref, ref_y = make_batch(42, n=20000, dim=16, classes=10, requires_grad=False)
        args = (None, ref, ref_y)
    else:
        x, y = make_batch(43, n=1100, dim=16, classes=60)
        args = ()

    def run(tile_bytes):
        monkeypatch.setattr(_kernel, "TILE_BYTES", tile_bytes)
        loss = losses.MSLoss(epsilon=epsilon, weighting=weighting, collect_stats=True)
        value = loss(x, y, *args)
        (grad,) = torch.autograd.grad(value, x)
        return value, grad, loss.num_pos_pairs, loss.num_neg_pairs

    whole = run(2**62)
    tiled = run(2**21)
    assert tiled[2:] == whole[2:]  # the same pairs
    assert whole[3] > 0 and (epsilon is None or whole[3] < (len(x) * (20000 if args else len(x))))
    torch.testing.assert_close(tiled[0], whole[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(tiled[1], whole[1], rtol=1e-5, atol=1e-6 * float(whole[1].abs().max()))
