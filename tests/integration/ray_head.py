"""A Ray head node (`ray start --head`) for tests that drive it from outside, like a cluster's job submitter.

Every fixed port Ray opens is chosen free here: another Ray instance on the machine (another test run, another
engineer) otherwise holds the dashboard agent's default port 52365, and the head never accepts a job
("No available agent to submit job").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from s3_support import free_port

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class RayHead:
    gcs_address: str        # 127.0.0.1:<port>, what RAY_ADDRESS points drivers at
    dashboard_url: str      # http://127.0.0.1:<port>, the job server
    env: dict[str, str]     # environment for drivers and the `ray` CLI: this venv first on PATH, token auth


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


@contextlib.contextmanager
def running_ray_head(num_cpus: int) -> Iterator[RayHead]:
    """Start a head in its own temp dir and process group; stop exactly that process group and remove the
    temp dir afterwards."""
    import psutil

    ports = {name: free_port() for name in ("port", "dashboard-port", "dashboard-agent-grpc-port",
                                            "dashboard-agent-listen-port", "metrics-export-port",
                                            "node-manager-port", "object-manager-port", "runtime-env-agent-port",
                                            "ray-client-server-port")}
    temp_dir = tempfile.mkdtemp(prefix="ray-head-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` in a job is this virtualenv's
    # Ray >= 2.59 local clusters require token auth; drivers and the CLI send ~/.ray/auth_token only in token mode.
    env["RAY_AUTH_MODE"] = "token"
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}",
         "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    dashboard_url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        wait_for_http(f"{dashboard_url}/api/version", timeout=120)
        yield RayHead(f"127.0.0.1:{ports['port']}", dashboard_url, env)
    finally:
        processes = [head]
        try:
            processes += psutil.Process(head.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        os.killpg(head.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs([psutil.Process(p.pid) for p in processes if psutil.pid_exists(p.pid)],
                                     timeout=5)
        for process in alive:
            process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
