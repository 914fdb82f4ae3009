"""The top of the library: stage 1 → stage 2 → stage 3 (preference), each plain, swept or with a sweep's
best settings, then the evaluation of the run.

Each stage hands the next its exported model (`models/<stage>/`, LoRA merged, tokenizer included);
the paths of a run are `orchestrator.layout.RunLayout`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from orchestrator.config import PipelineConfig
from orchestrator.errors import ConfigError
from orchestrator.evaluation.runner import EvalOutcome, evaluate_run
from orchestrator.runtime import configure_storage
from orchestrator.tracking import log_files, start_tracking
from orchestrator.train.stage import StageResult, materialize_base, run_stage
from orchestrator.tune.results import config_with_best
from orchestrator.tune.space import check_sweep
from orchestrator.tune.sweep import run_sweep_stage

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    stages: list[StageResult] = field(default_factory=list)
    eval_report: Optional[str] = None  # report.md of the evaluation after training (eval.after_training)

    @property
    def final_model(self) -> str:
        return self.stages[-1].model_uri


def train_stage(config: PipelineConfig, stage: str, base_model: Optional[str], tokenizer_uri: Optional[str],
                ray_address: Optional[str]) -> StageResult:
    """A stage as the config asks: swept (tune.stages), trained with its sweep's best settings
    (tune.reuse_best), or trained as configured."""
    if stage in config.tune.stages:
        return run_sweep_stage(config, stage, base_model, tokenizer_uri, ray_address)
    if stage in config.tune.reuse_best:
        config = config_with_best(config, stage)
    return run_stage(config, stage, base_model, tokenizer_uri, ray_address)


def run_pipeline(config: PipelineConfig, ray_address: Optional[str] = None) -> PipelineResult:
    """Stage 1, 2 and 3 — those configured —, each starting from the previous one's merged model."""
    if config.pretrain is None and config.sft is None and config.preference is None:
        raise ConfigError("the config has no `pretrain:`, `sft:` or `preference:` section; nothing to run")
    configure_storage(config.storage)
    for swept in config.tune.stages:
        check_sweep(config, swept)  # a bad stage-2 search space fails before stage 1 trains
    result = PipelineResult()
    base_model, tokenizer_uri = materialize_base(config)
    if config.pretrain is not None:
        stage1 = train_stage(config, "pretrain", base_model, tokenizer_uri, ray_address)
        result.stages.append(stage1)
        # Stage 2 starts from stage 1's merged model, which carries the tokenizer.
        base_model, tokenizer_uri = stage1.model_uri, None
    if config.sft is not None:
        stage2 = train_stage(config, "sft", base_model, tokenizer_uri, ray_address)
        result.stages.append(stage2)
        base_model, tokenizer_uri = stage2.model_uri, None
    if config.preference is not None:
        result.stages.append(train_stage(config, "preference", base_model, tokenizer_uri, ray_address))
    if config.eval.after_training:
        outcome = evaluate_run(config, ray_address=ray_address)
        result.eval_report = outcome.files["report.md"]
        track_evaluation(config, outcome)
    return result


def track_evaluation(config: PipelineConfig, outcome: EvalOutcome) -> None:
    """The evaluation report (report.md, report.json, loss plots) and its metrics on the run's tracking runs."""
    target = start_tracking(config)
    metrics = {f"eval/{model}/{name}": float(value) for model, scores in outcome.metrics.items()
               for name, value in scores.items() if isinstance(value, (int, float))}
    log_files(target, list(outcome.files.values()), "eval", metrics)

