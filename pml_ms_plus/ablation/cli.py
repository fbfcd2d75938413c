"""The ``pml-ms-plus`` command line."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, TextIO, Union

import torch

from . import checkpoint, images, report
from . import config as cfg
from . import data as data_mod


@dataclass
class Study:
    settings: Dict
    variants: List[cfg.Variant]
    data: Union[data_mod.Data, images.ImageData]
    device: torch.device
    out: str
    resume: bool
    done: List[Dict]
    backbone: Any = None  # backbones.Backbone for the image data sets
    baseline: Optional[str] = None


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
    ab.add_argument(
        "--dataset",
        help="digits (default), synthetic, PATH.npz (x, y[, train_classes]), or an image benchmark: "
        + ", ".join(images.IMAGE_DATASETS)
        + " (with --data-root)",
    )
    ab.add_argument(
        "--data-root",
        dest="data_root",
        metavar="PATH",
        help="the image data set's folder, or its parent (e.g. the folder holding CUB_200_2011/)",
    )
    ab.add_argument(
        "--backbone", help="image data sets: a torchvision.models name (default resnet50) or timm:NAME"
    )
    ab.add_argument(
        "--pretrained",
        metavar="imagenet|none|PATH",
        help="image data sets: the library's ImageNet weights (default), random weights, or a local state dict",
    )
    ab.add_argument(
        "--image-size", dest="image_size", type=int, help="image data sets: crop size; default 224"
    )
    ab.add_argument("--batch-size", dest="batch_size", type=int, help="batch size; default 80")
    ab.add_argument("--m", type=int, help="samples per class in a batch; default 16 (toy sets), 5 (images)")
    ab.add_argument("--seeds", type=int, help="number of seeds (0, 1, ...); default 3")
    ab.add_argument("--epochs", type=int, help="training epochs per run; default 15 (toy sets), 40 (images)")
    ab.add_argument(
        "--amp",
        choices=list(cfg.CHOICES["amp"]),
        help="autocast: none (default), bf16, fp16 (with a GradScaler)",
    )
    ab.add_argument(
        "--workers",
        type=int,
        help="image data sets: DataLoader workers that decode images; default min(8, CPUs)",
    )
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
        "same config hash (its other rows are kept, never deleted) and continue an interrupted run from "
        "its checkpoint after its last finished epoch",
    )
    return parser


CLI_SETTINGS = (
    "dataset",
    "data_root",
    "backbone",
    "pretrained",
    "image_size",
    "batch_size",
    "m",
    "seeds",
    "epochs",
    "amp",
    "workers",
)


def prepare(args: argparse.Namespace) -> Study:
    """Validate everything and load the data; touches no file. Raises ValueError subclasses."""
    overrides: Dict[str, Any] = {}
    variants: Optional[List[cfg.Variant]] = None
    if args.config:
        overrides, variants = cfg.load_config(args.config)
    cli = {k: getattr(args, k, None) for k in CLI_SETTINGS}
    settings = cfg.resolve_settings(cfg.DEFAULT_SETTINGS, overrides, cli)
    image = settings["dataset"] in images.IMAGE_DATASETS
    if variants is None:
        # raw-pixel kNN of full-size images is neither meaningful nor affordable
        variants = [v for v in cfg.DEFAULT_VARIANTS if not (image and v.kind == "raw")]
    cfg.check_variants(variants)
    if image:
        raw = [v.name for v in variants if v.kind == "raw"]
        if raw:
            raise cfg.ConfigError(
                f"variant {raw[0]!r}: kind 'raw' (kNN on the input pixels) is for the toy data sets only; "
                "for an image data set use kind 'untrained' (the pretrained backbone, not fine-tuned)"
            )
    names = [v.name for v in variants]
    baseline = settings["baseline"]
    if baseline is not None and baseline not in names:
        raise cfg.ConfigError(f"baseline {baseline!r} is not a variant of this study ({', '.join(names)})")
    if baseline is None:
        baseline = next((v.name for v in variants if v.kind == "train"), None)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available")
    data: Union[data_mod.Data, images.ImageData]
    backbone = None
    if image:
        data = images.load(settings["dataset"], settings["data_root"])
        from . import backbones

        backbone = backbones.prepare(settings["backbone"], settings["pretrained"])
    else:
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
    elif checkpoint.existing(args.out) and not args.resume:
        raise ValueError(
            f"{checkpoint.directory(args.out)} holds the checkpoint of an interrupted run: pass --resume "
            "to continue it, or choose another --out"
        )
    return Study(
        settings,
        variants,
        data,
        torch.device(args.device),
        args.out,
        args.resume,
        done,
        backbone=backbone,
        baseline=baseline,
    )


def data_counts(data: Union[data_mod.Data, images.ImageData]) -> Dict[str, int]:
    """``num_train_images``, ``num_train_classes``, ``num_test_images``, ``num_test_classes``
    (and ``num_query``, ``num_gallery`` for In-Shop)."""
    if isinstance(data, images.ImageData):
        return data.counts()
    return {
        "num_train_images": len(data.train_y),
        "num_train_classes": data.num_train_classes,
        "num_test_images": len(data.test_y),
        "num_test_classes": len(torch.unique(data.test_y)),
    }


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


def versions(device: torch.device, backbone: Optional[str] = None) -> Dict:
    import faiss
    import numpy
    import pytorch_metric_learning

    import pml_ms_plus

    extra: Dict[str, str] = {}
    if backbone is not None:
        from .backbones import library_versions

        extra = library_versions(backbone)
    return {
        **extra,
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


class RunBar:
    """A run's own progress bar (image data sets): images/s and the run's ETA."""

    def __init__(self, desc: str, enabled: bool):
        self.desc, self.enabled = desc, enabled
        self.bar: Any = None

    def start(self, n_images: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=n_images,
                desc=self.desc,
                unit="img",
                unit_scale=True,
                leave=False,
                file=sys.stderr,
                dynamic_ncols=True,
                position=1,
            )

    def step(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_study(study: Study, stream: Optional[TextIO] = None) -> List[Dict]:
    from tqdm import tqdm

    stream = stream or sys.stdout
    from .train import RunContext, run

    s = study.settings
    image = isinstance(study.data, images.ImageData)
    hashes = {v.name: cfg.variant_hash(v, s) for v in study.variants}
    keep = {(r["variant"], r["seed"], r["config_hash"]) for r in study.done}

    def current(r: Dict) -> bool:
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
        **{
            k: s[k]
            for k in (
                "epochs",
                "batch_size",
                "m",
                "embedding_size",
                "lr",
                "head_lr",
                "optimizer",
                "weight_decay",
                "schedule",
                "amp",
                "eval_every",
                "select",
                "select_metric",
                "seeds",
            )
        },
        baseline=study.baseline,
        baseline_test=report.stats.TEST_NAME,
        **data_counts(study.data),
    )
    if image:
        meta.update({k: s[k] for k in ("data_root", "backbone", "pretrained", "image_size", "freeze_bn")})
    resolved = {
        "study": s,
        "variant": [{**v.as_dict(), "config_hash": hashes[v.name]} for v in study.variants],
    }
    vers = versions(study.device, s["backbone"] if image else None)
    os.makedirs(study.out, exist_ok=True)
    for name in report.remove_stale_temps(study.out) + checkpoint.remove_stale_temps(study.out):
        print(f"removed {name}, left by an interrupted run", file=sys.stderr)
    if study.done:
        print(f"resuming: {len(rows)} finished runs kept, {len(todo)} to go", file=stream)
        if others:
            print(f"results.csv also keeps {len(others)} runs outside this study", file=stream)
    if image:
        counts = data_counts(study.data)
        print(
            f"{study.data.name}: {counts['num_train_images']} training images of {counts['num_train_classes']} "
            f"classes, {counts['num_test_images']} test images of {counts['num_test_classes']} classes",
            file=stream,
        )
    total = sum(s["epochs"] if v.kind == "train" else 1 for v, _ in todo)
    with tqdm(total=total, desc="ablate", unit="epoch", file=sys.stderr, dynamic_ncols=True) as bar:
        for v, seed in todo:
            bar.set_postfix_str(f"{v.name} / seed {seed}")
            ckpt = checkpoint.path(study.out, v.name, seed, hashes[v.name])
            run_bar = RunBar(f"{v.name} / seed {seed}", enabled=image)
            ctx = RunContext(
                device=study.device,
                backbone=study.backbone,
                checkpoint=ckpt,
                resume=study.resume,
                on_epoch=lambda e, loss: bar.update(1),
                on_start=run_bar.start,
                on_step=run_bar.step,
                log=lambda line: bar.write(line, file=stream),
            )
            try:
                result = run(v, study.data, seed, s, ctx)
            finally:
                run_bar.close()
            if result.resumed_from:
                bar.update(result.resumed_from)
            if v.kind != "train":
                bar.update(1)
            row = {
                "variant": v.name,
                "seed": seed,
                "config_hash": hashes[v.name],
                **result.metrics,
                "epoch": result.epoch,
                "train_seconds": round(result.seconds, 3),
                "losses": result.losses,
                "evaluations": result.evaluations,
            }
            rows.append(row)
            rows.sort(key=lambda r: (order.index(r["variant"]), r["seed"]))
            report.write_all(study.out, rows, order, meta, resolved, vers, kept=others)
            checkpoint.remove(study.out, ckpt)
            bar.write(
                f"done: {v.name:28s} seed {seed}  MAP@R {row['mean_average_precision_at_r']:.3f}  "
                f"R@1 {row['recall_at_1']:.3f}  ({result.seconds:.1f}s)",
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
    except images.ImageDecodeError as exc:
        print(
            f"pml-ms-plus: error: {exc}; every finished run is saved in {study.out}/results.csv and the "
            "run in progress is checkpointed after its last finished epoch: replace or remove the image, "
            "then run again with --resume",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            f"pml-ms-plus: interrupted; finished runs are in {study.out}/results.csv, the run in progress "
            "is checkpointed after its last finished epoch: add --resume to continue",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:
        # stdout's reader went away (``| head``): stop quietly; the finished runs are on disk,
        # --resume continues. Point stdout at devnull so the exit flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
