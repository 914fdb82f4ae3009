"""`ray job submit` of jobs/pretrain.py against a real head node that this test starts (and stops)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.checkpoint import latest_complete_checkpoint
from ray_head import BIN, running_ray_head

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_head():
    with running_ray_head(num_cpus=4) as head:
        yield head


def submit(ray_head, *job_args: str) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- python jobs/pretrain.py …`, waiting for the job agent."""
    command = [str(BIN / "ray"), "job", "submit", "--address", ray_head.dashboard_url, "--working-dir",
               str(REPO_ROOT), "--", "python", "jobs/pretrain.py", "--config", "configs/cluster-dev.yaml", *job_args]
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(command, env=ray_head.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
        # The job server answers before the head's job agent is up; the CLI then says to try again.
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(3)


def test_a_relative_storage_path_is_refused_in_a_job_with_a_working_dir(ray_head):
    # configs/cluster-dev.yaml says storage_path: runs, which would land in Ray's temporary copy of the repo.
    done = submit(ray_head, "run_name=job-relative")
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-4000:]
    assert "checkpoint.storage_path 'runs' resolves to" in output, output[-4000:]
    assert "deletes with the job" in output and "s3://bucket/runs" in output
    assert not (REPO_ROOT / "runs" / "job-relative").exists()


def test_ray_job_submit_pretrain(ray_head, tmp_path):
    """A job with --verbose: its output (streamed by `ray job submit`) has every log line, the Ray Train
    workers' included (the quiet default is checked by tests/integration/test_k8s_entrypoints.py)."""
    storage = tmp_path / "runs"
    done = submit(ray_head, f"checkpoint.storage_path={storage}", "run_name=job",
                  "--verbose")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in done.stdout.lower()
    assert "RayTrainWorker" in done.stdout and "epoch 1/1 done" in done.stdout and " INFO " in done.stdout
    checkpoint = latest_complete_checkpoint(str(storage / "job" / "pretrain"))
    assert checkpoint is not None and (Path(checkpoint) / "model" / "model.safetensors").is_file()
    assert (storage / "job" / "models" / "pretrain" / "config.json").is_file()
