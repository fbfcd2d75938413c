"""MultiSimilarityMiner returns exactly PML's pair sets."""

import pytest
import torch
from helpers import NAN_BASES, NAN_CELLS, make_batch, nan_batch, planted_nan, skip_if_half_unsupported
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import miners as pml_miners

from pml_ms_plus import miners

DISTANCES = {
    "cosine": lambda: pml_distances.CosineSimilarity(),
    "dot": lambda: pml_distances.DotProductSimilarity(),
    "lp": lambda: pml_distances.LpDistance(),
    "lp_raw": lambda: pml_distances.LpDistance(normalize_embeddings=False),
}


def pair_sets(tup):
    a1, p, a2, n = (t.cpu().tolist() for t in tup)
    pos, neg = list(zip(a1, p)), list(zip(a2, n))
    assert len(set(pos)) == len(pos) and len(set(neg)) == len(neg), "a pair returned twice"
    return set(pos), set(neg)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("use_ref", [False, True])
@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("dist", list(DISTANCES))
@pytest.mark.parametrize("seed", range(3))
def test_same_pairs_as_pml(device, dtype, use_ref, epsilon, dist, seed):
    skip_if_half_unsupported(device, dtype)
    x, y = make_batch(seed, n=48, classes=7, device=device, dtype=dtype, requires_grad=False)
    ref, ref_y = (
        make_batch(seed + 50, n=30, classes=9, device=device, dtype=dtype, requires_grad=False)
        if use_ref
        else (None, None)
    )
    theirs = pml_miners.MultiSimilarityMiner(epsilon, distance=DISTANCES[dist]())(x, y, ref, ref_y)
    ours_miner = miners.MultiSimilarityMiner(epsilon, distance=DISTANCES[dist](), collect_stats=True)
    ours = ours_miner(x, y, ref, ref_y)
    assert all(t.dtype == torch.long and t.device == x.device for t in ours)
    assert pair_sets(ours) == pair_sets(theirs)
    assert ours_miner.num_pos_pairs == len(ours[0]) and ours_miner.num_neg_pairs == len(ours[2])


def test_ref_emb_without_ref_labels_pairs_the_batchs_labels_each_own_row_dropped(device):
    """``ref_emb`` of the batch's length without ``ref_labels``: PML pairs the batch's labels
    (each anchor's row ``i`` both a positive and a negative candidate, see the README); ours
    raised ``AttributeError: 'NoneType' object has no attribute 'to'``. Now the pairs of the
    same labels tensor, ``(i, i)`` dropped, checked against a reference written here; another
    length is refused by name."""
    x, y = make_batch(4, n=16, classes=4, device=device, requires_grad=False)
    ref, _ = make_batch(5, n=16, classes=4, device=device, requires_grad=False)
    eps = 0.1
    S = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(ref, dim=1).T
    pos = (y[:, None] == y[None, :]) & ~torch.eye(16, dtype=torch.bool, device=device)
    neg = y[:, None] != y[None, :]
    min_pos = S.masked_fill(~pos, float("inf")).amin(1, keepdim=True)
    max_neg = S.masked_fill(~neg, -float("inf")).amax(1, keepdim=True)
    want_pos = {tuple(ij) for ij in (pos & (S - eps < max_neg)).nonzero().tolist()}
    want_neg = {tuple(ij) for ij in (neg & (S + eps > min_pos)).nonzero().tolist()}
    assert want_pos and want_neg
    assert pair_sets(miners.MultiSimilarityMiner(eps)(x, y, ref)) == (want_pos, want_neg)
    with pytest.raises(ValueError, match="ref_labels is required: ref_emb has 5 rows, embeddings 16"):
        miners.MultiSimilarityMiner(eps)(x, y, ref[:5])


@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [5, 5, 5, 5]])
def test_no_positive_or_no_negative_pairs_gives_empty(device, labels):
    x, _ = make_batch(0, n=4, device=device, requires_grad=False)
    y = torch.tensor(labels, device=device)
    theirs = pml_miners.MultiSimilarityMiner(0.1)(x, y)
    ours = miners.MultiSimilarityMiner(0.1)(x, y)
    assert pair_sets(ours) == pair_sets(theirs) == (set(), set())


@pytest.mark.parametrize("base", list(NAN_BASES))
@pytest.mark.parametrize("cells", list(NAN_CELLS))
@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.5])
def test_nan_similarities_are_mined_as_pml_mines_them(device, base, cells, epsilon):
    """PML's miner never keeps a NaN pair (its comparisons with NaN are false) and sorts NaN
    last: a NaN on the side whose largest value it takes (negatives of a similarity, positives
    of a distance) empties the other side, the other side's hardest skips NaN. Ours kept NaN
    pairs (a half-precision zero row under cosine: 11 positive pairs where PML keeps 1)."""
    x, y = nan_batch(device, epsilon)
    dist = lambda: planted_nan(NAN_BASES[base], NAN_CELLS[cells])  # noqa: E731
    theirs = pml_miners.MultiSimilarityMiner(epsilon, distance=dist())(x.detach(), y)
    ours = miners.MultiSimilarityMiner(epsilon, distance=dist())(x.detach(), y)
    assert pair_sets(ours) == pair_sets(theirs)
