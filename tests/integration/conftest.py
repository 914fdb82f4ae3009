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
