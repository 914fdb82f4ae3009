"""A real local Ray cluster per test module (own temp dir; never `address="auto"`)."""

from __future__ import annotations

import tempfile

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray-it-", dir="/tmp")
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()
