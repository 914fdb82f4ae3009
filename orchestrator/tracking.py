"""Experiment tracking: a run's params, metrics and reports in MLflow and/or Weights & Biases.

One tracking run per run of the pipeline (`<storage_path>/<run_name>`); its ids are kept in the
run's `tracking.json` (RunLayout.tracking), so running the same run again continues the same
tracking runs. A sweep trial is a child run (MLflow `mlflow.parentRunId`; W&B: a run in the parent's
group). The driver opens the runs and logs params and artifacts; rank 0 of the Train workers logs
the per-step and per-evaluation metrics live (orchestrator.train.metrics_log), both through a
`Tracker` built from a picklable `TrackingTarget`. Both clients are the libraries' own.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from orchestrator import storage
from orchestrator.config import PipelineConfig
from orchestrator.layout import RunLayout

log = logging.getLogger(__name__)
DEFAULT_EXPERIMENT = "ray-llm-orchestrator"
_MLFLOW_PARAM_LIMIT = 6000  # characters of a param value MLflow stores
_NOT_METRICS = {"time", "stage", "step", "event", "resumed_from"}


@dataclass(frozen=True)
class TrackingTarget:
    """The tracking runs to write to. Picklable: it travels to the Train workers in the WorkerPlan."""

    mlflow_uri: Optional[str] = None
    mlflow_run_id: Optional[str] = None
    wandb: dict[str, Any] = field(default_factory=dict)  # wandb.init arguments: project, id, mode, dir, ...

    @property
    def wandb_run_id(self) -> Optional[str]:
        return self.wandb.get("id")


def flat_params(config: PipelineConfig) -> dict[str, str]:
    """The resolved config as dotted keys → text (secrets come out masked: SecretStr dumps as ********)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            flat[prefix] = text[:_MLFLOW_PARAM_LIMIT]

    walk("", config.model_dump(mode="json"))
    return flat


def numeric_metrics(stage: str, metrics: dict[str, Any]) -> dict[str, float]:
    """`{train_loss: 1.2, event: …}` → `{<stage>/train_loss: 1.2}`: the numbers, keyed by stage."""
    return {f"{stage}/{key}": float(value) for key, value in metrics.items()
            if key not in _NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)}


def start_tracking(config: PipelineConfig, layout: Optional[RunLayout] = None,
                   parent: Optional[TrackingTarget] = None, name: Optional[str] = None) -> Optional[TrackingTarget]:
    """Open the run's tracking runs, or continue those `tracking.json` names; log the params.

    None when the config tracks nothing. `parent`/`name`: a sweep trial's parent run and its name.
    """
    settings = config.tracking
    if settings.mlflow is None and settings.wandb is None:
        return None
    layout = layout or RunLayout.of(config)
    known = _read_ids(layout)
    target = TrackingTarget()
    if settings.mlflow is not None:
        uri, run_id = _mlflow_run(config, known.get("mlflow_run_id"), parent, name)
        target = TrackingTarget(uri, run_id)
    if settings.wandb is not None:
        target = TrackingTarget(target.mlflow_uri, target.mlflow_run_id,
                                _wandb_init_args(config, known.get("wandb_run_id"), parent, name))
    ids = {"mlflow_run_id": target.mlflow_run_id, "wandb_run_id": target.wandb_run_id}
    if ids != {k: known.get(k) for k in ids}:
        storage.write_bytes(layout.tracking, json.dumps(ids, indent=1).encode())
    tracker = Tracker(target)
    try:
        tracker.log_params(flat_params(config))
    finally:
        tracker.close()
    log.info("tracking: %s", describe(target))
    return target


def describe(target: Optional[TrackingTarget]) -> str:
    """Where a target's runs are, for the summary of a run."""
    if target is None:
        return "off"
    parts = []
    if target.mlflow_run_id:
        parts.append(f"MLflow run {target.mlflow_run_id} at {target.mlflow_uri or 'the default store'}")
    if target.wandb:
        parts.append(f"W&B run {target.wandb['id']} ({target.wandb['project']}, {target.wandb['mode']})")
    return "; ".join(parts)


def describe_run(config: PipelineConfig) -> Optional[str]:
    """Where a run is tracked (from its tracking.json), or None when it is not."""
    if config.tracking.mlflow is None and config.tracking.wandb is None:
        return None
    ids = _read_ids(RunLayout.of(config))
    parts = []
    if config.tracking.mlflow is not None and ids.get("mlflow_run_id"):
        parts.append(f"MLflow run {ids['mlflow_run_id']} ({config.tracking.mlflow.tracking_uri or 'default store'})")
    if config.tracking.wandb is not None and ids.get("wandb_run_id"):
        parts.append(f"W&B run {ids['wandb_run_id']} ({config.tracking.wandb.project}, {config.tracking.wandb.mode})")
    return "; ".join(parts) or None


def log_files(target: Optional[TrackingTarget], uris: Iterable[str], artifact_path: Optional[str] = None,
              metrics: Optional[dict[str, float]] = None) -> None:
    """Attach files (local paths or URIs) to the tracking runs as artifacts, plus final metrics."""
    if target is None:
        return
    tracker = Tracker(target)
    try:
        with tempfile.TemporaryDirectory(prefix="tracking-") as tmp:
            for uri in uris:
                if not storage.exists(uri):
                    continue
                local = os.path.join(tmp, uri.rstrip("/").rsplit("/", 1)[-1])
                with open(local, "wb") as handle:
                    handle.write(storage.read_bytes(uri))
                tracker.log_artifact(local, artifact_path)
        if metrics:
            tracker.log_metrics(metrics, step=0)
    finally:
        tracker.close()


def mlflow_client(tracking_uri: Optional[str]) -> Any:
    """MLflow's client for `tracking_uri`. A `file:` URI asked for explicitly is allowed: MLflow keeps its file
    store in maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE is set."""
    from mlflow.tracking import MlflowClient

    if tracking_uri and tracking_uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri)


def finish_tracking(target: Optional[TrackingTarget], failed: bool = False) -> None:
    """Mark the MLflow run finished (or failed); running the run again marks it running once more."""
    if target is not None and target.mlflow_run_id:
        mlflow_client(target.mlflow_uri).set_terminated(target.mlflow_run_id, "FAILED" if failed else "FINISHED")


class Tracker:
    """Writes to a target's runs from this process (the driver, or rank 0 of the Train workers)."""

    def __init__(self, target: TrackingTarget):
        self.target = target
        self._mlflow = None
        self._wandb = None
        if target.mlflow_run_id:
            self._mlflow = mlflow_client(target.mlflow_uri)
        if target.wandb:
            import wandb

            self._wandb = wandb.init(**target.wandb, resume="allow", reinit="create_new", settings=wandb.Settings(
                silent=True, console="off", x_disable_stats=True))

    def log_params(self, params: dict[str, str]) -> None:
        if self._mlflow is not None:
            from mlflow.entities import Param

            # Params are immutable in MLflow: a continued run keeps those it has and gains new keys.
            have = self._mlflow.get_run(self.target.mlflow_run_id).data.params
            new = [Param(k, v) for k, v in params.items() if k not in have]
            for start in range(0, len(new), 100):  # log_batch takes at most 100 params per call
                self._mlflow.log_batch(self.target.mlflow_run_id, params=new[start:start + 100])
        if self._wandb is not None:
            self._wandb.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not metrics:
            return
        if self._mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._mlflow.log_batch(self.target.mlflow_run_id,
                                   metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
        if self._wandb is not None:
            stage = next(iter(metrics)).split("/", 1)[0]
            self._wandb.log({**metrics, f"{stage}/step": step})

    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> None:
        if self._mlflow is not None:
            self._mlflow.log_artifact(self.target.mlflow_run_id, local_path, artifact_path)
        if self._wandb is not None:
            self._wandb.save(local_path, base_path=os.path.dirname(local_path), policy="now")

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _read_ids(layout: RunLayout) -> dict[str, Optional[str]]:
    if not storage.exists(layout.tracking):
        return {}
    return json.loads(storage.read_bytes(layout.tracking))


def _mlflow_run(config: PipelineConfig, known_id: Optional[str], parent: Optional[TrackingTarget],
                name: Optional[str]) -> tuple[Optional[str], str]:
    """(tracking URI, run id): the known run when the store still has it, else a new run."""
    from mlflow.exceptions import MlflowException

    settings = config.tracking.mlflow
    client = mlflow_client(settings.tracking_uri)
    if known_id:
        try:
            client.update_run(client.get_run(known_id).info.run_id, status="RUNNING")
            return settings.tracking_uri, known_id
        except MlflowException:
            log.warning("tracking: MLflow run %s is gone from the store; starting a new one", known_id)
    experiment_name = settings.experiment or DEFAULT_EXPERIMENT
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
    tags = {"orchestrator.run_root": RunLayout.of(config).root}
    if parent is not None and parent.mlflow_run_id:
        tags["mlflow.parentRunId"] = parent.mlflow_run_id
    run = client.create_run(experiment_id, run_name=name or settings.run_name or config.run_name, tags=tags)
    return settings.tracking_uri, run.info.run_id


def _wandb_init_args(config: PipelineConfig, known_id: Optional[str], parent: Optional[TrackingTarget],
                     name: Optional[str]) -> dict[str, Any]:
    import uuid

    settings = config.tracking.wandb
    args = {"project": settings.project, "mode": settings.mode, "id": known_id or uuid.uuid4().hex[:12],
            "name": name or settings.run_name or config.run_name}
    if settings.entity:
        args["entity"] = settings.entity
    if settings.dir:
        os.makedirs(settings.dir, exist_ok=True)
        args["dir"] = os.path.abspath(settings.dir)
    if parent is not None and parent.wandb:
        args["group"] = parent.wandb["name"]
        args["job_type"] = "trial"
    return args
