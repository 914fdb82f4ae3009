"""A real local Ray cluster per test module (own temp dir; never `address="auto"`)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray-it-", dir="/tmp")
    # 8 logical CPUs on 2 cores: a failed run's placement group can linger while Ray cleans it up,
    # and must not starve the next test's workers.
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=True)
    try:
        yield temp_dir
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on 127.0.0.1 with one bucket, for the tests of this module."""
    from s3_support import MotoServer

    server = MotoServer().start()
    server.client().create_bucket(Bucket="orchestrator-test")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (`mlflow server`, SQLite backend, artifacts proxied over HTTP to
    a temp directory), shared by the tests of the session; yields its tracking URI."""
    import os
    import subprocess
    import time
    import urllib.request

    from s3_support import free_port

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()
