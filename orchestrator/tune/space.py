"""A sweep's search space, checked and translated: no Ray cluster needed.

The `tune:` config section says what varies (`SearchSpaceConfig`); this module checks that the
space makes sense for the stage it sweeps, turns it into Ray Tune distributions, and turns one
trial's sampled values back into a full config through the ordinary dotted overrides, so a trial's
config (and the best trial's YAML) is exactly what `orchestrator <stage> --config … key=value`
would train.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, Optional

from orchestrator import storage
from orchestrator.config import (
    SEARCH_PARAMETER_KEYS,
    PipelineConfig,
    SearchDimension,
    apply_overrides,
    config_from_dict,
)
from orchestrator.errors import ConfigError

LORA_PARAMETERS = ("lora_r", "lora_alpha")


def space_key(config: PipelineConfig, stage: str) -> str:
    """The config key holding `stage`'s search space (for error messages)."""
    own = getattr(config.tune.stage_search_space, stage) is not None
    return f"tune.stage_search_space.{stage}" if own else "tune.search_space"


def check_sweep(config: PipelineConfig, stage: str) -> None:
    """Reject a sweep of `stage` that cannot work, before any trial starts; the error names the key."""
    stage_cfg = config.stage(stage)
    key = space_key(config, stage)
    dimensions = config.tune.space_for(stage).dimensions()
    if not dimensions:
        raise ConfigError(f"{key} is empty: name at least one of {', '.join(SEARCH_PARAMETER_KEYS)}")
    method = stage_cfg.train.method
    for name in LORA_PARAMETERS:
        if name in dimensions and method != "lora":
            raise ConfigError(f"{key}.{name}: {stage}.train.method is {method}, which has no LoRA rank or alpha; "
                              "drop it from the search space or train with method lora")
    if "beta" in dimensions and stage != "preference":
        raise ConfigError(f"{key}.beta: only the preference stage has a loss temperature beta; drop it from the "
                          f"search space of {stage}")
    metric = config.tune.metric
    if metric == "eval_perplexity" and stage == "preference":
        raise ConfigError("tune.metric eval_perplexity: the preference stage reports no perplexity; use eval_loss or "
                          "eval_rewards/accuracies")
    if metric == "eval_rewards/accuracies" and (stage != "preference" or config.tune.mode != "max"):
        raise ConfigError("tune.metric eval_rewards/accuracies ranks preference sweeps only, with tune.mode max")
    if "warmup_ratio" in dimensions and "warmup_steps" not in dimensions and stage_cfg.train.warmup_steps is not None:
        raise ConfigError(f"{key}.warmup_ratio has no effect: {stage}.train.warmup_steps is set and overrides it")
    if "gradient_accumulation_steps" in dimensions and stage_cfg.train.global_batch_size is not None:
        raise ConfigError(f"{key}.gradient_accumulation_steps has no effect: {stage}.train.global_batch_size is "
                          "set and derives it")
    data = stage_cfg.data
    if data.eval_split == 0 and not data.eval_sources:
        raise ConfigError(f"tune.metric {config.tune.metric} needs held-out data: set {stage}.data.eval_split > 0 "
                          f"or {stage}.data.eval_sources")
    if config.tune.search_alg == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("tune.search_alg optuna needs the `optuna` package: pip install optuna")
    s3 = config.storage.s3
    if storage.is_remote(config.checkpoint.storage_path) and (s3.access_key_id or s3.secret_access_key
                                                              or s3.session_token):
        # Ray Tune pickles its storage filesystem, keys included, into the sweep state it writes to storage.
        raise ConfigError("storage.s3 credentials in the config would be saved inside the sweep state on "
                          f"{config.checkpoint.storage_path}; for sweeps, supply them through the AWS default "
                          "chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, an instance role)")


def tune_search_space(config: PipelineConfig, stage: str) -> dict[str, Any]:
    """Ray Tune distributions of `stage`'s search space, by parameter name."""
    return {name: _distribution(dim) for name, dim in config.tune.space_for(stage).dimensions().items()}


def _distribution(dim: SearchDimension) -> Any:
    from ray import tune

    if dim.distribution == "choice":
        return tune.choice(list(dim.values))
    if dim.distribution == "int":
        return tune.randint(int(dim.low), int(dim.high) + 1)  # Tune's upper end is exclusive; ours is included
    if dim.distribution == "loguniform":
        return tune.loguniform(dim.low, dim.high)
    return tune.uniform(dim.low, dim.high)


def trial_overrides(stage: str, params: dict[str, Any]) -> list[str]:
    """Dotted overrides that set one trial's sampled values, e.g. `pretrain.train.learning_rate=0.0031`."""
    unknown = sorted(set(params) - set(SEARCH_PARAMETER_KEYS))
    if unknown:
        raise ConfigError(f"unknown search parameter(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(SEARCH_PARAMETER_KEYS)}")
    return [f"{stage}.{SEARCH_PARAMETER_KEYS[name]}={_yaml_scalar(value)}" for name, value in sorted(params.items())]


def plain(value: Any) -> Any:
    """A sampled value as a plain Python number (samplers may hand out numpy scalars)."""
    return value.item() if hasattr(value, "item") else value


def _yaml_scalar(value: Any) -> str:
    return repr(plain(value))  # 0.003, 1e-05 and 4 all read back as the same number


def trial_config(config: PipelineConfig, stage: str, params: dict[str, Any]) -> PipelineConfig:
    """`config` with one trial's values applied (validated like any config)."""
    tree = apply_overrides(config.model_dump(), trial_overrides(stage, params))
    return config_from_dict(tree, f"trial of {stage} with {params}")


def evaluations_upper_bound(config: PipelineConfig, stage: str, train_rows: int) -> int:
    """The most evaluations (Tune results) one trial of the search space can report.

    Every epoch end reports once, and so does every `checkpoint.every_n_steps` checkpoint. Used as
    ASHA's `max_t`, which must not cut any trial short.
    """
    train_cfg = config.stage(stage).train
    dims = config.tune.space_for(stage).dimensions()
    epochs = _largest(dims.get("epochs"), train_cfg.epochs)
    per_epoch = 1
    every_n = config.checkpoint.every_n_steps
    if every_n:
        smallest_batch = _smallest(dims.get("micro_batch_size"), train_cfg.micro_batch_size)
        most_steps = math.ceil(train_rows / (config.distributed.num_workers * smallest_batch))
        per_epoch += most_steps // every_n
    return epochs * per_epoch


def _largest(dim: Optional[SearchDimension], fixed: int) -> int:
    if dim is None:
        return fixed
    return int(max(dim.values) if dim.distribution == "choice" else dim.high)


def _smallest(dim: Optional[SearchDimension], fixed: int) -> int:
    if dim is None:
        return fixed
    return int(min(dim.values) if dim.distribution == "choice" else dim.low)


def trial_resources(config: PipelineConfig) -> dict[str, float]:
    """What one trial's Ray Train workers reserve in total."""
    dist = config.distributed
    needed = {"CPU": dist.num_workers * dist.cpus_per_worker}
    if dist.use_gpu:
        needed["GPU"] = float(dist.num_workers)
    for name, amount in dist.resources_per_worker.items():
        needed[name] = needed.get(name, 0.0) + dist.num_workers * amount
    return needed


def concurrent_trials(cluster: dict[str, float], per_trial: dict[str, float], requested: Optional[int]) -> int:
    """How many trials run at once: as many as the cluster fits (never more), capped by `requested`."""
    fits = min(math.floor(cluster.get(name, 0.0) / amount + 1e-9) for name, amount in per_trial.items() if amount > 0)
    if fits < 1:
        short = ", ".join(f"{name} {amount:g} (cluster has {cluster.get(name, 0.0):g})"
                          for name, amount in per_trial.items() if cluster.get(name, 0.0) < amount)
        raise ConfigError(f"one trial needs more than the cluster has: {short}; lower distributed.num_workers or "
                          "distributed.cpus_per_worker, or add nodes")
    return fits if requested is None else min(fits, requested)
