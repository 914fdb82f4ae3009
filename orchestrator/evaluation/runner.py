"""Evaluation over the Ray cluster: every model answers the same requests through Ray Data
(`map_batches` with an actor pool of model replicas: `eval.replicas` actors, each with
`eval.num_cpus_per_replica` CPUs and `eval.num_gpus_per_replica` GPUs), then the report.

`evaluate_run` evaluates a pipeline run's base model and each stage's final model
(base → stage 1 → stage 2) and plots the run's training losses; `orchestrator eval` and
`jobs/eval.py` call it, and so does the pipeline when `eval.after_training` is set.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from orchestrator import progress, storage
from orchestrator.config import STAGES, PipelineConfig, s3_settings
from orchestrator.errors import ConfigError
from orchestrator.evaluation.report import EvalReport, build_samples, loss_curves, write_report
from orchestrator.evaluation.scoring import ModelScorer, ScorerSettings, generation_params, score_batch
from orchestrator.model.export import adapter_base
from orchestrator.evaluation.sets import describe_sets, load_eval_sets
from orchestrator.evaluation.tasks import ModelScores, build_requests, summarise
from orchestrator.layout import RunLayout
from orchestrator.runtime import configure_storage, ensure_ray
from orchestrator.storage import S3Settings
from orchestrator.train.metrics_log import read_stage_metrics

log = logging.getLogger(__name__)

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: its name in the report, its directory or URI, and its tokenizer when the
    model directory has none of its own (a `model.base` used with `tokenizer.path`)."""

    name: str
    uri: str
    tokenizer_uri: Optional[str] = None


@dataclass(frozen=True)
class EvalOutcome:
    """Where the report went and every model's metrics."""

    out_uri: str
    files: dict[str, str]
    metrics: dict[str, dict[str, float]]


class ModelReplica:
    """A Ray Data actor: one replica of a model, scoring batches of request rows."""

    def __init__(self, model: ModelSpec, settings: ScorerSettings, s3: Optional[S3Settings], num_threads: int,
                 trust_remote_code: bool):
        import torch

        if s3 is not None:
            storage.configure(s3)
        torch.set_num_threads(max(1, num_threads))
        cache = tempfile.mkdtemp(prefix="eval-model-")
        try:  # remote models are downloaded, loaded into memory, and the copy removed at once
            model_dir = storage.download_dir(model.uri, os.path.join(cache, "model"))
            tokenizer_dir = (storage.download_dir(model.tokenizer_uri, os.path.join(cache, "tokenizer"))
                             if model.tokenizer_uri else None)
            base_uri = adapter_base(model_dir)
            base_dir = storage.download_dir(base_uri, os.path.join(cache, "base")) if base_uri else None
            self.scorer = ModelScorer.load(model_dir, settings, tokenizer_dir, trust_remote_code, base_dir)
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        return pa.Table.from_pylist(score_batch(self.scorer, batch.to_pylist()))


def score_with_ray(model: ModelSpec, requests: Sequence[dict[str, str]], config: PipelineConfig,
                   settings: ScorerSettings) -> dict[str, dict[str, Any]]:
    """Every request answered by `model` on the cluster's replicas: key → response."""
    import ray.data

    cfg = config.eval
    scored = ray.data.from_items(list(requests)).map_batches(
        ModelReplica,
        fn_constructor_kwargs={"model": model, "settings": settings, "s3": s3_settings(config.storage),
                               "num_threads": int(cfg.num_cpus_per_replica),
                               "trust_remote_code": config.model.trust_remote_code},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.replicas),
        num_cpus=cfg.num_cpus_per_replica,
        num_gpus=cfg.num_gpus_per_replica,
    )
    responses = {row["key"]: json.loads(row["result"]) for row in scored.take_all()}
    missing = [r["key"] for r in requests if r["key"] not in responses]
    if missing:
        raise RuntimeError(f"{model.name}: {len(missing)} request(s) got no response, e.g. {missing[:3]}")
    return responses


def run_models(config: PipelineConfig) -> list[ModelSpec]:
    """The run's base model and each stage's final model that exists, in pipeline order."""
    layout = RunLayout.of(config)
    if config.model.base is not None:
        models = [ModelSpec("base", config.model.base, config.tokenizer.path)]
    elif storage.exists(storage.join(layout.tiny_base, "config.json")):
        models = [ModelSpec("base", layout.tiny_base)]
    else:
        models = []
    for stage in STAGES:
        uri = layout.model(stage)
        if any(storage.exists(storage.join(uri, name)) for name in ("config.json", "adapter_config.json")):
            models.append(ModelSpec(stage, uri))
    if not models:
        raise ConfigError(f"nothing to evaluate: no base model and no stage models under {layout.root} "
                          "(run the pipeline first, or pass --model)")
    return models


def parse_model_arg(text: str) -> ModelSpec:
    """`--model` values: `DIR_OR_URI`, or `NAME=DIR_OR_URI` to name it in the report."""
    name, sep, uri = text.partition("=")
    if sep and _MODEL_NAME.match(name) and uri:
        return ModelSpec(name, uri)
    uri = text
    base = uri.rstrip("/").rsplit("/", 1)[-1] or "model"
    return ModelSpec(re.sub(r"[^A-Za-z0-9._-]", "_", base), uri)


def training_curves(config: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Stage → loss curves from the run's metrics.jsonl (stages without logs are left out)."""
    curves = {}
    for stage in STAGES:
        if getattr(config, stage) is None:
            continue
        try:
            records = read_stage_metrics(RunLayout.of(config), stage)
        except FileNotFoundError:
            continue
        stage_curves = loss_curves(records)
        if stage_curves:
            curves[stage] = stage_curves
    return curves


def evaluate_models(config: PipelineConfig, models: Sequence[ModelSpec], out_uri: str,
                    curves: Optional[dict[str, Any]] = None, ray_address: Optional[str] = None) -> EvalOutcome:
    """Score every model on the config's evaluation sets (Ray Data) and write the report to `out_uri`.

    The sets are read and validated before Ray is reached (the running one, else `ray_address`,
    else RAY_ADDRESS or a new local cluster).
    """
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ConfigError(f"model names must be unique in one report, got {names}; name them with NAME=URI")
    sets = load_eval_sets(config)
    requests = build_requests(sets)
    if requests:
        ensure_ray(ray_address)
    cfg = config.eval
    settings = ScorerSettings(generation_params(cfg.generation),
                              cfg.perplexity.block_size if cfg.perplexity else 512, cfg.batch_size)
    patterns = cfg.honesty.refusal_patterns if cfg.honesty else []
    scores: dict[str, ModelScores] = {}
    for model in models:
        log.info("evaluating %s (%s): %d requests on %d replica(s)", model.name, model.uri, len(requests),
                 cfg.replicas)
        with progress.step(f"eval: {model.name}", total=len(requests), unit="request") as bar:
            responses = score_with_ray(model, requests, config, settings) if requests else {}
            scores[model.name] = summarise(sets, responses, patterns)
            bar.update(done=len(requests), **{k: round(v, 4) for k, v in list(scores[model.name].metrics.items())[:3]})
        log.info("%s: %s", model.name, ", ".join(f"{k} {v:.4g}" for k, v in scores[model.name].metrics.items()))
    report = EvalReport(
        run_name=config.run_name,
        models={m.name: m.uri for m in models},
        scores=scores,
        sets=describe_sets(sets, cfg),
        samples=build_samples(sets, scores, cfg.samples),
        curves=curves or {},
        settings={"generation": "sampled" if cfg.generation.do_sample else "greedy",
                  "max_tokens": cfg.generation.max_tokens, "replicas": cfg.replicas},
    )
    files = write_report(report, out_uri)
    log.info("evaluation report: %s", files["report.md"])
    return EvalOutcome(out_uri, files, {name: s.metrics for name, s in scores.items()})


def evaluate_run(config: PipelineConfig, models: Optional[Sequence[ModelSpec]] = None,
                 out_uri: Optional[str] = None, ray_address: Optional[str] = None) -> EvalOutcome:
    """Evaluate a run (its base and stage models, with its loss curves; report in <run>/eval), or the
    given models (report in <run>/eval-<names> unless `out_uri` says otherwise)."""
    configure_storage(config.storage)
    layout = RunLayout.of(config)
    if models:
        curves = None
        out_uri = out_uri or layout.eval(tuple(m.name for m in models))
    else:
        models = run_models(config)
        curves = training_curves(config)
        out_uri = out_uri or layout.eval()
    return evaluate_models(config, models, out_uri, curves, ray_address)
