"""Speed and peak memory of pml_ms_plus against PML, forward + backward, in one run.

    python benchmarks/bench_vs_pml.py [--device cuda] [--out benchmarks/results] [--tiny]

Cases (dimension 512, float32, 4 samples per class in each batch):
  * in-batch, batch 32 / 128 / 512 / 2048 / 4096 (and 2048 "clustered", see below):
    ``MSLoss(epsilon=0.1)`` against PML's ``MultiSimilarityMiner(0.1)`` + ``MultiSimilarityLoss()``;
  * cross-batch memory, batch 256, memory 4,096 / 16,384 / 65,536 (full):
    ours ``CrossBatchMemory(MSLoss(epsilon=0.1), 512, M)`` against PML's
    ``CrossBatchMemory(MultiSimilarityLoss(), 512, M, miner=MultiSimilarityMiner(0.1))``;
    ours alone at 262,144 and 1,048,576; and M=16,384 "clustered": the embeddings of each
    class around a centre (cosine ~0.3 within a class, 0 +- 0.044 across), so that the mining
    keeps ~1% of the negatives and ~40% of the positives, as with trained embeddings (random
    rows keep nearly all);
  * the floor of each case: the batch x reference matrix product and its backward alone,
    ``x @ y.T`` (anchor-major, as PML computes it); for the memory cases also the
    reference-major floor ``(y @ x.T).T``, the same product in the layout that is 15-35%
    faster on the CPU when the references far outnumber the anchors, and that our kernel
    uses there (``_kernel.REFERENCE_MAJOR``, eager and compiled);
  * every case also compiled (inductor): in-batch B=32 / 128, whose blocks are small (dense
    layout), as ``torch.compile(MSLoss(epsilon=0.1))`` (one graph; the finite check's host
    read after it, a second, small frame); the others, whose blocks are large, as ``MSLoss(epsilon=0.1, compile_blocks=True)``
    (and that inside the memory): the negatives' block math compiled once per process with
    dynamic shapes, so its compile time shows in the first such case only. The compile time
    is the first step's, from an empty inductor cache.

Time: the median of repeated steps after a warm-up (the small cases: ten more untimed
steps), the implementations interleaved step by step, in a new (seeded) order each round:
a step's time depends on what ran just before it (the allocator's and the caches' state;
measured, in-batch B=32: the same code, run twice per round in a fixed order beside PML and
the floor, 13% slower in one slot than in the other), so a fixed order favours one
implementation. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` above the allocation before the step; on the CPU each (case, implementation) runs
in its own subprocess and reports its peak resident set above the resident set
before the step (Linux ``VmHWM`` after resetting it via ``/proc/self/clear_refs``,
with freed heap pages handed back by ``malloc_trim`` first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch

DIM = 512
SAMPLES_PER_CLASS = 4
NUM_CLASSES_IN_MEMORY = 2000
CLUSTER_NOISE = 0.07  # per dimension: a noise of norm ~1.6 around a unit centre


def memory_case(memory: int, reps: int, note: str = "", **extra):
    """A cross-batch memory case of batch 256 (``extra``: ``clustered``, ``pml``)."""
    name = f"memory B=256 M={memory:,}{note}"
    return dict(name=name, kind="memory", batch=256, memory=memory, reps=reps, **extra)


def cases(tiny: bool):
    if tiny:
        return [
            dict(name="in-batch B=32", kind="batch", batch=32, reps=2),
            dict(name="memory B=16 M=256", kind="memory", batch=16, memory=256, reps=2),
            dict(
                name="memory B=16 M=1024 (ours only)", kind="memory", batch=16, memory=1024, reps=1, pml=False
            ),
        ]
    return [
        dict(name="in-batch B=32", kind="batch", batch=32, reps=1000, warm=20),
        dict(name="in-batch B=128", kind="batch", batch=128, reps=400, warm=20),
        dict(name="in-batch B=512", kind="batch", batch=512, reps=15),
        dict(name="in-batch B=2048", kind="batch", batch=2048, reps=5),
        dict(name="in-batch B=2048, clustered", kind="batch", batch=2048, reps=5, clustered=True),
        dict(name="in-batch B=4096", kind="batch", batch=4096, reps=3),
        memory_case(4096, 15),
        memory_case(16384, 9),
        memory_case(16384, 9, ", clustered", clustered=True),
        memory_case(65536, 5),
        memory_case(262144, 3, " (ours only)", pml=False),
        memory_case(1048576, 1, " (ours only)", pml=False),
    ]


# --------------------------------------------------------------------- set-ups
def make_step(case, impl, device):
    """A zero-argument callable running one forward + backward of ``impl``."""
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners

    from pml_ms_plus import _kernel, losses

    g = torch.Generator().manual_seed(0)
    B = case["batch"]
    dim = case.get("dim", DIM)
    n_classes = NUM_CLASSES_IN_MEMORY if case["kind"] == "memory" else max(1, B // SAMPLES_PER_CLASS)
    g_c = torch.Generator().manual_seed(1)
    centres = torch.nn.functional.normalize(torch.randn(n_classes, dim, generator=g_c), dim=1)

    def embeddings(rows, labels):
        """``rows`` random rows, or (``clustered``, like trained embeddings) each label's centre
        plus noise: cosine ~0.3 within a class, 0 +- 0.044 across, so the mining keeps ~1% of
        the negatives and ~40% of the positives (random rows: nearly all)."""
        if case.get("clustered"):
            return centres[labels] + CLUSTER_NOISE * torch.randn(len(labels), dim, generator=g_c)
        return rows

    x = torch.randn(B, dim, generator=g)
    y = torch.randperm(n_classes, generator=g)[: B // SAMPLES_PER_CLASS].repeat_interleave(SAMPLES_PER_CLASS)
    x = embeddings(x, y).to(device).requires_grad_(True)
    y = y.to(device)

    if case["kind"] == "batch":
        if impl == "pml":
            miner, loss = pml_miners.MultiSimilarityMiner(0.1), pml_losses.MultiSimilarityLoss()

            def run():
                loss(x, y, miner(x, y)).backward()
        elif impl in ("ours", "compiled"):
            small = B * B <= _kernel.DENSE_ELEMENTS  # dense small blocks: compile the whole loss
            ours = losses.MSLoss(epsilon=0.1, compile_blocks=impl == "compiled" and not small)
            if impl == "compiled" and small:
                ours = torch.compile(ours)

            def run():
                ours(x, y).backward()
        else:  # floor: S = x x^T and its backward
            grad = torch.randn(B, B, generator=g).to(device)

            def run():
                (x @ x.T).backward(grad)

        return run

    M = case["memory"]
    mem = torch.randn(M, dim, generator=g)
    mem_y = torch.randint(0, n_classes, (M,), generator=g)
    mem = torch.nn.functional.normalize(embeddings(mem, mem_y), dim=1).to(device)
    mem_y = mem_y.to(device)
    if impl in ("floor", "floor_rm"):
        grad = torch.randn(B, M, generator=g).to(device)

        def run():
            S = x @ mem.T if impl == "floor" else (mem @ x.T).T
            S.backward(grad)

        return run
    if impl == "pml":
        xbm = pml_losses.CrossBatchMemory(
            pml_losses.MultiSimilarityLoss(), dim, M, miner=pml_miners.MultiSimilarityMiner(0.1)
        ).to(device)
    else:
        inner = losses.MSLoss(epsilon=0.1, compile_blocks=impl == "compiled")
        xbm = losses.CrossBatchMemory(inner, dim, M).to(device)
    with torch.no_grad():  # a full memory: the steady state of training
        xbm.embedding_memory.copy_(mem)
        xbm.label_memory.copy_(mem_y)
    xbm.has_been_filled = True
    xbm.queue_idx = 0

    def run():
        xbm(x, y).backward()

    return run


# ------------------------------------------------------------------ measuring
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_case(case, device, impls):
    """Median ms per implementation, and the first (warm-up) step's seconds of each."""
    steps = {impl: make_step(case, impl, device) for impl in impls}
    first = {}
    for impl, run in steps.items():  # warm-up (for "compiled": the compilation)
        t0 = time.perf_counter()
        run()
        sync(device)
        first[impl] = time.perf_counter() - t0
    for _ in range(case.get("warm", 0)):  # a few more untimed steps where they are cheap
        for run in steps.values():
            run()
    times = {impl: [] for impl in impls}
    order = list(steps)
    shuffle = random.Random(0).shuffle  # a fixed seed: the same orders every run
    for _ in range(case["reps"]):
        shuffle(order)  # interleaved, in a new order each round (see the module doc)
        for impl in order:
            run = steps[impl]
            t0 = time.perf_counter()
            run()
            sync(device)
            times[impl].append((time.perf_counter() - t0) * 1000)
    return {impl: statistics.median(v) for impl, v in times.items()}, first


def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_memory_here(case, impl, device):
    """Peak extra memory (MB) of one step, measured in this process."""
    import gc

    run = make_step(case, impl, device)
    run()  # warm-up
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:  # hand freed heap pages back, so the step's own allocations show in the RSS
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    run()
    return (_rss_kb("VmHWM") - base) / 1024


def peak_memory(case, impl, device):
    if device.type == "cuda":
        return peak_memory_here(case, impl, device)
    cmd = [sys.executable, os.path.abspath(__file__), "--peak-of", json.dumps(case), impl]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------- report
def fmt(v, digits=1):
    return "–" if v is None else f"{v:,.{digits}f}"


def to_markdown(rows, meta):
    lines = [
        f"Machine: {meta['machine']}; torch {meta['torch']}, PML {meta['pml']}, device {meta['device']}, "
        f"{meta['threads']} threads, {meta['date']}.",
        "",
        "| case | PML ms | ours ms | speed-up | PML MB | ours MB | floor ms | ours / floor "
        "| ours / ref-major floor | compiled ms (speed-up, / floor, compile s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(a, b):
        return "–" if a is None or b is None else f"{a / b:.1f}×"

    for r in rows:
        compiled = "–"
        if r.get("compiled_ms") is not None:
            compiled = (
                f"{fmt(r['compiled_ms'])} ({ratio(r['pml_ms'], r['compiled_ms'])}, "
                f"{r['compiled_ms'] / r['floor_ms']:.2f}, {r['compile_s']:.0f} s)"
            )
        rm = r.get("floor_rm_ms")
        rm_ratio = "–" if rm is None else f"{r['ours_ms'] / rm:.2f} (floor {fmt(rm)})"
        lines.append(
            f"| {r['case']} | {fmt(r['pml_ms'])} | {fmt(r['ours_ms'])} | {ratio(r['pml_ms'], r['ours_ms'])} "
            f"| {fmt(r['pml_mb'], 0)} | {fmt(r['ours_mb'], 0)} | {fmt(r['floor_ms'])} "
            f"| {r['ours_ms'] / r['floor_ms']:.2f} | {rm_ratio} | {compiled} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this text")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--peak-of", nargs=2, metavar=("CASE_JSON", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    # compile times from an empty cache, as a user's first run sees them (not inductor's cache
    # of an earlier run on this machine)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-inductor-"))
    if args.peak_of:
        print(peak_memory_here(json.loads(args.peak_of[0]), args.peak_of[1], device))
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    import pytorch_metric_learning

    meta = dict(
        machine=(
            torch.cuda.get_device_name()
            if device.type == "cuda"
            else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
        ),
        torch=torch.__version__,
        pml=pytorch_metric_learning.__version__,
        device=args.device,
        threads=torch.get_num_threads(),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    )
    rows = []
    for case in cases(args.tiny):
        if args.only and args.only not in case["name"]:
            continue
        impls = (["pml"] if case.get("pml", True) else []) + ["ours", "floor"]
        if case["kind"] == "memory":
            impls.append("floor_rm")
        if not args.no_compile and not args.tiny:
            impls.append("compiled")
        ms, first = time_case(case, device, impls)
        row = dict(
            case=case["name"],
            pml_ms=ms.get("pml"),
            ours_ms=ms["ours"],
            floor_ms=ms["floor"],
            floor_rm_ms=ms.get("floor_rm"),
            compiled_ms=ms.get("compiled"),
            compile_s=first.get("compiled"),
            pml_mb=peak_memory(case, "pml", device) if "pml" in impls else None,
            ours_mb=peak_memory(case, "ours", device),
        )
        rows.append(row)
        print(to_markdown([row], meta).splitlines()[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = "tiny" if args.tiny else f"{'partial' if args.only else 'latest'}-{args.device}"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(to_markdown(rows, meta))
    print()
    print(to_markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
