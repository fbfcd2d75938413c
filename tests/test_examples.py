"""Every example runs (tiny settings), so none rots."""

import os
import subprocess
import sys

import pytest

from pml_ms_plus.ablation import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "script, args",
    [
        ("drop_in_pml_loop.py", ["--steps", "20"]),
        ("drop_in_pml_loop.py", ["--steps", "30", "--memory"]),
        ("train_and_evaluate.py", ["--epochs", "2"]),
    ],
)
def test_example_scripts_run(script, args):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "final loss" in result.stdout or "trained" in result.stdout


def test_example_ablation_config_runs(tmp_path):
    config = os.path.join(ROOT, "examples", "ablation_config.toml")
    out = str(tmp_path / "out")
    assert cli.main(["ablate", "--config", config, "--epochs", "1", "--seeds", "1", "--out", out]) == 0
    assert os.path.exists(os.path.join(out, "summary.md"))
