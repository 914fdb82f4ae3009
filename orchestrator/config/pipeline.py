"""The root of the config tree: shared sections plus one section per stage."""

from __future__ import annotations

from typing import Optional

from pydantic import Field, model_validator

from orchestrator.errors import ConfigError
from orchestrator.config.base import Section
from orchestrator.config.checkpoint import CheckpointConfig, StorageConfig
from orchestrator.config.data import DataConfig
from orchestrator.config.distributed import DistributedConfig
from orchestrator.config.eval import EvalConfig
from orchestrator.config.model import ModelConfig, TokenizerConfig
from orchestrator.config.plan import PlanConfig
from orchestrator.config.preference import PreferenceTrainConfig
from orchestrator.config.serve import ServeConfig
from orchestrator.config.tracking import TrackingConfig
from orchestrator.config.train import PROMPT_METHODS, TrainConfig
from orchestrator.config.tune import TuneConfig


class StageConfig(Section):
    """One training stage: its data and its optimisation settings."""

    data: DataConfig = Field(default_factory=DataConfig, description="Inputs of this stage.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation settings of this stage.")


class PreferenceStageConfig(StageConfig):
    """Stage 3: preference pairs (or KTO's labelled answers) and the optimisation settings with the loss."""

    train: PreferenceTrainConfig = Field(default_factory=PreferenceTrainConfig,
                                         description="Optimisation settings and the preference loss.")


class PipelineConfig(Section):
    """The whole run: shared settings plus the stages."""

    run_name: str = Field(
        "run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Name of the run; a second run with the "
        "same name and storage path resumes the first."
    )
    model: ModelConfig = Field(..., description="Base model.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Cluster shape.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints and outputs.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Remote storage access.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    plan: PlanConfig = Field(default_factory=PlanConfig, description="Memory and throughput planner assumptions.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="HTTP serving of the final model.")
    pretrain: Optional[StageConfig] = Field(None, description="Stage 1: continued pretraining on documents.")
    sft: Optional[StageConfig] = Field(None, description="Stage 2: supervised fine-tuning on conversations.")
    preference: Optional[PreferenceStageConfig] = Field(
        None, description="Stage 3: preference optimisation (DPO, IPO, ORPO, SimPO, KTO), from stage 2's model."
    )
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Hyperparameter sweeps (Ray Tune).")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Experiment tracking (MLflow, "
                                     "Weights & Biases); off by default.")

    @model_validator(mode="after")
    def _tuned_stages_exist(self) -> "PipelineConfig":
        for key in ("stages", "reuse_best"):
            missing = [name for name in getattr(self.tune, key) if getattr(self, name) is None]
            if missing:
                raise ValueError(f"tune.{key} names {', '.join(missing)}, but the config has no such stage section")
        return self

    @model_validator(mode="after")
    def _elastic_resumes_at_any_size(self) -> "PipelineConfig":
        if self.distributed.elastic and self.checkpoint.on_world_size_change == "fail":
            raise ValueError(
                f"distributed.min_workers={self.distributed.min_workers} lets a run continue with fewer than "
                f"{self.distributed.num_workers} workers, which checkpoint.on_world_size_change=fail refuses; set "
                "it to reload_weights, or drop min_workers"
            )
        return self

    @model_validator(mode="after")
    def _tokenizer_resolvable(self) -> "PipelineConfig":
        if self.tokenizer.path is None and self.model.base is None and self.tokenizer.train is None:
            raise ValueError(
                "no tokenizer: set `tokenizer.path`, or `model.base` (its tokenizer is used), or `tokenizer.train`"
            )
        return self

    @model_validator(mode="after")
    def _methods_fit(self) -> "PipelineConfig":
        for name in STAGES:
            stage = getattr(self, name)
            if stage is None:
                continue
            method = stage.train.method
            if method == "adalora" and self.distributed.zero_stage == 3:
                raise ValueError(
                    f"{name}.train.method=adalora does not work with distributed.zero_stage=3: AdaLoRA reallocates "
                    "ranks over whole adapter matrices, which ZeRO-3 partitions; use zero_stage 0, 1 or 2"
                )
            later = [after for after in STAGES[STAGES.index(name) + 1:] if getattr(self, after) is not None]
            if method in PROMPT_METHODS and later:
                raise ValueError(
                    f"{name}.train.method={method} trains virtual tokens that cannot be merged into the weights, "
                    f"so {later[0]} cannot start from it; use it in the last stage only (or full/freeze/lora/adalora)"
                )
        return self

    def stage(self, name: str) -> StageConfig:
        """The config of stage `name` ('pretrain', 'sft' or 'preference'); an error if the file has none."""
        stage = getattr(self, name, None) if name in STAGES else None
        if stage is None:
            raise ConfigError(f"the config has no `{name}:` section; add one to run stage '{name}'")
        return stage


STAGES = ("pretrain", "sft", "preference")
