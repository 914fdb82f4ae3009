"""Stage 1 → merge → stage 2, with the artifacts each stage hands to the next.

Layout under `<checkpoint.storage_path>/<run_name>/`:

    base/              the tiny base model + tokenizer (only when model.tiny is used)
    pretrain/          Ray Train run: checkpoint_step*/ (see orchestrator.train.checkpoint)
    sft/
    logs/<stage>/      metrics.jsonl and TensorBoard events
    models/<stage>/    the stage's final model, LoRA merged: loads with from_pretrained
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from orchestrator import storage
from orchestrator.config import PipelineConfig, s3_settings
from orchestrator.errors import OrchestratorError
from orchestrator.train.checkpoint import latest_complete_checkpoint
from orchestrator.train.metrics_log import METRICS_FILE, read_metrics
from orchestrator.data.formats import load_examples
from orchestrator.data.prepare import PreparedData, prepare_stage_data
from orchestrator.model.export import export_model
from orchestrator.plan.planner import check_fits
from orchestrator.model.loading import create_tiny_model, load_tokenizer, resolve_dtype, train_bpe_tokenizer
from orchestrator.train.stage_base import prepare_stage_base
from orchestrator.train.trainer import ensure_ray, fit_stage

log = logging.getLogger(__name__)


class TrainingFailed(OrchestratorError):
    """Training of a stage failed (after Ray Train's restarts); says where a rerun will resume."""

    def __init__(self, stage: str, stage_uri: str, cause: BaseException):
        try:
            latest = latest_complete_checkpoint(stage_uri)
            resume = (f"running the same command again resumes from {latest}" if latest
                      else "no complete checkpoint was written yet; running it again starts over")
        except Exception as exc:  # the storage may be the very thing that is down
            resume = f"the checkpoints under {stage_uri} cannot be listed right now ({exc})"
        super().__init__(f"stage '{stage}' failed: {_root_cause(cause)}\n{resume}")
        self.stage = stage


def _root_cause(exc: BaseException) -> str:
    """The first worker's own error for Ray Train's worker-group failures (whose message is truncated)."""
    failures = getattr(exc, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        cause = getattr(failure, "cause", None) or failure  # RayTaskError wraps the worker's exception
        text = str(cause).strip().splitlines()
        return f"worker {rank}: {type(cause).__name__}: {text[-1] if text else ''}"
    controller = getattr(exc, "controller_failure", None)
    if controller is not None:
        return f"{type(exc).__name__}: {type(controller).__name__}: {controller}"
    return f"{type(exc).__name__}: {exc}"


@dataclass
class StageResult:
    stage: str
    model_uri: str
    checkpoint_uri: str
    metrics: dict[str, Any]
    data_stats: dict[str, Any]
    wall_seconds: float


@dataclass
class PipelineResult:
    stages: list[StageResult] = field(default_factory=list)
    eval_report: Optional[str] = None  # report.md of the evaluation after training (eval.after_training)

    @property
    def final_model(self) -> str:
        return self.stages[-1].model_uri


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("ray-llm-orchestrator", "torch", "transformers", "peft", "deepspeed", "ray", "pyarrow", "boto3"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_revision() -> str:
    """The git commit of the orchestrator source, or 'unknown' (e.g. a `ray job submit` working-dir copy)."""
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def run_root(config: PipelineConfig) -> str:
    return storage.join(config.checkpoint.storage_path, config.run_name)


def logs_dir(config: PipelineConfig, stage: str) -> str:
    """Where rank 0 writes a stage's metrics.jsonl and TensorBoard events.

    Local storage: `<run>/logs/<stage>`. Remote storage: a fresh local scratch directory per
    process; the logs travel inside every checkpoint, and a resumed run restores them from the
    checkpoint it resumes from (see `read_stage_metrics`).
    """
    root = run_root(config)
    if storage.is_remote(root):
        run_key = hashlib.sha1(root.encode()).hexdigest()[:10]
        return os.path.join(tempfile.gettempdir(), "orchestrator-logs", f"{config.run_name}-{run_key}-{_SCRATCH_ID}",
                            stage)
    return storage.join(root, "logs", stage)


_SCRATCH_ID = uuid.uuid4().hex[:12]


def read_stage_metrics(config: PipelineConfig, stage: str) -> list[dict[str, Any]]:
    """All metric records of a stage: from the local logs, or from its latest complete checkpoint (remote)."""
    root = run_root(config)
    if not storage.is_remote(root):
        return read_metrics(logs_dir(config, stage))
    latest = latest_complete_checkpoint(storage.join(root, stage))
    if latest is None:
        return []
    text = storage.read_bytes(storage.join(latest, "logs", METRICS_FILE)).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def materialize_base(config: PipelineConfig) -> tuple[str, Optional[str]]:
    """(base model URI, tokenizer URI or None = the base's own). Creates the tiny base once per run.

    Local paths come back absolute: Ray Train workers run in a working directory of their own.
    """
    if config.model.base is not None:
        return storage.join(config.model.base), config.tokenizer.path and storage.join(config.tokenizer.path)
    base_uri = storage.join(run_root(config), "base")
    if storage.exists(storage.join(base_uri, "config.json")):
        log.info("reusing the tiny base model at %s", base_uri)
        return base_uri, config.tokenizer.path and storage.join(config.tokenizer.path)
    if config.tokenizer.path is not None:
        tokenizer = load_tokenizer(storage.download_dir(config.tokenizer.path, tempfile.mkdtemp(prefix="tok-")))
    else:
        training = config.tokenizer.train
        texts = [d.text for d in _all_documents(config)][: training.max_documents]
        log.info("training a %d-token BPE tokenizer on %d documents", training.vocab_size, len(texts))
        tokenizer = train_bpe_tokenizer(texts, training.vocab_size)
    seed = (config.pretrain or config.sft).train.seed
    model = create_tiny_model(config.model.tiny, tokenizer, seed)
    with tempfile.TemporaryDirectory(prefix="base-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        storage.upload_dir(tmp, base_uri)
    log.info("created a tiny LLaMA base (%d parameters, vocab %d) at %s",
             sum(p.numel() for p in model.parameters()), len(tokenizer), base_uri)
    return base_uri, None


def _all_documents(config: PipelineConfig) -> list:
    documents = []
    for name in ("pretrain", "sft"):
        stage = getattr(config, name)
        if stage is not None and stage.data.sources:
            docs, _ = load_examples(stage.data.sources, "documents", "skip", True, stage.data.shuffle_seed)
            documents.extend(docs)
    return documents


@dataclass(frozen=True)
class StageInputs:
    """What a stage trains from, prepared on the driver before any worker starts."""

    config: PipelineConfig  # as the stage base adjusted it (e.g. embeddings trained with a grown vocabulary)
    base_model: str  # URI of the model the stage starts from
    tokenizer_uri: str
    data: PreparedData
    lineage: dict[str, Any]  # where the stage base came from (merged adapters, grown vocabulary)


def prepare_stage_inputs(config: PipelineConfig, stage: str, base_model: Optional[str] = None,
                         tokenizer_uri: Optional[str] = None) -> StageInputs:
    """Check the plan, tokenize and validate the data, and derive the stage base (plain run and sweep alike)."""
    storage.configure(s3_settings(config.storage))
    check_fits(config, stage)  # warns (or, with plan.strict, refuses) when the config will not fit
    if base_model is None:
        base_model, tokenizer_uri = materialize_base(config)
    tokenizer_uri = tokenizer_uri or base_model
    with tempfile.TemporaryDirectory(prefix="tokenizer-") as tmp:
        tokenizer = load_tokenizer(storage.download_dir(tokenizer_uri, tmp))
    data = prepare_stage_data(stage, config.stage(stage).data, tokenizer)
    # init_adapters merged / an extended vocabulary grown into <run>/<stage>-base/ (reused on reruns)
    stage_base = prepare_stage_base(config, stage, base_model, tokenizer_uri, run_root(config))
    return StageInputs(stage_base.config, stage_base.model_uri, tokenizer_uri, data, stage_base.lineage)


def run_stage(config: PipelineConfig, stage: str, base_model: Optional[str] = None,
              tokenizer_uri: Optional[str] = None, ray_address: Optional[str] = None) -> StageResult:
    """Run one stage end to end: prepare data (driver), train (Ray Train), export the final model."""
    started = time.perf_counter()
    inputs = prepare_stage_inputs(config, stage, base_model, tokenizer_uri)
    config, data = inputs.config, inputs.data
    ensure_ray(ray_address)
    try:
        outcome = fit_stage(config, stage, data, inputs.base_model, inputs.tokenizer_uri, run_root(config),
                            logs_dir(config, stage))
    except OrchestratorError:
        raise
    except Exception as exc:
        raise TrainingFailed(stage, storage.join(run_root(config), stage), exc) from exc
    model_uri = export_stage_model(config, stage, outcome.checkpoint_path, outcome.metrics, data.stats,
                                   inputs.base_model, inputs.tokenizer_uri, extra_lineage=inputs.lineage)
    wall = time.perf_counter() - started
    log.info("%s finished in %.1f s: %s", stage, wall, outcome.metrics)
    return StageResult(stage, model_uri, outcome.checkpoint_path, outcome.metrics, data.stats, wall)


def export_stage_model(config: PipelineConfig, stage: str, checkpoint_uri: str, metrics: dict[str, Any],
                       data_stats: dict[str, Any], base_model: str, tokenizer_uri: str,
                       extra_lineage: Optional[dict[str, Any]] = None) -> str:
    """The stage's final model in `models/<stage>/`, with lineage.json saying where it came from."""
    train_cfg = config.stage(stage).train
    precision = "bf16" if train_cfg.precision == "bf16" else "fp32"
    lineage = {
        "stage": stage,
        "tokenizer": tokenizer_uri,
        "data_files": data_stats.get("files", {}),
        "data_stats": {k: v for k, v in data_stats.items() if k != "files"},
        "metrics": metrics,
        "config": config.model_dump(mode="json"),  # secrets are masked by their SecretStr type
        "packages": package_versions(),
        "git_revision": git_revision(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra_lineage or {}),
    }
    return export_model(checkpoint_uri, base_model, train_cfg.method, storage.join(run_root(config), "models", stage),
                        resolve_dtype(config.model.dtype, precision), lineage)


def _train_stage(config: PipelineConfig, stage: str, base_model: Optional[str], tokenizer_uri: Optional[str],
                 ray_address: Optional[str]) -> StageResult:
    """A stage as the config asks: swept (tune.stages), trained with its sweep's best settings
    (tune.reuse_best), or trained as configured."""
    if stage in config.tune.stages:
        from orchestrator.tune.sweep import run_sweep_stage  # imported here: it imports this module

        return run_sweep_stage(config, stage, base_model, tokenizer_uri, ray_address)
    if stage in config.tune.reuse_best:
        from orchestrator.tune.results import config_with_best

        config = config_with_best(config, stage)
    return run_stage(config, stage, base_model, tokenizer_uri, ray_address)


def run_pipeline(config: PipelineConfig, ray_address: Optional[str] = None) -> PipelineResult:
    """Stage 1 (if configured), then stage 2 (if configured) starting from stage 1's merged model."""
    if config.pretrain is None and config.sft is None:
        from orchestrator.errors import ConfigError

        raise ConfigError("the config has neither a `pretrain:` nor an `sft:` section; nothing to run")
    result = PipelineResult()
    storage.configure(s3_settings(config.storage))
    for swept in config.tune.stages:
        from orchestrator.tune.space import check_sweep

        check_sweep(config, swept)  # a bad stage-2 search space fails before stage 1 trains
    base_model, tokenizer_uri = materialize_base(config)
    if config.pretrain is not None:
        stage1 = _train_stage(config, "pretrain", base_model, tokenizer_uri, ray_address)
        result.stages.append(stage1)
        # Stage 2 starts from stage 1's merged model, which carries the tokenizer.
        base_model, tokenizer_uri = stage1.model_uri, None
    if config.sft is not None:
        result.stages.append(_train_stage(config, "sft", base_model, tokenizer_uri, ray_address))
    if config.eval.after_training:
        from orchestrator.evaluation.runner import evaluate_run  # imported here: it imports this module

        result.eval_report = evaluate_run(config, ray_address=ray_address).files["report.md"]
    return result
