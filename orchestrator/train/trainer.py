"""Ray edge of training: turn prepared data and a config into a TorchTrainer run."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from orchestrator import checkpoint as ckpt, progress, storage
from orchestrator.config import PipelineConfig, resolve_precision
from orchestrator.data.prepare import PreparedData
from orchestrator.data.prepare_ray import PreparedShards
from orchestrator.errors import DataError
from orchestrator.tracking import TrackingTarget
from orchestrator.layout import reference_logps_file
from orchestrator.train.deepspeed_config import build_deepspeed_config, load_user_deepspeed_config
from orchestrator.train.metrics_log import follow_metrics
from orchestrator.train.recipe import Schedule, WorkerPlan, train_loop_per_worker, train_schedule

log = logging.getLogger(__name__)


UPLOADING = " (uploading)"  # the training bar's checkpoint field while an asynchronous upload may still run


def show_progress(bar: progress.Step, record: dict[str, Any]) -> None:
    """A metrics record of rank 0 on the training step's progress bar."""
    if "train_loss" in record:
        bar.update(done=record.get("step"), loss=round(record["train_loss"], 4),
                   lr=f"{record.get('learning_rate', 0):.2e}", tok_s=round(record.get("tokens_per_s", 0)))
    if "eval_loss" in record:
        bar.update(done=record.get("step"), eval_loss=round(record["eval_loss"], 4))
    if record.get("event") == "checkpoint":
        bar.update(ckpt=checkpoint_progress(record))
    if record.get("event") == "resumed":
        bar.update(done=record.get("step"), ckpt=f"resumed from step {record.get('step')}")


def checkpoint_progress(record: dict[str, Any]) -> str:
    """The training bar's checkpoint field: `saving step 40…`, then `step 40, 12.5 MiB in 0.9 s`."""
    step = record.get("step")
    if record.get("checkpoint") == "saving":
        return f"saving step {step}…"
    upload = UPLOADING if record.get("checkpoint") == "uploading" else ""
    return f"step {step}, {record.get('checkpoint_mib')} MiB in {record.get('checkpoint_seconds')} s{upload}"


def reference_fingerprint(config: PipelineConfig, stage: str, data: PreparedData, base_model: str,
                          tokenizer: str) -> str:
    """What precomputed reference log-probs depend on: the reference weights, the tokenizer, the data and how it
    was tokenized (not the loss: the sums are stored, and each loss takes what it needs)."""
    stage_cfg = config.stage(stage)
    key = {"base_model": base_model, "tokenizer": tokenizer, "files": data.stats.get("files", {}),
           "data": stage_cfg.data.model_dump(mode="json"), "unpaired": stage_cfg.train.loss == "kto",
           "dtype": config.model.dtype, "precision": stage_cfg.train.precision,
           "rows": [data.train_rows, data.eval_rows]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class FitOutcome:
    checkpoint_path: str
    metrics: dict[str, Any]
    run_path: str


def fit_stage(
    config: PipelineConfig,
    stage: str,
    data: PreparedShards | PreparedData,
    base_model: str,
    tokenizer: str,
    run_root: str,
    logs_dir: str,
    callbacks: Sequence[Any] = (),
    tracking: Optional[TrackingTarget] = None,
) -> FitOutcome:
    """Train one stage on the Ray cluster; a second call with the same run_root resumes the first.

    `data`: stages 1 and 2 a prepared shard set, which every worker reads its share of itself (exact resume);
    stage 3 in-memory tables, handed to Ray Data.

    `callbacks`: Ray Train callbacks, e.g. Tune's TuneReportCallback when the run is a sweep trial.
    `tracking`: the MLflow / W&B runs rank 0 logs the metrics to.
    """
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    dist = config.distributed
    schedule, deepspeed_user_config = check_batch_plan(config, stage, data.train_rows)
    ckpt.check_resume_world_size(storage.join(run_root, stage), dist.num_workers, config.checkpoint.on_world_size_change)
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False  # per-step progress comes from our own log lines
    data_context.print_on_execution_start = False
    datasets, reference_uri = _driver_datasets(config, stage, data, base_model, tokenizer, run_root)
    plan = _worker_plan(config, stage, data, base_model, tokenizer, run_root, logs_dir, deepspeed_user_config,
                        tracking, reference_uri)
    storage_path, filesystem = storage.ray_storage(run_root)
    trainer = TorchTrainer(
        train_loop_per_worker,
        # Credentials travel through the object store, never in the (possibly persisted) loop config.
        train_loop_config={"plan": plan, "storage_settings": ray.put(storage.current_settings())},
        scaling_config=ray.train.ScalingConfig(
            num_workers=dist.ray_num_workers(),
            use_gpu=dist.use_gpu,
            resources_per_worker={"CPU": dist.cpus_per_worker, **({"GPU": 1} if dist.use_gpu else {}),
                                  **dist.resources_per_worker},
        ),
        run_config=_run_config(config, stage, storage_path, filesystem, callbacks, data.has_eval),
        datasets=datasets or None,
        # Eval is not split: every worker evaluates the whole (small) held-out set, which keeps
        # ZeRO-3's collective forward passes in step across workers.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]) if datasets else None,
        torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo", timeout_s=dist.collective_timeout_s),
    )
    log.info("%s: fitting with %s workers, schedule %s", stage,
             f"{dist.min_workers}-{dist.num_workers}" if dist.elastic else dist.num_workers, schedule)
    with progress.step(f"{stage}: train", total=schedule.total_steps, unit="step") as bar:
        with follow_metrics(logs_dir, lambda record: show_progress(bar, record)):
            result = trainer.fit()
        # fit() returns once every checkpoint is stored, the last one's asynchronous upload included.
        if str(bar.fields.get("ckpt", "")).endswith(UPLOADING):
            bar.update(ckpt=bar.fields["ckpt"].removesuffix(UPLOADING))
    if result.checkpoint is None:
        raise RuntimeError(f"{stage}: training finished without a checkpoint")
    return FitOutcome(storage.to_uri(result.checkpoint.path, filesystem), dict(result.metrics or {}),
                      storage.to_uri(result.path, filesystem))


def check_batch_plan(config: PipelineConfig, stage: str, train_rows: int) -> tuple[Schedule, Optional[dict[str, Any]]]:
    """The stage's step schedule and the user's DeepSpeed JSON, checked (batch arithmetic, precision) before any
    worker starts; DataError when the data is too small for one optimizer step."""
    train_cfg, dist = config.stage(stage).train, config.distributed
    deepspeed_user_config = load_user_deepspeed_config(dist.deepspeed_config)
    # Elastic training may run at any size between min_workers and num_workers: every one must add up.
    for world in range(dist.min_workers if dist.elastic else dist.num_workers, dist.num_workers + 1):
        build_deepspeed_config(train_cfg, dist, world, resolve_precision(train_cfg.precision, dist.use_gpu, True),
                               deepspeed_user_config)
    accumulation = train_cfg.accumulation_steps(dist.num_workers)
    schedule = train_schedule(train_cfg, train_rows, dist.num_workers)
    if schedule.steps_per_epoch == 0:
        raise DataError(
            f"{stage}: {train_rows} training examples are too few for one optimizer step with "
            f"{dist.num_workers} workers x micro_batch_size {train_cfg.micro_batch_size} x gradient_accumulation_steps "
            f"{accumulation}; add data or lower those settings"
        )
    return schedule, deepspeed_user_config


def _driver_datasets(config: PipelineConfig, stage: str, data: PreparedShards | PreparedData, base_model: str,
                     tokenizer: str, run_root: str) -> tuple[dict[str, Any], Optional[str]]:
    """The Ray datasets the driver hands to the workers (stage 3's in-memory tables; shard sets are read by the
    workers themselves) and where precomputed reference log-probs go, if the stage precomputes them."""
    import ray.data

    datasets: dict[str, Any] = {}
    if not isinstance(data, PreparedShards):
        datasets["train"] = ray.data.from_arrow(data.train)
        if data.eval is not None:
            datasets["eval"] = ray.data.from_arrow(data.eval)
    reference_uri = None
    if getattr(config.stage(stage).train, "precompute_reference", False):
        # One pass over every example (unsplit) before the first step; keyed by what the log-probs depend on.
        datasets["reference"] = ray.data.from_arrow(data.train)
        reference_uri = reference_logps_file(run_root, stage, reference_fingerprint(config, stage, data, base_model,
                                                                                   tokenizer))
    return datasets, reference_uri


def _worker_plan(config: PipelineConfig, stage: str, data: PreparedShards | PreparedData, base_model: str,
                 tokenizer: str, run_root: str, logs_dir: str,
                 deepspeed_user_config: Optional[dict[str, Any]], tracking: Optional[TrackingTarget],
                 reference_uri: Optional[str]) -> WorkerPlan:
    """What every worker is told: the typed contract of orchestrator.train.recipe."""
    return WorkerPlan(
        stage=stage,
        model=config.model,
        train=config.stage(stage).train,
        distributed=config.distributed,
        checkpoint=config.checkpoint,
        eval=config.eval,
        base_model=base_model,
        tokenizer=tokenizer,
        train_rows=data.train_rows,
        stage_uri=storage.join(run_root, stage),
        logs_dir=logs_dir,
        logs_into_checkpoints=storage.is_remote(run_root),
        has_eval=data.has_eval,
        shard_set_uri=data.set_uri if isinstance(data, PreparedShards) else None,
        shard_manifest=data.manifest if isinstance(data, PreparedShards) else None,
        group_by_length=stage == "sft" and config.stage(stage).data.group_by_length,
        deepspeed_user_config=deepspeed_user_config,
        tracking=tracking,
        reference_logps_uri=reference_uri,
        node_cache=config.storage.node_cache,
    )


def _run_config(config: PipelineConfig, stage: str, storage_path: str, filesystem: Any, callbacks: Sequence[Any],
                has_eval: bool) -> Any:
    """Ray Train's run settings: where checkpoints go, how many are kept, how often a failed group restarts."""
    import ray.train

    return ray.train.RunConfig(
        name=stage,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        callbacks=list(callbacks),
        # Keep the N best by eval loss (Ray always keeps the latest too, for resuming).
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=config.checkpoint.keep,
            checkpoint_score_attribute="eval_loss" if has_eval else None,
            checkpoint_score_order="min",
        ),
        failure_config=ray.train.FailureConfig(max_failures=config.distributed.max_failures),
    )
