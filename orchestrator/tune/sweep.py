"""Ray edge of sweeps: a Ray Tune `Tuner` over full training runs of one stage.

`run_sweep` prepares the stage's data once on the driver, starts (or resumes) the sweep in
`<storage_path>/<run_name>/tune/<stage>/`, and writes the results table, the best trial's config
and the best checkpoint's URI. `run_sweep_stage` is the pipeline's form of it: the best trial's
best checkpoint becomes the stage's model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

from orchestrator import progress, storage
from orchestrator.config import PipelineConfig
from orchestrator.data.prepare import PreparedData
from orchestrator.data.prepare_ray import PreparedShards
from orchestrator.errors import CheckpointError, ConfigError, DataError
from orchestrator.checkpoint import CheckpointInfo, list_checkpoints
from orchestrator.layout import RunLayout
from orchestrator.tracking import TrackingTarget, log_files, start_tracking
from orchestrator.runtime import configure_storage, ensure_ray_with_dashboard, is_quiet
from orchestrator.train.stage import StageResult, export_stage_model, prepare_stage_inputs
from orchestrator.tune.results import (
    SWEEP_RECORD,
    TrialRow,
    changed_keys,
    pick_best,
    sweep_identity,
    write_results,
)
from orchestrator.tune.space import (
    check_sweep,
    concurrent_trials,
    evaluations_upper_bound,
    plain,
    trial_config,
    trial_resources,
    tune_search_space,
)
from orchestrator.tune.trainable import TRIAL_FUNCTION_RESOURCES, train_trial

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    stage: str
    rows: list[TrialRow]
    best: TrialRow
    best_config: PipelineConfig
    files: dict[str, str]  # csv, json, best_config → URI
    data_stats: dict[str, Any]
    base_model: str  # what the trials started from
    tokenizer_uri: str
    base_lineage: dict[str, Any]  # how that base was derived (adapters merged, vocabulary grown), if it was
    wall_seconds: float
    resumed: bool  # continued an interrupted sweep

    @property
    def best_checkpoint(self) -> Optional[str]:
        return self.best.checkpoint


def run_sweep(config: PipelineConfig, stage: str, base_model: Optional[str] = None,
              tokenizer_uri: Optional[str] = None, ray_address: Optional[str] = None) -> SweepResult:
    """Sweep `stage` as `config.tune` says; a second call with the same run_name and storage resumes it."""
    started = time.perf_counter()
    configure_storage(config.storage)
    check_sweep(config, stage)
    ensure_ray_with_dashboard(ray_address)  # before the data: stages 1 and 2 prepare it on the cluster
    inputs = prepare_stage_inputs(config, stage, base_model, tokenizer_uri)  # as for a plain run of the stage
    data = inputs.data
    if not data.has_eval:
        raise DataError(f"{stage}: the held-out set is empty (e.g. shorter than one block), so trials cannot be "
                        f"ranked by {config.tune.metric}; raise {stage}.data.eval_split or set eval_sources")
    sweep = RunLayout.of(config).sweep(stage)
    _record_sweep(config, stage, sweep)
    tracking = start_tracking(config)  # each trial is a child run of the run's own
    tuner, resumed = _tuner(inputs.config, stage, data, inputs.base_model, inputs.tokenizer_uri, sweep, tracking)
    with progress.step(f"{stage}: sweep", total=config.tune.num_samples, unit="trial") as bar:
        grid = tuner.fit()
        bar.update(done=len(grid))
    rows = sorted((_row(result, config, stage, sweep) for result in grid), key=lambda row: row.trial_id)
    best = pick_best(rows, config.tune.mode)
    wall = time.perf_counter() - started
    files = write_results(config, stage, rows, best, wall)
    log_files(tracking, list(files.values()), f"tune/{stage}")
    log.info("%s sweep: %d trials in %.1f s; best %s %s=%.4g, checkpoint %s", stage, len(rows), wall,
             best.trial_id, config.tune.metric, best.best_metric, best.checkpoint)
    return SweepResult(stage, rows, best, trial_config(inputs.config, stage, best.params), files, data.stats,
                       inputs.base_model, inputs.tokenizer_uri, inputs.lineage, wall, resumed)


def run_sweep_stage(config: PipelineConfig, stage: str, base_model: Optional[str] = None,
                    tokenizer_uri: Optional[str] = None, ray_address: Optional[str] = None) -> StageResult:
    """A pipeline stage run as a sweep: the best trial's best checkpoint is exported as the stage's model."""
    result = run_sweep(config, stage, base_model, tokenizer_uri, ray_address)
    if result.best_checkpoint is None:
        raise CheckpointError(f"{stage} sweep: the best trial {result.best.trial_id} left no complete checkpoint")
    metrics = {config.tune.metric: result.best.best_metric, "epoch": result.best.epochs_run}
    sweep = {"sweep": {"results": result.files["json"], "trial_id": result.best.trial_id, "params": result.best.params}}
    model_uri = export_stage_model(result.best_config, stage, result.best_checkpoint, metrics, result.data_stats,
                                   result.base_model, result.tokenizer_uri, {**result.base_lineage, **sweep})
    return StageResult(stage, model_uri, result.best_checkpoint, metrics, result.data_stats, result.wall_seconds)


def _record_sweep(config: PipelineConfig, stage: str, sweep: str) -> None:
    """Write what is swept; refuse to continue a sweep whose settings changed since it started."""
    current = sweep_identity(config, stage)
    record = storage.join(sweep, SWEEP_RECORD)
    if storage.exists(record):
        changed = changed_keys(json.loads(storage.read_bytes(record).decode("utf-8")), current)
        if changed:
            raise ConfigError(f"a different {stage} sweep already lives in {sweep} (changed: {', '.join(changed)}); "
                              "use a new run_name, or restore those settings to resume it")
        return
    storage.write_bytes(record, json.dumps(current, indent=1).encode("utf-8"))


def _tuner(config: PipelineConfig, stage: str, data: PreparedShards | PreparedData, base_model: str, tokenizer_uri: str,
           sweep: str, tracking: Optional[TrackingTarget]) -> tuple[Any, bool]:
    """A new Tuner, or the interrupted one restored (finished trials are kept, unfinished ones resume)."""
    import ray
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(train_trial, config=config, stage=stage, data=data, base_model=base_model,
                             tokenizer=tokenizer_uri, layout=RunLayout.of(config), s3_settings=storage.current_settings(),
                             tracking=tracking),
        TRIAL_FUNCTION_RESOURCES,
    )
    storage_path, filesystem = storage.ray_storage(RunLayout.of(config).tune)
    experiment = f"{storage_path}/{stage}"
    if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        log.info("%s sweep: resuming the interrupted sweep in %s", stage, sweep)
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=False,
                                  storage_filesystem=filesystem), True
    tune_cfg = config.tune
    concurrency = concurrent_trials(ray.cluster_resources(), trial_resources(config), tune_cfg.max_concurrent_trials)
    if tune_cfg.max_concurrent_trials and concurrency < tune_cfg.max_concurrent_trials:
        log.warning("tune.max_concurrent_trials=%d, but the cluster fits %d trials of %s at once; running %d",
                    tune_cfg.max_concurrent_trials, concurrency, trial_resources(config), concurrency)
    log.info("%s sweep: %d trials, %d at a time, each %s", stage, tune_cfg.num_samples, concurrency,
             trial_resources(config))
    tuner = tune.Tuner(
        trainable,
        param_space=tune_search_space(config, stage),
        tune_config=tune.TuneConfig(
            metric=tune_cfg.metric,
            mode=tune_cfg.mode,
            search_alg=_search_algorithm(config, concurrency),
            scheduler=_scheduler(config, stage, data.train_rows),
            num_samples=tune_cfg.num_samples,
            max_concurrent_trials=concurrency,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(name=stage, storage_path=storage_path, storage_filesystem=filesystem,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  verbose=0 if is_quiet() else 1),
    )
    return tuner, False


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def _search_algorithm(config: PipelineConfig, concurrency: int) -> Any:
    if config.tune.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=config.tune.seed)  # Tune caps it at max_concurrent_trials
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune ignores max_concurrent_trials for a generator passed in: it takes its own cap.
    return BasicVariantGenerator(random_state=config.tune.seed, max_concurrent=concurrency)


def _scheduler(config: PipelineConfig, stage: str, train_rows: int) -> Any:
    if config.tune.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    asha = config.tune.asha
    max_t = asha.max_t or evaluations_upper_bound(config, stage, train_rows)
    if asha.grace_period >= max_t:
        raise ConfigError(f"tune.asha.grace_period={asha.grace_period} is not below the {max_t} evaluations a "
                          "trial reports, so ASHA could never stop one; lower it or set tune.scheduler: none")
    # One time unit = one reported evaluation (epoch end, or a checkpoint every checkpoint.every_n_steps).
    return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=asha.grace_period,
                         reduction_factor=asha.reduction_factor)


def _row(result: Any, config: PipelineConfig, stage: str, sweep: str) -> TrialRow:
    """One trial's line of the results table, from Tune's result and what the trial left in storage."""
    metric, mode = config.tune.metric, config.tune.mode
    trial_id = result.metrics.get("trial_id") or os.path.basename(result.path.rstrip("/"))
    history = result.metrics_dataframe
    best = None
    epochs = 0
    if history is not None and metric in history:
        values = history[metric].dropna()
        if len(values):
            best = float(values.min() if mode == "min" else values.max())
    if history is not None and "epoch" in history and history["epoch"].notna().any():
        epochs = int(history["epoch"].max())
    params = {name: plain(value) for name, value in result.config.items()}
    # Only checkpoints Tune was told about count: the workers of a stopped trial may still write one
    # before they are gone. The last epoch always ends in a checkpoint with trainer_state.epoch = epochs.
    _, filesystem = storage.ray_storage(sweep)
    reported = set()
    if history is not None and "checkpoint_path" in history:
        reported = {storage.to_uri(path, filesystem) for path in history["checkpoint_path"].dropna()}
    checkpoints = [info for info in list_checkpoints(RunLayout.of(config).trial(stage, trial_id).stage(stage))
                   if info.complete and info.uri in reported]
    planned_epochs = trial_config(config, stage, params).stage(stage).train.epochs
    trained_to_end = any(info.epoch == planned_epochs for info in checkpoints)
    error = None if result.error is None else (str(result.error).strip().splitlines() or [""])[-1]
    return TrialRow(
        trial_id=trial_id,
        status="ERROR" if result.error is not None else "TERMINATED",
        params=params,
        best_metric=best,
        epochs_run=epochs,
        stopped_early=result.error is None and not trained_to_end,
        wall_s=float(result.metrics.get("time_total_s") or 0.0),
        checkpoint=_best_checkpoint(checkpoints, mode),
        error=error,
    )


def _best_checkpoint(complete: list[CheckpointInfo], mode: str) -> Optional[str]:
    """The checkpoint with the best eval loss (else the latest one)."""
    if not complete:
        return None
    scored = [info for info in complete if info.eval_loss is not None]
    if not scored:
        return complete[-1].uri
    pick = min if mode == "min" else max
    return pick(scored, key=lambda info: info.eval_loss).uri
