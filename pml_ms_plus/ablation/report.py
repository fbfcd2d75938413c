"""Results files: CSV (the record), JSON, a Markdown summary, PNG plots; all written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from . import stats
from .metrics import METRICS

CSV_FIELDS = ["variant", "seed", "config_hash", *METRICS, "epoch", "train_seconds", "losses", "evaluations"]
# results.csv of version 0.2.0 (no Recall@K, epoch, evaluations): read for --resume, missing values empty
LEGACY_FIELDS = [
    "variant",
    "seed",
    "config_hash",
    "mean_average_precision_at_r",
    "r_precision",
    "precision_at_1",
    "NMI",
    "train_seconds",
    "losses",
]
OUTPUT_FILES = (
    "results.csv",
    "results.json",
    "config.resolved.json",
    "versions.json",
    "summary.md",
    "metrics.png",
    "training_loss.png",
)


TEMP_PREFIX = ".tmp-"


class ResultsError(ValueError):
    """An existing ``results.csv`` that cannot be read; the message names the file and line."""


def file_mode() -> int:
    """The mode a plainly created file gets under the current umask (``0o666 & ~umask``)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str, data: Union[str, bytes], mode: Optional[int] = None) -> None:
    """Write to a temporary file beside ``path``, then rename: never half-written.

    The file gets ``mode`` (default: what the umask gives a new file), not
    ``mkstemp``'s private 0600.
    """
    directory = os.path.dirname(os.path.abspath(path))
    mode = file_mode() if mode is None else mode
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temps(out_dir: str) -> List[str]:
    """Delete the temporary files a killed run left in ``out_dir``; their names."""
    removed = []
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if name.startswith(TEMP_PREFIX) and name.endswith(OUTPUT_FILES) and os.path.isfile(path):
            os.unlink(path)
            removed.append(name)
    return removed


def rows_to_csv(rows: List[Dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        row = {k: ("" if r.get(k) is None else r[k]) for k in CSV_FIELDS}
        row.update(losses=json.dumps(r["losses"]), evaluations=json.dumps(r.get("evaluations", [])))
        writer.writerow(row)
    return buf.getvalue()


def _number(value: str, field: str) -> Optional[float]:
    if value == "":  # a value this run did not record (e.g. Recall@K in a 0.2.0 results.csv)
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{field} is not a number: {value!r}") from None


def _checked(value: str, field: str, valid: Callable[[float], bool], what: str) -> Optional[float]:
    """:func:`_number`, refused unless ``valid`` (``what`` it should be, for the message)."""
    number = _number(value, field)
    if number is not None and not valid(number):
        raise ValueError(f"{field} is not {what}: {value!r}")
    return number


def _is_fraction(x: float) -> bool:
    """A metric: in ``[0, 1]``, or NaN (a metric with no query to count, as evaluation writes it)."""
    return math.isnan(x) or 0.0 <= x <= 1.0


def _is_count(x: float) -> bool:
    return math.isfinite(x) and x >= 0 and x == int(x)


def _is_duration(x: float) -> bool:
    return math.isfinite(x) and x >= 0


def _json_list(value: str, field: str, item: Any) -> list:
    try:
        out = json.loads(value)
    except ValueError:
        out = None
    if not isinstance(out, list) or not all(item(v) for v in out):
        raise ValueError(f"{field} is not a JSON list of {item.__doc__}: {value!r}")
    return out


def _is_number(v: Any) -> bool:
    """numbers"""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_evaluation(v: Any) -> bool:
    """evaluations ({"epoch": e, metric: value})"""
    return isinstance(v, dict) and all(
        isinstance(k, str) and (x is None or _is_number(x)) for k, x in v.items()
    )


def _parse_row(r: Dict, fields: List[str]) -> Dict:
    if None in r or None in r.values():  # more fields than columns, or fewer
        n = len(fields) + len(r.get(None, ())) - sum(v is None for v in r.values())
        raise ValueError(f"{n} fields, expected {len(fields)}")
    if not r["variant"]:
        raise ValueError("empty variant name")
    seed = r["seed"]
    if not (seed.isascii() and seed.isdigit()):
        raise ValueError(f"seed is not an integer >= 0: {seed!r}")
    row: Dict = {"variant": r["variant"], "seed": int(seed), "config_hash": r["config_hash"]}
    row.update({m: _checked(r.get(m, ""), m, _is_fraction, "a fraction in [0, 1]") for m in METRICS})
    epoch = _checked(r.get("epoch", ""), "epoch", _is_count, "an integer >= 0")
    row["epoch"] = None if epoch is None else int(epoch)
    row["train_seconds"] = _checked(r["train_seconds"], "train_seconds", _is_duration, "a finite number >= 0")
    row["losses"] = _json_list(r["losses"], "losses", _is_number)
    row["evaluations"] = _json_list(r.get("evaluations", "[]"), "evaluations", _is_evaluation)
    return row


def read_csv(path: str) -> List[Dict]:
    """Rows of an existing ``results.csv`` (for ``--resume``); ``ResultsError`` names a bad line."""
    line = 0
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames
            if fields not in (CSV_FIELDS, LEGACY_FIELDS):
                raise ResultsError(f"{path} is not a results file of this tool (columns {fields})")
            rows = []
            first_line: Dict[Tuple[str, int, str], int] = {}  # each run once: (variant, seed, config)
            for r in reader:
                line = reader.line_num
                try:
                    row = _parse_row(r, fields)
                except ValueError as exc:
                    raise ResultsError(f"{path}, line {line}: {exc}") from None
                key = (row["variant"], row["seed"], row["config_hash"])
                if key in first_line:
                    raise ResultsError(
                        f"{path}, line {line}: a second row of run {key[0]!r} / seed {key[1]} (config "
                        f"{key[2]}), first on line {first_line[key]}"
                    )
                first_line[key] = line
                rows.append(row)
    except csv.Error as exc:
        raise ResultsError(f"{path}, line {line + 1}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ResultsError(f"{path} is not UTF-8 text ({exc})") from None
    return rows


def summarise(rows: List[Dict], order: List[str], baseline: Optional[str] = None) -> List[Dict]:
    """Per variant, in ``order``: mean and std over seeds, the 95% CI, and a paired test against
    ``baseline`` (None values, i.e. metrics a run did not record, are left out)."""
    per_seed = {
        name: {
            m: {r["seed"]: r[m] for r in rows if r["variant"] == name and r.get(m) is not None}
            for m in METRICS
        }
        for name in order
    }
    out = []
    for name in order:
        mine = [r for r in rows if r["variant"] == name]
        if not mine:
            continue
        entry: Dict = {"variant": name, "seeds": len(mine)}
        for m in METRICS:
            values = list(per_seed[name][m].values())
            entry[m] = stats.mean_std(values) if values else None
            entry[f"{m}_ci95"] = stats.ci95(values) if values else None
            test = None
            if baseline is not None and name != baseline and baseline in per_seed:
                test = stats.paired_test(per_seed[name][m], per_seed[baseline][m])
            entry[f"{m}_vs_baseline"] = (
                None if test is None else {"n": test.n, "diff": test.diff, "p": test.p}
            )
        entry["train_seconds"] = stats.mean_std([r["train_seconds"] for r in mine])[0]
        epochs = sorted({r["epoch"] for r in mine if r.get("epoch") is not None})
        entry["epochs"] = epochs
        out.append(entry)
    return out


HEADLINE = ("mean_average_precision_at_r", "recall_at_1")


def _fmt(x: Optional[float], digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def summary_markdown(summary: List[Dict], meta: Dict) -> str:
    best = {m: max((e[m][0] for e in summary if e[m] is not None), default=None) for m in METRICS}
    baseline = meta.get("baseline")
    head = "| variant | seeds | " + " | ".join(METRICS.values()) + " | s / run |"
    setup = (
        f"{meta['description']}. {meta['epochs']} epochs, batch {meta['batch_size']} "
        f"(m={meta['m']} per class), embedding {meta['embedding_size']}"
    )
    if meta.get("backbone"):
        setup += f", backbone {meta['backbone']} (pretrained: {meta['pretrained']}), image size {meta['image_size']}"
    setup += f", amp {meta.get('amp', 'none')}, device {meta['device']}"
    if meta.get("world_size", 1) > 1:
        per = meta["batch_size"] // meta["world_size"]
        bn = ", SyncBatchNorm" if meta.get("sync_bn") else ""
        setup += (
            f", data-parallel over {meta['world_size']} processes ({meta['backend']}, {per} per process{bn})"
        )
    setup += "."
    counts = ""
    if "num_train_images" in meta:
        counts = (
            f"Data: {meta['num_train_images']} training images of {meta['num_train_classes']} classes; "
            f"{meta['num_test_images']} test images of {meta['num_test_classes']} classes"
        )
        if "num_query" in meta:
            counts += f" ({meta['num_query']} queries retrieved in a gallery of {meta['num_gallery']})"
        counts += "."
    if meta.get("select") == "best":
        label = METRICS.get(meta.get("select_metric", ""), meta.get("select_metric"))
        selection = (
            f'**Selection: the best evaluation of each run by {label} (`select = "best"`). It is chosen on '
            "the test classes themselves, so these numbers are optimistic; report the last evaluation "
            "(the default) for an unbiased figure.**"
        )
    else:
        selection = "Metrics of each run's last evaluation (after its final epoch)."
    if baseline:
        legend = (
            f"Mean ± std over seeds; best mean per column in bold; † marks a variant that differs from the "
            f"baseline **{baseline}** at p < {stats.ALPHA} ({stats.TEST_NAME}, seeds paired, no correction "
            "for multiple comparisons)."
        )
    else:
        legend = "Mean ± std over seeds; best mean per column in bold."
    lines = [f"# Ablation: {meta['dataset']}", "", setup]
    if counts:
        lines.append(counts)
    lines += [selection, legend, "", _other_runs_line(meta.get("other_runs", 0)), "", head]
    lines.append("|---|---:|" + "---:|" * len(METRICS) + "---:|")
    for e in summary:
        cells = []
        for m in METRICS:
            if e[m] is None:
                cells.append("–")
                continue
            mean, std = e[m]
            text = f"{mean:.3f} ± {std:.3f}"
            test = e.get(f"{m}_vs_baseline")
            if test is not None and test["p"] < stats.ALPHA:
                text += " †"
            cells.append(f"**{text}**" if mean == best[m] else text)
        lines.append(
            f"| {e['variant']} | {e['seeds']} | " + " | ".join(cells) + f" | {e['train_seconds']:.1f} |"
        )
    lines += [
        "",
        "## 95% confidence intervals" + (f" and paired tests against {baseline}" if baseline else ""),
        "",
    ]
    lines.append(
        "95% CI of the mean over seeds: mean ± t(0.975, n−1)·std/√n (– with one seed)."
        + (
            f" Δ: mean over the shared seeds of (variant − {baseline}); p: {stats.TEST_NAME}"
            " (– with fewer than 2 shared seeds)."
            if baseline
            else ""
        )
    )
    lines.append("")
    cols = []
    for m in HEADLINE:
        cols.append(f"{METRICS[m]} 95% CI")
        if baseline:
            cols += [f"Δ {METRICS[m]}", "p"]
    lines.append("| variant | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    for e in summary:
        cells = []
        for m in HEADLINE:
            ci = e[f"{m}_ci95"]
            cells.append("–" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]")
            if baseline:
                test = e[f"{m}_vs_baseline"]
                if e["variant"] == baseline:
                    cells += ["baseline", ""]
                elif test is None:
                    cells += ["–", "–"]
                else:
                    cells += [
                        f"{test['diff']:+.3f}",
                        _p(test["p"]) + (" †" if test["p"] < stats.ALPHA else ""),
                    ]
        lines.append(f"| {e['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _other_runs_line(n: int) -> str:
    kept = f"it also keeps {n} other finished run{'s' if n != 1 else ''}" if n else "it holds no other runs"
    return (
        "This summary (and the plots, and results.json) show the current study only; "
        f"results.csv keeps every finished run, and {kept} (other variants, seeds or configurations)."
    )


def plot_metrics(summary: List[Dict], path: str, mode: Optional[int] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e["variant"] for e in summary]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(names) + 3), 5))
    width = 0.8 / len(METRICS)
    for k, (m, label) in enumerate(METRICS.items()):
        xs = [i + (k - (len(METRICS) - 1) / 2) * width for i in range(len(names))]
        means = [e[m][0] if e[m] is not None else 0.0 for e in summary]
        errs = [e[m][1] if e[m] is not None else 0.0 for e in summary]
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out classes (mean ± std over seeds)")
    ax.legend(ncol=4, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path, mode)


def plot_losses(rows: List[Dict], order: List[str], path: str, mode: Optional[int] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    plotted = False
    for name in order:
        curves = [r["losses"] for r in rows if r["variant"] == name and r["losses"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
        first = mean[0] if mean[0] else 1.0
        ax.plot(range(1, n + 1), [v / first for v in mean], marker="o", ms=3, label=name)
        plotted = True
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss / first-epoch loss (mean over seeds)")
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path, mode)


def _save(fig: Any, path: str, mode: Optional[int] = None) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue(), mode)


def write_all(
    out_dir: str,
    rows: List[Dict],
    order: List[str],
    meta: Dict,
    resolved: Dict,
    versions: Dict,
    kept: Sequence[Dict] = (),
) -> None:
    """Every output file (``results.csv`` first): ``results.csv`` holds ``rows`` (the current
    study) and then the ``kept`` rows (finished runs outside it, never deleted); the other
    files show ``rows`` only."""
    mode = file_mode()
    meta = {**meta, "other_runs": len(kept)}
    write_atomic(os.path.join(out_dir, "results.csv"), rows_to_csv([*rows, *kept]), mode)
    summary = summarise(rows, order, meta.get("baseline"))
    write_atomic(
        os.path.join(out_dir, "results.json"),
        json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=2),
        mode,
    )
    write_atomic(os.path.join(out_dir, "config.resolved.json"), json.dumps(resolved, indent=2), mode)
    write_atomic(os.path.join(out_dir, "versions.json"), json.dumps(versions, indent=2), mode)
    if summary:
        write_atomic(os.path.join(out_dir, "summary.md"), summary_markdown(summary, meta), mode)
        plot_metrics(summary, os.path.join(out_dir, "metrics.png"), mode)
        plot_losses(rows, order, os.path.join(out_dir, "training_loss.png"), mode)
