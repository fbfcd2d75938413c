"""`pml-ms-plus ablate` end to end on tiny settings, --resume, and every bad input."""

import csv
import errno
import json
import os
import shutil
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


def tiny_arrays():
    """160 points in 4-d, 8 classes: 4 train (80 samples), 4 held out; trains in a blink."""
    g = np.random.default_rng(0)
    y = np.arange(160) % 8
    return (g.standard_normal((160, 4)) + y[:, None]).astype(np.float32), y


def tiny_npz(tmp_path, name="tiny.npz", scale=1.0):
    x, y = tiny_arrays()
    return make_npz(tmp_path, name, x=x * scale, y=y)


STUDY = "[study]\nseeds = 1\nepochs = 1\nbatch_size = 32\nm = 8\n"
MS_VARIANT = '[[variant]]\nname = "a"\nloss = "pml_ms_plus.losses.MSLoss"\n'

# bad inputs the pre-flight checks used to miss: (config text, message); run on tiny.npz
LATE_FAILURES = {
    "memory_too_small": (
        STUDY + MS_VARIANT + 'memory = "pml_ms_plus.losses.CrossBatchMemory"\n'
        "memory_kwargs = { memory_size = 10 }\n",
        "memory_size=10 is smaller than batch_size=32",
    ),
    "lr_inf": (STUDY + "lr = inf\n" + MS_VARIANT, "'lr' must be a finite number > 0, got inf"),
    "lr_nan": (STUDY + "lr = nan\n" + MS_VARIANT, "'lr' must be a finite number > 0, got nan"),
    "loss_lr_inf": (STUDY + "loss_lr = inf\n" + MS_VARIANT, "'loss_lr' must be a finite number > 0"),
    "name_int": (STUDY + '[[variant]]\nname = 3\nkind = "raw"\n', "name must be a non-empty string, got 3"),
    "name_empty": (STUDY + '[[variant]]\nname = ""\nkind = "raw"\n', "name must be a non-empty string"),
    # a '|' or a line break in a name broke summary.md's tables (a column more, a row split)
    "name_pipe": (STUDY + '[[variant]]\nname = "raw | A"\nkind = "raw"\n', "'|' (the column separator"),
    "name_newline": (
        STUDY + '[[variant]]\nname = "raw\\nA"\nkind = "raw"\n',
        "is not printable (a line break",
    ),
    "loss_mse": (
        STUDY + '[[variant]]\nname = "a"\nloss = "torch.nn.MSELoss"\n',
        "'torch.nn.MSELoss' is not a subclass of pytorch_metric_learning.losses.BaseMetricLossFunction",
    ),
    "loss_linear": (
        STUDY + '[[variant]]\nname = "a"\nloss = "torch.nn.Linear"\n',
        "'torch.nn.Linear' is not a subclass of pytorch_metric_learning.losses.BaseMetricLossFunction",
    ),
    "miner_is_a_loss": (
        STUDY + MS_VARIANT + 'miner = "pytorch_metric_learning.losses.ContrastiveLoss"\n',
        "is not a subclass of pytorch_metric_learning.miners.BaseMiner",
    ),
    "memory_not_a_wrapper": (
        STUDY + MS_VARIANT + 'memory = "torch.nn.Identity"\n',
        "is not a subclass of pytorch_metric_learning.losses.BaseLossWrapper",
    ),
    "learned_num_classes": (
        STUDY + '[[variant]]\nname = "a"\nloss = "pml_ms_plus.losses.AdaptiveMSLoss"\n'
        'loss_kwargs = { margin_mode = "learned", num_classes = 2 }\n',
        "num_classes=2 is smaller than the 4 training classes",
    ),
    # C4: a plain top-level module is refused before it is imported (importing `this` prints)
    "loss_this": (
        STUDY + '[[variant]]\nname = "a"\nloss = "this.Loss"\n',
        "'this' is a module, not a package",
    ),
    "loss_os_system": (
        STUDY + '[[variant]]\nname = "a"\nloss = "os.system"\nloss_kwargs = { command = "echo pwned" }\n',
        "'os' is a module, not a package",
    ),
    "loss_bare": (STUDY + '[[variant]]\nname = "a"\nloss = "this"\n', "is not an import path"),
    # keyword arguments of the wrong type that PML's constructors take: the floor variant had run
    # and written every result file, then the first training step raised (exit 1, a traceback)
    "loss_kwargs_wrong_type": (
        STUDY + '[[variant]]\nname = "floor"\nkind = "raw"\n'
        '[[variant]]\nname = "a"\nloss = "pytorch_metric_learning.losses.MultiSimilarityLoss"\n'
        'loss_kwargs = { alpha = "two" }\n',
        "variant 'a': its loss failed on a batch of 32 random embeddings: TypeError",
    ),
    "miner_kwargs_wrong_type": (
        STUDY + MS_VARIANT + 'miner = "pytorch_metric_learning.miners.MultiSimilarityMiner"\n'
        'miner_kwargs = { epsilon = "a" }\n',
        "variant 'a': its miner and loss failed on a batch of 32 random embeddings: TypeError",
    ),
    "too_many_seeds": (  # passed, created --out, then hung building the list of runs
        STUDY.replace("seeds = 1", "seeds = 1000000000000") + MS_VARIANT,
        "'seeds' must be at most 10,000, got 1,000,000,000,000",
    ),
}


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_dataset", "unknown dataset"),
        ("missing_npz", "no such file"),
        ("npz_without_y", "has no array 'y'"),
        ("npz_mismatch", "'x' has 30 rows but 'y' has 29 labels"),
        ("npz_not_a_zip", "not an .npz archive"),  # numpy's message blamed pickled data
        ("npz_a_npy", "not an .npz archive"),  # numpy's: no context manager protocol
        ("one_train_class", "at least 2 training classes"),
        ("bad_toml", "cannot read config"),
        ("config_not_utf8", "it is not UTF-8 text"),  # was a decoder message naming no file
        ("missing_config", "config file not found"),
        ("bad_import", "cannot import module 'not_a_module'"),
        ("bad_attribute", "has no 'NoSuchLoss'"),
        ("bad_kwargs", "epsilon must be"),
        ("bad_m", "not a multiple of m=7"),
        ("m_too_small", "cannot fill a batch of 80 with m=4 per class from 5 training classes"),
        ("bad_setting", "unknown study setting 'learning_rate'"),
        ("bad_seeds", "'seeds' must be >= 1"),
        ("duplicate_names", "repeated"),
        *[(case, message) for case, (_, message) in LATE_FAILURES.items()],
        ("npz_overflow", "beyond the float32 range"),
        ("npz_complex", "'x' is complex"),
        ("out_under_file", "is not a directory"),
        ("out_read_only", "is not writable"),
        ("results_without_resume", "pass --resume"),
        ("out_empty", "--out is empty"),  # was a FileNotFoundError traceback, exit 1
        ("out_uncreatable", "cannot create it"),  # passed the checks, failed after loading the data
        ("out_in_use", "in use by another pml-ms-plus run"),  # the later run's rows replaced the other's
    ],
)
def test_bad_input_exits_2_and_touches_nothing(tmp_path, capfd, case, message):
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
    elif case == "npz_not_a_zip":
        (tmp_path / "text.npz").write_text("x,y\n1,0\n")
        args += ["--dataset", str(tmp_path / "text.npz")]
    elif case == "npz_a_npy":
        np.save(tmp_path / "a.npy", x)
        os.replace(tmp_path / "a.npy", tmp_path / "a.npz")
        args += ["--dataset", str(tmp_path / "a.npz")]
    elif case == "one_train_class":
        args += [
            "--dataset",
            make_npz(tmp_path, "c.npz", x=x, y=np.arange(30) % 3, train_classes=np.array([0])),
        ]
    elif case == "bad_toml":
        args += ["--config", write(tmp_path, "c.toml", "[study\nseeds = ")]
    elif case == "config_not_utf8":
        path = tmp_path / "c.toml"
        path.write_bytes('[[variant]]\nname = "café"\nkind = "raw"\n'.encode("latin-1"))
        args += ["--config", str(path)]
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
    elif case in LATE_FAILURES:
        args += [
            "--config",
            write(tmp_path, "c.toml", LATE_FAILURES[case][0]),
            "--dataset",
            tiny_npz(tmp_path),
        ]
    elif case in ("npz_overflow", "npz_complex"):
        # 1e300 is finite in float64 but inf in float32; the rest of the setup is valid
        npz = tiny_npz(tmp_path, scale=np.float64(1e300) if case == "npz_overflow" else 1 + 1j)
        args += ["--config", write(tmp_path, "c.toml", STUDY + MS_VARIANT), "--dataset", npz]
    elif case == "out_under_file":
        args += ["--out", str(out / "results.csv" / "sub")]
    elif case == "out_read_only":
        if os.geteuid() == 0:
            pytest.skip("root may write into a read-only directory (os.access says so); see out_under_file")
        out.chmod(0o555)
        args += ["--out", str(out / "sub")]
    elif case == "results_without_resume":
        args += ["--config", write(tmp_path, "c.toml", STUDY + '[[variant]]\nname = "raw"\nkind = "raw"\n')]
        args += ["--dataset", tiny_npz(tmp_path)]
    elif case == "out_empty":
        args += ["--out", ""]
    elif case == "out_uncreatable":
        if not os.path.isdir("/proc/self") or os.geteuid() != 0:
            pytest.skip(
                "needs Linux's /proc, where no directory can be made, and root, whom access() lets write"
            )
        args += ["--config", write(tmp_path, "c.toml", STUDY + '[[variant]]\nname = "raw"\nkind = "raw"\n')]
        args += ["--out", "/proc/pml-ms-plus-out", "--dataset", tiny_npz(tmp_path)]
    elif case == "out_in_use":
        fcntl = pytest.importorskip("fcntl")
        busy = tmp_path / "busy"
        busy.mkdir()
        held = os.open(busy, os.O_RDONLY)  # what a run in progress holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        args += ["--config", write(tmp_path, "c.toml", STUDY + '[[variant]]\nname = "raw"\nkind = "raw"\n')]
        args += ["--dataset", tiny_npz(tmp_path), "--out", str(busy)]
    try:
        assert cli.main(args) == 2
    finally:
        out.chmod(0o755)
        if case == "out_in_use":
            os.close(held)
            assert os.listdir(tmp_path / "busy") == []
    captured = capfd.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pml-ms-plus: error: "), err
    assert message in err[0]
    assert captured.out == ""  # nothing printed: no Zen of Python, no shell command run
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


FLOORS_AND_MS = (
    STUDY + '[[variant]]\nname = "raw"\nkind = "raw"\n[[variant]]\nname = "untrained"\nkind = "untrained"\n'
    '[[variant]]\nname = "ms"\nloss = "pml_ms_plus.losses.MSLoss"\n'
)


def test_resume_never_deletes_finished_rows(tmp_path, capsys):
    npz = tiny_npz(tmp_path)
    config = write(tmp_path, "c.toml", FLOORS_AND_MS)
    out = str(tmp_path / "out")
    base = ["ablate", "--config", config, "--dataset", npz, "--out", out]
    assert cli.main(base) == 0
    first = read_rows(out)
    assert [r["variant"] for r in first] == ["raw", "untrained", "ms"]

    # other epochs: the floors do not depend on them, so only "ms" reruns; the old "ms" row stays
    capsys.readouterr()
    assert cli.main(base + ["--resume", "--epochs", "2"]) == 0
    assert "2 finished runs kept, 1 to go" in capsys.readouterr().out
    rows = read_rows(out)
    assert len(rows) == 4 and first[2] in rows
    summary = open(os.path.join(out, "summary.md")).read()
    assert "| ms | 1 |" in summary and "1 other finished run" in summary
    assert len(json.load(open(os.path.join(out, "results.json")))["rows"]) == 3

    # a config listing fewer variants: nothing to run, nothing dropped
    fewer = write(tmp_path, "fewer.toml", STUDY + '[[variant]]\nname = "raw"\nkind = "raw"\n')
    capsys.readouterr()
    assert cli.main(["ablate", "--config", fewer, "--dataset", npz, "--out", out, "--resume"]) == 0
    assert "1 finished runs kept, 0 to go" in capsys.readouterr().out
    assert sorted(map(str, read_rows(out))) == sorted(map(str, rows))
    summary = open(os.path.join(out, "summary.md")).read()
    assert "| raw |" in summary and "| ms |" not in summary and "3 other finished runs" in summary


def test_floor_hash_ignores_training_settings():
    from pml_ms_plus.ablation.config import DEFAULT_SETTINGS, Variant, variant_hash

    raw, untrained = Variant("raw", kind="raw"), Variant("untrained", kind="untrained")
    trained = Variant("ms", loss="pml_ms_plus.losses.MSLoss")
    other = dict(DEFAULT_SETTINGS, epochs=2, lr=0.5, loss_lr=0.5, batch_size=8, m=2, seeds=9)
    assert variant_hash(raw, DEFAULT_SETTINGS) == variant_hash(raw, other)
    assert variant_hash(untrained, DEFAULT_SETTINGS) == variant_hash(untrained, other)
    assert variant_hash(trained, DEFAULT_SETTINGS) != variant_hash(trained, other)
    assert variant_hash(raw, DEFAULT_SETTINGS) != variant_hash(
        raw, dict(DEFAULT_SETTINGS, dataset="synthetic")
    )
    bigger = dict(DEFAULT_SETTINGS, embedding_size=8)
    assert variant_hash(untrained, DEFAULT_SETTINGS) != variant_hash(untrained, bigger)
    assert variant_hash(raw, DEFAULT_SETTINGS) == variant_hash(raw, bigger)


HEADER = "variant,seed,config_hash,mean_average_precision_at_r,r_precision,precision_at_1,NMI,train_seconds,losses\n"
GOOD_ROW = "raw,0,abc,0.5,0.5,0.5,0.5,0.1,[]\n"


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ("raw,0,abc,0.5,0.5\n", "line 3: 5 fields, expected 9"),  # truncated
        ("raw,0,abc,0.5,0.5,0.5,0.5,0.1,[],extra\n", "line 3: 10 fields, expected 9"),
        (
            "raw,0,abc,high,0.5,0.5,0.5,0.1,[]\n",
            "line 3: mean_average_precision_at_r is not a number: 'high'",
        ),
        ("raw,zero,abc,0.5,0.5,0.5,0.5,0.1,[]\n", "line 3: seed is not an integer >= 0: 'zero'"),
        ('raw,0,abc,0.5,0.5,0.5,0.5,0.1,"[1, 2"\n', "line 3: losses is not a JSON list of numbers"),
        ('raw,0,abc,0.5,0.5,0.5,0.5,0.1,"{}"\n', "line 3: losses is not a JSON list of numbers"),
        # accepted before: a run counted twice (summary.md said 3 seeds for 2), impossible values
        (GOOD_ROW, "line 3: a second row of run 'raw' / seed 0 (config abc), first on line 2"),
        (
            "raw,1,abc,-7,0.5,0.5,0.5,0.1,[]\n",
            "line 3: mean_average_precision_at_r is not a fraction in [0, 1]",
        ),
        ("raw,1,abc,0.5,0.5,0.5,inf,0.1,[]\n", "line 3: NMI is not a fraction in [0, 1]: 'inf'"),
        ("raw,1,abc,0.5,0.5,0.5,0.5,inf,[]\n", "line 3: train_seconds is not a finite number >= 0: 'inf'"),
        ("raw,1,abc,0.5,0.5,0.5,0.5,-1,[]\n", "line 3: train_seconds is not a finite number >= 0: '-1'"),
    ],
)
def test_malformed_results_csv_exits_2_with_line(tmp_path, capsys, bad_row, message):
    out = tmp_path / "out"
    out.mkdir()
    text = HEADER + GOOD_ROW + bad_row
    (out / "results.csv").write_text(text)
    config = write(tmp_path, "c.toml", STUDY + '[[variant]]\nname = "raw"\nkind = "raw"\n')
    args = ["ablate", "--config", config, "--dataset", tiny_npz(tmp_path), "--out", str(out), "--resume"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pml-ms-plus: error: ")
    assert f"{out / 'results.csv'}, {message}" in err[0]
    assert sorted(os.listdir(out)) == ["results.csv"] and (out / "results.csv").read_text() == text


def run_raw_only(tmp_path, out):
    config = write(tmp_path, "raw.toml", STUDY + '[[variant]]\nname = "raw"\nkind = "raw"\n')
    return cli.main(["ablate", "--config", config, "--dataset", tiny_npz(tmp_path), "--out", str(out)])


def test_result_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert run_raw_only(tmp_path, tmp_path / "out") == 0
    finally:
        os.umask(old)
    for name in OUTPUTS:
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o640, name


def test_stale_temp_files_are_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".tmp-k1ll3dresults.csv").write_text("half a file")
    (out / "notes.txt").write_text("mine")
    assert run_raw_only(tmp_path, out) == 0
    assert sorted(os.listdir(out)) == sorted(OUTPUTS + ["notes.txt"])


def test_stdout_closed_early_gives_no_traceback(tmp_path):
    """`pml-ms-plus ablate ... | head -1`: the reader goes away after one line."""
    config = write(tmp_path, "tiny.toml", TINY)
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # the first "done:" line comes at once, the rest later
    proc = subprocess.Popen(
        [sys.executable, "-m", "pml_ms_plus", "ablate", "--config", config, "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert first.startswith(b"done: raw")
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 1


NEW_HEADER = ",".join(
    ["variant", "seed", "config_hash", "mean_average_precision_at_r", "r_precision", "precision_at_1"]
    + [f"recall_at_{k}" for k in (1, 2, 4, 8)]
    + ["NMI", "epoch", "train_seconds", "losses", "evaluations"]
)


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ("raw,0,abc,0.5,0.5\n", "line 2: 5 fields, expected 15"),
        ("raw,0,abc,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,x,0.1,[],[]\n", "line 2: epoch is not a number: 'x'"),
        # a fractional epoch was rewritten as an integer, a negative one kept
        ("raw,0,abc,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,1.5,0.1,[],[]\n", "line 2: epoch is not an integer >= 0"),
        ("raw,0,abc,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,-2,0.1,[],[]\n", "line 2: epoch is not an integer >= 0"),
        # an infinite epoch escaped as an OverflowError (a traceback, exit 1)
        ("raw,0,abc,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,inf,0.1,[],[]\n", "line 2: epoch is not an integer >= 0"),
        (
            'raw,0,abc,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0,0.1,[],"[1]"\n',
            "line 2: evaluations is not a JSON list",
        ),
    ],
)
def test_malformed_results_csv_of_this_version(tmp_path, capsys, bad_row, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text(NEW_HEADER + "\n" + bad_row)
    config = write(tmp_path, "c.toml", STUDY + '[[variant]]\nname = "raw"\nkind = "raw"\n')
    args = ["ablate", "--config", config, "--dataset", tiny_npz(tmp_path), "--out", str(out), "--resume"]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_a_results_csv_of_0_2_0_still_resumes(tmp_path, capsys):
    """Its rows lack Recall@K: they are kept and shown as '–'; nothing is lost."""
    npz = tiny_npz(tmp_path)
    config = write(tmp_path, "c.toml", STUDY + '[[variant]]\nname = "raw"\nkind = "raw"\n')
    out = tmp_path / "out"
    assert cli.main(["ablate", "--config", config, "--dataset", npz, "--out", str(out)]) == 0
    (row,) = read_rows(out)
    old = HEADER + ",".join([row[k] for k in HEADER.strip().split(",")]) + "\n"
    (out / "results.csv").write_text(old)  # as 0.2.0 wrote it
    capsys.readouterr()
    assert cli.main(["ablate", "--config", config, "--dataset", npz, "--out", str(out), "--resume"]) == 0
    assert "1 finished runs kept, 0 to go" in capsys.readouterr().out
    (again,) = read_rows(out)
    assert again["mean_average_precision_at_r"] == row["mean_average_precision_at_r"]
    assert again["recall_at_1"] == ""
    assert "| raw | 1 | " in (out / "summary.md").read_text() and " – |" in (out / "summary.md").read_text()


def test_a_finished_runs_checkpoint_left_by_an_interrupt_is_removed_on_resume(tmp_path, monkeypatch, capsys):
    """An interrupt after a run's row is in results.csv but before its checkpoint is removed
    (the plots are written in between) left the checkpoint for good: --resume found nothing to
    run and never looked at it. Now --resume removes checkpoints of finished runs."""
    from pml_ms_plus.ablation import report

    config = write(tmp_path, "c.toml", STUDY.replace("epochs = 1", "epochs = 2") + MS_VARIANT)
    base = ["ablate", "--config", config, "--dataset", tiny_npz(tmp_path), "--out", str(tmp_path / "out")]
    plot = report.plot_metrics

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "plot_metrics", interrupted)
    assert cli.main(base) == 130
    assert len(read_rows(tmp_path / "out")) == 1 and os.listdir(tmp_path / "out" / "checkpoints")
    monkeypatch.setattr(report, "plot_metrics", plot)
    capsys.readouterr()
    assert cli.main(base + ["--resume"]) == 0
    captured = capsys.readouterr()
    assert "1 finished runs kept, 0 to go" in captured.out and "a finished run's checkpoint" in captured.err
    assert sorted(os.listdir(tmp_path / "out")) == sorted(OUTPUTS)


def interrupted_checkpoint(tmp_path, monkeypatch):
    """A two-epoch toy run interrupted after its first epoch: ``(command, checkpoint path)``."""
    from pml_ms_plus.ablation import checkpoint

    config = write(tmp_path, "c.toml", STUDY.replace("epochs = 1", "epochs = 2") + MS_VARIANT)
    out = tmp_path / "out"
    base = ["ablate", "--config", config, "--dataset", tiny_npz(tmp_path), "--out", str(out)]
    save = checkpoint.save

    def save_then_die(file, state):
        save(file, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    assert cli.main(base) == 130
    monkeypatch.setattr(checkpoint, "save", save)
    (name,) = checkpoint.existing(str(out))
    return base, out / "checkpoints" / name


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncated", "cannot read checkpoint"),  # was a traceback, exit 1
        # a file torch loads that lacks a checkpoint's entries (another format, another tool's
        # file): was a KeyError traceback, exit 1
        ("no rng", "KeyError: 'rng'"),
        ("no model", "KeyError: 'model'"),
    ],
)
def test_a_bad_checkpoint_stops_resume_with_exit_2_and_its_name(
    tmp_path, monkeypatch, capsys, damage, message
):
    """An error line naming the file and what to do, exit 2; the file is left for the user to
    look at."""
    import torch

    base, ckpt = interrupted_checkpoint(tmp_path, monkeypatch)
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:100])
    else:
        state = torch.load(ckpt, weights_only=True)
        del state[damage.split()[1]]
        torch.save(state, ckpt)
    capsys.readouterr()
    assert cli.main(base + ["--resume"]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("pml-ms-plus: error:")]  # beside the progress bar
    assert "Traceback" not in err and str(ckpt) in line and message in line
    assert "delete it to restart that run" in line and ckpt.exists()


def test_ctrl_c_while_preparing_exits_130_with_the_message(tmp_path, monkeypatch, capsys):
    """Interrupted before the first run (loading the data, checking the variants): the promised
    line and exit 130, nothing written (was a KeyboardInterrupt traceback)."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "prepare", interrupted)
    out = tmp_path / "out"
    assert cli.main(["ablate", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "pml-ms-plus: interrupted before the first run started"
    assert not out.exists()


@pytest.mark.parametrize("value", ["-5", "0", "inf", "nan", "soon"])
def test_a_dist_timeout_that_is_not_a_positive_number_is_refused(tmp_path, value, capsys):
    """Refused by the parser (a negative or infinite timeout was taken, and the study ran)."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        cli.main(["ablate", "--dist-timeout", value, "--seeds", "1", "--epochs", "1", "--out", str(out)])
    assert exited.value.code == 2
    assert "--dist-timeout" in capsys.readouterr().err and not out.exists()


def test_the_lock_reads_results_again_and_a_file_system_without_locks_runs_unlocked(
    tmp_path, monkeypatch, capsys
):
    """claim_out re-reads results.csv under the lock (a run that finished between prepare's
    read and the lock has its rows kept); a flock that fails for another reason than a holder
    (NFS, some FUSE systems) is a warning, not 'in use'."""
    fcntl = pytest.importorskip("fcntl")
    npz = tiny_npz(tmp_path)
    config = write(tmp_path, "c.toml", STUDY + '[[variant]]\nname = "raw"\nkind = "raw"\n')
    out = tmp_path / "out"
    assert cli.main(["ablate", "--config", config, "--dataset", npz, "--out", str(tmp_path / "other")]) == 0
    args = cli.build_parser().parse_args(["ablate", "--config", config, "--dataset", npz, "--out", str(out)])
    args.resume = True
    study = cli.prepare(args)
    assert study.done == []
    out.mkdir()
    shutil.copy(tmp_path / "other" / "results.csv", out / "results.csv")  # finished meanwhile
    handle = cli.claim_out(study)
    try:
        assert len(study.done) == 1 and study.done[0]["variant"] == "raw"
    finally:
        os.close(handle)

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    capsys.readouterr()
    assert cli.main(["ablate", "--config", config, "--dataset", npz, "--out", str(out), "--resume"]) == 0
    captured = capsys.readouterr()
    assert "warning: cannot lock --out" in captured.err and "1 finished runs kept, 0 to go" in captured.out


def test_resume_notices_a_changed_npz(tmp_path, capsys):
    """The runs' config hash covers the .npz file's contents, not only its path: new data under
    the same name is a new study (the old rows are kept as other runs), where --resume had kept
    the old numbers as current."""
    npz = tiny_npz(tmp_path)
    config = write(tmp_path, "c.toml", STUDY + '[[variant]]\nname = "raw"\nkind = "raw"\n')
    base = ["ablate", "--config", config, "--dataset", npz, "--out", str(tmp_path / "out")]
    assert cli.main(base) == 0
    (first,) = read_rows(tmp_path / "out")
    tiny_npz(tmp_path, scale=3.0)  # other features, the same file name
    capsys.readouterr()
    assert cli.main(base + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "0 finished runs kept, 1 to go" in out and "keeps 1 runs outside this study" in out
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 2 and rows[0]["config_hash"] != rows[1]["config_hash"]
    assert first in rows


@pytest.mark.parametrize("name", ["a", ".tmp-a"])
def test_toy_run_interrupted_after_an_epoch_resumes_with_the_same_numbers(
    tmp_path, monkeypatch, capsys, name
):
    """Also for a variant whose name starts like a temporary file: its checkpoint was taken for
    a stray temporary file, deleted, and the run started again from epoch 0."""
    from pml_ms_plus.ablation import checkpoint

    npz = tiny_npz(tmp_path)
    text = STUDY.replace("epochs = 1", "epochs = 3") + MS_VARIANT.replace('"a"', f'"{name}"')
    config = write(tmp_path, "c.toml", text)
    base = ["ablate", "--config", config, "--dataset", npz]
    assert cli.main(base + ["--out", str(tmp_path / "whole")]) == 0
    save = checkpoint.save

    def save_then_die(file, state):
        save(file, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    out = str(tmp_path / "out")
    assert cli.main(base + ["--out", out]) == 130
    err = capsys.readouterr().err
    assert "no run has finished yet" in err and "add --resume to continue" in err  # no results.csv yet
    monkeypatch.setattr(checkpoint, "save", save)
    assert cli.main(base + ["--out", out, "--resume"]) == 0
    assert "from its checkpoint after epoch 2/3" in capsys.readouterr().out
    (a,), (b,) = read_rows(tmp_path / "whole"), read_rows(out)
    assert a["losses"] == b["losses"] and a["mean_average_precision_at_r"] == b["mean_average_precision_at_r"]
    assert sorted(os.listdir(out)) == sorted(OUTPUTS)  # the checkpoint is gone


@pytest.mark.parametrize(
    "setting, message",
    [
        ('schedule = "step"', "schedule 'step' needs lr_steps"),
        ("lr_steps = [2, 1]", "'lr_steps' must be increasing"),
        ('amp = "fp8"', "'amp' must be one of none, bf16, fp16"),
        ('select = "top"', "'select' must be one of last, best"),
        ('select_metric = "recall_at_3"', "'select_metric' must be one of"),
        ("warmup_epochs = -1", "'warmup_epochs' must be a finite number >= 0"),
        ('baseline = "nope"', "baseline 'nope' is not a variant of this study"),
        ('optimizer = "lbfgs"', "'optimizer' must be one of adam, adamw, sgd"),
        ("image_size = 32", "setting 'image_size' applies to the image data sets"),
    ],
)
def test_bad_training_settings_exit_2(tmp_path, capsys, setting, message):
    config = write(tmp_path, "c.toml", STUDY + setting + "\n" + MS_VARIANT)
    out = tmp_path / "out"
    assert cli.main(["ablate", "--config", config, "--dataset", tiny_npz(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
