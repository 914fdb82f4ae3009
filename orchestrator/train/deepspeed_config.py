"""Our config → a DeepSpeed config dict (pure; no DeepSpeed import needed to build it)."""

from __future__ import annotations

import copy
import json
from typing import Any, Optional

from orchestrator import storage
from orchestrator.config import DistributedConfig, TrainConfig
from orchestrator.errors import ConfigError

# Batch sizes come from train.* (the data pipeline is cut by them); a user DeepSpeed JSON may only repeat them.
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def build_deepspeed_config(train: TrainConfig, dist: DistributedConfig, world_size: int, precision: str,
                           user_config: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The DeepSpeed config for one stage: batch arithmetic stated in full, ZeRO stage, offload, precision, AdamW.

    train_batch_size = micro_batch_size × gradient_accumulation_steps × world_size, spelled out so
    DeepSpeed never guesses ("auto" is refused). The optimizer is torch's AdamW (no JIT-compiled fused
    kernel) unless optimizer states are offloaded, where DeepSpeed's CPU Adam is required.
    `user_config` (distributed.deepspeed_config) is deep-merged last: any key can be overridden,
    except that batch sizes must agree with train.* and the LR schedule comes from train.schedule.
    """
    if dist.offload_params and dist.zero_stage != 3:
        raise ConfigError("distributed.offload_params needs distributed.zero_stage=3")
    if dist.offload_optimizer and dist.zero_stage == 0:
        raise ConfigError("distributed.offload_optimizer needs distributed.zero_stage 1, 2 or 3")
    if dist.offload_device == "nvme" and not dist.nvme_path and (dist.offload_optimizer or dist.offload_params):
        raise ConfigError("distributed.offload_device=nvme needs distributed.nvme_path (a local NVMe directory)")
    accumulation = train.accumulation_steps(world_size)
    zero: dict[str, Any] = {"stage": dist.zero_stage}
    if dist.zero_stage >= 1:
        zero.update(reduce_bucket_size=dist.reduce_bucket_size, allgather_bucket_size=dist.allgather_bucket_size)
    if dist.zero_stage >= 2:
        overlap = dist.use_gpu if dist.overlap_comm is None else dist.overlap_comm
        zero.update(overlap_comm=overlap, contiguous_gradients=True)
    if dist.zero_stage == 3:
        zero.pop("allgather_bucket_size")  # stage 3 prefetches by stage3_prefetch_bucket_size instead
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=1e4,
                    stage3_prefetch_bucket_size=dist.reduce_bucket_size)
    if dist.offload_optimizer:
        zero["offload_optimizer"] = _offload(dist)
    if dist.offload_params:
        zero["offload_param"] = _offload(dist)
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": train.micro_batch_size * accumulation * world_size,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.resolved_learning_rate,
                "betas": list(train.adam_betas),
                "eps": train.adam_epsilon,
                "weight_decay": train.weight_decay,
                "torch_adam": not dist.offload_optimizer,
            },
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if user_config:
        config = _apply_user_config(config, user_config, world_size)
    return config


def _offload(dist: DistributedConfig) -> dict[str, Any]:
    if dist.offload_device == "nvme":
        return {"device": "nvme", "nvme_path": dist.nvme_path, "pin_memory": dist.use_gpu}
    return {"device": "cpu", "pin_memory": dist.use_gpu}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`: nested mappings merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _apply_user_config(config: dict[str, Any], user: dict[str, Any], world_size: int) -> dict[str, Any]:
    where = "distributed.deepspeed_config"
    autos = [path for path, value in _leaves(user) if value == "auto"]
    if autos:
        raise ConfigError(f"{where}: {', '.join(autos)} = \"auto\"; state every value (the orchestrator fills the "
                          "batch sizes, precision and optimizer from the config)")
    if "scheduler" in user:
        raise ConfigError(f"{where}: 'scheduler' is not allowed; the learning-rate schedule comes from "
                          "train.schedule / train.warmup_*")
    for key in BATCH_KEYS:
        if key in user and user[key] != config[key]:
            raise ConfigError(
                f"{where}: {key}={user[key]} disagrees with the training config, which gives {key}={config[key]} "
                f"(micro_batch_size {config['train_micro_batch_size_per_gpu']} x gradient_accumulation_steps "
                f"{config['gradient_accumulation_steps']} x {world_size} workers = {config['train_batch_size']}); "
                "set train.micro_batch_size / train.gradient_accumulation_steps / train.global_batch_size instead"
            )
    merged = deep_merge(config, user)
    if merged["bf16"].get("enabled") and merged["fp16"].get("enabled"):
        raise ConfigError(f"{where}: bf16 and fp16 are both enabled; enable at most one")
    return merged


def _leaves(tree: dict[str, Any], prefix: str = ""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def load_user_deepspeed_config(value: Optional[str | dict[str, Any]]) -> Optional[dict[str, Any]]:
    """distributed.deepspeed_config: an inline mapping, or a JSON file (path or URI) read through storage."""
    if value is None or isinstance(value, dict):
        return value
    try:
        text = storage.read_bytes(value).decode("utf-8")
    except Exception as exc:
        raise ConfigError(f"distributed.deepspeed_config: cannot read {value}: {exc}") from exc
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{value}:{exc.lineno}: not valid JSON ({exc.msg}); distributed.deepspeed_config must "
                          "name a DeepSpeed JSON file") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{value}: expected a JSON object of DeepSpeed keys, got {type(loaded).__name__}")
    return loaded
