"""Process-wide settings: the Ray connection and the storage credentials, set once per process entry.

Entry points (the CLI, `jobs/*.py`, the library's top functions `run_pipeline`, `run_sweep`,
`evaluate_run`, `run_server`) call `configure_storage(config.storage)` once; processes Ray starts
(train workers, trial functions, eval and serve replicas) receive the resolved `S3Settings`
explicitly and call `storage.configure` at their own start. Nothing below the entries touches
process-wide state.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any, Callable, Optional

from orchestrator import storage
from orchestrator.config import CheckpointConfig, ModelTaskConfig, StorageConfig, s3_settings
from orchestrator.errors import ConfigError

log = logging.getLogger(__name__)
# Set by Ray's job supervisor for a job's driver: the job's runtime_env (working_dir among it).
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
_quiet = False  # see quiet_ray


def quiet_ray(quiet: bool = True) -> None:
    """Keep Ray's own output off this process's console: worker and actor output stays in Ray's log
    files (and the run's logs/<stage>/worker-<rank>.log), Ray's driver-side logging shows errors only and
    Ray Data draws no progress bars. Set once by the CLI before Ray starts; `--verbose` leaves it off."""
    global _quiet
    _quiet = quiet


def configure_storage(storage_config: StorageConfig) -> storage.S3Settings:
    """Make the config's S3 settings this process's (idempotent); returns them, to hand to Ray tasks."""
    settings = s3_settings(storage_config)
    storage.configure(settings)
    return settings


def quiet_serve_logger() -> None:
    """Ray Serve gives its driver-side logger a console handler of its own at INFO when it is imported;
    when quiet, keep it to warnings (call after importing ray.serve)."""
    if _quiet:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)


def is_quiet() -> bool:
    """Whether this process keeps Ray's (and Tune's) output off the console (see quiet_ray)."""
    return _quiet


def ensure_ray(address: Optional[str] = None) -> None:
    """Connect to Ray once: `address`, else RAY_ADDRESS (set by `ray job submit`), else a new local cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, **_ray_output())


def _ray_output() -> dict:
    import ray.data

    if _quiet:
        ray.data.DataContext.get_current().enable_progress_bars = False
        # The driver runs the stages' data prepare (Ray Data): its INFO lines and notices go to Ray's logs only.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    # Quiet: Ray's driver-side warnings (e.g. "token authentication is enabled") stay in Ray's logs too.
    return {"log_to_driver": not _quiet, "logging_level": logging.ERROR if _quiet else logging.INFO}


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
    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, **_ray_output())


def job_working_dir() -> Optional[str]:
    """The working directory Ray unpacked for this job (`ray job submit --working-dir`), else None."""
    try:
        runtime_env = json.loads(os.environ.get(_JOB_CONFIG_ENV, "{}")).get("runtime_env") or {}
    except json.JSONDecodeError:
        return None
    return os.getcwd() if runtime_env.get("working_dir") else None


def check_storage_outlives_job(checkpoint: CheckpointConfig) -> None:
    """Refuse a `checkpoint.storage_path` that would vanish with the job's temporary working directory.

    A job submitted with `--working-dir` runs in a copy Ray deletes when it no longer needs it; a
    relative storage path would put checkpoints and models there. An explicit setting
    (`checkpoint.allow_job_working_dir`) keeps it, with a warning.
    """
    working_dir = job_working_dir()
    path = checkpoint.storage_path
    if working_dir is None or storage.is_remote(path):
        return
    resolved = os.path.realpath(path.removeprefix("file://"))
    if not (resolved + os.sep).startswith(os.path.realpath(working_dir) + os.sep):
        return
    message = (f"checkpoint.storage_path {path!r} resolves to {resolved}, inside this Ray job's temporary "
               "working directory, which Ray deletes with the job: checkpoints and models would vanish. Use an "
               "absolute path every node shares (checkpoint.storage_path=/mnt/shared/runs) or "
               "s3://bucket/runs")
    if not checkpoint.allow_job_working_dir:
        raise ConfigError(message + " (or set checkpoint.allow_job_working_dir=true to keep them there anyway)")
    log.warning("%s; kept there because checkpoint.allow_job_working_dir=true", message)


def run_model_task(fn: Callable[..., Any], *args: Any, resources: ModelTaskConfig, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` as a Ray task with the declared resources, on whichever node has them.

    For the heavy model work of a run (exports that merge LoRA into the base, derived bases): the driver,
    often a small head node, only waits. The task receives this process's storage settings explicitly.
    Without a Ray cluster (the library called from a plain script, the unit tests) it runs in this process.
    """
    import ray

    if not ray.is_initialized():
        log.info("no Ray cluster in this process: running %s here", getattr(fn, "__name__", fn))
        return fn(*args, **kwargs)
    task = ray.remote(_with_storage).options(
        num_cpus=resources.num_cpus,
        num_gpus=1 if resources.use_gpu else 0,
        memory=int(resources.memory_gb * 1024**3) if resources.memory_gb else None,
        resources=resources.resources or None,
        max_retries=0,  # the work is not idempotent-cheap: a failure is reported, the stage is rerun
    )
    return ray.get(task.remote(storage.current_settings(), int(resources.num_cpus), fn, args, kwargs))


def _with_storage(settings: storage.S3Settings, threads: int, fn: Callable[..., Any], args: tuple,
                  kwargs: dict) -> Any:
    import torch

    storage.configure(settings)
    torch.set_num_threads(max(1, threads))
    return fn(*args, **kwargs)


def where_this_runs() -> dict[str, Any]:
    """This process's node and pid (recorded in lineage: which machine did the work)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"node_id": node_id, "hostname": socket.gethostname(), "pid": os.getpid()}
