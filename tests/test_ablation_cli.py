"""`pml-ms-plus ablate` end to end on tiny settings, --resume, and every bad input."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pml_ms_plus.ablation import cli, data
from pml_ms_plus.ablation.config import DEFAULT_VARIANTS, build_loss

TINY = """
[study]
seeds = 1
epochs = 1
batch_size = 40
m = 8

[[variant]]
name = "raw"
kind = "raw"

[[variant]]
name = "untrained"
kind = "untrained"

[[variant]]
name = "ms"
loss = "pml_ms_plus.losses.MSLoss"
loss_kwargs = { epsilon = 0.1 }

[[variant]]
name = "pml-miner"
loss = "pytorch_metric_learning.losses.MultiSimilarityLoss"
miner = "pml_ms_plus.miners.MultiSimilarityMiner"
miner_kwargs = { epsilon = 0.1 }
"""

OUTPUTS = [
    "results.csv",
    "results.json",
    "summary.md",
    "metrics.png",
    "training_loss.png",
    "config.resolved.json",
    "versions.json",
]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def read_rows(out):
    with open(os.path.join(out, "results.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_end_to_end_and_resume(tmp_path, capsys):
    config = write(tmp_path, "tiny.toml", TINY)
    out = str(tmp_path / "out")
    assert cli.main(["ablate", "--config", config, "--out", out]) == 0
    for name in OUTPUTS:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    rows = read_rows(out)
    assert [r["variant"] for r in rows] == ["raw", "untrained", "ms", "pml-miner"]
    for r in rows:
        assert 0.0 <= float(r["mean_average_precision_at_r"]) <= 1.0
        assert len(json.loads(r["losses"])) == (1 if r["variant"] in ("ms", "pml-miner") else 0)
    summary = open(os.path.join(out, "summary.md")).read()
    assert "MAP@R" in summary and "**" in summary and "pml-miner" in summary
    results = json.load(open(os.path.join(out, "results.json")))
    assert len(results["rows"]) == 4 and len(results["summary"]) == 4
    versions = json.load(open(os.path.join(out, "versions.json")))
    assert {"torch", "pytorch_metric_learning", "pml_ms_plus", "device"} <= set(versions)
    printed = capsys.readouterr().out
    assert printed.count("done: ") == 4

    # same config and seed: same numbers
    again = str(tmp_path / "again")
    assert cli.main(["ablate", "--config", config, "--out", again]) == 0
    for a, b in zip(rows, read_rows(again)):
        assert a["mean_average_precision_at_r"] == b["mean_average_precision_at_r"]
        assert a["losses"] == b["losses"]

    # --resume: drop a finished run, resume reruns only that one and keeps the others
    with open(os.path.join(out, "results.csv")) as f:
        lines = f.read().splitlines()
    with open(os.path.join(out, "results.csv"), "w") as f:
        f.write("\n".join(line for line in lines if not line.startswith("ms,")) + "\n")
    capsys.readouterr()
    assert cli.main(["ablate", "--config", config, "--out", out, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "3 finished runs kept, 1 to go" in printed and printed.count("done: ") == 1
    resumed = read_rows(out)
    assert [r["variant"] for r in resumed] == ["raw", "untrained", "ms", "pml-miner"]
    assert resumed[2]["mean_average_precision_at_r"] == rows[2]["mean_average_precision_at_r"]

    # a second seed on resume: only the new seed's runs
    capsys.readouterr()
    assert cli.main(["ablate", "--config", config, "--out", out, "--resume", "--seeds", "2"]) == 0
    assert capsys.readouterr().out.count("done: ") == 4
    assert len(read_rows(out)) == 8


def test_python_dash_m_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pml_ms_plus", "ablate", "--dataset", "nope"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "unknown dataset 'nope'" in result.stderr


def make_npz(tmp_path, name, **arrays):
    path = str(tmp_path / name)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_dataset", "unknown dataset"),
        ("missing_npz", "no such file"),
        ("npz_without_y", "has no array 'y'"),
        ("npz_mismatch", "'x' has 30 rows but 'y' has 29 labels"),
        ("one_train_class", "at least 2 training classes"),
        ("bad_toml", "cannot read config"),
        ("missing_config", "config file not found"),
        ("bad_import", "cannot import module 'not_a_module'"),
        ("bad_attribute", "has no 'NoSuchLoss'"),
        ("bad_kwargs", "epsilon must be"),
        ("bad_m", "not a multiple of m=7"),
        ("m_too_small", "cannot fill a batch of 80 with m=4 per class from 5 training classes"),
        ("bad_setting", "unknown study setting 'learning_rate'"),
        ("bad_seeds", "'seeds' must be >= 1"),
        ("duplicate_names", "repeated"),
    ],
)
def test_bad_input_exits_2_and_touches_nothing(tmp_path, capsys, case, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("precious\n")
    args = ["ablate", "--out", str(out)]
    x = np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32)
    if case == "unknown_dataset":
        args += ["--dataset", "cifar"]
    elif case == "missing_npz":
        args += ["--dataset", str(tmp_path / "none.npz")]
    elif case == "npz_without_y":
        args += ["--dataset", make_npz(tmp_path, "a.npz", x=x)]
    elif case == "npz_mismatch":
        args += ["--dataset", make_npz(tmp_path, "b.npz", x=x, y=np.arange(29) % 3)]
    elif case == "one_train_class":
        args += [
            "--dataset",
            make_npz(tmp_path, "c.npz", x=x, y=np.arange(30) % 3, train_classes=np.array([0])),
        ]
    elif case == "bad_toml":
        args += ["--config", write(tmp_path, "c.toml", "[study\nseeds = ")]
    elif case == "missing_config":
        args += ["--config", str(tmp_path / "none.toml")]
    elif case == "bad_import":
        args += [
            "--config",
            write(tmp_path, "c.toml", '[[variant]]\nname = "a"\nloss = "not_a_module.Loss"\n'),
        ]
    elif case == "bad_attribute":
        args += [
            "--config",
            write(tmp_path, "c.toml", '[[variant]]\nname = "a"\nloss = "pml_ms_plus.losses.NoSuchLoss"\n'),
        ]
    elif case == "bad_kwargs":
        text = '[[variant]]\nname = "a"\nloss = "pml_ms_plus.losses.MSLoss"\nloss_kwargs = { epsilon = -1 }\n'
        args += ["--config", write(tmp_path, "c.toml", text)]
    elif case == "bad_m":
        args += ["--config", write(tmp_path, "c.toml", "[study]\nm = 7\n")]
    elif case == "m_too_small":
        args += ["--config", write(tmp_path, "c.toml", "[study]\nm = 4\n")]
    elif case == "bad_setting":
        args += ["--config", write(tmp_path, "c.toml", "[study]\nlearning_rate = 0.1\n")]
    elif case == "bad_seeds":
        args += ["--seeds", "0"]
    elif case == "duplicate_names":
        args += [
            "--config",
            write(
                tmp_path,
                "c.toml",
                '[[variant]]\nname = "a"\nkind = "raw"\n[[variant]]\nname = "a"\nkind = "raw"\n',
            ),
        ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pml-ms-plus: error: ")
    assert message in err[0]
    assert sorted(os.listdir(out)) == ["results.csv"]
    assert (out / "results.csv").read_text() == "precious\n"


def test_default_grid_builds():
    for v in DEFAULT_VARIANTS:
        if v.kind == "train":
            build_loss(v, 64, 5)
    assert len(DEFAULT_VARIANTS) == 12


def test_datasets_are_offline_and_well_formed():
    d = data.load("digits")
    assert d.num_train_classes == 5 and sorted(set(d.test_y.tolist())) == [5, 6, 7, 8, 9]
    assert tuple(d.test_x.shape[1:]) == (1, 14, 14)
    import torch

    batch = d.make_batch(torch.arange(10), torch.Generator().manual_seed(0))
    assert tuple(batch.shape) == (10, 1, 14, 14)
    s = data.load("synthetic")
    assert s.num_train_classes == 150 and len(set(s.test_y.tolist())) == 150
    assert torch.equal(s.train_x, data.load("synthetic").train_x)  # seeded: same every time
