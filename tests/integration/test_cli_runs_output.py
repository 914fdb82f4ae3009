"""What `orchestrator` prints, captured from real runs (a subprocess each, its own local Ray cluster):
quiet by default (progress lines, stage summaries, where the outputs went; no Ray worker lines, no
library warnings), everything with --verbose; the run's log files keep it all either way."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = ["pretrain.train.epochs=1", "sft.train.epochs=1", "distributed.zero_stage=0"]


def run_cli(tmp_path: Path, *argv: str) -> tuple[str, Path]:
    storage = tmp_path / "runs"
    # Its own Ray temp dir, short: Ray's socket paths must stay under 108 bytes.
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-cli-", dir="/tmp"), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "orchestrator", *argv, "--config", "configs/tiny.yaml",
                           f"checkpoint.storage_path={storage}", "run_name=cli", *SMALL],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    return output, storage / "cli"


def test_default_output_is_progress_and_summaries(tmp_path):
    output, run = run_cli(tmp_path, "pipeline")
    lines = output.splitlines()
    for stage in ("pretrain", "sft"):
        assert any(line.startswith(f"✓ {stage}: prepare data") and "tokens=" in line for line in lines), output
        assert any(line.startswith(f"✓ {stage}: train ") and "loss=" in line and "eval_loss=" in line
                   for line in lines), output
        assert any(line.startswith(f"✓ {stage}: export model") for line in lines), output
        assert f"  model       {run}/models/{stage}" in lines
    assert f"run         {run}" in lines
    assert "RayTrainWorker" not in output and "pid=" not in output  # no worker log lines
    assert "Warning" not in output and "INFO" not in output  # no library warnings, no info log lines
    assert len(lines) < 30, output
    # ... which the run's log files keep
    assert "pretrain: fitting with 2 workers" in (run / "logs" / "driver.log").read_text()
    assert "epoch 1/1 done" in (run / "logs" / "pretrain" / "worker-0.log").read_text()


def test_verbose_output_shows_the_worker_log_lines(tmp_path):
    output, run = run_cli(tmp_path, "pretrain", "--verbose")
    assert "RayTrainWorker" in output and "epoch 1/1 done" in output
    assert " INFO " in output
    assert (run / "models" / "pretrain" / "config.json").is_file()
