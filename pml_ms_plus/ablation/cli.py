"""The ``pml-ms-plus`` command line."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from . import config as cfg
from . import data as data_mod
from . import report


@dataclass
class Study:
    settings: Dict
    variants: List[cfg.Variant]
    data: data_mod.Data
    device: torch.device
    out: str
    resume: bool
    done: List[Dict]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pml-ms-plus", description="MS-loss tools for pytorch-metric-learning."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ab = sub.add_parser(
        "ablate",
        help="run a reproducible ablation study",
        description="Train each variant with each seed, evaluate retrieval on held-out classes, "
        "write results.csv/json, summary.md and plots.",
    )
    ab.add_argument("--config", help="TOML file: a [study] table and/or [[variant]] tables")
    ab.add_argument("--dataset", help="digits (default), synthetic, or PATH.npz (x, y[, train_classes])")
    ab.add_argument("--seeds", type=int, help="number of seeds (0, 1, ...); default 3")
    ab.add_argument("--epochs", type=int, help="training epochs per run; default 15")
    ab.add_argument(
        "--out",
        default="ablation_results",
        help="output directory (default: ablation_results); it must be writable, and a plain run "
        "refuses an --out that already holds a results.csv (pass --resume, or choose another --out)",
    )
    ab.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ab.add_argument(
        "--resume",
        action="store_true",
        help="continue the results.csv in --out: skip the (variant, seed) runs it already holds with the "
        "same config hash; its other rows (other variants, seeds or settings) are kept, never deleted",
    )
    return parser


def prepare(args) -> Study:
    """Validate everything and load the data; touches no file. Raises ValueError subclasses."""
    overrides, variants = ({}, None)
    if args.config:
        overrides, variants = cfg.load_config(args.config)
    cli = dict(dataset=args.dataset, seeds=args.seeds, epochs=args.epochs)
    settings = cfg.resolve_settings(cfg.DEFAULT_SETTINGS, overrides, cli)
    variants = variants if variants is not None else list(cfg.DEFAULT_VARIANTS)
    cfg.check_variants(variants)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available")
    data = data_mod.load(settings["dataset"])
    n_classes = data.num_train_classes
    m, bs = settings["m"], settings["batch_size"]
    if bs % m:
        raise ValueError(f"batch_size {bs} is not a multiple of m={m} (samples per class)")
    if m * n_classes < bs:
        raise ValueError(
            f"the sampler cannot fill a batch of {bs} with m={m} per class from {n_classes} training classes"
        )
    if bs > len(data.train_y):
        raise ValueError(f"batch_size {bs} exceeds the {len(data.train_y)} training samples")
    for v in variants:  # build every loss once: bad kwargs fail now, not mid-study
        if v.kind == "train":
            loss, _ = cfg.build_loss(v, settings["embedding_size"], n_classes)
            size = getattr(loss, "memory_size", None)
            if isinstance(size, int) and size < bs:
                raise ValueError(
                    f"variant {v.name!r} memory: memory_size={size} is smaller than batch_size={bs}"
                )
    check_out(args.out)
    done: List[Dict] = []
    results = os.path.join(args.out, "results.csv")
    if os.path.lexists(results):
        if not args.resume:
            raise ValueError(
                f"{results} already exists: pass --resume to continue it (finished runs are kept), "
                "or choose another --out"
            )
        done = report.read_csv(results)
    return Study(settings, variants, data, torch.device(args.device), args.out, args.resume, done)


def check_out(out: str) -> None:
    """``--out`` is, or can be created as, a writable directory; creates nothing."""
    path = os.path.abspath(out)
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise ValueError(f"--out {out} exists and is not a directory")
        nearest = path
    else:
        nearest = os.path.dirname(path)
        while not os.path.lexists(nearest):
            nearest = os.path.dirname(nearest)
        if not os.path.isdir(nearest):
            raise ValueError(f"--out {out}: {nearest} is not a directory")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {nearest} is not writable")


def versions(device: torch.device) -> Dict:
    import faiss
    import numpy
    import pytorch_metric_learning

    import pml_ms_plus

    return {
        "pml_ms_plus": pml_ms_plus.__version__,
        "torch": torch.__version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "numpy": numpy.__version__,
        "faiss": getattr(faiss, "__version__", "unknown"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(),
    }


def run_study(study: Study, stream=None) -> List[Dict]:
    from tqdm import tqdm

    stream = stream or sys.stdout
    from .train import run

    s = study.settings
    hashes = {v.name: cfg.variant_hash(v, s) for v in study.variants}
    keep = {(r["variant"], r["seed"], r["config_hash"]) for r in study.done}

    def current(r):
        return hashes.get(r["variant"]) == r["config_hash"] and r["seed"] < s["seeds"]

    rows = [r for r in study.done if current(r)]
    others = [r for r in study.done if not current(r)]  # finished results are never deleted
    todo = [
        (v, seed)
        for v in study.variants
        for seed in range(s["seeds"])
        if (v.name, seed, hashes[v.name]) not in keep
    ]
    order = [v.name for v in study.variants]
    meta = dict(
        dataset=study.data.name,
        description=study.data.description,
        device=str(study.device),
        **{k: s[k] for k in ("epochs", "batch_size", "m", "embedding_size", "lr", "seeds")},
    )
    resolved = {
        "study": s,
        "variant": [{**v.as_dict(), "config_hash": hashes[v.name]} for v in study.variants],
    }
    vers = versions(study.device)
    os.makedirs(study.out, exist_ok=True)
    for name in report.remove_stale_temps(study.out):
        print(f"removed {name}, left by an interrupted run", file=sys.stderr)
    if study.done:
        print(f"resuming: {len(rows)} finished runs kept, {len(todo)} to go", file=stream)
        if others:
            print(f"results.csv also keeps {len(others)} runs outside this study", file=stream)
    total = sum(s["epochs"] if v.kind == "train" else 1 for v, _ in todo)
    with tqdm(total=total, desc="ablate", unit="epoch", file=sys.stderr, dynamic_ncols=True) as bar:
        for v, seed in todo:
            bar.set_postfix_str(f"{v.name} / seed {seed}")
            result = run(v, study.data, seed, s, study.device, on_epoch=lambda e, loss: bar.update(1))
            if v.kind != "train":
                bar.update(1)
            row = {
                "variant": v.name,
                "seed": seed,
                "config_hash": hashes[v.name],
                **result.metrics,
                "train_seconds": round(result.seconds, 3),
                "losses": result.losses,
            }
            rows.append(row)
            rows.sort(key=lambda r: (order.index(r["variant"]), r["seed"]))
            report.write_all(study.out, rows, order, meta, resolved, vers, kept=others)
            bar.write(
                f"done: {v.name:28s} seed {seed}  MAP@R {row['mean_average_precision_at_r']:.3f}  "
                f"P@1 {row['precision_at_1']:.3f}  ({result.seconds:.1f}s)",
                file=stream,
            )
    report.write_all(study.out, rows, order, meta, resolved, vers, kept=others)
    print(
        f"\nwrote {study.out}/: results.csv, results.json, summary.md, metrics.png, training_loss.png",
        file=stream,
    )
    with open(os.path.join(study.out, "summary.md")) as f:
        print(f.read(), file=stream)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        study = prepare(args)
    except (ValueError, OSError) as exc:
        print(f"pml-ms-plus: error: {exc}", file=sys.stderr)
        return 2
    try:
        run_study(study)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except BrokenPipeError:
        # stdout's reader went away (``| head``): stop quietly; the finished runs are on disk,
        # --resume continues. Point stdout at devnull so the exit flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
