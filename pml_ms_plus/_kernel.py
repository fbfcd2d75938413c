"""The fused, chunked MS loss for inner-product similarities.

``ms_terms_fused(x, y, ...)`` equals ``_blocks.dense_terms(x @ y.T, masks, ...)``
in extra memory bounded by a budget, whatever the number of references, and its backward uses the closed-form pair weights (``dL/dS = w_neg - w_pos``)
instead of letting autograd store ``(B, M)`` intermediates:

* forward, step 1 (:func:`_hardest_pass`): each anchor's hardest positive and
  negative over all blocks (the exact log-sum-exp shifts, and the mining
  thresholds);
* forward, step 2 (:func:`_accumulate`): mining and the per-anchor sums of both
  sides, block by block;
* forward, step 3 (:func:`_finish`): per-anchor losses and weight scales;
* backward: per block ``G = g * (w_neg - w_pos)``, ``dx += G @ y_blk``,
  ``dy_blk = G.T @ x`` (in-batch, ``y is x``, with one block: ``dx = (G + G.T) @ x``);
  on the CPU a large ``G`` whose mining kept few pairs (trained embeddings) enters
  those products as a sparse copy of its nonzero pairs (:func:`_weights_operand`).

A problem that is one small block (:attr:`BlockPlan.stacked`, every in-batch
``B <= 256``) is computed with both sides stacked in one signed tensor
(:func:`_stacked_block`, :func:`_blocks.signed_terms`): the same pairs in half the
operator calls. On the CPU, large blocks against references other than the anchors
are stored reference-major (:meth:`_Problem.product`; compiled, see
:func:`_compiled_negative_terms`).

When some blocks are recomputed, steps 1 and 2 are one pass (:func:`_one_pass`):
positives first, from row dot products, then each block's negatives mined and
summed against a running maximum. The negatives of a large block go through one
function, :func:`_blocks.negative_terms`, eager or (``compile_blocks``) compiled; eagerly on
the CPU a block beyond :data:`TILE_BYTES` runs it tile by tile (:func:`_tiled_negative_terms`),
so that its passes read a tile from the cache instead of the whole block from memory.

Memory: a budget in bytes (``memory_budget``, default :data:`DEFAULT_MEMORY_BUDGET`
= 512 MiB) bounds the extra memory. When the whole ``(B, M)`` block and two
working copies fit, it is one block, computed once and kept for the backward
(the backward builds its gradient in the kept storage). Otherwise the
references are split into blocks of 1/8 of the budget (at most ``2**22``
similarities); as many blocks as fit in
the budget beside two working blocks are kept between forward and backward, the
others are recomputed by each pass (one extra matrix product per pass): time
traded for bounded memory only where the budget demands it. ``chunk_size``
fixes the block width instead.

Higher-order gradients: a backward run with ``create_graph=True`` (grad mode on
inside the backward) differentiates a dense, differentiable recomputation of the
same loss instead, so second derivatives are exact (``gradgradcheck`` passes);
``torch.func.grad`` works through the Function's ``setup_context`` form (tested); ``vmap`` and ``jacrev`` of
the loss are not supported.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, ContextManager, List, NamedTuple, Optional, Tuple

import torch

from . import _blocks

CHUNK_ELEMENTS = 2**22  # block of the passes that keep nothing (centre sums)
DEFAULT_MEMORY_BUDGET = 2**29  # bytes: 512 MiB


def chunk_columns(num_anchors: int, chunk_size: Optional[int]) -> int:
    """References per block of a pass that keeps nothing: ``chunk_size``, else ``2**22 // B``."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, CHUNK_ELEMENTS // max(1, num_anchors))


REFERENCE_MAJOR = True  # on the CPU, listed blocks of references other than the anchors are
# computed as (y_blk @ x.T).T (see _Problem.product); compiled, their elementwise math runs over
# the contiguous (M, B) storage and the sums are ATen's (_compiled_negative_terms)

DENSE_ELEMENTS = 2**16  # blocks up to this many similarities hold their positives densely (in-batch
# B <= 256); measured: dense 6% faster at B=128, even at 256, 20% slower at 512 (2 CPU cores)


class BlockPlan(NamedTuple):
    """How the references are split: ``cols`` per block, the first ``keep`` blocks kept;
    ``dense``: the blocks hold their positives in the dense layout (see :class:`_blocks.Block`);
    ``one_pass``: some blocks are recomputed, so the forward makes one pass over the blocks
    (see :func:`_one_pass`) instead of two; ``stacked``: one dense block, kept, computed with
    both sides stacked (:func:`_stacked_block`, the small-batch path)."""

    cols: int
    keep: int
    dense: bool = False
    one_pass: bool = False
    stacked: bool = False


def plan_blocks(
    num_anchors: int, num_refs: int, itemsize: int, chunk_size: Optional[int], memory_budget: int
) -> BlockPlan:
    """The :class:`BlockPlan` for a budget of ``memory_budget`` bytes.

    Without ``chunk_size``: one block of all references if it fits three times
    in the budget (itself and two working copies), else blocks of 1/8 of the
    budget or ``2**22`` similarities, whichever is smaller. Blocks are kept
    while the kept ones and two working blocks fit. Blocks of at most
    :data:`DENSE_ELEMENTS` similarities use the dense layout (a kept block then
    holds two ``(B, cols)`` tensors, beside one working block; the listed
    layout is cheaper beyond); a problem that is one such block, kept, is
    ``stacked`` (both sides in one signed tensor, :func:`_stacked_block`).
    """
    row = max(1, num_anchors) * itemsize  # bytes of one column of a block
    if chunk_size is not None:
        cols = max(1, int(chunk_size))
    elif 3 * row * num_refs <= memory_budget:
        cols = max(1, num_refs)
    else:  # at most 1/8 of the budget and 2**22 similarities (16 MB in float32): blocks that
        # the allocator recycles; fresh 64 MB blocks would be page-faulted in on every pass
        cols = max(1, min(memory_budget // (8 * row), CHUNK_ELEMENTS // max(1, num_anchors)))
    cols = min(cols, max(1, num_refs))
    n_blocks = -(-num_refs // cols)
    dense = max(1, num_anchors) * cols <= DENSE_ELEMENTS
    # a kept block: Vn's terms, and sp's too when dense; working blocks beside them: two
    # listed (S and a temporary), one dense (the dense layout works in place)
    kept_copies, working_copies = (2, 1) if dense else (1, 2)
    keep = min(n_blocks, max(0, (memory_budget - working_copies * row * cols) // (kept_copies * row * cols)))
    return BlockPlan(cols, keep, dense, one_pass=keep < n_blocks, stacked=dense and n_blocks == keep == 1)


class _Config(NamedTuple):
    alpha: float
    beta: float
    epsilon: Optional[float]
    weighting: _blocks.Weighting
    cols: int
    keep: int  # the first `keep` blocks are kept between forward and backward
    counts: bool
    dense: bool  # the dense layout of the positives
    one_pass: bool  # some blocks recomputed: the one-pass forward (:func:`_one_pass`)
    compile_blocks: bool = False  # the negatives of listed blocks through torch.compile
    stacked: bool = False  # one dense kept block, both sides stacked (:func:`_stacked_block`)
    transposed: bool = False  # listed blocks of other references: reference-major (_Problem.product)
    own_diagonal: bool = False  # in-batch, self_index = arange(B): the own copies are the diagonal

    def negatives(self) -> Callable[..., Tuple[_blocks.PairTerms, Optional[torch.Tensor]]]:
        """:func:`_blocks.negative_terms` for this problem's blocks: compiled for large
        (listed) blocks when asked for, else eager (large blocks tile by tile, see
        :func:`_tiled_negative_terms`)."""
        if self.dense:
            return _blocks.negative_terms
        return _compiled_negative_terms if self.compile_blocks else _tiled_negative_terms

    def gradient_block(self) -> Callable[..., torch.Tensor]:
        """:func:`_gradient_block`, compiled under the same rule as :meth:`negatives`."""
        return _compiled_gradient_block if self.compile_blocks and not self.dense else _gradient_block

    @property
    def kept_outputs(self) -> int:
        """Tensors kept per block (:func:`_fused_forward`'s ``kept``): ``(Rp, Rn)`` dense, ``(pa, pj, Rp, Rn)`` listed,
        ``(Rn, factor)`` one-pass (see :class:`_Swept`), ``R`` (both sides) stacked."""
        return 1 if self.stacked else 2 if self.dense or self.one_pass else 4


TILE_BYTES = 2**21  # eager elementwise passes over a large CPU block run tile by tile, each tile
# about this size, so that it stays in the L2 caches between the passes (2 MB here, 1 MB per
# core) and the passes' temporaries are tile-sized instead of fresh block-sized tensors (each
# page-faulted in); measured, memory B=256 (forward + backward, interleaved with the whole-block
# passes): M=65,536 and 262,144 6-12% faster, M=16,384 1-11%; in-batch B=1,024-4,096 unchanged


class _Tile(NamedTuple):
    """One tile of a ``(B, M)`` block: the view, and the slices of its anchors and references
    (the per-anchor and per-reference vectors that go with it)."""

    view: torch.Tensor
    anchors: slice
    refs: slice


def _tiles(block: torch.Tensor) -> Optional[List[_Tile]]:
    """The tiles of an eager pass over a ``(B, M)`` CPU block: slices along the storage's outer
    dimension (rows of an anchor-major block, columns of a reference-major one: each tile one
    contiguous stretch of about :data:`TILE_BYTES`); ``None`` where the pass runs over the
    whole block (one tile would hold it; a GPU, where each tile would be more kernel launches;
    under ``torch.compile``, which fuses the passes anyway)."""
    if not block.is_cpu or torch.compiler.is_compiling():
        return None
    dim = 1 if _reference_major(block) else 0
    line = block.element_size() * max(1, block.shape[1 - dim])  # bytes of one slice
    size = max(1, TILE_BYTES // line)
    if block.shape[dim] <= size:
        return None
    every = slice(None)
    parts = [slice(i, i + size) for i in range(0, block.shape[dim], size)]
    if dim == 1:
        return [_Tile(block[:, part], every, part) for part in parts]
    return [_Tile(block[part], part, every) for part in parts]


def _tiled_negative_terms(
    Vn: torch.Tensor,
    side: _blocks.Side,
    ref: torch.Tensor,
    min_pos: torch.Tensor,
    epsilon: Optional[float],
    weighting: _blocks.Weighting,
    counts: bool,
    inplace: bool,
) -> Tuple[_blocks.PairTerms, Optional[torch.Tensor]]:
    """:func:`_blocks.negative_terms` of a large block, eagerly, tile by tile (:func:`_tiles`):
    every element's value is the same, bit for bit (the passes are elementwise, with each
    anchor's own ``ref`` and ``min_pos``); each anchor's sum and count are added up over its
    tiles. In place (``R`` in ``Vn``'s storage), for the log-sum-exp weightings; otherwise
    the whole block at once."""
    tiles = _tiles(Vn) if inplace and weighting.log_sum_exp else None
    if tiles is None:
        return _blocks.negative_terms(Vn, side, ref, min_pos, epsilon, weighting, counts, inplace)
    acc = Vn.new_zeros(Vn.shape[0])
    num = torch.zeros(Vn.shape[0], dtype=torch.long, device=Vn.device) if counts else None
    for tile in tiles:
        a = tile.anchors
        side_a = _blocks.Side(side.coef, side.lam[a])
        t, n = _blocks.negative_terms(tile.view, side_a, ref[a], min_pos[a], epsilon, weighting, counts, True)
        acc[a] += t.acc
        if num is not None and n is not None:
            num[a] += n
    return _blocks.PairTerms(Vn, acc), num


def _gradient_block(
    R: torch.Tensor, rows: torch.Tensor, cols: Optional[torch.Tensor], in_place: bool, anchor_dim: int = 0
) -> torch.Tensor:
    """``R * rows[:, None] (* cols[None, :])``: a block's negative weights times the upstream
    gradient (and the column scale of references normalised in the kernel); in ``R``'s
    storage when ``in_place`` (eagerly, tile by tile when there are two factors: see
    :func:`_tiles`). ``anchor_dim=1``: ``R`` is reference-major ``(M, B)``
    (``R * rows[None, :] (* cols[:, None])``)."""
    r = rows[:, None] if anchor_dim == 0 else rows[None, :]
    tiles = _tiles(R) if in_place and cols is not None and anchor_dim == 0 else None
    if tiles is None:
        G = R.mul_(r) if in_place else R * r
        return G if cols is None else G.mul_(cols if anchor_dim == 0 else cols[:, None])
    assert cols is not None  # (tiles only with a column factor)
    for tile in tiles:
        tile.view.mul_(r[tile.anchors]).mul_(cols[tile.refs])
    return R


def _reference_major(block: torch.Tensor) -> bool:
    """Whether a ``(B, M)`` block is the transposed view of a contiguous ``(M, B)`` tensor
    (:meth:`_Problem.product` with ``transposed``); a block of one row or one column is
    contiguous either way and takes the anchor-major code, which is right for any strides."""
    return block.T.is_contiguous() and not block.is_contiguous()


# Sparse gradient products (CPU): after the mining most pair weights of trained embeddings are 0
# (a memory's block keeps ~1% of its negatives), and a product with the nonzero pairs alone is
# cheaper than the dense one. Measured on 2 cores, float32, B=256 x 16,384 references: dense
# ~0.015 ns per element and dimension, sparse ~2 ns per element (finding the nonzeros) + 0.3 ns
# per nonzero and dimension (MKL's sparse product); below :func:`_sparse_density_limit` (3/4 of
# the break-even density) the sparse product wins. The in-batch fold (``W @ x + W.T @ x``, two
# sparse products against one dense) was measured too: at the D=512 limit (2.8%) sparse takes
# 0.6-0.9x the dense fold's time (B=1024-4096).
SPARSE_MIN_ELEMENTS = 2**20  # smaller blocks: the dense product (fixed costs dominate)
_DENSITY_SAMPLE = 2**16  # entries read to estimate a block's density before converting it


def _sparse_density_limit(dim: int) -> float:
    """The largest fraction of nonzero weights at which a ``(B, M)`` block times ``(M, dim)``
    rows is computed sparse: 3/4 of the measured break-even ``0.05 - 6.7 / dim`` (D=512: 2.8%;
    D <= 134: never)."""
    return 0.75 * (0.05 - 6.7 / dim)


_MKL = torch.backends.mkl.is_available()  # read once: torch.compile cannot trace the call
_csr_notice_silenced = False  # torch's one-time "sparse CSR support is in beta" notice


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A CSR tensor of trusted indices (no invariant checks); the first one built with torch's
    one-time beta notice silenced (only then: ``catch_warnings`` resets the warning registry)."""
    global _csr_notice_silenced
    if _csr_notice_silenced:
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        W = torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
    _csr_notice_silenced = True
    return W


def _weights_operand(G: torch.Tensor, dim: int) -> torch.Tensor:
    """``G`` for the backward's products ``G @ y`` and ``G.T @ x`` with ``dim``-wide rows: a
    sparse CSR copy of its nonzero entries when they are few, else ``G`` itself. Not while
    ``torch.compile`` traces (the density is read on the host); the CPU with MKL only (measured
    there), float32/float64, contiguous blocks (or transposed views of them) of
    :data:`SPARSE_MIN_ELEMENTS` or more. The density is estimated from evenly spaced rows, then
    counted (no allocation) before the nonzeros are listed. The products' sums run in another
    order than the dense product's (rounding differs, ~1e-7 relative). Building the copy takes
    up to ~60 bytes per nonzero for a moment (D=512: under half the float32 block's storage),
    within the two working blocks the memory budget reserves."""
    if torch.compiler.is_compiling():
        return G
    limit = _sparse_density_limit(dim)
    if (
        limit <= 0
        or not _MKL
        or G.device.type != "cpu"
        or G.dtype not in (torch.float32, torch.float64)
        or G.numel() < SPARSE_MIN_ELEMENTS
    ):
        return G
    major = _reference_major(G)  # stored (M, B): its entries in reference order
    storage = G.T if major else G
    if not storage.is_contiguous():
        return G
    rows, cols = storage.shape
    sample = storage[:: max(1, rows // max(1, _DENSITY_SAMPLE // cols))]
    if int(sample.count_nonzero()) > limit * sample.numel():
        return G
    if int(storage.count_nonzero()) > limit * storage.numel():  # the sample was not representative
        return G
    flat = storage.view(-1)
    index = flat.nonzero().squeeze(1)  # in storage order
    if major:  # CSR wants G's rows (the anchors, storage columns) in order
        row, order = torch.sort(index % cols, stable=True)
        index = index[order]
        col = index // cols
    else:
        row = index // cols
        col = index - row * cols
    crow = index.new_zeros(G.shape[0] + 1)
    torch.cumsum(torch.bincount(row, minlength=G.shape[0]), 0, out=crow[1:])
    return _csr(crow, col, flat[index], G.shape)


def _compiled_gradient_block(
    R: torch.Tensor, rows: torch.Tensor, cols: Optional[torch.Tensor], in_place: bool
) -> torch.Tensor:
    """:func:`_gradient_block` through ``torch.compile``; a reference-major block is handed
    over as its contiguous ``(M, B)`` storage (inductor's code follows the storage order)."""
    fn = _compiled("gradient", _gradient_block)
    if _reference_major(R):
        return fn(R.T, rows, cols, in_place, 1).T
    return fn(R, rows, cols, in_place)


class _Problem(NamedTuple):
    """Anchors ``x`` against references ``y`` with their labels and self indices."""

    x: torch.Tensor
    y: torch.Tensor
    labels: torch.Tensor
    ref_labels: torch.Tensor
    self_index: torch.Tensor
    ref_scale: Optional[torch.Tensor] = None  # (M,) 1 / |y_j|: cosine with raw references
    transposed: bool = False  # blocks stored reference-major (see :meth:`product`)

    def starts(self, cols: int) -> range:
        return range(0, self.y.shape[0], cols)

    def new_block(self, cols: int) -> torch.Tensor:
        """An uninitialised ``(B, cols)`` block in the layout of :meth:`product`."""
        B = self.x.shape[0]
        return self.x.new_empty((cols, B)).T if self.transposed else self.x.new_empty((B, cols))

    def product(self, y_blk: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x @ y_blk.T``, ``(B, cols)``; ``transposed``: computed as ``(y_blk @ x.T).T``, the
        block stored reference-major. With many more references than anchors that product is
        15-35% faster on the CPU (measured, B=256: M=4,096 1.15x, 16,384 1.2x, 65,536 1.36x;
        square blocks ~1x); the block is used through its transposed view. Without ``out``, as
        ``linear`` (the same product, without a transpose operator call)."""
        if self.transposed:
            if out is None:
                return torch.nn.functional.linear(y_blk, self.x).T
            return torch.matmul(y_blk, self.x.T, out=out.T).T
        if out is None:
            return torch.nn.functional.linear(self.x, y_blk)
        return torch.matmul(self.x, y_blk.T, out=out)

    def scale_columns_(self, A: torch.Tensor, c0: int) -> torch.Tensor:
        """``A * ref_scale`` over the block's columns, in place (the normalisation of y)."""
        if self.ref_scale is not None:
            A.mul_(self.ref_scale[c0 : c0 + A.shape[1]])
        return A

    def block(
        self,
        c0: int,
        cols: int,
        out: Optional[torch.Tensor] = None,
        dense: bool = False,
        positives: bool = True,
    ) -> _blocks.Block:
        """The :class:`_blocks.Block` of references ``[c0, c0 + cols)`` (no autograd).

        ``out``: a ``(B, cols)`` buffer from :meth:`new_block` to compute it in (a block
        that is not kept: one buffer serves every such block, so the allocator sees no churn).
        ``positives=False``: its negatives alone (the one-pass forward holds the positives).
        """
        y_blk = self.y[c0 : c0 + cols]
        if out is not None and out.shape[1] != y_blk.shape[0]:
            out = None  # the last, narrower block
        S = self.scale_columns_(self.product(y_blk, out), c0)
        ref_labels, self_index = self.ref_labels[c0 : c0 + cols], self.self_index - c0
        return _blocks.block_from_labels(
            S, self.labels, ref_labels, self_index, inplace=True, dense=dense, positives=positives
        )

    def pair_chunks(self, num_pairs: int, elements: int) -> range:
        """Starts of chunks of pairs whose ``(chunk, D)`` row gathers hold about ``elements``."""
        step = max(1, elements // (3 * max(1, self.x.shape[1])))
        return range(0, num_pairs, step)

    def positives(self, elements: int) -> _blocks.Block:
        """Every positive pair over all references as a listed block without negatives
        (``Vn`` is ``(B, 0)``): its similarities from row dot products, in chunks of pairs
        gathering about ``elements`` values at a time (no ``(B, M)`` block)."""
        pa, pj = _blocks.same_label_pairs(self.labels, self.ref_labels)
        other = pj != self.self_index[pa]
        pa, pj = pa[other], pj[other]
        sp = self.x.new_empty(pa.shape[0])
        chunks = self.pair_chunks(pa.shape[0], elements)
        for p0 in chunks:
            a, j = pa[p0 : p0 + chunks.step], pj[p0 : p0 + chunks.step]
            torch.linalg.vecdot(self.x[a], self.y[j], out=sp[p0 : p0 + chunks.step])
        if self.ref_scale is not None:
            sp.mul_(self.ref_scale[pj])
        return _blocks.Block(pa, pj, sp, self.x.new_empty((self.x.shape[0], 0)))

    def positive_grads_(
        self,
        dx: Optional[torch.Tensor],
        dy: Optional[torch.Tensor],
        pa: torch.Tensor,
        pj: torch.Tensor,
        w: torch.Tensor,
        elements: int,
    ) -> None:
        """``dx``/``dy`` += the gradient of ``sum_p w_p * S[pa_p, pj_p]`` (row by row, in chunks)."""
        if self.ref_scale is not None:
            w = w * self.ref_scale[pj]
        chunks = self.pair_chunks(pa.shape[0], elements)
        for p0 in chunks:
            a, j, wc = (t[p0 : p0 + chunks.step] for t in (pa, pj, w))
            if dx is not None:
                dx.index_add_(0, a, self.y[j] * wc[:, None])
            if dy is not None:
                dy.index_add_(0, j, self.x[a] * wc[:, None])

    def dense_similarities(self) -> torch.Tensor:
        """The whole ``(B, M)`` similarity block, differentiable in ``x`` and ``y``."""
        S = self.x @ self.y.T
        return S if self.ref_scale is None else S * self.ref_scale


# ----------------------------------------------------------- forward, by step
def _hardest_pass(
    problem: _Problem, cfg: _Config, buffer: Optional[torch.Tensor]
) -> Tuple[_blocks.Hardest, List[_blocks.Block]]:
    """Step 1: the hardest pairs over all references, and the blocks that are kept."""
    hard = None
    kept: List[_blocks.Block] = []
    for k, c0 in enumerate(problem.starts(cfg.cols)):
        block = problem.block(c0, cfg.cols, out=None if k < cfg.keep else buffer, dense=cfg.dense)
        if k < cfg.keep:
            kept.append(block)
        part = _blocks.hardest(block)
        hard = part if hard is None else hard.merge(part)
    assert hard is not None, "no references"
    return hard, kept


def _working_buffer(problem: _Problem, cfg: _Config) -> Optional[torch.Tensor]:
    """One ``(B, cols)`` buffer for the blocks that are recomputed, or ``None`` if all are kept."""
    n_blocks = len(problem.starts(cfg.cols))
    if cfg.keep >= n_blocks:
        return None
    return problem.new_block(cfg.cols)


class _Sums(NamedTuple):
    """Per-anchor sums over the blocks, per side (:class:`_blocks.SidePair` of ``(B,)``)."""

    acc: _blocks.SidePair  # sum of the side's loss terms
    counts: Optional[_blocks.SidePair]  # kept pairs (when counted)
    r_sum: Optional[_blocks.SidePair]  # sum of R (for "self" only: its weights are not acc)

    @staticmethod
    def of_block(bt: _blocks.BlockTerms, weighting: _blocks.Weighting) -> "_Sums":
        r_sum = None
        if not weighting.log_sum_exp:
            r_sum = _blocks.SidePair(bt.block.row_sum(bt.terms.pos.R), bt.terms.neg.R.sum(1))
        return _Sums(_blocks.SidePair(bt.terms.pos.acc, bt.terms.neg.acc), bt.counts, r_sum)

    def merge(self, other: "_Sums") -> "_Sums":
        """The sums over the blocks of both."""

        def add(a: Optional[_blocks.SidePair], b: Optional[_blocks.SidePair]) -> Optional[_blocks.SidePair]:
            return None if a is None or b is None else _blocks.SidePair(a.pos + b.pos, a.neg + b.neg)

        acc = add(self.acc, other.acc)
        assert acc is not None
        return _Sums(acc, add(self.counts, other.counts), add(self.r_sum, other.r_sum))


class _Kept(NamedTuple):
    """A kept block's terms, held between forward and backward (``pa``/``pj``:
    ``None`` in the dense layout)."""

    pa: Optional[torch.Tensor]
    pj: Optional[torch.Tensor]
    Rp: torch.Tensor
    Rn: torch.Tensor

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        return tuple(t for t in self if t is not None)

    @staticmethod
    def split(flat: Tuple[torch.Tensor, ...], per_block: int) -> List["_Kept"]:
        """The kept blocks of :func:`_fused_forward`'s flat ``kept`` tensors (``per_block`` each:
        ``R`` stacked, ``(Rp, Rn)`` dense, ``(pa, pj, Rp, Rn)`` listed)."""
        parts = [flat[i : i + per_block] for i in range(0, len(flat), per_block)]
        if per_block == 1:  # stacked: R is (2, B, M), both sides
            return [_Kept(None, None, *p[0].unbind(0)) for p in parts]
        return [_Kept(None, None, *p) if per_block == 2 else _Kept(*p) for p in parts]

    def block(self) -> _blocks.Block:
        """The layout of the block these terms came from (``Rp`` in the place of ``sp``)."""
        return _blocks.Block(self.pa, self.pj, self.Rp, self.Rn)


def _block_terms(
    cfg: _Config,
    block: _blocks.Block,
    side_pair: _blocks.SidePair,
    shifts: _blocks.SidePair,
    hard: _blocks.Hardest,
    counts: bool = False,
) -> _blocks.BlockTerms:
    """One block mined and turned into both sides' terms, in place, under ``cfg``
    (``hard``/``shifts``: over all references)."""
    return _blocks.block_terms(
        block,
        side_pair,
        shifts,
        hard,
        weighting=cfg.weighting,
        epsilon=cfg.epsilon,
        inplace=True,
        counts=counts,
        negatives=cfg.negatives(),
    )


def _accumulate(
    problem: _Problem,
    cfg: _Config,
    side_pair: _blocks.SidePair,
    shifts: _blocks.SidePair,
    hard: _blocks.Hardest,
    blocks: List[_blocks.Block],
    buffer: Optional[torch.Tensor],
) -> Tuple[_Sums, List[_Kept]]:
    """Step 2: mine each block and add up both sides' terms."""
    sums: Optional[_Sums] = None
    kept: List[_Kept] = []
    for k, c0 in enumerate(problem.starts(cfg.cols)):
        blk = blocks[k] if k < len(blocks) else problem.block(c0, cfg.cols, out=buffer, dense=cfg.dense)
        bt = _block_terms(cfg, blk, side_pair, shifts, hard, counts=cfg.counts)
        part = _Sums.of_block(bt, cfg.weighting)
        sums = part if sums is None else sums.merge(part)
        if k < len(blocks):
            kept.append(_Kept(bt.block.pa, bt.block.pj, bt.terms.pos.R, bt.terms.neg.R))
    assert sums is not None, "no references"
    return sums, kept


class _Swept(NamedTuple):
    """A block kept by the one-pass forward: its negatives' ``R``, taken against the running
    level of the pass when the block was reached, and the ``(B,)`` factor that turns them
    into the ``R`` against the side's final reference (``exp(coef * (level - ref)) <= 1``)."""

    Rn: torch.Tensor
    factor: torch.Tensor


def _negative_terms(
    cfg: _Config,
    Vn: torch.Tensor,
    side: _blocks.Side,
    ref: torch.Tensor,
    min_pos: torch.Tensor,
    counts: bool = False,
) -> Tuple[_blocks.PairTerms, Optional[torch.Tensor]]:
    """:func:`_blocks.negative_terms` of a block under ``cfg``, in place."""
    return cfg.negatives()(Vn, side, ref, min_pos, cfg.epsilon, cfg.weighting, counts, True)


_COMPILED: dict = {}  # name -> compiled function, made on first use


def _compiled(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn, dynamic=True)``, once per process: dynamic shapes, so that a
    filling memory or a last, smaller batch does not recompile."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


def _compiled_negative_terms(
    Vn: torch.Tensor,
    side: _blocks.Side,
    ref: torch.Tensor,
    min_pos: torch.Tensor,
    epsilon: Optional[float],
    weighting: _blocks.Weighting,
    counts: bool,
    inplace: bool,
) -> Tuple[_blocks.PairTerms, Optional[torch.Tensor]]:
    """:func:`_blocks.negative_terms` through ``torch.compile`` (inductor: C++ on the CPU,
    Triton on a GPU): its passes over the block fused into one.

    Compiled once per process (:func:`_compiled`). The hyper-parameters enter as 0-d
    tensors and no mining as mining against ``-inf`` (which drops nothing), and the pairs
    are always counted in the anchor-major pass (free there), so the graphs depend on the
    weighting, dtype and layout (and, reference-major, on counting) alone, not on
    ``alpha``/``beta``/``epsilon``: no recompilation per loss of an ablation grid.

    A reference-major block (:meth:`_Problem.product`) goes in as its contiguous ``(M, B)``
    storage through :func:`_blocks.negative_values` (``anchor_dim=1``: mining and
    exponentials, one pass), its per-anchor sums and counts by ATen: inductor's CPU code
    for reductions across the anchors' order in that storage is several times slower than
    the fused pass (measured, 256 x 16,384: 30 ms against 6 ms), while the elementwise
    pass and ATen's sums together match the anchor-major fused pass and the
    reference-major product saves ~25% of the forward product.
    """
    if not Vn.numel():  # the one-pass positives' block has no negatives: no graph for size 0
        return _blocks.negative_terms(Vn, side, ref, min_pos, epsilon, weighting, counts, inplace)

    def scalar(v: _blocks.Threshold) -> torch.Tensor:
        return torch.tensor(v, dtype=Vn.dtype, device=Vn.device)

    if epsilon is None:
        min_pos, epsilon = torch.full_like(min_pos, -float("inf")), 0.0
    side = _blocks.Side(scalar(side.coef), side.lam)
    if _reference_major(Vn):
        # the contiguous (M, B) storage, elementwise only: inductor's CPU code for sums across
        # that order is slower than the product's layout saves; ATen's sums over it are not
        fn = _compiled("negative values", _blocks.negative_values)
        R, summands, kept = fn(Vn.T, side, ref, min_pos, scalar(epsilon), weighting, counts, inplace, 1)
        num = None if kept is None else kept.sum(0)
        return _blocks.PairTerms(R.T, summands.sum(0)), num
    fn = _compiled("negatives", _blocks.negative_terms)
    terms, num = fn(Vn, side, ref, min_pos, scalar(epsilon), weighting, True, inplace)
    return terms, num if counts else None


def _one_pass(
    problem: _Problem, cfg: _Config, side_pair: _blocks.SidePair, buffer: Optional[torch.Tensor]
) -> Tuple[_blocks.Hardest, _blocks.SidePair, _Sums, List[_Swept], _Kept]:
    """Steps 1 and 2 in one pass over the blocks, for plans that recompute blocks.

    The positive pairs come first, from row dot products (a handful per anchor): they give
    each anchor's hardest positive, so every block's negatives can be mined as soon as the
    block is computed. The negatives' log-sum-exp is accumulated against a running level
    (the largest unmined negative so far), the sum rescaled whenever the level rises (as
    memory-efficient attention does); the last level is the hardest negative, so the final
    reference is reached by one more rescaling. The positives are mined and summed last,
    against the hardest negative. Each recomputed block costs one matrix product in the
    forward instead of two.

    Returns the hardest pairs, both sides' shifts, the sums, the kept blocks and the
    positives' terms (``_Kept(pa, pj, Rp, (B, 0))``).
    """
    w, side_n = cfg.weighting, side_pair.neg
    B = problem.x.shape[0]
    block_elements = B * cfg.cols
    positives = problem.positives(block_elements)
    min_pos = _blocks.hardest(positives).min_pos
    minus_inf = torch.full((B,), -float("inf"), dtype=problem.x.dtype, device=problem.x.device)
    level, acc, ref = minus_inf, None, side_n.lam
    count_n = r_sum_n = None
    kept: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (Rn, the block's reference level)
    for k, c0 in enumerate(problem.starts(cfg.cols)):
        keep = k < cfg.keep
        Vn = problem.block(c0, cfg.cols, out=None if keep else buffer, dense=cfg.dense, positives=False).Vn
        new_level = torch.maximum(level, Vn.amax(1))  # this block's largest (unmined) negative
        if w.log_sum_exp:  # the sums follow the level ("self" stays against the threshold)
            new_ref = torch.where(new_level > -float("inf"), new_level, 0.0)
            if acc is not None:  # sum exp(c (V - a)) = sum exp(c (V - b)) * exp(c (a - b)), a <= b
                acc = acc * torch.exp(
                    torch.where(level > -float("inf"), side_n.coef * (ref - new_ref), -float("inf"))
                )
            ref = new_ref
        level = new_level
        terms, num = _negative_terms(cfg, Vn, side_n, ref, min_pos, counts=cfg.counts)
        acc = terms.acc if acc is None else acc + terms.acc
        if num is not None:
            count_n = num if count_n is None else count_n + num
        if not w.log_sum_exp:
            part = terms.R.sum(1)
            r_sum_n = part if r_sum_n is None else r_sum_n + part
        if keep:
            kept.append((terms.R, ref))
    assert acc is not None, "no references"
    hard = _blocks.Hardest(min_pos, level)
    shifts = _blocks.side_shifts(side_pair, hard, cfg.epsilon, w)
    kept_neg = _blocks.kept_sides(hard, cfg.epsilon).neg

    def to_final(level_ref: torch.Tensor) -> torch.Tensor:
        """``exp(coef * (level - ref))`` to the final reference; 0 where the side keeps nothing."""
        gap = torch.where(kept_neg, side_n.coef * (level_ref - shifts.neg.ref), -float("inf"))
        return torch.exp(gap)

    if w.log_sum_exp:
        acc = acc * to_final(ref)
        swept = [_Swept(R, to_final(r)) for R, r in kept]
    else:  # "self": every block already against the threshold
        swept = [_Swept(R, torch.ones_like(r)) for R, r in kept]
    bt = _block_terms(cfg, positives, side_pair, shifts, hard, counts=cfg.counts)
    pos_r = bt.terms.pos
    counts = None if bt.counts is None else _blocks.SidePair(bt.counts.pos, count_n)
    r_sum = None if w.log_sum_exp else _blocks.SidePair(positives.row_sum(pos_r.R), r_sum_n)
    sums = _Sums(_blocks.SidePair(pos_r.acc, acc), counts, r_sum)
    return hard, shifts, sums, swept, _Kept(bt.block.pa, bt.block.pj, pos_r.R, positives.Vn)


def _finish(
    cfg: _Config, side_pair: _blocks.SidePair, shifts: _blocks.SidePair, sums: _Sums
) -> Tuple[_blocks.SidePair, _blocks.SidePair]:
    """Step 3: per-side :class:`_blocks.SideLoss` and weight sums."""
    w = cfg.weighting
    side_losses = _blocks.SidePair(
        *(_blocks.side_finish(a, sh, s.coef, w) for a, sh, s in zip(sums.acc, shifts, side_pair))
    )
    r_sums = sums.r_sum or _blocks.SidePair(None, None)
    wsums = _blocks.SidePair(
        *(_blocks.weight_sum(a, r, sl.scale, w) for a, r, sl in zip(sums.acc, r_sums, side_losses))
    )
    return side_losses, wsums


class _State(NamedTuple):
    """What the backward needs per anchor, each ``(2, B)`` (rows: positive, negative side) in the
    signed convention of :func:`_blocks.signed_terms`; one ``(8, B)`` tensor saved for the backward."""

    hard: torch.Tensor  # (-min_pos, max_neg)
    scale: torch.Tensor  # of the pair weights
    ref: torch.Tensor  # (-ref_p, ref_n): the shifts' reference levels
    shift: torch.Tensor

    def pack(self) -> torch.Tensor:
        """The ``(8, B)`` tensor saved for the backward (a new tensor)."""
        return torch.cat(self)

    @staticmethod
    def of_sides(hard: _blocks.Hardest, losses: _blocks.SidePair, shifts: _blocks.SidePair) -> "_State":
        """The state of the per-side passes."""
        sp, sn = shifts

        def pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.stack((a, b))

        return _State(
            pair(-hard.min_pos, hard.max_neg),
            pair(losses.pos.scale, losses.neg.scale),
            pair(-sp.ref, sn.ref),
            pair(sp.shift, sn.shift),
        )

    @staticmethod
    def unpack(packed: torch.Tensor) -> "_State":
        return _State(*packed.view(4, 2, -1).unbind(0))

    def hardest(self) -> _blocks.Hardest:
        return _blocks.Hardest(-self.hard[0], self.hard[1])

    def shifts(self) -> _blocks.SidePair:
        return _blocks.SidePair(
            _blocks.Shift(-self.ref[0], self.shift[0]), _blocks.Shift(self.ref[1], self.shift[1])
        )


def _stacked_block(
    problem: _Problem, cfg: _Config, lam_pos: torch.Tensor, lam_neg: torch.Tensor
) -> Tuple[_blocks.SignedTerms, torch.Tensor]:
    """The whole problem as one dense block with both sides stacked (:func:`_blocks.signed_terms`):
    the small-batch path, the same pairs and exponents as the per-side passes in half the
    operator calls. Returns the terms and the similarity block ``S`` (left intact)."""
    S = problem.scale_columns_(problem.product(problem.y), 0)
    if cfg.own_diagonal:  # each anchor's own copy is its column: dropped from both sides
        U = _blocks.signed_block(S, problem.labels, problem.ref_labels, None)
        U.diagonal(dim1=1, dim2=2).fill_(-float("inf"))
    else:
        U = _blocks.signed_block(S, problem.labels, problem.ref_labels, problem.self_index)
    side = _blocks.signed_sides(cfg.alpha, cfg.beta, lam_pos, lam_neg)
    return _blocks.signed_terms(U, side, cfg.epsilon, cfg.weighting, counts=cfg.counts, inplace=True), S


def _autocast_off(device_type: str) -> ContextManager[Any]:
    """``torch.autocast(device_type, enabled=False)`` where autocast is on, else a null context
    (entering autocast's context costs ~7 us, twice a step)."""
    try:
        on = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no per-device query
        on = True
    return torch.autocast(device_type, enabled=False) if on else contextlib.nullcontext()


def _fused_forward(
    x: torch.Tensor,
    y: Optional[torch.Tensor],
    lam_pos: torch.Tensor,
    lam_neg: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor,
    self_index: torch.Tensor,
    cfg: _Config,
    ref_scale: Optional[torch.Tensor],
    x_unit: Optional[torch.Tensor],
    x_norm: Optional[torch.Tensor],
) -> Tuple[Tuple[torch.Tensor, ...], Tuple[torch.Tensor, ...]]:
    """The forward of :class:`_FusedMS` (its inputs): ``(outputs, kept)``, the outputs (the
    per-anchor losses; with ``cfg.counts`` also the pair counts ``(2, B)`` and the weight sums
    ``(2, B)``) and what the backward keeps: the packed :class:`_State` ``(8, B)`` (stacked:
    the weights' scales ``(2, B)``) and the kept blocks' tensors (see :func:`_remember`)."""
    if x_unit is not None:  # x is raw, x_unit its normalised rows (see unit_rows)
        x = x_unit
    refs = x if y is None else y
    problem = _Problem(x, refs, labels, ref_labels, self_index, ref_scale, cfg.transposed)
    # few outputs (autograd's bookkeeping costs ~8 us per output): per-anchor values stacked
    # per side, the backward's state packed in one (8, B) tensor (a new tensor: a threshold
    # input may be a side's reference level, and the setup_context form returns it as an
    # output, which an input cannot be)
    with _autocast_off(x.device.type):
        if cfg.stacked:
            t, S = _stacked_block(problem, cfg, lam_pos, lam_neg)
            # the backward needs the weights' scales and R; S for the anchors' normalisation
            kept_stacked = (t.loss.scale, t.R, S) if x_norm is not None else (t.loss.scale, t.R)
            if t.counts is None:
                return (t.loss.loss.sum(0),), kept_stacked
            wsums = _blocks.signed_weight_sums(t, cfg.weighting)
            return (t.loss.loss.sum(0), t.counts, wsums), kept_stacked
        buffer = _working_buffer(problem, cfg)  # shared by the passes
        side_pair = _blocks.sides(cfg.alpha, cfg.beta, lam_pos, lam_neg)
        kept_out: Tuple[torch.Tensor, ...]
        if cfg.one_pass:
            hard, shifts, sums, swept, positives = _one_pass(problem, cfg, side_pair, buffer)
            kept_out = (*positives.tensors()[:3], *(t for k in swept for t in k))  # pa, pj, Rp
        else:
            hard, blocks = _hardest_pass(problem, cfg, buffer)
            shifts = _blocks.side_shifts(side_pair, hard, cfg.epsilon, cfg.weighting)
            sums, kept = _accumulate(problem, cfg, side_pair, shifts, hard, blocks, buffer)
            kept_out = tuple(t for k in kept for t in k.tensors())
        side_losses, wsums_ = _finish(cfg, side_pair, shifts, sums)
    losses = side_losses.pos.loss + side_losses.neg.loss
    state = _State.of_sides(hard, side_losses, shifts).pack()
    if sums.counts is None:
        return (losses,), (state, *kept_out)
    return (losses, torch.stack(sums.counts), torch.stack(wsums_)), (state, *kept_out)


def _remember(ctx: Any, inputs: Tuple[Any, ...], kept: Tuple[torch.Tensor, ...]) -> None:
    """The bookkeeping of :class:`_FusedMS` between its forward and backward: ``inputs`` as
    the Function got them, ``kept`` as :func:`_fused_forward` returned it.
    Saves the inputs, the packed state and the small kept blocks with ``save_for_backward``;
    holds the large kept blocks on ``ctx`` (see the class doc). The caller marks its
    non-differentiable outputs."""
    x, y, lam_pos, lam_neg, labels, ref_labels, self_index, cfg, ref_scale, x_unit, x_norm = inputs
    ctx.cfg = cfg
    ctx.same_refs = y is None  # the anchors are the references (in-batch)
    ctx.has_ref_scale = ref_scale is not None
    # the backward works on the unit rows, then maps dx to the raw rows (saved only when dx
    # is wanted: the caller may change anchors that need no gradient before the backward)
    ctx.normalized = x_unit is not None and ctx.needs_input_grad[0]
    extra = (ref_scale,) if ref_scale is not None else ()
    if ctx.normalized:
        extra += (x, x_norm)
    if x_unit is not None:
        x = x_unit
    flat = kept[1:]
    # dense kept blocks (small) are saved, and left intact by the backward; listed ones
    # (large) are held on ctx and become the gradient blocks in place (see the class doc);
    # one-pass: the positives' (pa, pj, Rp) are saved, the kept blocks held on ctx
    saved_kept = flat[:3] if cfg.one_pass else flat if cfg.dense else ()
    if cfg.one_pass:
        flat = flat[3:]
    ctx.save_for_backward(
        x, y, lam_pos, lam_neg, labels, ref_labels, self_index, kept[0], *extra, *saved_kept
    )
    if cfg.one_pass:
        ctx.kept = [_Swept(*flat[i : i + 2]) for i in range(0, len(flat), 2)]
    else:
        ctx.kept = [] if cfg.dense else _Kept.split(flat, cfg.kept_outputs)
    ctx.set_materialize_grads(False)  # no zero gradients the size of the kept blocks


class _FusedMS(torch.autograd.Function):
    """The fused MS loss as one autograd node.

    Inputs: ``x`` ``(B, D)``, ``y`` ``(M, D)`` or ``None`` (the anchors themselves:
    in-batch), ``lam_pos``/``lam_neg`` ``(B,)`` (differentiable), labels, reference
    labels, self indices, a :class:`_Config`, the optional column scale of raw
    references and, optionally, ``x``'s unit rows and norms (:class:`UnitRows`; ``x``
    is then raw, the math runs on the unit rows, and the backward maps the gradient
    back through the normalisation).

    Outputs (few: autograd's bookkeeping costs ~8 us per output): the per-anchor
    losses ``(B,)`` (differentiable) and, with ``cfg.counts`` (the stats), non-differentiable:
    the pair counts and weight sums ``(2, B)`` (rows: positive, negative side). What the backward needs
    (:func:`_fused_forward`'s ``kept``) is saved by the forward itself: the packed
    :class:`_State` ``(8, B)`` (stacked: the weights' scales ``(2, B)``, all its
    backward needs beside ``R``) and the kept blocks' tensors
    (:attr:`_Config.kept_outputs` per block: ``R`` of both sides when stacked,
    ``(Rp, Rn)`` dense, ``(pa, pj, Rp, Rn)`` listed; one-pass: the positives'
    ``(pa, pj, Rp)``, then ``(Rn, factor)`` per kept block).

    Bookkeeping (:func:`_remember`): the inputs, the state and the small kept blocks
    are saved with ``save_for_backward``. Kept blocks in the listed layout (large) are
    held on ``ctx.kept`` (not saved: the backward builds each gradient block in
    ``Rn``'s storage, which autograd's version check would refuse) and are consumed by
    the first backward; a second backward (``retain_graph``) recomputes them. Kept
    blocks in the dense layout (small) are saved and left intact (the gradient block is
    a new tensor), so that nothing but saved tensors crosses from forward to backward
    there: what ``torch.compile`` needs to trace the small-batch path as one graph.

    The forward takes ``ctx`` (measured: ~25 us a call less than ``setup_context``, whose
    ``apply`` binds the arguments to the signature and calls back into Python once more);
    :class:`_FusedMSTransformable` is the same node for ``torch.func`` transforms, which
    accept ``setup_context`` alone (see :func:`_apply_fused`).
    """

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> Tuple[torch.Tensor, ...]:
        outputs, kept = _fused_forward(*inputs)
        _remember(ctx, inputs, kept)
        ctx.mark_non_differentiable(*outputs[1:])  # the stats
        return outputs

    @staticmethod
    def backward(ctx: Any, g: Optional[torch.Tensor], *_: Any) -> Tuple[Optional[torch.Tensor], ...]:
        saved = ctx.saved_tensors
        if g is None:  # the losses were not used: nothing flows back
            return (None,) * 11
        x, y, lam_pos, lam_neg, labels, ref_labels, self_index = saved[:7]
        same = ctx.same_refs
        y = x if same else y
        extra = saved[8 : 8 + ctx.has_ref_scale + 2 * ctx.normalized]
        ref_scale = extra[0] if ctx.has_ref_scale else None
        x_raw, x_norm = extra[-2:] if ctx.normalized else (None, None)  # raw anchors, their norms
        cfg = ctx.cfg
        kept_saved = saved[8 + len(extra) :]
        problem = _Problem(x, y, labels, ref_labels, self_index, ref_scale, cfg.transposed)
        needs = ctx.needs_input_grad[:4]
        if needs[1] and ref_scale is not None:
            raise RuntimeError("references normalised inside the kernel cannot receive gradients")
        if torch.is_grad_enabled():  # create_graph=True: a differentiable recomputation
            grads = _differentiable_grads(problem, cfg, lam_pos, lam_neg, g, needs, same, x_raw)
            return (*grads, *(None,) * 7)
        if cfg.stacked:  # one saved block, both sides in it; saved[7]: the weights' scales
            with _autocast_off(x.device.type):
                a = _blocks.cast(g, x.dtype) * saved[7]
                return _stacked_grads(problem, kept_saved, a, needs, same, x_norm)
        state = _State.unpack(saved[7])
        scale_p, scale_n = state.scale
        kept: List[Any]  # of _Kept, or of _Swept (one-pass)
        if cfg.dense and not cfg.one_pass:  # saved, not to be overwritten
            kept = list(_Kept.split(kept_saved, cfg.kept_outputs))  # List[Any] for mypy
        else:
            kept = ctx.kept
            ctx.kept = []  # consumed: a second backward (retain_graph) recomputes the blocks
        with _autocast_off(x.device.type):
            g = _blocks.cast(g, x.dtype)
            n_blocks = len(problem.starts(cfg.cols))
            if cfg.one_pass or len(kept) < n_blocks:  # what recomputing a block (below) needs
                hard, shifts = state.hardest(), state.shifts()
                min_pos = hard.min_pos
                side_pair = _blocks.sides(cfg.alpha, cfg.beta, lam_pos, lam_neg)
            a_pos, a_neg = g * scale_p, g * scale_n  # w = R * scale, times the upstream grad
            dx: Optional[torch.Tensor] = None  # the first block's product, then accumulated
            # anchors as references, one block: dL/dx = (G + G^T) x, one product instead of two
            fold = same and n_blocks == 1 and not cfg.one_pass
            ref_grads = (needs[1] or same and needs[0]) and not fold
            dy = torch.empty_like(y) if ref_grads else None  # every row is one block's product
            sum_rp = torch.zeros_like(g) if needs[2] else None
            sum_rn = torch.zeros_like(g) if needs[3] else None
            buffer = problem.new_block(cfg.cols) if len(kept) < n_blocks else None
            for k, c0 in enumerate(problem.starts(cfg.cols)):
                in_place = k >= len(kept) or not cfg.dense or cfg.one_pass  # a saved block stays intact
                a_row, blk = a_neg, None  # blk: the block's positives (the two-pass forward)
                if cfg.one_pass:  # the block's negatives; its positives are in the saved list
                    if k < len(kept):
                        Rn, factor = kept[k]  # a _Swept
                        a_row = a_neg * factor
                    else:
                        Vn = problem.block(c0, cfg.cols, out=buffer, dense=cfg.dense, positives=False).Vn
                        Rn = _negative_terms(cfg, Vn, side_pair.neg, shifts.neg.ref, min_pos)[0].R
                        factor = None
                    if sum_rn is not None:
                        sum_rn += Rn.sum(1) if factor is None else Rn.sum(1) * factor
                else:
                    if k < len(kept):
                        terms = kept[k]
                    else:
                        b = problem.block(c0, cfg.cols, out=buffer, dense=cfg.dense)
                        bt = _block_terms(cfg, b, side_pair, shifts, hard)
                        terms = _Kept(bt.block.pa, bt.block.pj, bt.terms.pos.R, bt.terms.neg.R)
                    blk, Rp, Rn = terms.block(), terms.Rp, terms.Rn
                    if sum_rp is not None:
                        sum_rp += blk.row_sum(Rp)
                    if sum_rn is not None:
                        sum_rn += Rn.sum(1)
                # dL/dS = w_neg - w_pos; the positives are 0 in Rn, and Rp (dense) off them;
                # d(S * ref_scale)/dS: the columns scaled
                c1 = c0 + Rn.shape[1]
                cols = None if ref_scale is None else ref_scale[c0:c1]
                G = cfg.gradient_block()(Rn, a_row, cols, in_place)
                if blk is not None and blk.pa is None and cols is None:  # dense: G -= Rp * a_pos
                    G.addcmul_(Rp, a_pos[:, None], value=-1.0)
                elif blk is not None:
                    w_pos = -Rp * blk.per_pair(a_pos)
                    if cols is not None:
                        w_pos = w_pos * (cols if blk.pj is None else cols[blk.pj])
                    if blk.pa is None:
                        G.add_(w_pos)
                    else:
                        G.index_put_((blk.pa, blk.pj), w_pos, accumulate=True)
                W = _weights_operand(G, x.shape[1]) if needs[0] or dy is not None else G
                if fold and needs[0]:
                    dx = (G + G.T) @ x if W is G else (W @ x).add_(W.t() @ x)
                elif needs[0]:
                    dx = W @ y[c0:c1] if dx is None else dx.addmm_(W, y[c0:c1])
                if dy is not None:
                    torch.matmul(W.t(), x, out=dy[c0:c1])
            if cfg.one_pass:  # the positives, pair by pair: dL/dS = -w_pos
                pa, pj, Rp = kept_saved[:3]
                if sum_rp is not None:
                    sum_rp += torch.zeros_like(g).index_add_(0, pa, Rp)
                problem.positive_grads_(dx, dy, pa, pj, -Rp * a_pos[pa], x.shape[0] * cfg.cols)
            if same and dx is not None and dy is not None:  # the references' part is the anchors'
                dx, dy = dx.add_(dy), None
            if x_norm is not None and dx is not None:  # through the rows' normalisation
                dx = unit_rows_backward(dx, x, x_norm)
        d_lp = None if sum_rp is None else a_pos * sum_rp  # dL/dlam_pos = +sum w_pos
        d_ln = None if sum_rn is None else -a_neg * sum_rn  # dL/dlam_neg = -sum w_neg
        return dx, dy, d_lp, d_ln, None, None, None, None, None, None, None


def _stacked_grads(
    problem: _Problem,
    kept: Tuple[torch.Tensor, ...],
    a: torch.Tensor,
    needs: Tuple[bool, ...],
    same: bool,
    x_norm: Optional[torch.Tensor],
) -> Tuple[Optional[torch.Tensor], ...]:
    """:meth:`_FusedMS.backward` of a stacked problem (:func:`_stacked_block`): ``kept`` its
    ``(2, B, M)`` pair terms ``R`` (and, with ``x_norm``, the similarity block ``S``), ``a``
    ``(2, B)`` the upstream gradient times the weight scales (``w = R * scale``).
    ``dL/dS = w_neg - w_pos``; in-batch one product, ``(G + G^T) x``.

    Through the anchors' normalisation (``x_norm``: ``problem.x`` holds the unit rows ``u``):
    ``dL/dx = (g - u (u . g)) / |x|`` for ``g = G_x Y`` (:func:`unit_rows_backward`), computed on
    the small block instead of the ``(B, D)`` rows: ``u_i . g_i = sum_j G_x[i, j] S[i, j]`` (``S``
    holds ``u_i . y_j`` with the columns' scale, ``G_x`` is ``G`` before it), and the division
    by ``|x_i|`` scales ``G_x``'s rows before the product: ``(G_x / |x|) Y - u (u . g) / |x|``.
    Three ``(B, D)`` passes fewer (at B=128, D=512: 16,384 values a pass instead of 65,536)."""
    x, y = problem.x, problem.y
    R_pos, R_neg = kept[0].unbind(0)
    a_pos, a_neg = a[..., None].unbind(0)
    w_pos, w_neg = R_pos * a_pos, R_neg * a_neg  # the pair weights times the upstream gradient
    d_lp = d_ln = None
    if needs[2] or needs[3]:  # dL/dlam_pos = +sum w_pos, dL/dlam_neg = -sum w_neg
        d_lp, d_ln = w_pos.sum(-1), w_neg.sum(-1).neg_()
    G = w_neg.sub_(w_pos)  # (two products and a difference: cheaper than a stacked product and sum)
    Gx = G + G.T if same and needs[0] else G  # dL/du = Gx @ (x if same else y), columns scaled
    rows = None  # with the normalisation: the scale of Gx's rows and u's coefficients
    if needs[0] and x_norm is not None:
        S = kept[1]
        clamped = x_norm.clamp_min(NORM_EPS)
        dot = (Gx * S).sum(1, keepdim=True).mul_(_unclamped(x_norm))  # u . g (the clamp's rows: 0)
        rows = (clamped, dot.div_(clamped))
    if problem.ref_scale is not None:  # d(S * ref_scale)/dS: the columns scaled (never in-batch)
        G.mul_(problem.ref_scale)
    dx = dy = None
    if needs[0]:
        Gu = Gx if rows is None else Gx / rows[0]
        dx = Gu @ (x if same else y)
        if rows is not None:
            dx.addcmul_(x, rows[1], value=-1.0)
    if needs[1] and not same:
        dy = G.T @ x
    return dx, dy, d_lp if needs[2] else None, d_ln if needs[3] else None, *(None,) * 7


class _FusedMSTransformable(_FusedMS):
    """:class:`_FusedMS` with ``setup_context``, for ``torch.func`` transforms (``grad``): the
    forward returns what the backward keeps as extra (non-differentiable) outputs."""

    @staticmethod
    def forward(*inputs: Any) -> Tuple[torch.Tensor, ...]:
        outputs, kept = _fused_forward(*inputs)
        return (*outputs, *kept)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[torch.Tensor, ...]) -> None:
        _remember(ctx, inputs, output[_num_outputs(inputs[7]) :])
        ctx.mark_non_differentiable(*output[1:])  # the stats and what the backward keeps


def _num_outputs(cfg: _Config) -> int:
    """How many outputs :class:`_FusedMS` has: the losses, and the counts and weight sums
    where the stats are wanted."""
    return 3 if cfg.counts else 1


def _apply_fused(*inputs: Any) -> Tuple[torch.Tensor, ...]:
    """:class:`_FusedMS` of ``inputs``: its outputs. Under a ``torch.func`` transform,
    whose ``apply`` refuses a forward that takes ``ctx`` (before running anything),
    :class:`_FusedMSTransformable` instead."""
    try:
        return _FusedMS.apply(*inputs)
    except RuntimeError as error:
        if "setup_context" not in str(error):
            raise
    return _FusedMSTransformable.apply(*inputs)[: _num_outputs(inputs[7])]


def _differentiable_grads(
    problem: _Problem,
    cfg: _Config,
    lam_pos: torch.Tensor,
    lam_neg: torch.Tensor,
    g: torch.Tensor,
    needs: Tuple[bool, ...],
    same_refs: bool = False,
    x_raw: Optional[torch.Tensor] = None,
) -> List[Optional[torch.Tensor]]:
    """The input gradients from the dense differentiable path, with ``create_graph``.

    Each input enters through its own view, so that ``lam_pos is lam_neg`` still gives
    each argument its own partial derivative; ``same_refs``: the anchors are the
    references (``y`` was passed as ``None``), one leaf for both; ``x_raw``: the anchors
    before their normalisation (``problem.x`` holds the unit rows), the leaf then.
    """
    first = problem.x if x_raw is None else x_raw
    leaves = [t.view_as(t) for t in (first, problem.y, lam_pos, lam_neg)]
    if same_refs:
        leaves[1] = leaves[0]
    x = leaves[0] if x_raw is None else torch.nn.functional.normalize(leaves[0], dim=1, eps=NORM_EPS)
    y = x if same_refs else leaves[1]
    lp, ln = leaves[2:]
    S = problem._replace(x=x, y=y).dense_similarities()
    pos, neg = _blocks.pair_masks(problem.labels, problem.ref_labels, problem.self_index)
    params = _blocks.MSParams(cfg.alpha, cfg.beta, lp, ln, cfg.weighting.name, cfg.epsilon)
    losses = _blocks.dense_terms(S, pos, neg, params).losses
    wanted = [t for t, n in zip(leaves, needs) if n]
    grads = iter(torch.autograd.grad(losses, wanted, g, create_graph=True, allow_unused=True))
    out = []
    for t, n in zip(leaves, needs):
        grad = next(grads) if n else None
        out.append(torch.zeros_like(t) if n and grad is None else grad)
    return out


NORM_EPS = 1e-12  # torch.nn.functional.normalize's eps, with which PML's distances normalise


class UnitRows(NamedTuple):
    """Rows scaled to unit 2-norm and their norms: ``unit`` ``(B, D)``, ``norm`` ``(B, 1)``."""

    unit: torch.Tensor
    norm: torch.Tensor


def unit_rows(x: torch.Tensor) -> UnitRows:
    """``x / max(|x_i|_2, 1e-12)`` with the norms: the values of
    ``torch.nn.functional.normalize(x, dim=1)`` (the same operations), without autograd
    (of ``x.detach()``: cheaper than a ``no_grad`` context)."""
    x = x.detach()
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return UnitRows(x / norm.clamp_min(NORM_EPS), norm)


def _unclamped(norm: torch.Tensor) -> torch.Tensor:
    """1.0 where ``norm >= eps`` (the clamp of :func:`unit_rows` passes its input), else 0.0, in
    ``norm``'s dtype: the comparison written as a float (a boolean factor costs a conversion)."""
    return torch.ge(norm, _blocks.number(NORM_EPS, norm), out=torch.empty_like(norm))


def unit_rows_backward(g: torch.Tensor, unit: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``dL/dx`` from ``g = dL/du`` for ``u = x / max(|x|, eps)`` (in place on ``g``):
    ``(g - u (u . g)) / |x|`` where ``|x| >= eps`` (the clamp passes its input there), else
    ``g / eps``: autograd's three nodes of ``normalize`` in one expression."""
    dot = (unit * g).sum(1, keepdim=True).mul_(_unclamped(norm))
    return g.addcmul_(unit, dot, value=-1.0).div_(norm.clamp_min(NORM_EPS))


def _inverse_norms(y: torch.Tensor, p: Optional[float]) -> Optional[torch.Tensor]:
    """``1 / max(|y_j|_p, 1e-12)``, as ``torch.nn.functional.normalize`` divides."""
    if p is None:
        return None
    with torch.no_grad():
        return y.norm(p=p, dim=1).clamp_min(NORM_EPS).reciprocal_()


def ms_terms_fused(
    x: torch.Tensor,
    y: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor,
    self_index: torch.Tensor,
    lam_pos: torch.Tensor,
    lam_neg: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    weighting: str = "ms",
    epsilon: Optional[float] = None,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    counts: bool = True,
    ref_norm_p: Optional[float] = None,
    compile_blocks: bool = False,
    anchor_units: Optional[UnitRows] = None,
    own_diagonal: bool = False,
) -> _blocks.MSTerms:
    """:func:`_blocks.dense_terms` for ``S = x @ y.T`` without storing ``(B, M)`` blocks.

    ``x``: ``(B, D)`` anchors, ``y``: ``(M, D)`` references (already normalised
    if the similarity is cosine; ``y is x``: in-batch, the gradient of both roles
    formed at once); ``self_index``: ``(B,)`` column of each
    anchor's own copy in ``y`` (``-1``: none); ``lam_pos``/``lam_neg``: ``(B,)``
    thresholds (may require grad). The sums run in float32 or wider.
    ``counts=False`` skips counting pairs and returns no weight sums (``num_pos`` and
    ``num_neg`` are then one tensor of zeros, ``pos_weight_sum`` and ``neg_weight_sum``
    another: read-only).
    ``chunk_size`` / ``memory_budget``: see :func:`plan_blocks`.
    ``ref_norm_p``: if set, ``y`` is raw and is p-normalised implicitly: the
    similarity block's columns are scaled by ``1 / |y_j|`` (no ``(M, D)``
    normalised copy; ``y`` must not require grad).
    ``compile_blocks``: the negatives of blocks over :data:`DENSE_ELEMENTS` similarities
    through ``torch.compile`` (see :func:`_compiled_negative_terms`).
    ``anchor_units``: if set, ``x`` is raw and ``anchor_units`` is :func:`unit_rows` of it
    (of ``x.to`` the compute dtype): the similarities are those of the unit rows (and of
    the references too when ``y is x``), and the backward maps the gradient through the
    normalisation in closed form (:func:`unit_rows_backward`) instead of autograd's nodes.
    ``own_diagonal``: the caller vouches that ``y is x`` and ``self_index`` is ``arange(B)``
    (each anchor's own copy is its own column, whatever the reference labels): the small-batch
    path then drops the diagonal from both sides instead of comparing every column with
    ``self_index``.
    """
    w = _blocks.get_weighting(weighting)
    dtype = _blocks.compute_dtype(x.dtype)
    # in-batch: the anchors are the references (references normalised in the kernel are not
    # differentiable, so they never take this path)
    same_refs = y is x and ref_norm_p is None
    x = _blocks.cast(x, dtype)
    y = x if same_refs else _blocks.cast(y, dtype)
    B = x.shape[0]
    if B == 0 or y.shape[0] == 0:  # no pairs: zero losses that still backpropagate
        zero = x.sum(1) * 0 + y.sum() * 0
        none = torch.zeros(B, dtype=torch.long, device=x.device)
        return _blocks.MSTerms(zero, none, none, zero.detach(), zero.detach())
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    plan = plan_blocks(B, y.shape[0], x.element_size(), chunk_size, budget)
    cfg = _Config(
        float(alpha),
        float(beta),
        epsilon,
        w,
        plan.cols,
        plan.keep,
        counts,
        plan.dense,
        plan.one_pass,
        compile_blocks,
        plan.stacked,
        transposed=REFERENCE_MAJOR
        and x.device.type == "cpu"  # measured there; GPU libraries pick layouts themselves
        and not same_refs
        and not plan.dense,
        own_diagonal=own_diagonal and same_refs,
    )
    ref_scale = _inverse_norms(y, ref_norm_p)
    refs = None if same_refs else y  # None: the anchors themselves (one gradient product, see backward)
    x, lp, ln, labels, ref_labels, self_index = _distinct(
        x, _blocks.cast(lam_pos, dtype), _blocks.cast(lam_neg, dtype), labels, ref_labels, self_index
    )
    x_unit, x_norm = (None, None) if anchor_units is None else anchor_units
    out = _apply_fused(x, refs, lp, ln, labels, ref_labels, self_index, cfg, ref_scale, x_unit, x_norm)
    if not counts:
        none, zero = _blocks.full(B, 0, torch.long, x), _blocks.full(B, 0, out[0].dtype, x)
        return _blocks.MSTerms(out[0], none, none, zero, zero)
    losses, num, wsums = out  # num: (2, B) pair counts, wsums: (2, B) weight sums
    return _blocks.MSTerms(losses, *num.unbind(0), *wsums.unbind(0))


def _distinct(*tensors: torch.Tensor) -> List[torch.Tensor]:
    """The tensors, a repeated one (in-batch ``ref_labels is labels``, one threshold tensor
    for both sides) as a view under ``torch.compile``, which requires each input
    of the autograd Function to be its own tensor (gradients reach the original through the
    view); eagerly the tensors as they are (a view costs an operator call and an autograd node)."""
    if not torch.compiler.is_compiling():  # eager autograd takes one tensor twice
        return list(tensors)
    seen: List[torch.Tensor] = []
    for t in tensors:
        seen.append(t.view_as(t) if any(t is s for s in seen) else t)
    return seen


@torch.no_grad()
def centre_sums(
    x: torch.Tensor,
    y: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor,
    self_index: torch.Tensor,
    *,
    chunk_size: Optional[int] = None,
    ref_norm_p: Optional[float] = None,
) -> _blocks.RowSums:
    """:func:`_blocks.block_row_sums` of ``x @ y.T``, block by block."""
    dtype = _blocks.compute_dtype(x.dtype)
    x, y = x.to(dtype), y.to(dtype)
    cols = chunk_columns(x.shape[0], chunk_size)
    problem = _Problem(x, y, labels, ref_labels, self_index, _inverse_norms(y, ref_norm_p))
    parts = [_blocks.block_row_sums(problem.block(c0, cols)) for c0 in problem.starts(cols)]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total
