"""CrossBatchMemory: PML parity over steps, the self-copy difference, warm-up, checkpoints, bad input."""

import contextlib
import copy
import pickle
import shutil

import pytest
import torch
from helpers import make_batch, tol
from pytorch_metric_learning import distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.reducers import DoNothingReducer

from pml_ms_plus import _kernel, losses, miners

DIM, MEMORY, BATCH = 16, 50, 24  # 50 is no multiple of 24: the ring buffer wraps mid-batch


def steps(device, dtype, n_steps=6, with_mask=False):
    for step in range(n_steps):
        x, y = make_batch(300 + step, n=BATCH, dim=DIM, classes=6, device=device, dtype=dtype)
        mask = None
        if with_mask:  # the first half of each class is enqueued, the rest are anchors
            mask = torch.zeros(BATCH, dtype=torch.bool, device=device)
            mask[torch.arange(BATCH, device=device) % 4 < 2] = True
        yield x, y, mask


def pml_memory(device, dtype):
    return pml_losses.CrossBatchMemory(
        pml_losses.MultiSimilarityLoss(), DIM, memory_size=MEMORY, miner=pml_miners.MultiSimilarityMiner(0.1)
    ).to(device=device, dtype=dtype)


OURS = {
    "fused": lambda: losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY),
    "our_miner": lambda: losses.CrossBatchMemory(
        losses.MSLoss(), DIM, memory_size=MEMORY, miner=miners.MultiSimilarityMiner(0.1)
    ),
    "pml_miner": lambda: losses.CrossBatchMemory(
        losses.MSLoss(), DIM, memory_size=MEMORY, miner=pml_miners.MultiSimilarityMiner(0.1)
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("variant", list(OURS))
@pytest.mark.parametrize("blocks", ["stacked", "listed", "listed, anchor-major"])
def test_parity_with_pml_over_steps(device, dtype, with_mask, variant, blocks, monkeypatch):
    """Every step against PML's XBM; ``blocks``: the kernel's small-batch block (both sides
    stacked), or the listed layout of large memories, reference-major (the CPU's default) or
    anchor-major (other devices)."""
    if blocks != "stacked":
        monkeypatch.setattr(_kernel, "DENSE_ELEMENTS", 0)
        monkeypatch.setattr(_kernel, "REFERENCE_MAJOR", blocks == "listed")
    stacked_calls = []
    stacked_block = _kernel._stacked_block
    monkeypatch.setattr(_kernel, "_stacked_block", lambda *a: stacked_calls.append(1) or stacked_block(*a))
    ours = OURS[variant]().to(device=device, dtype=dtype)
    theirs = pml_memory(device, dtype)
    tolerance = tol(dtype)
    for x, y, mask in steps(device, dtype, with_mask=with_mask):
        a = ours(x, y, enqueue_mask=mask)
        (ga,) = torch.autograd.grad(a, x)
        b = theirs(x, y, enqueue_mask=mask)
        (gb,) = torch.autograd.grad(b, x)
        torch.testing.assert_close(a, b, **tolerance)
        torch.testing.assert_close(ga, gb, **tolerance)
        torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory)
        assert torch.equal(ours.label_memory, theirs.label_memory)
        assert ours.queue_idx == theirs.queue_idx and ours.has_been_filled == theirs.has_been_filled
    assert ours.has_been_filled  # the ring buffer wrapped around
    if variant == "fused":  # the memory's blocks went through the path named
        assert bool(stacked_calls) == (blocks == "stacked")


@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler"
)
def test_compiled_blocks_in_a_filling_memory_match_pml_without_recompiling(device, monkeypatch):
    """``MSLoss(compile_blocks=True)`` in the memory: PML's numbers at every step while the
    memory fills (24, 48, then 50 references) and wraps; after the first two steps no step
    recompiles (``fail_on_recompile`` raises if one would), a smaller batch included."""
    monkeypatch.setattr(_kernel, "DENSE_ELEMENTS", 0)  # these small blocks listed: compiled
    ours = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1, compile_blocks=True), DIM, memory_size=MEMORY)
    ours = ours.to(device)
    theirs = pml_memory(device, torch.float32)
    batches = [(x, y) for x, y, _ in steps(device, torch.float32)]
    batches.append(make_batch(399, n=13, dim=DIM, classes=4, device=device))
    try:
        for step, (x, y) in enumerate(batches):
            if step == 2:
                torch.compiler.set_stance("fail_on_recompile")
            a = ours(x, y)
            (ga,) = torch.autograd.grad(a, x)
            b = theirs(x, y)
            (gb,) = torch.autograd.grad(b, x)
            torch.testing.assert_close(a, b, **tol(torch.float32))
            torch.testing.assert_close(ga, gb, **tol(torch.float32))
    finally:
        torch.compiler.set_stance("default")


def lonely_anchor_reference(x, y, mem, mem_y, self_index, epsilon=0.1, alpha=2.0, beta=50.0, base=0.5):
    """Per-anchor losses, own copy removed BEFORE mining, one anchor at a time."""
    xn = torch.nn.functional.normalize(x, dim=1)
    mn = torch.nn.functional.normalize(mem, dim=1)
    out = []
    for i in range(len(x)):
        s = mn @ xn[i]
        is_pos = mem_y == y[i]
        is_pos[self_index[i]] = False
        pos_all, neg_all = s[is_pos], s[mem_y != y[i]]
        if len(pos_all) == 0 or len(neg_all) == 0:
            out.append(0.0)
            continue
        pos = pos_all[pos_all - epsilon < neg_all.max()]
        neg = neg_all[neg_all + epsilon > pos_all.min()]
        value = torch.log1p(torch.exp(-alpha * (pos - base)).sum()) / alpha
        value = value + torch.log1p(torch.exp(beta * (neg - base)).sum()) / beta
        out.append(float(value))
    return torch.tensor(out, dtype=x.dtype)


def test_own_copy_is_excluded_before_mining(device):
    # anchor 0 is the only member of class 9 anywhere: its only "positive" is its own copy
    x, y = make_batch(
        40, n=BATCH, dim=DIM, classes=6, device=device, dtype=torch.float64, requires_grad=False
    )
    y = y.clone()
    y[0] = 9
    x[0] = x[1] + 0.3 * x[2]  # close to some negatives, so PML mines them
    ours = (
        losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1, collect_stats=True), DIM, memory_size=MEMORY)
        .double()
        .to(device)
    )
    ours.loss.reducer = DoNothingReducer()
    theirs = pml_memory(device, torch.float64)
    theirs.loss.reducer = DoNothingReducer()
    got = ours(x, y)["loss"]["losses"].reshape(-1)
    pml = theirs(x, y)["loss"]["losses"].reshape(-1)
    mem, mem_y = ours.memory()
    self_index = torch.arange(BATCH)
    expected = lonely_anchor_reference(x.cpu(), y.cpu(), mem.cpu(), mem_y.cpu(), self_index)
    torch.testing.assert_close(got.cpu(), expected, **tol(torch.float64))
    assert float(got[0]) == 0.0  # no true positive: no pairs
    assert float(pml[0]) > 0.0  # PML mined negatives against the own copy
    torch.testing.assert_close(got[1:], pml[1:], **tol(torch.float64))  # everyone else agrees


def test_warm_up_and_weights(device):
    ours = losses.CrossBatchMemory(
        losses.MSLoss(epsilon=0.1),
        DIM,
        memory_size=MEMORY,
        start_iteration=2,
        batch_weight=0.5,
        memory_weight=2.0,
    ).to(device)
    plain = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY).to(device)
    in_batch = losses.MSLoss(epsilon=0.1)
    for step, (x, y, _) in enumerate(steps(device, torch.float32, n_steps=5)):
        got = ours(x, y)
        memory_loss = plain(x, y)
        if step < 2:
            expected = in_batch(x, y)
        else:
            expected = 0.5 * in_batch(x, y) + 2.0 * memory_loss
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(ours.embedding_memory, plain.embedding_memory)  # filled during warm-up too
    assert int(ours.iteration) == 5


def test_checkpoint_round_trip_mid_training(device, tmp_path):
    ours = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY, start_iteration=3).to(
        device
    )
    batches = list(steps(device, torch.float32, n_steps=8))
    for x, y, _ in batches[:4]:
        ours(x, y)
    torch.save(ours.state_dict(), tmp_path / "xbm.pt")
    resumed = losses.CrossBatchMemory(
        losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY, start_iteration=3
    ).to(device)
    resumed.load_state_dict(torch.load(tmp_path / "xbm.pt"))
    assert resumed.queue_idx == ours.queue_idx and int(resumed.iteration) == 4
    for x, y, _ in batches[4:]:
        torch.testing.assert_close(resumed(x, y), ours(x, y))


@pytest.mark.parametrize("when", ["before_the_backward", "after_the_backward"])
def test_the_whole_module_pickles_after_a_call_as_pmls_does(device, tmp_path, when):
    """``torch.save(model)`` / ``pickle`` of a memory that has been called: it raised ``TypeError:
    cannot pickle 'weakref.ReferenceType'`` (the record of which graph reads the buffers); PML's
    memory pickles. The copy goes on exactly as the original, and the original's pending
    backward is unaffected."""
    ours = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY).to(device)
    batches = list(steps(device, torch.float32, n_steps=4))
    for x, y, _ in batches[:2]:
        ours(x, y).backward()
    x, y, _ = batches[2]
    pending = ours(x, y)
    if when == "after_the_backward":
        pending.backward()
    copies = [pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)]
    torch.save(ours, tmp_path / "xbm.pt")
    copies.append(torch.load(tmp_path / "xbm.pt", weights_only=False))
    if when == "before_the_backward":
        pending.backward()
    x, y, _ = batches[3]
    want = ours(x, y)
    for other in copies:
        torch.testing.assert_close(other(x, y), want)
        for key, value in ours.state_dict().items():
            assert torch.equal(other.state_dict()[key], value), key


def test_memory_keeps_float32_and_follows_device(device):
    ours = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY).to(device)
    x, y = make_batch(1, n=BATCH, dim=DIM, device=device, dtype=torch.float32)
    reference = copy.deepcopy(ours)(x, y)
    value = ours(x.to(torch.bfloat16), y)
    assert ours.embedding_memory.dtype == torch.float32 and ours.embedding_memory.device.type == device.type
    assert torch.isfinite(value)
    assert float(value.detach()) == pytest.approx(float(reference.detach()), rel=2e-2)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert torch.isfinite(ours(x, y))
    assert ours.embedding_memory.dtype == torch.float32


def test_rejects_other_losses():
    with pytest.raises(TypeError, match="MS family"):
        losses.CrossBatchMemory(pml_losses.ContrastiveLoss(), DIM)
    with pytest.raises(TypeError, match="MS family"):
        losses.CrossBatchMemory(pml_losses.MultiSimilarityLoss(), DIM)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(memory_size=0), "memory_size"),
        (dict(embedding_size=0), "embedding_size"),
        (dict(start_iteration=-1), "start_iteration"),
        (dict(batch_weight=-1.0), "batch_weight"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = dict(embedding_size=DIM, memory_size=MEMORY)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        losses.CrossBatchMemory(losses.MSLoss(), **args)


def test_bad_input_leaves_memory_untouched(device):
    ours = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY).to(device)
    x, y = make_batch(2, n=BATCH, dim=DIM, device=device)
    ours(x, y)
    before = copy.deepcopy(ours.state_dict())
    bad_nan = x.detach().clone()
    bad_nan[0, 0] = float("nan")
    big, big_y = make_batch(3, n=MEMORY + 1, dim=DIM, device=device)
    cases = [
        ((bad_nan, y), "NaN or inf"),
        ((x[:, :-1], y), "width 15 but embedding_size=16"),
        ((x, y[:-1]), "labels has 23 entries"),
        ((big, big_y), "exceeds memory_size"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            ours(*args)
    with pytest.raises(ValueError, match="mutually exclusive"):
        ours(x, y, (y, y, y), torch.ones(BATCH, dtype=torch.bool, device=device))
    after = ours.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


# ---------------------------------------------------------------- robustness regressions
PML_MINERS = {
    "triplet_all": lambda: pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="all"),
    "triplet_semihard": lambda: pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"),
    "pair_margin": lambda: pml_miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8),
    "ms": lambda: pml_miners.MultiSimilarityMiner(0.1),
}


def assert_same_step(ours, theirs, x, y, tup):
    """One call of both memories (float64) with the tuple ``tup``: the same loss and gradient."""
    a_val = ours(x, y, tup)
    (ga,) = torch.autograd.grad(a_val, x)
    b_val = theirs(x, y, tup)
    (gb,) = torch.autograd.grad(b_val, x)
    torch.testing.assert_close(a_val, b_val, **tol(torch.float64))
    torch.testing.assert_close(ga, gb, **tol(torch.float64))


def callers_tuple(theirs, y, step, form, device):
    """A caller's own tuple for the batch ``y`` of step ``step`` (0, 1, ...), in memory indices
    after PML's memory ``theirs`` enqueues it: six anchors, each with a positive and a
    negative slot; ``form`` ``"pairs"`` or ``"triplets"``."""
    n = min(MEMORY, (step + 1) * BATCH)
    g = torch.Generator().manual_seed(step)
    a = torch.randint(0, BATCH, (6,), generator=g).to(device)
    mem_y = theirs.label_memory.clone()
    idx = (theirs.queue_idx + torch.arange(BATCH, device=device)) % MEMORY
    mem_y[idx] = y
    cand = torch.randint(0, n, (6, 40), generator=g).to(device)
    same = mem_y[cand] == y[a, None]
    p = cand[torch.arange(6), same.float().argmax(1)]
    q = cand[torch.arange(6), (~same).float().argmax(1)]
    return (a, p, a, q) if form == "pairs" else (a, p, q)


@pytest.mark.parametrize("miner", list(PML_MINERS))
@pytest.mark.parametrize("extra", [None, "pairs", "triplets"])
def test_explicit_miner_keeps_pmls_order(device, miner, extra):
    # PML drops a whole triplet whose positive is the anchor's own copy, its negative included
    ours = losses.CrossBatchMemory(losses.MSLoss(), DIM, memory_size=MEMORY, miner=PML_MINERS[miner]())
    theirs = pml_losses.CrossBatchMemory(
        pml_losses.MultiSimilarityLoss(), DIM, memory_size=MEMORY, miner=PML_MINERS[miner]()
    )
    ours, theirs = ours.to(device).double(), theirs.to(device).double()
    for step, (x, y, _) in enumerate(steps(device, torch.float64, n_steps=4)):
        if step == 0:  # anchor 0's only positive in memory is its own copy: PML drops its triplets
            y = y.clone()
            y[0] = 99
            with torch.no_grad():  # and close to some negatives, so the miners pick triplets
                x[0] = x[1] + 0.05 * x[2]
        assert_same_step(
            ours, theirs, x, y, None if extra is None else callers_tuple(theirs, y, step, extra, device)
        )


@pytest.mark.parametrize(
    "case", ["out_of_range_anchor", "out_of_range_ref", "pos_and_neg", "bad_shape", "float", "uint8"]
)
def test_rejected_indices_tuple_enqueues_nothing(device, case):
    ours = losses.CrossBatchMemory(losses.MSLoss(), DIM, memory_size=MEMORY).to(device)
    x, y = make_batch(2, n=BATCH, dim=DIM, device=device)
    ours(x, y)
    before = copy.deepcopy(ours.state_dict())
    x2, y2 = make_batch(3, n=BATCH, dim=DIM, device=device)
    i = torch.tensor([0, 1], device=device)
    tup, message = {
        "out_of_range_anchor": ((i + BATCH, i, i, i), "anchor indices must lie in"),
        "out_of_range_ref": ((i, i + MEMORY, i, i), "positive indices must lie in"),
        "pos_and_neg": ((i, i + 2, i, i + 2), "both as positive and as negative"),
        "bad_shape": ((i, i[:1], i, i), "lengths differ"),
        "float": ((i.float(), i, i, i), "1D integer tensors"),
        "uint8": ((i, i.to(torch.uint8), i, i), "int64 or int32 tensors"),
    }[case]
    with pytest.raises(ValueError, match=message):
        ours(x2, y2, tup)
    after = ours.state_dict()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # and the memory goes on as if the call had not happened
    reference = losses.CrossBatchMemory(losses.MSLoss(), DIM, memory_size=MEMORY).to(device)
    reference(x, y)
    torch.testing.assert_close(ours(x2, y2), reference(x2, y2))


def test_failing_miner_enqueues_nothing(device):
    class Broken(pml_miners.BaseMiner):
        def mine(self, *args):
            raise RuntimeError("miner failed")

    ours = losses.CrossBatchMemory(losses.MSLoss(), DIM, memory_size=MEMORY, miner=Broken()).to(device)
    before = copy.deepcopy(ours.state_dict())
    x, y = make_batch(4, n=BATCH, dim=DIM, device=device)
    with pytest.raises(RuntimeError, match="miner failed"):
        ours(x, y)
    for key, value in ours.state_dict().items():
        assert torch.equal(before[key], value), key


@pytest.mark.parametrize("label_dtype", [torch.bool, torch.uint8, torch.int16])
def test_small_label_dtypes_in_memory_match_pml(device, label_dtype):
    ours = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY).to(device)
    theirs = pml_memory(device, torch.float32)
    for x, y, _ in steps(device, torch.float32, n_steps=3):
        y = y % 2 if label_dtype == torch.bool else y
        torch.testing.assert_close(ours(x, y.to(label_dtype)), theirs(x, y), **tol(torch.float32))


def test_pml_state_dict_loads_with_a_clear_story(device):
    theirs = pml_losses.CrossBatchMemory(
        pml_losses.MultiSimilarityLoss(), DIM, memory_size=MEMORY, miner=pml_miners.MultiSimilarityMiner(0.1)
    ).to(device)
    batches = list(steps(device, torch.float32, n_steps=4))
    for x, y, _ in batches[:3]:
        theirs(x, y)
    state = theirs.state_dict()
    ours = losses.CrossBatchMemory(
        losses.MSLoss(), DIM, memory_size=MEMORY, miner=pml_miners.MultiSimilarityMiner(0.1)
    ).to(device)
    with pytest.raises(RuntimeError, match="state dict of PML's CrossBatchMemory"):
        ours.load_state_dict(state)
    ours.load_state_dict(state, strict=False)
    ours.queue_idx, ours.has_been_filled = theirs.queue_idx, theirs.has_been_filled
    x, y, _ = batches[3]
    torch.testing.assert_close(ours(x, y), theirs(x, y))


def test_float64_embeddings_are_stored_unrounded_as_pml_stores_them(device):
    """PML's memory takes the embeddings' dtype; ours kept float32 buffers and rounded every
    float64 row (losses off by ~3e-9, and a distance of exactly 0 became ~1e-8, whose cdist
    gradient is a unit vector of noise). Now a float64 batch makes a float64 memory: the rows
    stored exactly, losses and gradients equal to PML's at float64 precision, a checkpoint of it
    loads unrounded into a new memory, and a call that fails converts nothing."""
    ours = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY).to(device)
    theirs = pml_memory(device, torch.float32)  # PML converts its memory to float64 itself
    for x, y, _ in steps(device, torch.float64, n_steps=4):
        xo, xp = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        lo, lp = ours(xo, y), theirs(xp, y)
        (go,), (gp,) = torch.autograd.grad(lo, xo), torch.autograd.grad(lp, xp)
        torch.testing.assert_close(lo, lp, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(go, gp, rtol=1e-10, atol=1e-13)
        slots = (torch.arange(BATCH, device=device) + ours.queue_idx - BATCH) % MEMORY
        assert torch.equal(ours.embedding_memory[slots], x)
    assert ours.embedding_memory.dtype == torch.float64

    resumed = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY).to(device)
    resumed.load_state_dict(ours.state_dict())
    assert torch.equal(resumed.embedding_memory, ours.embedding_memory)

    class Broken(pml_miners.BaseMiner):
        def mine(self, *args):
            raise RuntimeError("miner failed")

    fresh = losses.CrossBatchMemory(losses.MSLoss(), DIM, memory_size=MEMORY, miner=Broken()).to(device)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(RuntimeError, match="miner failed"):
        fresh(x, y)
    for key, value in fresh.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(before[key], value), key
    # a float64 memory and a float32 call that fails: not rounded (the call wrote to a converted copy)
    ours.miner = Broken()
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(RuntimeError, match="miner failed"):
        ours(x.float(), y)
    for key, value in ours.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(before[key], value), key
    half = {**before, "embedding_memory": before["embedding_memory"].half()}
    resumed.load_state_dict(half)  # a half-precision checkpoint: stored in float32, as a call would
    assert resumed.embedding_memory.dtype == torch.float32


def _bad_memory_state(good, case):
    """A copy of the state dict ``good`` with one problem (see the test below)."""
    bad = {k: v.clone() for k, v in good.items()}
    if case == "non-integer labels":
        bad["embedding_memory"] = torch.full_like(bad["embedding_memory"], 7.0)
        bad["label_memory"] = torch.full(bad["label_memory"].shape, 0.5)
        bad["queue_position"] = torch.tensor(3)
    elif case == "another memory size":
        bad["embedding_memory"] = torch.zeros(MEMORY + 1, DIM)
        bad["label_memory"] = torch.zeros(MEMORY + 1, dtype=torch.long)
        bad["queue_position"] = torch.tensor(MEMORY)
    elif case == "another embedding size":
        bad["embedding_memory"] = torch.zeros(MEMORY, DIM + 1)
    elif case == "a fractional call counter":
        bad["iteration"] = torch.tensor(2.5)
    elif case == "the loss's parameters":  # refused by the loss's module, after the memory's entries
        bad["loss.thresholds"] = torch.zeros(3)
    elif case == "position past the end":
        bad["queue_position"] = torch.tensor(MEMORY)
        bad["label_memory"] = torch.zeros_like(bad["label_memory"])
    else:  # "negative call counter"
        bad["iteration"] = torch.tensor(-1)
        bad["label_memory"] = torch.zeros_like(bad["label_memory"])
    return bad


@pytest.mark.parametrize("form", ["pairs", "triplets"])
def test_a_callers_tuple_joins_the_fused_mining_as_pmls_tuple_joins_its_miner(device, form):
    """``MSLoss(epsilon)`` in the memory is its own miner; a caller's ``indices_tuple`` is
    appended to the pairs its mining keeps, as PML appends it to its miner's (before, the tuple
    turned the mining off: the loss was PML's over all pairs and the tuple, unmined)."""
    ours = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY).to(device).double()
    theirs = pml_memory(device, torch.float64)
    for step, (x, y, _) in enumerate(steps(device, torch.float64, n_steps=4)):
        assert_same_step(ours, theirs, x, y, callers_tuple(theirs, y, step, form, device))


@pytest.mark.parametrize("refused", [False, True], ids=["loaded", "refused"])
def test_a_checkpoint_loaded_before_the_backward_leaves_that_backward_as_it_was(device, refused):
    """``load_state_dict`` between a call and its backward: the backward still sees the memory
    the call read (before, any load, even a refused one, wrote into the buffers the call's
    graph had saved, and autograd refused that backward), and the memory then holds the
    checkpoint (or, refused, what it held)."""
    ours = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY).to(device)
    (x0, y0, _), (x1, y1, _) = steps(device, torch.float32, n_steps=2)
    ours(x0, y0)
    checkpoint = copy.deepcopy(ours.state_dict())
    if refused:
        checkpoint["label_memory"] = checkpoint["label_memory"][:-1]
    (expected,) = torch.autograd.grad(copy.deepcopy(ours)(x1, y1), x1)
    loss = ours(x1, y1)
    after_call = copy.deepcopy(ours.state_dict())
    if refused:
        with pytest.raises(RuntimeError, match="label_memory has shape"):
            ours.load_state_dict(checkpoint)
    else:
        ours.load_state_dict(checkpoint)
    (grad,) = torch.autograd.grad(loss, x1)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    held = after_call if refused else checkpoint
    for key, value in ours.state_dict().items():
        assert torch.equal(held[key], value), key


@pytest.mark.parametrize(
    "case, message",
    [
        ("non-integer labels", "non-integer labels"),
        ("another memory size", r"embedding_memory has shape \(51, 16\), this memory's is \(50, 16\)"),
        ("another embedding size", r"embedding_memory has shape \(50, 17\)"),
        ("position past the end", r"queue_position is 50, outside \[0, 50\)"),
        ("negative call counter", "iteration is -1"),
        ("a fractional call counter", "iteration has dtype torch.float32; it is a count"),
        ("the loss's parameters", r"loss.thresholds has shape \(3,\), this memory's is \(6,\)"),
    ],
)
@pytest.mark.parametrize("nested", [False, True], ids=["memory", "inside a model"])
def test_a_refused_checkpoint_changes_nothing(device, case, message, nested):
    """``load_state_dict`` refuses a malformed memory state with a message naming the problem,
    and the memory is as before, every buffer and the write position: torch copies the
    well-formed entries before it raises, so the check comes first (before, a refused checkpoint
    had overwritten the embeddings, labels and write position). Also when the memory is a
    submodule of the module being loaded."""
    loss = losses.AdaptiveMSLoss(epsilon=0.1, margin_mode="learned", num_classes=6)  # parameters of its own
    ours = losses.CrossBatchMemory(loss, DIM, memory_size=MEMORY).to(device)
    for x, y, _ in list(steps(device, torch.float32, n_steps=3)):
        ours(x, y)
    host = (ours.queue_idx, ours.has_been_filled)
    before = copy.deepcopy(ours.state_dict())
    bad = _bad_memory_state(before, case)
    target = ours
    if nested:
        target = torch.nn.ModuleDict({"xbm": ours})
        bad = {"xbm." + k: v for k, v in bad.items()}
    with pytest.raises(RuntimeError, match=message) as raised:
        target.load_state_dict(bad)
    assert "Missing key" not in str(raised.value) and "Unexpected key" not in str(raised.value)
    assert (ours.queue_idx, ours.has_been_filled) == host
    for key, value in ours.state_dict().items():
        assert torch.equal(before[key], value), key
    x, y, _ = next(iter(steps(device, torch.float32, n_steps=1)))
    ours(x, y)  # still works, from where it was
    assert ours.queue_idx == (host[0] + BATCH) % MEMORY


def test_gather_setting(device):
    with pytest.raises(ValueError, match="gather must be"):
        losses.CrossBatchMemory(losses.MSLoss(), DIM, gather="yes")
    ours = losses.CrossBatchMemory(losses.MSLoss(), DIM, memory_size=MEMORY, gather=True).to(device)
    x, y = make_batch(5, n=BATCH, dim=DIM, device=device)
    with pytest.raises(ValueError, match="gather=True needs an initialised"):
        ours(x, y)
    assert ours.queue_idx == 0


def test_empty_batch_gives_zero(device):
    ours = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY).to(device)
    x, y = make_batch(6, n=BATCH, dim=DIM, device=device)
    ours(x, y)
    e = torch.zeros(0, DIM, device=device, requires_grad=True)
    value = ours(e, torch.zeros(0, dtype=torch.long, device=device))
    (g,) = torch.autograd.grad(value, e)
    assert float(value.detach()) == 0.0 and g.shape == (0, DIM) and ours.queue_idx == BATCH


@pytest.mark.parametrize("epsilon", [None, 0.1])
def test_a_retained_graph_backpropagates_again_after_the_next_call_as_with_pml(device, epsilon):
    """``backward(retain_graph=True)``, another call (which enqueues), then a second backward
    through the first graph: PML's graph holds its own normalised copy of the memory, ours holds
    the buffers, so the next call writes to copies while that graph lives; the gradients equal
    PML's (before, autograd refused the second backward: buffers changed in place). Once a
    retained loss is dropped, the writes are in place again."""
    ours = losses.CrossBatchMemory(losses.MSLoss(epsilon=epsilon), DIM, memory_size=MEMORY).to(device)
    miner = None if epsilon is None else pml_miners.MultiSimilarityMiner(epsilon)
    theirs = pml_losses.CrossBatchMemory(pml_losses.MultiSimilarityLoss(), DIM, MEMORY, miner=miner)
    theirs = theirs.to(device)
    batches = list(steps(device, torch.float32, n_steps=5))
    for x, y, _ in batches[:3]:
        ours(x.detach(), y)
        theirs(x.detach(), y)
    grads = []
    for xbm in (ours, theirs):
        (x1, y1, _), (x2, y2, _) = batches[3:]
        a, b = x1.detach().requires_grad_(True), x2.detach().requires_grad_(True)
        first = xbm(a, y1)
        (once,) = torch.autograd.grad(first, a, retain_graph=True)
        second = xbm(b, y2)
        (other,) = torch.autograd.grad(second, b)
        (again,) = torch.autograd.grad(first, a)  # through the retained graph
        torch.testing.assert_close(again, once)
        grads.append((once, other))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **tol(torch.float32))
    torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory)
    x, y, _ = batches[0]
    retained = ours(x.detach().requires_grad_(True), y)
    retained.backward(retain_graph=True)
    del retained  # the retained graph goes with its loss
    buffer = ours.embedding_memory
    for x, y, _ in batches[:2]:  # the usual loop: the last loss lives during the next call
        loss = ours(x.detach().requires_grad_(True), y)
        loss.backward()
    assert ours.embedding_memory is buffer  # written in place: no copy


@pytest.mark.parametrize("weights", [dict(), dict(batch_weight=0.5, memory_weight=2.0)])
def test_two_calls_before_one_backward_match_pml(device, weights):
    """Gradient accumulation: a second call enqueues while the first call's loss still awaits
    its backward, whose graph holds the memory's buffers (the kernel saves the references):
    the writes go to copies of the buffers, so both losses backpropagate, with PML's gradients;
    a loop that backpropagates each loss before the next call writes in place (no copy)."""
    ours = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY, **weights).to(device)
    theirs = pml_memory(device, torch.float32)
    batches = list(steps(device, torch.float32, n_steps=5))
    for x, y, _ in batches[:3]:  # fill the memories alike
        ours(x.detach(), y)
        theirs(x.detach(), y)
    grads = []
    for xbm, scale in ((ours, 1.0), (theirs, weights.get("memory_weight", 1.0))):
        (x1, y1, _), (x2, y2, _) = batches[3:]
        a, b = x1.detach().requires_grad_(True), x2.detach().requires_grad_(True)
        total = xbm(a, y1) + xbm(b, y2)
        if xbm is theirs:  # PML has no weights: the same combination by hand
            total = scale * total
            if weights:
                inner = losses.MSLoss(epsilon=0.1)
                total = total + 0.5 * (inner(a, y1) + inner(b, y2))
        grads.append(torch.autograd.grad(total, (a, b)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **tol(torch.float32))
    torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory)
    buffer = ours.embedding_memory
    for x, y, _ in batches[:2]:  # the usual loop: each backward before the next call
        loss = ours(x.detach().requires_grad_(True), y)  # (the last loss lives during the call)
        loss.backward()
    unused = ours(x.detach().requires_grad_(True), y)  # a loss never backpropagated, then dropped
    del unused
    ours(x.detach(), y)
    assert ours.embedding_memory is buffer  # written in place: no copy


@pytest.mark.parametrize("case", ["saved-tensor hooks", "dot product, dense path"])
def test_two_calls_before_one_backward_with_graphs_that_hold_other_objects(device, case):
    """Gradient accumulation where the graph holds the buffers through objects other than the
    views the memory hands the loss: saved-tensor hooks whose pack returns another tensor on the
    same storage (autograd then skips its version check: in-place writes would give silently
    wrong gradients), and an unnormalised dot product on the dense path (``matmul`` saves a
    transposed view). The loss awaiting its backward still sends the writes to copies, so the
    gradients equal those of the same two calls each backpropagated before the next (PML's own
    memory raises on the raw dot product)."""
    if case == "saved-tensor hooks":
        make = lambda: losses.MSLoss(epsilon=0.1)  # noqa: E731
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach(), lambda t: t)
    else:
        dot = distances.DotProductSimilarity(normalize_embeddings=False)
        make = lambda: losses.MSLoss(epsilon=0.1, fused=False, distance=dot)  # noqa: E731
        hooks = contextlib.nullcontext()
    ours = losses.CrossBatchMemory(make(), DIM, memory_size=MEMORY).to(device)
    batches = list(steps(device, torch.float32, n_steps=5))
    for x, y, _ in batches[:3]:
        ours(x.detach(), y)
    reference = copy.deepcopy(ours)
    (x1, y1, _), (x2, y2, _) = batches[3:]
    a, b = x1.detach().requires_grad_(True), x2.detach().requires_grad_(True)
    with hooks:
        total = ours(a, y1) + ours(b, y2)
    got = torch.autograd.grad(total, (a, b))
    for x, y, g in ((x1, y1, got[0]), (x2, y2, got[1])):
        x = x.detach().requires_grad_(True)
        (want,) = torch.autograd.grad(reference(x, y), x)
        torch.testing.assert_close(g, want, **tol(torch.float32))
    torch.testing.assert_close(ours.embedding_memory, reference.embedding_memory)


@pytest.mark.parametrize("weights", [dict(memory_weight=0.5), dict(batch_weight=1.0)])
def test_weights_need_a_reducer_that_reduces(weights):
    """``memory_weight != 1`` and ``batch_weight`` weigh and add reduced losses: with the loss's
    ``DoNothingReducer`` (a dict) the call raised ``TypeError: unsupported operand type(s)``."""
    inner = losses.MSLoss(reducer=DoNothingReducer())
    with pytest.raises(ValueError, match="DoNothingReducer returns the loss dict"):
        losses.CrossBatchMemory(inner, DIM, memory_size=MEMORY, **weights)
    losses.CrossBatchMemory(inner, DIM, memory_size=MEMORY)  # the default weights take the dict
