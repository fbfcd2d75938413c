"""torch.distributed, 2 CPU processes on gloo (one spawn for the module), against one process.

* ``CrossBatchMemory``: identical memories on every rank, each rank's loss over its own anchors,
  the in-batch term against every rank's batch, learned thresholds averaged;
* ``GatheredMSLoss`` under DDP: losses, model gradients and threshold gradients step by step;
* PML's ``DistributedLossWrapper`` (and miner wrapper) as ``pml-ms-plus ablate`` applies it,
  a loss's own parameters (ProxyAnchor's proxies) scaled back to the single-process gradient.
"""

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.reducers import AvgNonZeroReducer, DoNothingReducer
from pytorch_metric_learning.regularizers import LpRegularizer

from pml_ms_plus import losses
from pml_ms_plus.losses import GatheredMSLoss

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

WORLD, LOCAL, DIM, MEMORY, STEPS = 2, 12, 8, 40, 5
# the DDP cases: a linear model IN -> EMB trained for DDP_STEPS steps on batches of WORLD x DDP_LOCAL
DDP_LOCAL, IN, EMB, CLASSES, DDP_STEPS = 10, 6, 5, 4, 3


def full_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    # classes come in pairs inside each rank's half, so every anchor has a true positive
    labels = torch.cat([torch.arange(LOCAL) // 2 + 10 * r + step % 3 for r in range(WORLD)]) % 9
    return torch.randn(WORLD * LOCAL, DIM, generator=g, dtype=torch.float64), labels


def make_learned_memory():
    inner = losses.AdaptiveMSLoss(epsilon=0.1, margin_mode="learned", num_classes=9, margin=0.05)
    return losses.CrossBatchMemory(
        inner, DIM, memory_size=MEMORY, start_iteration=2, batch_weight=1.0
    ).double()


def ddp_cases():
    """name -> a fresh MS-family loss for GatheredMSLoss (the same construction on both sides)."""
    return {
        "fused": lambda: losses.MSLoss(epsilon=0.1),
        "dense": lambda: losses.MSLoss(epsilon=0.1, distance=LpDistance(), base=1.0, fused=False),
        "learned": lambda: losses.AdaptiveMSLoss(
            epsilon=0.1, margin_mode="learned", num_classes=CLASSES, margin=0.05
        ),
        "anchor": lambda: losses.AdaptiveMSLoss(margin_mode="anchor"),
        "avg-nonzero": lambda: losses.MSLoss(reducer=AvgNonZeroReducer()),
    }


PML_CASES = {  # name -> (loss, miner): through PML's wrappers, as the ablation distributes them
    "pml-contrastive": lambda: (pml_losses.ContrastiveLoss(), None),
    "pml-ms+miner": lambda: (pml_losses.MultiSimilarityLoss(), pml_miners.MultiSimilarityMiner(0.1)),
    "pml-proxyanchor": lambda: (pml_losses.ProxyAnchorLoss(CLASSES, EMB), None),
}


def ddp_batch(step):
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(WORLD * DDP_LOCAL, IN, generator=g, dtype=torch.float64)
    return x, torch.randint(0, CLASSES, (WORLD * DDP_LOCAL,), generator=g)


def make_model():
    torch.manual_seed(7)
    return torch.nn.Linear(IN, EMB).double()


def train_steps(model, loss_fn, local=None, miner=None, loss_params=None, after_backward=None, scale=1.0):
    """DDP_STEPS steps of SGD; per step the loss (divided by ``scale``) and the gradients of the
    model and of the loss's own parameters, before the update."""
    loss_params = list(loss_fn.parameters()) if loss_params is None else loss_params
    params = list(model.parameters()) + loss_params
    opt = torch.optim.SGD(params, lr=0.5)
    records = []
    for step in range(DDP_STEPS):
        x, y = ddp_batch(step)
        if local is not None:
            x, y = x[local], y[local]
        opt.zero_grad()
        emb = model(x)
        value = loss_fn(emb, y, miner(emb, y)) if miner is not None else loss_fn(emb, y)
        value.backward()
        if after_backward is not None:
            after_backward()
        records.append(dict(loss=value.detach() / scale, grads=[p.grad.clone() for p in params]))
        opt.step()
    return records


def ddp_worker(rank):
    """GatheredMSLoss and PML's wrapper under DDP on this rank (in an initialised group)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pml_ms_plus.ablation import distributed as ablation_dist

    out = {}
    local = slice(rank * DDP_LOCAL, (rank + 1) * DDP_LOCAL)
    for name, make in ddp_cases().items():
        loss_fn = GatheredMSLoss(make().double())
        out[name] = dict(anchors=loss_fn.anchors, records=train_steps(DDP(make_model()), loss_fn, local))
    d = ablation_dist.Distributed(rank, WORLD, rank, WORLD, "gloo", torch.device("cpu"))
    for name, make in PML_CASES.items():
        inner, miner = make()
        inner = inner.double()
        wrapped = ablation_dist.distribute_loss(inner, miner, d)
        params = list(inner.parameters())
        records = train_steps(
            DDP(make_model()),
            wrapped.loss,
            local,
            wrapped.miner,
            params,
            lambda: ablation_dist.sync_loss_gradients(params, wrapped.scale, d),  # noqa: B023
            wrapped.scale,
        )
        out[name] = dict(kind=type(wrapped.loss).__name__, scale=wrapped.scale, records=records)
    x, y = ddp_batch(0)
    out["bool"] = GatheredMSLoss(losses.MSLoss())(x[local], y[local] % 2 == 0).detach()
    try:  # unequal shares are refused on every rank, before anything else is gathered
        GatheredMSLoss(losses.MSLoss())(x[: DDP_LOCAL + rank], y[: DDP_LOCAL + rank])
        out["unequal"] = "no error"
    except ValueError as exc:
        out["unequal"] = str(exc)
    return out


def masked_batch(step):
    """A batch of WORLD x LOCAL rows and an enqueue mask that leaves each rank another number of
    anchors (rank 0: 9, rank 1: 3; the rows not enqueued are the anchors)."""
    x, y = full_batch(step)
    keep = torch.tensor([3, 9])[torch.arange(WORLD)].repeat_interleave(LOCAL)  # rows enqueued per rank
    mask = torch.arange(LOCAL).repeat(WORLD) < keep
    return x, y, mask


def lonely_labels(rank):
    """Rank 0: labels that occur nowhere else in the gathered batch; rank 1: pairs."""
    return 100 + torch.arange(LOCAL) if rank == 0 else torch.arange(LOCAL) // 2


MASKED_MEMORIES = {  # name -> a fresh memory for the masked steps (the same on both sides)
    "plain": lambda: losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY).double(),
    "regularized": lambda: losses.CrossBatchMemory(
        losses.MSLoss(embedding_regularizer=LpRegularizer()), DIM, memory_size=MEMORY
    ).double(),
}
MASKED_STEPS = 3


def masked_steps(memory, rank):
    """MASKED_STEPS calls of ``memory`` on this rank's share of :func:`masked_batch`: the loss and
    the gradient of this rank's rows per step."""
    local = slice(rank * LOCAL, (rank + 1) * LOCAL)
    records = []
    for step in range(MASKED_STEPS):
        x, y, mask = masked_batch(step)
        mine = x[local].clone().requires_grad_(True)
        value = memory(mine, y[local], enqueue_mask=mask[local])
        (grad,) = torch.autograd.grad(value, mine)
        records.append(dict(loss=value.detach(), grad=grad))
    return records


def outcome(call):
    """``call()``'s ValueError message, or ``"no error"``."""
    try:
        call()
    except ValueError as exc:
        return str(exc)
    return "no error"


def bad_share(case, rank, x, y):
    """Rank 1's bad share of one kind (rank 0's share is good)."""
    if rank == 0:
        return x, y
    if case == "nan":
        x = x.clone()
        x[0, 0] = float("nan")
    elif case == "label_range":  # outside the learned thresholds' classes
        y = y.clone()
        y[0] = 99
    elif case == "float_labels":
        y = y.double()
    elif case == "width":
        x = torch.cat([x, x[:, :1]], 1)
    return x, y


BAD_SHARES = ("nan", "label_range", "float_labels", "width")


def agreement_worker(rank):
    """Inputs that differ between the ranks: unequal anchors under an enqueue mask, a bad share on
    rank 1 alone, labels of different integer dtypes, distinct rows that project alike."""
    out = {}
    local = slice(rank * LOCAL, (rank + 1) * LOCAL)
    out["masked"] = masked_steps(MASKED_MEMORIES["plain"](), rank)
    x, y = full_batch(0)
    x, y = x[local], y[local] % 4
    for case in BAD_SHARES:
        learned = case == "label_range"

        def inner(learned=learned):
            if learned:
                return losses.AdaptiveMSLoss(margin_mode="learned", num_classes=4).double()
            return losses.MSLoss().double()

        xbm = losses.CrossBatchMemory(inner(), DIM, memory_size=MEMORY).double()
        xbm(x, y)  # one good call first
        before = {k: v.clone() for k, v in xbm.state_dict().items()}
        bx, by = bad_share(case, rank, x, y)
        message = outcome(lambda: xbm(bx, by))  # noqa: B023
        unchanged = all(torch.equal(v, xbm.state_dict()[k]) for k, v in before.items())
        # and both ranks go on together (no collective left unmatched)
        after = xbm(x, y).detach()
        gathered = GatheredMSLoss(inner())
        out[f"bad-{case}"] = dict(
            memory=message,
            unchanged=unchanged,
            after=after,
            gathered=outcome(lambda: gathered(bx, by)),  # noqa: B023
            gathered_after=gathered(x, y).detach(),
        )
    # labels of another integer dtype on one rank: class ids all the same
    small = y.to(torch.int8) if rank == 1 else y
    out["dtypes"] = dict(
        gathered=GatheredMSLoss(losses.MSLoss())(x, small).detach(),
        memory=losses.CrossBatchMemory(losses.MSLoss(), DIM, memory_size=MEMORY).double()(x, small).detach(),
    )
    # shares that differ in what decides the collectives that follow: refused on every rank
    mismatches = {
        "dtype": lambda: ((x.float() if rank == 1 else x), y, None),
        "mask": lambda: (x, y, torch.arange(LOCAL) < 3 if rank == 0 else None),
        "grad": lambda: (x.clone().requires_grad_(rank == 0), y, None),
    }
    for case, make in mismatches.items():
        xbm = losses.CrossBatchMemory(losses.MSLoss(), DIM, memory_size=MEMORY).double()
        mx, my, mask = make()
        out[f"mismatch-{case}"] = dict(
            memory=outcome(lambda: xbm(mx, my, enqueue_mask=mask)),  # noqa: B023
            queue_idx=xbm.queue_idx,
            gathered=outcome(lambda: GatheredMSLoss(losses.MSLoss())(mx, my)),  # noqa: B023
        )
    # a rank without anchors (every row enqueued) under learned thresholds: its loss did not reach
    # the thresholds, so its backward skipped their averaging all-reduce and rank 0 waited in it
    learned = losses.CrossBatchMemory(
        losses.AdaptiveMSLoss(epsilon=0.1, margin_mode="learned", num_classes=9, margin=0.05),
        DIM,
        memory_size=MEMORY,
    ).double()
    zero = []
    for step in range(2):
        bx, by, _ = masked_batch(step)
        mine = bx[local].clone().requires_grad_(True)
        everything = torch.ones(LOCAL, dtype=torch.bool) if rank == 1 else torch.arange(LOCAL) < 4
        learned.zero_grad()
        value = learned(mine, by[local], enqueue_mask=everything)
        value.backward()
        zero.append(
            dict(loss=value.detach(), grad=mine.grad, thresholds=learned.loss.thresholds.grad.clone())
        )
    out["zero-anchors"] = zero
    # a step that fails after the gather on one rank alone: rank 0's tuple lists a pair as both
    # positive and negative (found once joined with the label pairs); rank 1's tuple is sound
    xbm4 = losses.CrossBatchMemory(losses.MSLoss(), DIM, memory_size=MEMORY).double()
    xbm4(x, y)
    before = {k: v.clone() for k, v in xbm4.state_dict().items()}
    q = xbm4.queue_idx + rank * LOCAL  # this rank's rows' slots once enqueued: q, q + 1, ...
    i = torch.tensor([0])
    tup = (i, i + q + 1, i + q + 1) if rank == 0 else (i, i + q + 1, i + q + 2)  # rows 0, 1 share a label
    out["late-failure"] = dict(
        message=outcome(lambda: xbm4(x, y, tup)),
        unchanged=all(torch.equal(v, xbm4.state_dict()[k]) for k, v in before.items()),
        after=xbm4(x, y).detach(),
    )
    # uint16 labels on one rank (class ids): the memory, and learned thresholds over the gathered batch
    wide = y.to(torch.uint16) if rank == 1 else y
    learned_loss = losses.AdaptiveMSLoss(margin_mode="learned", num_classes=4).double()
    out["uint16"] = dict(
        memory=losses.CrossBatchMemory(losses.MSLoss(), DIM, memory_size=MEMORY).double()(x, wide).detach(),
        gathered=GatheredMSLoss(learned_loss)(x, wide).detach(),
    )
    # an embedding regularizer (PML then holds MultipleReducers of MeanReducers) under a mask
    out["regularized"] = masked_steps(MASKED_MEMORIES["regularized"](), rank)
    # rank 0's labels nowhere else: its dense mining keeps no pair and its loss was PML's zero loss
    # of its anchors alone, so its backward skipped the gather's all-reduce (rank 1 waited there)
    lonely = lonely_labels(rank)
    nopair = {}
    for name, make in {
        "gathered": lambda: GatheredMSLoss(losses.MSLoss(epsilon=0.1, fused=False)),
        "warm-up": lambda: losses.CrossBatchMemory(
            losses.MSLoss(epsilon=0.1, fused=False), DIM, memory_size=MEMORY, start_iteration=5
        ).double(),
    }.items():
        fn = make()
        mine = x.clone().requires_grad_(True)
        value = fn(mine, lonely)
        (grad,) = torch.autograd.grad(value, mine)
        nopair[name] = dict(loss=value.detach(), grad=grad)
    out["nopair"] = nopair
    # DoNothingReducer (the loss is PML's dict, without a graph on a rank with no pair: its peers'
    # backward waited for it) is refused on every rank; learned thresholds keep bfloat16
    kept = {}
    xbm5 = losses.CrossBatchMemory(
        losses.AdaptiveMSLoss(margin_mode="learned", num_classes=4, reducer=DoNothingReducer()),
        DIM,
        memory_size=MEMORY,
    ).double()
    kept["memory"] = outcome(lambda: xbm5(x, y))
    kept["queue_idx"] = xbm5.queue_idx
    kept["gathered"] = outcome(
        lambda: GatheredMSLoss(
            losses.AdaptiveMSLoss(margin_mode="learned", num_classes=4, reducer=DoNothingReducer()),
            anchors="all",
        )(x, y)
    )
    # a second differentiation through the gather (a gradient penalty) was silently wrong
    penalised = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(
        GatheredMSLoss(losses.MSLoss(epsilon=0.1))(penalised, y), penalised, create_graph=True
    )
    try:
        (g**2).sum().backward()
        kept["double"] = "no error"
    except RuntimeError as exc:
        kept["double"] = str(exc)
    bf16 = GatheredMSLoss(losses.AdaptiveMSLoss(margin_mode="learned", num_classes=4))(x.bfloat16(), y)
    kept["bfloat16"] = str(bf16.dtype)
    out["kept"] = kept
    # a collapsed model's batch (every row alike, on every rank) is not taken for a gathered one
    xbm3 = losses.CrossBatchMemory(losses.MSLoss(), DIM, memory_size=MEMORY).double()
    out["collapsed"] = outcome(lambda: xbm3(torch.ones(LOCAL, DIM, dtype=torch.float64), y))
    # distinct rows whose projections (the check's ordering key) coincide: not "gathered already"
    rows = [[[2.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.5]]][rank]
    xbm2 = losses.CrossBatchMemory(losses.MSLoss(), 2, memory_size=8).double()
    out["alike"] = outcome(lambda: xbm2(torch.tensor(rows, dtype=torch.float64), torch.tensor([0, 1])))
    return out


def worker(rank, init_file, out_dir):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),  # a collective left unmatched fails the test, not CI
    )
    try:
        from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

        native = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY).double()
        wrapped_inner = losses.CrossBatchMemory(
            losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY, gather=False
        ).double()
        wrapped = DistributedLossWrapper(wrapped_inner)
        records = []
        for step in range(STEPS):
            x, y = full_batch(step)
            local = x[rank * LOCAL : (rank + 1) * LOCAL].clone().requires_grad_(True)
            local_y = y[rank * LOCAL : (rank + 1) * LOCAL]
            value = native(local, local_y)
            (grad,) = torch.autograd.grad(value, local)
            before = wrapped_inner.queue_idx
            wrapped(local.detach(), local_y)
            records.append(
                dict(
                    loss=value.detach(),
                    grad=grad,
                    memory=native.embedding_memory.clone(),
                    labels=native.label_memory.clone(),
                    queue_idx=native.queue_idx,
                    wrapped_advance=(wrapped_inner.queue_idx - before) % MEMORY,
                )
            )
        # the default gather="auto" inside PML's wrapper would gather twice: refused clearly
        misused = DistributedLossWrapper(
            losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY).double()
        )
        try:
            misused(local.detach(), local_y)
            records.append("no error")
        except ValueError as exc:
            records.append(str(exc))
        # warm-up (in-batch only), then memory + in-batch: the in-batch term is this rank's anchors
        # against every rank's batch, and the learned thresholds' gradients are averaged
        learned = make_learned_memory()
        in_batch = []
        for step in range(STEPS):
            x, y = full_batch(step)
            local = x[rank * LOCAL : (rank + 1) * LOCAL].clone().requires_grad_(True)
            learned.zero_grad()
            value = learned(local, y[rank * LOCAL : (rank + 1) * LOCAL])
            value.backward()
            in_batch.append(
                dict(loss=value.detach(), grad=local.grad, thresholds=learned.loss.thresholds.grad)
            )
        saved = dict(
            records=records, in_batch=in_batch, gathered=ddp_worker(rank), agreement=agreement_worker(rank)
        )
        torch.save(saved, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


def test_two_ranks_share_one_memory_and_match_a_single_process(saved):
    ranks = [s["records"] for s in saved]

    single = losses.CrossBatchMemory(losses.MSLoss(epsilon=0.1), DIM, memory_size=MEMORY).double()
    for step in range(STEPS):
        x, y = full_batch(step)
        x.requires_grad_(True)
        expected = single(x, y)
        (expected_grad,) = torch.autograd.grad(expected, x)
        r0, r1 = ranks[0][step], ranks[1][step]
        # identical memories on every rank, slot by slot, and equal to the single process's
        assert torch.equal(r0["memory"], r1["memory"]) and torch.equal(r0["labels"], r1["labels"])
        torch.testing.assert_close(r0["memory"], single.embedding_memory)
        assert r0["queue_idx"] == r1["queue_idx"] == single.queue_idx
        # each rank's loss covers its own anchors: their mean is the global loss,
        # and DDP's gradient averaging gives the single-process gradient
        torch.testing.assert_close((r0["loss"] + r1["loss"]) / WORLD, expected.detach())
        for r, rec in enumerate((r0, r1)):
            torch.testing.assert_close(rec["grad"] / WORLD, expected_grad[r * LOCAL : (r + 1) * LOCAL])
        # inside PML's DistributedLossWrapper (gather=False) the batch is gathered once, not twice
        assert r0["wrapped_advance"] == WORLD * LOCAL
    for r in range(WORLD):
        assert "gathered already" in ranks[r][-1] and "gather=False" in ranks[r][-1]

    learned = make_learned_memory()
    for step in range(STEPS):
        x, y = full_batch(step)
        x.requires_grad_(True)
        learned.zero_grad()
        expected = learned(x, y)
        expected.backward()
        r0, r1 = (s["in_batch"][step] for s in saved)
        torch.testing.assert_close((r0["loss"] + r1["loss"]) / WORLD, expected.detach())
        for r, rec in enumerate((r0, r1)):
            torch.testing.assert_close(rec["grad"] / WORLD, x.grad[r * LOCAL : (r + 1) * LOCAL])
            # the single-process threshold gradient on every rank
            torch.testing.assert_close(rec["thresholds"], learned.loss.thresholds.grad)
        assert learned.loss.thresholds.grad.abs().max() > 0


@pytest.mark.parametrize("name", list(ddp_cases()))
def test_gathered_loss_under_ddp_equals_one_process_with_the_whole_batch(saved, name):
    ranks = [s["gathered"][name] for s in saved]
    single = train_steps(make_model(), ddp_cases()[name]().double())
    for rank in ranks:
        assert rank["anchors"] == ("all" if name == "avg-nonzero" else "local")
    for step, ref in enumerate(single):
        per_rank = [rank["records"][step] for rank in ranks]
        # the mean over ranks of each rank's share is the single-process loss
        torch.testing.assert_close(
            sum(r["loss"] for r in per_rank) / WORLD, ref["loss"], rtol=1e-10, atol=1e-12
        )
        # every gradient, the model's (DDP-averaged) and the learned thresholds', is the
        # single-process one, on every rank: no scaling anywhere
        for r in per_rank:
            assert len(r["grads"]) == len(ref["grads"]) == (3 if name == "learned" else 2)
            for got, want in zip(r["grads"], ref["grads"]):
                assert want.abs().max() > 0
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(PML_CASES))
def test_pml_wrapper_as_the_ablation_applies_it_equals_one_process(saved, name):
    inner, miner = PML_CASES[name]()
    single = train_steps(make_model(), inner.double(), miner=miner)
    for s in saved:
        rank = s["gathered"][name]
        assert rank["kind"] == "DistributedLossWrapper" and rank["scale"] == WORLD
        assert len(rank["records"][0]["grads"]) == (3 if name == "pml-proxyanchor" else 2)
        for step, ref in enumerate(single):
            got = rank["records"][step]
            # PML's wrapper returns world_size x the global loss on every rank
            torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-10, atol=1e-12)
            for g, want in zip(got["grads"], ref["grads"]):
                assert want.abs().max() > 0
                torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-12)


def test_gathered_loss_takes_bool_labels_and_refuses_unequal_shares(saved):
    x, y = ddp_batch(0)
    expected = losses.MSLoss()(x, (y % 2 == 0).long())
    torch.testing.assert_close(sum(s["gathered"]["bool"] for s in saved) / WORLD, expected)
    for s in saved:
        assert "equal batch sizes" in s["gathered"]["unequal"] and "[10, 11]" in s["gathered"]["unequal"]


def assert_masked_steps_match_one_process(saved, key, name):
    """The ranks' :func:`masked_steps` against one process with the whole batch and mask: the mean
    of the ranks' losses is its loss, each rank's gradient / WORLD its gradient of those rows."""
    single = MASKED_MEMORIES[name]()
    for step in range(MASKED_STEPS):
        x, y, mask = masked_batch(step)
        x.requires_grad_(True)
        expected = single(x, y, enqueue_mask=mask)
        (expected_grad,) = torch.autograd.grad(expected, x)
        per_rank = [s["agreement"][key][step] for s in saved]
        torch.testing.assert_close(sum(r["loss"] for r in per_rank) / WORLD, expected.detach())
        for r, rec in enumerate(per_rank):
            want = expected_grad[r * LOCAL : (r + 1) * LOCAL]
            assert want.abs().max() > 0
            torch.testing.assert_close(rec["grad"] / WORLD, want)


def test_an_enqueue_mask_that_leaves_ranks_unequal_anchors_matches_one_process(saved):
    """Each rank's memory loss was its own anchors' mean; with an enqueue mask the ranks hold
    different numbers of anchors (9 and 3 here), and the mean over ranks of those means is not
    the mean over every anchor: loss and gradients differed from one process's."""
    assert_masked_steps_match_one_process(saved, "masked", "plain")


@pytest.mark.parametrize("case", BAD_SHARES)
def test_a_bad_share_on_one_rank_is_refused_on_every_rank(saved, case):
    """A share refused on rank 1 alone: rank 1 raised before the gather and rank 0 waited in it
    until the process group's timeout (the memory: NaN, a width; GatheredMSLoss: float labels,
    which it gathered and rank 0 computed a loss with); a learned threshold's label range was
    checked after the gather, so rank 0 enqueued the batch and rank 1 did not (the memories
    differed from then on); two widths crashed gloo. Now every rank refuses the call, the
    memories are untouched, and the next call runs on both."""
    results = [s["agreement"][f"bad-{case}"] for s in saved]
    own = {
        "nan": "contain NaN or inf",
        "label_range": "labels must lie in [0, num_classes=4)",
        "float_labels": "labels must be an integer or bool tensor",
        "width": "embedding_size=8",
    }[case]
    gathered_own = "needs equal embedding widths on every rank, got [8, 9]" if case == "width" else own
    for rank, r in enumerate(results):
        assert r["unchanged"], rank
        if case == "width":  # the memory's own width check on rank 1; GatheredMSLoss compares widths
            assert (own in r["memory"]) if rank == 1 else ("input of rank 1 was refused" in r["memory"])
            assert gathered_own in r["gathered"]
        elif case == "nan":  # GatheredMSLoss checks the gathered rows, alike on every rank
            assert (own in r["memory"]) if rank == 1 else ("input of rank 1 was refused" in r["memory"])
            assert own in r["gathered"]
        else:
            for message in (r["memory"], r["gathered"]):
                assert (own in message) if rank == 1 else ("input of rank 1 was refused" in message), message
    assert all(torch.isfinite(r["after"]) and torch.isfinite(r["gathered_after"]) for r in results)


def test_labels_of_other_integer_dtypes_on_one_rank_match_one_process(saved):
    """int64 labels on rank 0 and int8 on rank 1 (both class ids): gloo aborted the process (the
    gathered labels' sizes differed)."""
    x, y = full_batch(0)
    y = y % 4
    want = losses.MSLoss()(x, y)
    got = [s["agreement"]["dtypes"] for s in saved]
    torch.testing.assert_close(sum(g["gathered"] for g in got) / WORLD, want)
    single = losses.CrossBatchMemory(losses.MSLoss(), DIM, memory_size=MEMORY).double()
    torch.testing.assert_close(sum(g["memory"] for g in got) / WORLD, single(x, y))


def test_distinct_rows_that_project_alike_are_not_taken_for_a_gathered_batch(saved):
    """The check for a batch gathered already (PML's wrapper inside) compared one projection of
    the rows: distinct rows projecting alike were refused (with bf16 rows of D=128, one row per
    rank, about once in 1,000 steps)."""
    for s in saved:
        assert s["agreement"]["alike"] == "no error"


@pytest.mark.parametrize(
    "case, message",
    [
        ("dtype", "needs equal embedding dtypes on every rank, got ['float64', 'float32']"),  # gloo aborted
        ("mask", "needs equal enqueue masks (given or not) on every rank, got [True, False]"),  # gloo aborted
        ("grad", "needs equal embeddings requiring grad (or not) on every rank, got [True, False]"),
    ],
)
def test_shares_that_differ_in_what_decides_the_collectives_are_refused_on_every_rank(saved, case, message):
    """Embeddings of two dtypes, an enqueue mask on one rank only (one more gather there), or
    embeddings requiring grad on one rank only (a backward that all-reduces there alone): every
    rank refuses the call and the memory is untouched."""
    for s in saved:
        r = s["agreement"][f"mismatch-{case}"]
        assert message in r["memory"] and r["queue_idx"] == 0, r
        if case != "mask":
            assert message in r["gathered"], r


def test_a_rank_without_anchors_under_learned_thresholds_matches_one_process(saved):
    """Rank 1 enqueues every row (no anchors): its loss reached no threshold, its backward skipped
    the thresholds' averaging all-reduce and rank 0 waited there (the spawn timed out). Now both
    backpropagate, and loss, gradients and the thresholds' gradient are one process's."""
    single = losses.CrossBatchMemory(
        losses.AdaptiveMSLoss(epsilon=0.1, margin_mode="learned", num_classes=9, margin=0.05),
        DIM,
        memory_size=MEMORY,
    ).double()
    for step in range(2):
        x, y, _ = masked_batch(step)
        mask = torch.cat([torch.arange(LOCAL) < 4, torch.ones(LOCAL, dtype=torch.bool)])
        x.requires_grad_(True)
        single.zero_grad()
        expected = single(x, y, enqueue_mask=mask)
        expected.backward()
        per_rank = [s["agreement"]["zero-anchors"][step] for s in saved]
        torch.testing.assert_close(sum(r["loss"] for r in per_rank) / WORLD, expected.detach())
        for r, rec in enumerate(per_rank):
            torch.testing.assert_close(rec["grad"] / WORLD, x.grad[r * LOCAL : (r + 1) * LOCAL])
            torch.testing.assert_close(rec["thresholds"], single.loss.thresholds.grad)
        assert single.loss.thresholds.grad.abs().max() > 0


def test_a_collapsed_batch_is_not_taken_for_a_gathered_one(saved):
    for s in saved:
        assert s["agreement"]["collapsed"] == "no error"


def test_a_step_that_fails_after_the_gather_on_one_rank_is_undone_on_every_rank(saved):
    """Rank 0's index tuple lists a pair on both sides once joined with the label pairs, which
    only the step itself finds: rank 0 raised and undid its enqueue, rank 1 returned a loss and
    kept the batch (the memories differed from then on). Now the ranks exchange their outcome
    when a tuple or a miner is given: both raise, both memories are as before, both go on."""
    for rank, s in enumerate(saved):
        r = s["agreement"]["late-failure"]
        if rank == 0:
            assert "both as positive and as negative" in r["message"], r
        else:
            assert "the call failed on rank 0" in r["message"], r
        assert r["unchanged"]
    x, y = full_batch(0)
    single = losses.CrossBatchMemory(losses.MSLoss(), DIM, memory_size=MEMORY).double()
    single(x, y % 4)
    want = single(x, y % 4)
    torch.testing.assert_close(sum(s["agreement"]["late-failure"]["after"] for s in saved) / WORLD, want)


def test_uint16_labels_on_one_rank_match_one_process(saved):
    """uint16 labels (class ids) on rank 1: the memory's anchors kept them and the kernel refused
    to compare them with the gathered int64 labels after the gather, on that rank alone; learned
    thresholds could not take their range (min/max are not defined for uint16) and that rank
    never reached the exchange of verdicts."""
    x, y = full_batch(0)
    y = y % 4
    got = [s["agreement"]["uint16"] for s in saved]
    single = losses.CrossBatchMemory(losses.MSLoss(), DIM, memory_size=MEMORY).double()
    torch.testing.assert_close(sum(g["memory"] for g in got) / WORLD, single(x, y))
    learned = losses.AdaptiveMSLoss(margin_mode="learned", num_classes=4).double()
    torch.testing.assert_close(sum(g["gathered"] for g in got) / WORLD, learned(x, y))


def test_a_masked_memory_with_an_embedding_regularizer_matches_one_process(saved):
    """PML holds a loss with a regularizer's reducers as MultipleReducers (MeanReducers here),
    which was not taken for a mean: the masked memory's per-rank weighting was skipped."""
    assert_masked_steps_match_one_process(saved, "regularized", "regularized")


@pytest.mark.parametrize("name", ["gathered", "warm-up"])
def test_a_rank_whose_dense_mining_keeps_no_pair_matches_one_process(saved, name):
    """Rank 0's labels occur nowhere else: its dense loss was PML's zero loss of its own anchors,
    whose backward never reached the gathered batch, so rank 0 skipped the all-reduce of the
    gather's backward and rank 1 waited in it until the timeout. Now every rank's loss reaches
    the gathered batch (times zero), and the gradients are one process's."""
    x, _ = full_batch(0)
    x = x.clone().requires_grad_(True)
    y = torch.cat([lonely_labels(r) for r in range(WORLD)])
    expected = losses.MSLoss(epsilon=0.1, fused=False)(x, y)
    (expected_grad,) = torch.autograd.grad(expected, x)
    per_rank = [s["agreement"]["nopair"][name] for s in saved]
    assert float(per_rank[0]["loss"]) == 0.0
    torch.testing.assert_close(sum(r["loss"] for r in per_rank) / WORLD, expected.detach())
    for r, rec in enumerate(per_rank):
        torch.testing.assert_close(rec["grad"] / WORLD, expected_grad[r * LOCAL : (r + 1) * LOCAL])
    assert expected_grad.abs().max() > 0


def test_do_nothing_reducer_and_double_backward_are_refused_and_the_dtype_kept(saved):
    """Under torch.distributed: ``DoNothingReducer``'s dict holds no graph on a rank whose mining
    kept no pair, and its peers' backward waited for that rank (the zero term that puts the
    gathered batch and the thresholds in every graph was even added to the dict: TypeError after
    the memory had enqueued) -- refused on every rank, nothing enqueued; a second differentiation
    through the gather gave wrong numbers (its all-reduce is not differentiated) -- refused; the
    zero term promoted a bfloat16 loss to float32."""
    for s in saved:
        kept = s["agreement"]["kept"]
        for who in ("memory", "gathered"):
            assert "needs a loss that reduces to a tensor" in kept[who], kept
        assert kept["queue_idx"] == 0
        assert "once_differentiable" in kept["double"] or "differentiate twice" in kept["double"], kept
        assert kept["bfloat16"] == "torch.bfloat16", kept
