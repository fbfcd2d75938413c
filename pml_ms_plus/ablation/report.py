"""Results files: CSV (the record), JSON, a Markdown summary, PNG plots; all written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from typing import Dict, List, Optional, Sequence

from .train import METRICS

CSV_FIELDS = ["variant", "seed", "config_hash", *METRICS, "train_seconds", "losses"]
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


def write_atomic(path: str, data, mode: Optional[int] = None) -> None:
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
        writer.writerow({**r, "losses": json.dumps(r["losses"])})
    return buf.getvalue()


def _number(value: str, field: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{field} is not a number: {value!r}") from None


def _parse_row(r: Dict) -> Dict:
    if None in r or None in r.values():  # more fields than columns, or fewer
        n = len(CSV_FIELDS) + len(r.get(None, ())) - sum(v is None for v in r.values())
        raise ValueError(f"{n} fields, expected {len(CSV_FIELDS)}")
    if not r["variant"]:
        raise ValueError("empty variant name")
    seed = r["seed"]
    if not (seed.isascii() and seed.isdigit()):
        raise ValueError(f"seed is not an integer >= 0: {seed!r}")
    row = {"variant": r["variant"], "seed": int(seed), "config_hash": r["config_hash"]}
    row.update({m: _number(r[m], m) for m in METRICS})
    row["train_seconds"] = _number(r["train_seconds"], "train_seconds")
    try:
        losses = json.loads(r["losses"])
    except ValueError:
        losses = None
    if not isinstance(losses, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in losses
    ):
        raise ValueError(f"losses is not a JSON list of numbers: {r['losses']!r}")
    row["losses"] = losses
    return row


def read_csv(path: str) -> List[Dict]:
    """Rows of an existing ``results.csv`` (for ``--resume``); ``ResultsError`` names a bad line."""
    line = 0
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != CSV_FIELDS:
                raise ResultsError(f"{path} is not a results file of this tool (columns {reader.fieldnames})")
            rows = []
            for r in reader:
                line = reader.line_num
                try:
                    rows.append(_parse_row(r))
                except ValueError as exc:
                    raise ResultsError(f"{path}, line {line}: {exc}") from None
    except csv.Error as exc:
        raise ResultsError(f"{path}, line {line + 1}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ResultsError(f"{path} is not UTF-8 text ({exc})") from None
    return rows


def _mean_std(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarise(rows: List[Dict], order: List[str]) -> List[Dict]:
    """Mean and std over seeds, per variant, in ``order``."""
    out = []
    for name in order:
        mine = [r for r in rows if r["variant"] == name]
        if not mine:
            continue
        entry = {"variant": name, "seeds": len(mine)}
        for m in METRICS:
            entry[m] = _mean_std([r[m] for r in mine])
        entry["train_seconds"] = _mean_std([r["train_seconds"] for r in mine])[0]
        out.append(entry)
    return out


def summary_markdown(summary: List[Dict], meta: Dict) -> str:
    best = {m: max(e[m][0] for e in summary) for m in METRICS}
    head = "| variant | seeds | " + " | ".join(METRICS.values()) + " | s / run |"
    lines = [
        f"# Ablation: {meta['dataset']}",
        "",
        f"{meta['description']}. {meta['epochs']} epochs, batch {meta['batch_size']} "
        f"(m={meta['m']} per class), embedding {meta['embedding_size']}, device {meta['device']}. "
        "Mean ± std over seeds; best mean per column in bold.",
        "",
        _other_runs_line(meta.get("other_runs", 0)),
        "",
        head,
        "|---|---:|" + "---:|" * len(METRICS) + "---:|",
    ]
    for e in summary:
        cells = []
        for m in METRICS:
            mean, std = e[m]
            text = f"{mean:.3f} ± {std:.3f}"
            cells.append(f"**{text}**" if mean == best[m] else text)
        lines.append(
            f"| {e['variant']} | {e['seeds']} | " + " | ".join(cells) + f" | {e['train_seconds']:.1f} |"
        )
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
        ax.bar(xs, [e[m][0] for e in summary], width, yerr=[e[m][1] for e in summary], capsize=2, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out classes (mean ± std over seeds)")
    ax.legend(ncol=len(METRICS), fontsize=8)
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


def _save(fig, path: str, mode: Optional[int] = None) -> None:
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
    summary = summarise(rows, order)
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
