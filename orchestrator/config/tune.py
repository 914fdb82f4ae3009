"""Config sections: hyperparameter sweeps (search spaces, ASHA, Ray Tune settings)."""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from orchestrator.config.base import Section


class SearchDimension(Section):
    """The values one hyperparameter takes in a sweep: a `loguniform` or `uniform` range, a whole-number
    `int` range (both ends included), or a `choice` of listed values. Subclasses fix the domain."""

    distribution: Optional[Literal["loguniform", "uniform", "int", "choice"]] = Field(
        None, description="loguniform | uniform (real numbers in [low, high]), int (whole numbers in [low, high]), "
        "choice (one of `values`). Default: choice when `values` is given."
    )
    low: Optional[int | float] = Field(None, description="Lower end of the range.")
    high: Optional[int | float] = Field(None, description="Upper end of the range.")
    values: Optional[list[int | float]] = Field(None, description="The candidates of a choice.")

    integer: ClassVar[bool] = False  # whole numbers only (int or choice)
    minimum: ClassVar[float] = 0.0
    minimum_included: ClassVar[bool] = False
    below: ClassVar[Optional[float]] = None  # exclusive upper limit of the domain

    @classmethod
    def _outside_domain(cls, value: float) -> Optional[str]:
        if cls.integer and not float(value).is_integer():
            return "must be a whole number"
        if value < cls.minimum or (value == cls.minimum and not cls.minimum_included):
            return f"must be {'>=' if cls.minimum_included else '>'} {cls.minimum:g}"
        if cls.below is not None and value >= cls.below:
            return f"must be < {cls.below:g}"
        return None

    @field_validator("low", "high")
    @classmethod
    def _bound_in_domain(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and (problem := cls._outside_domain(value)):
            raise PydanticCustomError("search_domain", problem)
        return int(value) if value is not None and cls.integer else value

    @field_validator("values")
    @classmethod
    def _values_in_domain(cls, values: Optional[list[float]]) -> Optional[list[float]]:
        if values is None:
            return None
        if not values:
            raise PydanticCustomError("search_domain", "must list at least one value")
        for value in values:
            if problem := cls._outside_domain(value):
                raise PydanticCustomError("search_domain", "every value {problem}; {value} does not",
                                          {"problem": problem, "value": value})
        return [int(v) for v in values] if cls.integer else values

    @model_validator(mode="after")
    def _complete(self) -> "SearchDimension":
        if self.distribution is None:
            if self.values is None:
                raise PydanticCustomError("search_space", "set `distribution` (loguniform, uniform, int) with "
                                          "`low` and `high`, or list `values`")
            self.distribution = "choice"
        kinds = ("int", "choice") if self.integer else ("loguniform", "uniform", "choice")
        if self.distribution not in kinds:
            raise PydanticCustomError("search_space", "distribution {got} does not fit this parameter; use one of "
                                      "{allowed}", {"got": self.distribution, "allowed": ", ".join(kinds)})
        if self.distribution == "choice":
            if self.values is None or self.low is not None or self.high is not None:
                raise PydanticCustomError("search_space", "a choice lists `values` (and no low/high)")
            return self
        if self.low is None or self.high is None or self.values is not None:
            raise PydanticCustomError("search_space", "a {kind} range needs `low` and `high` (and no values)",
                                      {"kind": self.distribution})
        if self.low > self.high or (self.low == self.high and not self.integer):
            raise PydanticCustomError("search_space", "low ({low}) must be below high ({high})",
                                      {"low": self.low, "high": self.high})
        if self.distribution == "loguniform" and self.low <= 0:
            raise PydanticCustomError("search_space", "a loguniform range needs low > 0 (got {low})", {"low": self.low})
        return self


class PositiveDimension(SearchDimension):
    """A range of numbers > 0."""


class FractionDimension(SearchDimension):
    """A range of shares in [0, 1)."""

    minimum_included: ClassVar[bool] = True
    below: ClassVar[Optional[float]] = 1.0


class NonNegativeDimension(SearchDimension):
    """A range of numbers >= 0."""

    minimum_included: ClassVar[bool] = True


class CountDimension(SearchDimension):
    """A range of whole numbers >= 1."""

    integer: ClassVar[bool] = True
    minimum: ClassVar[float] = 1.0
    minimum_included: ClassVar[bool] = True


class NonNegativeCountDimension(SearchDimension):
    """A range of whole numbers >= 0."""

    integer: ClassVar[bool] = True
    minimum_included: ClassVar[bool] = True


class SearchSpaceConfig(Section):
    """What a sweep varies; each parameter is a key of the swept stage's `train` section (left out = fixed)."""

    learning_rate: Optional[PositiveDimension] = Field(None, description="train.learning_rate (usually loguniform).")
    epochs: Optional[CountDimension] = Field(None, description="train.epochs (int range or choice).")
    lora_r: Optional[CountDimension] = Field(None, description="train.lora.r (method lora).")
    lora_alpha: Optional[CountDimension] = Field(None, description="train.lora.alpha (method lora).")
    warmup_ratio: Optional[FractionDimension] = Field(None, description="train.warmup_ratio.")
    warmup_steps: Optional[NonNegativeCountDimension] = Field(None, description="train.warmup_steps.")
    micro_batch_size: Optional[CountDimension] = Field(None, description="train.micro_batch_size.")
    gradient_accumulation_steps: Optional[CountDimension] = Field(
        None, description="train.gradient_accumulation_steps."
    )
    weight_decay: Optional[NonNegativeDimension] = Field(None, description="train.weight_decay.")
    beta: Optional[PositiveDimension] = Field(None, description="train.beta (stage 3 preference loss).")

    def dimensions(self) -> dict[str, SearchDimension]:
        """The parameters that are swept, by name."""
        return {name: getattr(self, name) for name in type(self).model_fields if getattr(self, name) is not None}


# Search-space parameter → its key under a stage section (what a trial's dotted override sets).
SEARCH_PARAMETER_KEYS = {
    "learning_rate": "train.learning_rate",
    "epochs": "train.epochs",
    "lora_r": "train.lora.r",
    "lora_alpha": "train.lora.alpha",
    "warmup_ratio": "train.warmup_ratio",
    "warmup_steps": "train.warmup_steps",
    "micro_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "weight_decay": "train.weight_decay",
    "beta": "train.beta",
}


class StageSearchSpaces(Section):
    """Per-stage search spaces that replace `tune.search_space` for that stage."""

    pretrain: Optional[SearchSpaceConfig] = Field(None, description="Search space of stage 1 sweeps.")
    sft: Optional[SearchSpaceConfig] = Field(None, description="Search space of stage 2 sweeps.")
    preference: Optional[SearchSpaceConfig] = Field(None, description="Search space of stage 3 sweeps.")


class AshaConfig(Section):
    """ASHA early stopping. Its time unit is one evaluation: every epoch end (and every
    `checkpoint.every_n_steps` checkpoint) reports the eval loss to Tune."""

    grace_period: int = Field(1, ge=1, description="Evaluations every trial runs before it may be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="Keep the best 1/reduction_factor at every rung.")
    max_t: Optional[int] = Field(
        None, ge=1, description="Evaluations after which a trial stops; default: the most a trial of the search "
        "space can report, so no trial is cut short by the cap."
    )


class TuneConfig(Section):
    """Hyperparameter sweeps with Ray Tune (`orchestrator tune`; `orchestrator pipeline` sweeps `stages`).
    Each trial is a full training run of the stage; results live in <storage_path>/<run_name>/tune/<stage>/."""

    stages: list[Literal["pretrain", "sft", "preference"]] = Field(
        default_factory=list, description="Stages `orchestrator pipeline` runs as sweeps; the best trial's model "
        "becomes the stage's model."
    )
    reuse_best: list[Literal["pretrain", "sft", "preference"]] = Field(
        default_factory=list, description="Stages `orchestrator pipeline` trains once with the best settings of "
        "that stage's finished sweep (same run_name and storage)."
    )
    num_samples: int = Field(8, ge=1, description="Trials per sweep.")
    max_concurrent_trials: Optional[int] = Field(
        None, ge=1, description="Trials running at once; default and upper limit: what the cluster fits "
        "(CPUs / (num_workers x cpus_per_worker), GPUs likewise)."
    )
    metric: Literal["eval_loss", "eval_perplexity", "eval_rewards/accuracies"] = Field(
        "eval_loss", description="What trials are ranked by. eval_rewards/accuracies (stage 3 only, with mode max): "
        "the share of held-out pairs whose chosen answer gets the higher implicit reward."
    )
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher `metric` is better.")
    search_alg: Literal["random", "optuna"] = Field(
        "random", description="random: random search; optuna: Optuna's TPE sampler (needs `optuna` installed)."
    )
    scheduler: Literal["asha", "none"] = Field("asha", description="asha: stop poor trials early; none: run all.")
    asha: AshaConfig = Field(default_factory=AshaConfig, description="ASHA settings.")
    seed: int = Field(0, description="Seed of the search algorithm (trials train with their stage's train.seed).")
    search_space: SearchSpaceConfig = Field(
        default_factory=SearchSpaceConfig, description="What a sweep varies (for any stage without its own)."
    )
    stage_search_space: StageSearchSpaces = Field(
        default_factory=StageSearchSpaces, description="A stage's own search space, replacing `search_space`."
    )

    @model_validator(mode="after")
    def _sweep_or_reuse(self) -> "TuneConfig":
        both = sorted(set(self.stages) & set(self.reuse_best))
        if both:
            raise ValueError(f"tune.stages and tune.reuse_best both name {', '.join(both)}: a stage is either swept "
                             "or trained with a finished sweep's best settings")
        return self

    def space_for(self, stage: str) -> SearchSpaceConfig:
        """The search space of `stage`: its own, else the shared one."""
        return getattr(self.stage_search_space, stage) or self.search_space
