"""One stage on the cluster: its inputs (plan check, data, stage base), Ray Train, the exported model.

The paths a stage reads and writes come from `orchestrator.layout.RunLayout`; the chaining of
stages (and sweeps, evaluation) lives above, in `orchestrator.pipeline`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

from orchestrator import progress, storage
from orchestrator.checkpoint import latest_complete_checkpoint
from orchestrator.config import PipelineConfig
from orchestrator.data.formats import load_examples
from orchestrator.data.prepare import PreparedData, prepare_stage_data
from orchestrator.data.prepare_ray import SHARDED_STAGES, PreparedShards, prepare_stage_shards
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.layout import RunLayout
from orchestrator.model.export import export_model
from orchestrator.model.loading import create_tiny_model, fetch_tokenizer, resolve_dtype, train_bpe_tokenizer
from orchestrator.plan.planner import check_fits
from orchestrator.provenance import git_revision, package_versions
from orchestrator.runtime import configure_storage, ensure_ray, run_model_task
from orchestrator.tracking import finish_tracking, log_files, start_tracking
from orchestrator.train.stage_base import prepare_stage_base
from orchestrator.train.trainer import fit_stage

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


def materialize_base(config: PipelineConfig) -> tuple[str, Optional[str]]:
    """(base model URI, tokenizer URI or None = the base's own). Creates the tiny base once per run.

    Local paths come back absolute: Ray Train workers run in a working directory of their own.
    """
    if config.model.base is not None:
        return storage.join(config.model.base), config.tokenizer.path and storage.join(config.tokenizer.path)
    base_uri = RunLayout.of(config).tiny_base
    if storage.exists(storage.join(base_uri, "config.json")):
        log.info("reusing the tiny base model at %s", base_uri)
        return base_uri, config.tokenizer.path and storage.join(config.tokenizer.path)
    if config.tokenizer.path is not None:
        tokenizer = fetch_tokenizer(config.tokenizer.path, tempfile.mkdtemp(prefix="tok-"))
    else:
        training = config.tokenizer.train
        texts = [d.text for d in documents_for_tokenizer(config)][: training.max_documents]
        log.info("training a %d-token BPE tokenizer on %d documents", training.vocab_size, len(texts))
        tokenizer = train_bpe_tokenizer(texts, training.vocab_size)
    seed = (config.pretrain or config.sft or config.preference).train.seed
    model = create_tiny_model(config.model.tiny, tokenizer, seed)
    with tempfile.TemporaryDirectory(prefix="base-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        storage.upload_dir(tmp, base_uri)
    log.info("created a tiny LLaMA base (%d parameters, vocab %d) at %s",
             sum(p.numel() for p in model.parameters()), len(tokenizer), base_uri)
    return base_uri, None


def documents_for_tokenizer(config: PipelineConfig) -> list:
    """The documents `tokenizer.train` learns from: every stage's sources (conversations flattened), validated
    first under the stage's `data.bad_records` policy, so bad records are listed with file:line as they would
    be when the stage prepares its data, not dropped before anyone sees them."""
    documents = []
    for name in ("pretrain", "sft", "preference"):
        stage = getattr(config, name)
        if name == "preference":
            continue  # preference records are not documents
        if stage is not None and stage.data.sources:
            docs, _ = load_examples(stage.data.sources, "documents", stage.data.bad_records, True,
                                    stage.data.shuffle_seed)
            documents.extend(docs)
    return documents


@dataclass(frozen=True)
class StageInputs:
    """What a stage trains from, prepared on the driver before any worker starts."""

    config: PipelineConfig  # as the stage base adjusted it (e.g. embeddings trained with a grown vocabulary)
    base_model: str  # URI of the model the stage starts from
    tokenizer_uri: str
    data: PreparedShards | PreparedData  # stages 1 and 2: the cached shard set; stage 3: in-memory tables
    lineage: dict[str, Any]  # where the stage base came from (merged adapters, grown vocabulary)


def prepare_stage_inputs(config: PipelineConfig, stage: str, base_model: Optional[str] = None,
                         tokenizer_uri: Optional[str] = None) -> StageInputs:
    """Check the plan, tokenize and validate the data, and derive the stage base (plain run and sweep alike).

    Stages 1 and 2 prepare their data on the Ray cluster (connect first: a local one is started otherwise)
    into the run's cached shard set; stage 3 prepares in this process. Without `base_model`, stage 3 starts
    from the run's stage-2 model (see previous_stage_model).
    """
    check_fits(config, stage)  # warns (or, with plan.strict, refuses) when the config will not fit
    if base_model is None:
        base_model = previous_stage_model(config, stage)
    if base_model is None:
        base_model, tokenizer_uri = materialize_base(config)
    tokenizer_uri = tokenizer_uri or base_model
    data = prepare_data(config, stage, tokenizer_uri)
    # init_adapters merged / an extended vocabulary grown into <run>/<stage>-base/ (reused on reruns)
    stage_base = prepare_stage_base(config, stage, base_model, tokenizer_uri, RunLayout.of(config))
    return StageInputs(stage_base.config, stage_base.model_uri, tokenizer_uri, data, stage_base.lineage)


def prepare_data(config: PipelineConfig, stage: str, tokenizer_uri: str) -> PreparedShards | PreparedData:
    """A stage's prepared data: the cached shard set (stages 1 and 2, on the Ray cluster), or tables (stage 3)."""
    stage_cfg = config.stage(stage)
    with tempfile.TemporaryDirectory(prefix="tokenizer-") as tmp, progress.step(f"{stage}: prepare data") as bar:
        tokenizer = fetch_tokenizer(tokenizer_uri, tmp)
        if stage in SHARDED_STAGES:
            data = prepare_stage_shards(stage, stage_cfg.data, tokenizer_uri, tmp, RunLayout.of(config).data(stage),
                                        config.storage.node_cache)
            bar.update(reused=data.reused)
        else:
            data = prepare_stage_data(stage, stage_cfg.data, tokenizer,
                                      unpaired=getattr(stage_cfg.train, "loss", None) == "kto")
        bar.update(records=data.stats.get("records"), tokens=data.stats.get("train_tokens"))
    return data


@dataclass(frozen=True)
class PreparedStage:
    """A stage's shard set as `orchestrator prepare` made or found it, and the tokenizer it was made with."""

    stage: str
    data: PreparedShards
    tokenizer_uri: str

    def tokenizer(self) -> Any:
        with tempfile.TemporaryDirectory(prefix="tokenizer-") as tmp:
            return fetch_tokenizer(self.tokenizer_uri, tmp)


def prepare_stages(config: PipelineConfig, stages: list[str], ray_address: Optional[str] = None) -> list[PreparedStage]:
    """Prepare (or find in the cache) the shard sets of stages 1 and 2 exactly as running them would."""
    configure_storage(config.storage)
    ensure_ray(ray_address)
    prepared = []
    for stage in stages:
        if stage not in SHARDED_STAGES:
            raise ConfigError(f"stage {stage!r} prepares in memory when it runs; only {SHARDED_STAGES} make shard sets")
        config.stage(stage)  # names a stage the config lacks
        base_model, tokenizer_uri = materialize_base(config)
        tokenizer_uri = tokenizer_uri or base_model
        prepared.append(PreparedStage(stage, prepare_data(config, stage, tokenizer_uri), tokenizer_uri))
    return prepared


def previous_stage_model(config: PipelineConfig, stage: str) -> Optional[str]:
    """Stage 3 run on its own starts from stage 2's exported model (else stage 1's); None: the configured base.

    A config that has an earlier stage whose model is not there yet is an error: training on the raw
    base instead would silently skip it.
    """
    if stage != "preference":
        return None
    layout = RunLayout.of(config)
    for earlier in ("sft", "pretrain"):
        uri = layout.model(earlier)
        if storage.exists(storage.join(uri, "config.json")):
            log.info("preference starts from stage model %s", uri)
            return uri
        if getattr(config, earlier) is not None:
            raise ConfigError(f"the config has a `{earlier}:` stage but its model {uri} does not exist yet; "
                                    f"run `orchestrator {earlier}` (or `orchestrator pipeline`) first")
    return None


def run_stage(config: PipelineConfig, stage: str, base_model: Optional[str] = None,
              tokenizer_uri: Optional[str] = None, ray_address: Optional[str] = None) -> StageResult:
    """Run one stage end to end: prepare data (cached shard set), train (Ray Train), export the final model."""
    started = time.perf_counter()
    configure_storage(config.storage)
    ensure_ray(ray_address)  # the data of stages 1 and 2 is prepared on the cluster
    inputs = prepare_stage_inputs(config, stage, base_model, tokenizer_uri)
    config, data = inputs.config, inputs.data
    layout = RunLayout.of(config)
    tracking = start_tracking(config, layout)
    try:
        outcome = fit_stage(config, stage, data, inputs.base_model, inputs.tokenizer_uri, layout.root,
                            layout.logs(stage), tracking=tracking)
    except OrchestratorError:
        finish_tracking(tracking, failed=True)
        raise
    except Exception as exc:
        finish_tracking(tracking, failed=True)
        raise TrainingFailed(stage, layout.stage(stage), exc) from exc
    model_uri = export_stage_model(config, stage, outcome.checkpoint_path, outcome.metrics, data.stats,
                                   inputs.base_model, inputs.tokenizer_uri, extra_lineage=inputs.lineage)
    wall = time.perf_counter() - started
    log_files(tracking, [storage.join(model_uri, "lineage.json")], f"lineage/{stage}")
    finish_tracking(tracking)
    log.info("%s finished in %.1f s: %s", stage, wall, outcome.metrics)
    return StageResult(stage, model_uri, outcome.checkpoint_path, outcome.metrics, data.stats, wall)


def export_stage_model(config: PipelineConfig, stage: str, checkpoint_uri: str, metrics: dict[str, Any],
                       data_stats: dict[str, Any], base_model: str, tokenizer_uri: str,
                       extra_lineage: Optional[dict[str, Any]] = None) -> str:
    """The stage's final model in `models/<stage>/`, with lineage.json saying where it came from.

    The export (LoRA merged into the base) runs as a Ray task with `distributed.model_tasks` resources.
    """
    train_cfg = config.stage(stage).train
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
    with progress.step(f"{stage}: export model"):
        return run_model_task(export_model, checkpoint_uri, base_model, train_cfg.method,
                              RunLayout.of(config).model(stage), resolve_dtype(config.model.dtype, train_cfg.precision),
                              lineage, config.storage.node_cache, resources=config.distributed.model_tasks)
