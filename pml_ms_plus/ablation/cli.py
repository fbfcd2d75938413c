"""The ``pml-ms-plus`` command line."""

from __future__ import annotations

import argparse
import errno
import math
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, TextIO, Union

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (two runs into one --out are not detected)
    fcntl = None  # type: ignore[assignment]

import torch

from . import checkpoint, images, report
from . import config as cfg
from . import data as data_mod
from . import distributed as ddp


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
    dist: Optional[ddp.Distributed] = None  # under torchrun: this rank's place in the process group
    sync_bn: bool = False

    @property
    def is_main(self) -> bool:
        """The process that writes files and shows progress (the only one, or rank 0)."""
        return self.dist is None or self.dist.is_main


def _positive_seconds(text: str) -> float:
    """``--dist-timeout``'s type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return value


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
    ab.add_argument(
        "--m",
        "--samples-per-class",
        dest="m",
        type=int,
        help="samples per class in a batch; default 16 (toy sets), 5 (images); under torchrun write "
        "--samples-per-class (torchrun's own parser takes --m for an abbreviation of its options)",
    )
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
    ab.add_argument(
        "--dist-timeout",
        dest="dist_timeout",
        type=_positive_seconds,
        default=ddp.DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="under torchrun: how long a collective waits for the other ranks before the job fails "
        f"(default {ddp.DEFAULT_TIMEOUT_S:.0f})",
    )
    ab.add_argument(
        "--sync-bn",
        dest="sync_bn",
        action="store_true",
        help="under torchrun with --device cuda: BatchNorm layers that train use the statistics of the "
        "global batch (SyncBatchNorm) instead of each rank's share",
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


def prepare(args: argparse.Namespace, dist: Optional[ddp.Distributed] = None) -> Study:
    """Validate everything and load the data; touches no file. Raises ValueError subclasses.

    Under torchrun every rank validates and loads alike, and the ranks agree: if any fails,
    all raise (rank 0 reports it). ``--out`` and its ``results.csv`` are read by rank 0 alone,
    which sends the rows to the others (only rank 0's machine needs the output directory)."""
    study: Optional[Study] = None
    error: Optional[BaseException] = None
    try:
        study = _prepare_here(args, dist)
        if study.is_main:
            study.done = read_out(args.out, args.resume)
    except (ValueError, OSError) as exc:
        if dist is None:
            raise
        error = exc
    ddp.agree(error, dist)
    assert study is not None
    study.done = ddp.broadcast(study.done, dist)
    return study


def _prepare_here(args: argparse.Namespace, dist: Optional[ddp.Distributed]) -> Study:
    """The settings, variants and data of a study, validated in this process."""
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
    if getattr(args, "sync_bn", False) and args.device != "cuda":
        raise ValueError("--sync-bn needs --device cuda (SyncBatchNorm runs on GPUs only)")
    world = dist.world_size if dist is not None else 1
    if settings["batch_size"] % world:
        raise ValueError(
            f"batch_size {settings['batch_size']} is not divisible by the {world} processes: each takes an "
            f"equal share of every batch (use a multiple of {world})"
        )
    data: Union[data_mod.Data, images.ImageData]
    backbone = None
    if image:
        data = images.load(settings["dataset"], settings["data_root"])
        from . import backbones

        backbone = backbones.prepare(settings["backbone"], settings["pretrained"])
    else:
        data = data_mod.load(settings["dataset"])
        if settings["dataset"].endswith(".npz"):  # --resume compares the file's contents, not its name
            settings = {**settings, "dataset_sha256": data_mod.file_sha256(settings["dataset"])}
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
    for v in variants:  # build every loss and run it once: bad kwargs fail now, not mid-study
        if v.kind == "train":
            loss, _ = cfg.build_loss(v, settings["embedding_size"], n_classes)
            size = getattr(loss, "memory_size", None)
            if isinstance(size, int) and size < bs:
                raise ValueError(
                    f"variant {v.name!r} memory: memory_size={size} is smaller than batch_size={bs}"
                )
            cfg.check_on_a_batch(v, settings["embedding_size"], n_classes, bs, m)
    return Study(
        settings,
        variants,
        data,
        dist.device if dist is not None else torch.device(args.device),
        args.out,
        args.resume,
        [],
        backbone=backbone,
        baseline=baseline,
        dist=dist,
        sync_bn=getattr(args, "sync_bn", False),
    )


def read_out(out: str, resume: bool) -> List[Dict]:
    """Check ``--out`` and return the rows of its ``results.csv`` (``--resume``); touches no file."""
    check_out(out)
    results = os.path.join(out, "results.csv")
    if os.path.lexists(results):
        if not resume:
            raise ValueError(
                f"{results} already exists: pass --resume to continue it (finished runs are kept), "
                "or choose another --out"
            )
        return report.read_csv(results)
    if checkpoint.existing(out) and not resume:
        raise ValueError(
            f"{checkpoint.directory(out)} holds the checkpoint of an interrupted run: pass --resume "
            "to continue it, or choose another --out"
        )
    return []


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
    if not out:
        raise ValueError("--out is empty: name the output directory")
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


def versions(
    device: torch.device, backbone: Optional[str] = None, dist: Optional[ddp.Distributed] = None
) -> Dict:
    """Library versions, the platform and the device, and how the study ran (``world_size``,
    ``backend``: ``None`` for one process)."""
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
        **run_layout(dist),
    }


def run_layout(dist: Optional[ddp.Distributed]) -> Dict[str, Any]:
    """``world_size``, ``backend`` and ``processes_per_node`` of the study (1, None, 1 for one process)."""
    if dist is None:
        return {"world_size": 1, "backend": None, "processes_per_node": 1}
    return {
        "world_size": dist.world_size,
        "backend": dist.backend,
        "processes_per_node": dist.local_world_size,
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


class RunFailed(RuntimeError):
    """A (variant, seed) run that raised in a data-parallel study; the message names the rank and
    the run, and the cause is chained."""


def claim_out(study: Study) -> Optional[int]:
    """Create ``--out`` and lock it for this run (rank 0; the ranks agree on the outcome), then
    read its ``results.csv`` again under the lock (another run may have finished runs since
    :func:`prepare` read it): a second run writing to the same directory would rewrite
    ``results.csv`` from its own rows and lose the other's. The lock (``flock`` on the directory
    itself, no file of its own) goes with the process, also when it is killed; the returned
    descriptor holds it. Raises ValueError."""
    handle: Optional[int] = None
    error: Optional[BaseException] = None
    if study.is_main:
        try:
            handle = _lock_out(study.out)
            study.done = read_out(study.out, study.resume)
        except ValueError as exc:
            if handle is not None:
                os.close(handle)
                handle = None
            if study.dist is None:
                raise
            error = exc
    ddp.agree(error, study.dist)
    study.done = ddp.broadcast(study.done, study.dist)
    return handle


def _lock_out(out: str) -> Optional[int]:
    """``--out`` created, and a descriptor holding its lock (``None`` where there is no
    ``flock``: Windows; a file system that cannot lock directories runs unlocked, with a
    warning)."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create it ({exc.strerror or exc})") from None
    if fcntl is None:
        return None
    try:
        handle = os.open(out, os.O_RDONLY)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot open it ({exc.strerror or exc})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(handle)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ValueError(
                f"--out {out} is in use by another pml-ms-plus run (it holds a lock on that directory): "
                "wait for it to finish, or choose another --out"
            ) from None
        print(
            f"pml-ms-plus: warning: cannot lock --out {out} ({exc.strerror or exc}): a second run into it "
            "at the same time would not be noticed",
            file=sys.stderr,
        )
        return None
    return handle


def run_study(study: Study, stream: Optional[TextIO] = None) -> List[Dict]:
    """Run every (variant, seed) that is not finished yet and write the results after each.

    Under torchrun every rank runs the same runs in the same order; rank 0 alone writes files
    and prints (``stream``, progress bars). A run that raises on a rank becomes
    :class:`RunFailed` naming the rank and the run (the other ranks are stopped by torchrun, or
    by the collective timeout); the finished runs are in ``results.csv`` already.
    """
    from tqdm import tqdm

    main = study.is_main
    stream = (stream or sys.stdout) if main else open(os.devnull, "w")
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
        device=str(study.device) if study.dist is None else study.device.type,
        **run_layout(study.dist),
        sync_bn=study.sync_bn and study.dist is not None,
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
    vers = versions(study.device, s["backbone"] if image else None, study.dist)
    if main:
        os.makedirs(study.out, exist_ok=True)
        for name in report.remove_stale_temps(study.out) + checkpoint.remove_stale_temps(study.out):
            print(f"removed {name}, left by an interrupted run", file=sys.stderr)
        for r in study.done:  # interrupted between writing its row and removing its checkpoint
            stale = checkpoint.path(study.out, r["variant"], r["seed"], r["config_hash"])
            if os.path.exists(stale):
                checkpoint.remove(study.out, stale)
                print(
                    f"removed {os.path.relpath(stale, study.out)}, a finished run's checkpoint",
                    file=sys.stderr,
                )
    if study.dist is not None:
        d = study.dist
        print(
            f"data-parallel: {d.world_size} processes ({d.backend}, {d.local_world_size} per node), "
            f"global batch {s['batch_size']} = {d.world_size} x {s['batch_size'] // d.world_size}",
            file=stream,
        )
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
    with tqdm(
        total=total, desc="ablate", unit="epoch", file=sys.stderr, dynamic_ncols=True, disable=not main
    ) as bar:
        for v, seed in todo:
            bar.set_postfix_str(f"{v.name} / seed {seed}")
            ckpt = checkpoint.path(study.out, v.name, seed, hashes[v.name])
            run_bar = RunBar(f"{v.name} / seed {seed}", enabled=image and main)
            ctx = RunContext(
                device=study.device,
                backbone=study.backbone,
                checkpoint=ckpt,
                resume=study.resume,
                on_epoch=lambda e, loss: bar.update(1),
                on_start=run_bar.start,
                on_step=run_bar.step,
                log=lambda line: bar.write(line, file=stream) if main else None,
                dist=study.dist,
                sync_bn=study.sync_bn,
            )
            try:
                result = run(v, study.data, seed, s, ctx)
            except Exception as exc:
                if study.dist is None:
                    raise
                raise RunFailed(
                    f"rank {study.dist.rank} of {study.dist.world_size}: run {v.name!r} / seed {seed} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
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
            if not main:
                continue
            report.write_all(study.out, rows, order, meta, resolved, vers, kept=others)
            checkpoint.remove(study.out, ckpt)
            bar.write(
                f"done: {v.name:28s} seed {seed}  MAP@R {row['mean_average_precision_at_r']:.3f}  "
                f"R@1 {row['recall_at_1']:.3f}  ({result.seconds:.1f}s)",
                file=stream,
            )
    if not main:
        stream.close()
        ddp.barrier(study.dist)  # rank 0 writes the last files
        return rows
    report.write_all(study.out, rows, order, meta, resolved, vers, kept=others)
    print(
        f"\nwrote {study.out}/: results.csv, results.json, summary.md, metrics.png, training_loss.png",
        file=stream,
    )
    with open(os.path.join(study.out, "summary.md")) as f:
        print(f.read(), file=stream)
    ddp.barrier(study.dist)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    """``pml-ms-plus``: the exit status (0 done, 1 a run failed, 2 bad input, 130 interrupted).

    Under torchrun (``WORLD_SIZE`` > 1) the process joins the process group first; rank 0 alone
    prints errors of the input, a failing run is reported by the rank it failed on.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        dist = ddp.from_environment(args.device, args.dist_timeout)
    except (ValueError, RuntimeError) as exc:  # a bad launch, or the rendezvous failed
        print(f"pml-ms-plus: error: {exc}", file=sys.stderr)
        return 2
    status = _main(args, dist)
    if status in (0, 2):  # the ranks ended together; after a failure a rank just exits
        ddp.shutdown(dist)
    return status


def _main(args: argparse.Namespace, dist: Optional[ddp.Distributed]) -> int:
    main_rank = dist is None or dist.is_main
    try:
        study = prepare(args, dist)
        lock = claim_out(study)  # held while this process runs the study
    except (ValueError, OSError) as exc:
        if main_rank:
            print(f"pml-ms-plus: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # no run had started
        if main_rank:
            print("pml-ms-plus: interrupted before the first run started", file=sys.stderr)
        return 130
    try:
        return _run(study)
    finally:
        if lock is not None:
            os.close(lock)


def _finished_runs(out: str) -> str:
    """Where the finished runs are, for a message: ``out``'s ``results.csv``, if there is one yet."""
    results = os.path.join(out, "results.csv")
    return f"the finished runs are in {results}" if os.path.exists(results) else "no run has finished yet"


def _run(study: Study) -> int:
    """Run a prepared study: the exit status, each failure reported as :func:`main` says."""
    try:
        run_study(study)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except RunFailed as exc:
        import traceback

        cause = exc.__cause__ or exc
        traceback.print_exception(type(cause), cause, cause.__traceback__, file=sys.stderr)
        hint = ""
        if any(c.__name__.startswith("Dist") for c in type(cause).__mro__) or "Connection closed" in str(
            cause
        ):
            hint = " (a collective failed: another rank probably failed or was killed first; see its message)"
        print(
            f"pml-ms-plus: error: {exc}{hint}. Every finished run is saved in {study.out}/results.csv on "
            "rank 0's machine and the run in progress is checkpointed after its last finished epoch: fix "
            "the cause and run the same command with --resume to continue",
            file=sys.stderr,
        )
        sys.stderr.flush()
        return 1
    except checkpoint.CheckpointError as exc:
        print(f"pml-ms-plus: error: {exc}; {_finished_runs(study.out)}", file=sys.stderr)
        return 2
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
            f"pml-ms-plus: interrupted; {_finished_runs(study.out)}, the run in progress is checkpointed "
            "after its last finished epoch: add --resume to continue",
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
