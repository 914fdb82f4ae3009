"""Process-wide settings: the Ray connection and the storage credentials, set once per process entry.

Entry points (the CLI, `jobs/*.py`, the library's top functions `run_pipeline`, `run_sweep`,
`evaluate_run`, `run_server`) call `configure_storage(config.storage)` once; processes Ray starts
(train workers, trial functions, eval and serve replicas) receive the resolved `S3Settings`
explicitly and call `storage.configure` at their own start. Nothing below the entries touches
process-wide state.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

from orchestrator import storage
from orchestrator.config import StorageConfig, s3_settings


def configure_storage(storage_config: StorageConfig) -> storage.S3Settings:
    """Make the config's S3 settings this process's (idempotent); returns them, to hand to Ray tasks."""
    settings = s3_settings(storage_config)
    storage.configure(settings)
    return settings


def ensure_ray(address: Optional[str] = None) -> None:
    """Connect to Ray once: `address`, else RAY_ADDRESS (set by `ray job submit`), else a new local cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True)


def ensure_ray_with_dashboard(address: Optional[str] = None) -> None:
    """Connect to Ray for a sweep; a local cluster started here runs the dashboard.

    When ASHA stops a trial, Ray Train removes that trial's placement group through the State API,
    which needs the dashboard; without it the group leaks and later trials starve.
    RAY_API_SERVER_ADDRESS tells Ray's processes where the API server is.
    """
    import ray

    if ray.is_initialized() or address or os.environ.get("RAY_ADDRESS"):
        ensure_ray(address)
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.setdefault("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=True)
