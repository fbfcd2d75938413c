"""`pml-ms-plus ablate` under torchrun: 2 gloo processes on the CPU against one process.

The study is started the way a user starts it (``python -m torch.distributed.run ... -m
pml_ms_plus ablate``), from a directory outside the repository, so the processes import the
installed package. One rank fails on purpose (a loss of the test's own package raises on rank 1
in the second epoch): the job must end with a non-zero exit and a message naming the rank and the
run, keep the finished runs, and continue with ``--resume``. The resumed job runs each rank in its
own working directory with a relative ``--out`` (as two machines without a shared file system
would): rank 1 must write nothing and learn the finished runs and the checkpoint from rank 0.
Every number is compared with a single-process study of the same config, run in the test.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from pml_ms_plus.ablation import cli
from pml_ms_plus.ablation import distributed as ablation_dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

# synthetic, 2 epochs of 12 steps, plain SGD (Adam would hide a gradient off by a constant factor)
CONFIG = """
[study]
dataset = "synthetic"
seeds = 1
epochs = 2
batch_size = 240
m = 4
embedding_size = 16
optimizer = "sgd"
lr = 0.1
loss_lr = 0.1

[[variant]]
name = "XBM + MSLoss"
loss = "pml_ms_plus.losses.MSLoss"
loss_kwargs = { epsilon = 0.1 }
memory = "pml_ms_plus.losses.CrossBatchMemory"
memory_kwargs = { memory_size = 480, start_iteration = 5, batch_weight = 1.0 }

[[variant]]
name = "PML MS + PML miner"
loss = "pytorch_metric_learning.losses.MultiSimilarityLoss"
miner = "pytorch_metric_learning.miners.MultiSimilarityMiner"
miner_kwargs = { epsilon = 0.1 }

[[variant]]
name = "Adaptive (learned), faulty"
loss = "faultpkg.FaultyAdaptiveMSLoss"
loss_kwargs = { epsilon = 0.1, margin_mode = "learned", num_classes = "auto", fail_at = 17 }
"""

# a loss of the test's own package: AdaptiveMSLoss that fails on rank 1 at its fail_at-th call
# when FAULT is set (raise: an exception; kill: SIGKILL, the process just disappears)
FAULTPKG = """
import os
import signal

from pml_ms_plus.losses import AdaptiveMSLoss


class FaultyAdaptiveMSLoss(AdaptiveMSLoss):
    def __init__(self, fail_at=1, **kwargs):
        super().__init__(**kwargs)
        self.fail_at, self.calls = fail_at, 0

    def problem_thresholds(self, problem, sims):  # once per loss evaluation, on every path
        self.calls += 1
        fault = os.environ.get("FAULT")
        if fault and os.environ.get("RANK") == "1" and self.calls == self.fail_at:
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected fault on rank 1")
        return super().problem_thresholds(problem, sims)
"""
METRIC_KEYS = (
    "mean_average_precision_at_r",
    "r_precision",
    "precision_at_1",
    "recall_at_1",
    "recall_at_8",
    "NMI",
)


@pytest.fixture
def work(tmp_path, monkeypatch):
    pkg = tmp_path / "pkgs" / "faultpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAULTPKG)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    (tmp_path / "config.toml").write_text(CONFIG)
    return tmp_path


def torchrun(work, args, env=None, cwd=None, timeout=240):
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 ARGS``; (code, stdout, stderr)."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(work / "pkgs"), full_env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    # its own session: a job that overruns is ended with all of its processes, then the test fails
    proc = subprocess.Popen(
        cmd,
        cwd=cwd or work,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not end within {timeout} s (a hang):\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return proc.returncode, stdout, stderr


def rows_by_variant(out):
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    return results, {r["variant"]: r for r in results["rows"]}


def test_two_ranks_match_one_process_survive_a_failing_rank_and_resume(work):
    out = work / "rank0" / "out"
    # 1. the user's command; rank 1 raises in the second epoch of the third run
    code, stdout, stderr = torchrun(
        work,
        [
            "-m",
            "pml_ms_plus",
            "ablate",
            "--config",
            str(work / "config.toml"),
            "--out",
            str(out),
            "--dist-timeout",
            "60",
        ],
        env={"FAULT": "raise"},
    )
    assert code != 0, stdout + stderr
    assert "pml-ms-plus: error: rank 1 of 2: run 'Adaptive (learned), faulty' / seed 0 failed" in stderr
    assert "RuntimeError: injected fault on rank 1" in stderr and "--resume" in stderr
    assert "data-parallel: 2 processes (gloo" in stdout
    # the runs finished before the failure are kept, the failed run is checkpointed after epoch 1
    _, done = rows_by_variant(out)
    assert list(done) == ["XBM + MSLoss", "PML MS + PML miner"]
    assert len(os.listdir(out / "checkpoints")) == 1

    # 2. --resume, each rank in its own directory: rank 1 sees neither results.csv nor the checkpoint
    (work / "rank1").mkdir()
    args = ["ablate", "--config", str(work / "config.toml"), "--out", "out", "--resume"]
    shell = 'cd "$BASE/rank$LOCAL_RANK" && exec "$PY" -m pml_ms_plus "$@"'
    code, stdout, stderr = torchrun(
        work, ["--no-python", "sh", "-c", shell, "sh", *args], env={"BASE": str(work), "PY": sys.executable}
    )
    assert code == 0, stdout + stderr
    assert "resuming: 2 finished runs kept, 1 to go" in stdout
    assert "resuming Adaptive (learned), faulty / seed 0 from its checkpoint after epoch 1/2" in stdout
    assert os.listdir(work / "rank1") == []  # only rank 0 writes
    results, ddp = rows_by_variant(out)
    assert results["meta"]["world_size"] == 2 and results["meta"]["backend"] == "gloo"
    with open(out / "versions.json") as f:
        versions = json.load(f)
    assert (versions["world_size"], versions["backend"], versions["processes_per_node"]) == (2, "gloo", 2)
    assert "data-parallel over 2 processes (gloo, 120 per process)" in (out / "summary.md").read_text()

    # 3. one process, the same config: the same numbers (float reduction order aside)
    single_out = work / "single"
    assert cli.main(["ablate", "--config", str(work / "config.toml"), "--out", str(single_out)]) == 0
    single_results, single = rows_by_variant(single_out)
    assert single_results["meta"]["world_size"] == 1 and single_results["meta"]["backend"] is None
    assert list(ddp) == list(single)
    for name, row in single.items():
        for key in METRIC_KEYS:
            assert abs(ddp[name][key] - row[key]) <= 1e-4, (name, key, ddp[name][key], row[key])
        assert ddp[name]["losses"] == pytest.approx(row["losses"], rel=1e-5)
        assert row["mean_average_precision_at_r"] > 0.1  # trained, not a degenerate run


@pytest.mark.skipif(
    os.environ.get("PML_MS_PLUS_DIST_LONG") != "1",
    reason="one more torchrun job (~12 s on 2 cores); PML_MS_PLUS_DIST_LONG=1 runs it",
)
def test_a_killed_rank_ends_the_job(work, tmp_path):
    config = tmp_path / "one.toml"
    head = CONFIG.split("[[variant]]")[0].replace("epochs = 2", "epochs = 1")
    faulty = CONFIG.split("[[variant]]")[3].replace("fail_at = 17", "fail_at = 3")
    config.write_text(head + "[[variant]]" + faulty)
    args = ["-m", "pml_ms_plus", "ablate", "--config", str(config), "--out", str(tmp_path / "out")]
    code, stdout, stderr = torchrun(work, args, env={"FAULT": "kill"}, timeout=120)
    assert code != 0
    assert "SIGKILL" in stderr, stderr[-3000:]
    assert not (tmp_path / "out" / "results.csv").exists()


def test_a_batch_the_processes_do_not_divide_is_refused_before_anything_starts(tmp_path):
    args = cli.build_parser().parse_args(
        [
            "ablate",
            "--dataset",
            "synthetic",
            "--batch-size",
            "45",
            "--samples-per-class",
            "3",
            "--out",
            str(tmp_path),
        ]
    )
    two = ablation_dist.Distributed(0, 2, 0, 2, "gloo", None)
    with pytest.raises(ValueError, match="batch_size 45 is not divisible by the 2 processes"):
        cli._prepare_here(args, two)
    assert cli._prepare_here(args, None).settings["batch_size"] == 45  # one process takes it


def test_environment_without_torchrun_and_bad_timeouts():
    assert ablation_dist.from_environment("cpu", environ={}) is None
    assert ablation_dist.from_environment("cpu", environ={"WORLD_SIZE": "1"}) is None
    with pytest.raises(
        ablation_dist.DistributedError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"
    ):
        ablation_dist.from_environment("cpu", environ={"WORLD_SIZE": "2"})
    with pytest.raises(ablation_dist.DistributedError, match="not a number"):
        ablation_dist.from_environment("cpu", environ={"WORLD_SIZE": "two"})
    with pytest.raises(ablation_dist.DistributedError, match="--dist-timeout must be > 0"):
        ablation_dist.from_environment("cpu", 0, environ={"WORLD_SIZE": "2"})


def test_shares_cover_the_rows_in_order():
    for n in (0, 1, 5, 80, 81):
        for world in (1, 2, 3, 8):
            shares = [
                ablation_dist.Distributed(r, world, r, world, "gloo", None).share(n) for r in range(world)
            ]
            covered = [i for s in shares for i in range(n)[s]]
            assert covered == list(range(n))
            if n % world == 0:
                assert {s.stop - s.start for s in shares} == {n // world}


def test_sync_bn_needs_cuda(tmp_path, capsys):
    assert cli.main(["ablate", "--dataset", "synthetic", "--sync-bn", "--out", str(tmp_path / "o")]) == 2
    assert "--sync-bn needs --device cuda" in capsys.readouterr().err


def test_image_sampler_shares_rebuild_the_single_process_batches():
    import numpy as np
    from pytorch_metric_learning.samplers import MPerClassSampler

    from pml_ms_plus.ablation.train import _SeededSampler, seed_everything

    labels = torch.arange(120) % 12
    bs, world = 24, 3

    def draw(share):
        seed_everything(3)  # the sampler draws from numpy's global generator, as in a run
        sampler = _SeededSampler(
            MPerClassSampler(labels, 4, batch_size=bs, length_before_new_iter=120), 7, bs, share
        )
        sampler.epoch = 2
        return list(iter(sampler)), len(sampler), sampler.per_batch

    single, n_single, _ = draw(slice(None))
    assert n_single == len(single) == 120
    parts = [
        draw(ablation_dist.Distributed(r, world, r, world, "gloo", None).share(bs)) for r in range(world)
    ]
    for items, n, per_batch in parts:
        assert per_batch == bs // world and n == len(items) == 120 // world
    # batch by batch, the ranks' shares in rank order are the single-process batch (indices and seeds)
    rebuilt = [p for b in range(120 // bs) for items, _, k in parts for p in items[b * k : (b + 1) * k]]
    assert rebuilt == single
    assert np.unique([i for i, _ in single]).size > 1
