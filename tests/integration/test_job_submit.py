"""`ray job submit` of jobs/pretrain.py against a real head node that this test starts (and stops)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orchestrator.train.checkpoint import latest_complete_checkpoint
from s3_support import free_port

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def wait_for_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (401 until a token is sent): the server is up
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@pytest.fixture
def ray_head():
    """A head node with the job server on 127.0.0.1, in its own process group so it can be stopped alone."""
    import psutil

    gcs_port, dashboard_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-job-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this virtualenv's
    # Ray >= 2.59 local clusters require token auth; the CLI sends ~/.ray/auth_token only in token mode.
    env["RAY_AUTH_MODE"] = "token"
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=4",
         "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for_http(f"{address}/api/version", timeout=120)
        yield address, env
    finally:
        processes = [head]
        try:
            processes += psutil.Process(head.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        os.killpg(head.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs([psutil.Process(p.pid) for p in processes if psutil.pid_exists(p.pid)],
                                     timeout=20)
        for process in alive:
            process.kill()


def test_ray_job_submit_pretrain(ray_head, tmp_path):
    address, env = ray_head
    storage = tmp_path / "runs"
    command = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO_ROOT), "--",
        "python", "jobs/pretrain.py", "--config", "configs/tiny.yaml",
        f"checkpoint.storage_path={storage}", "run_name=job", "pretrain.train.epochs=1",
    ]
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
        # The job server answers before the head's job agent is up; the CLI then says to try again.
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in done.stdout.lower()
    checkpoint = latest_complete_checkpoint(str(storage / "job" / "pretrain"))
    assert checkpoint is not None and (Path(checkpoint) / "model" / "model.safetensors").is_file()
    assert (storage / "job" / "models" / "pretrain" / "config.json").is_file()
