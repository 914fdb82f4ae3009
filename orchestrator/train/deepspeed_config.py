"""Our config → a DeepSpeed config dict (pure; no DeepSpeed import needed to build it)."""

from __future__ import annotations

from typing import Any

from orchestrator.config import DistributedConfig, TrainConfig
from orchestrator.errors import ConfigError


def resolve_precision(requested: str, use_gpu: bool, bf16_supported: bool) -> str:
    """'auto' → bf16 on GPUs that support it, else fp32; fp16 only on GPUs."""
    if requested == "auto":
        return "bf16" if use_gpu and bf16_supported else "fp32"
    if requested == "fp16" and not use_gpu:
        raise ConfigError("train.precision=fp16 needs GPUs (distributed.use_gpu=true); use fp32 or bf16 on CPU")
    if requested == "bf16" and use_gpu and not bf16_supported:
        raise ConfigError("train.precision=bf16 but this GPU has no bf16 support; use fp16 or fp32")
    return requested


def build_deepspeed_config(train: TrainConfig, dist: DistributedConfig, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed config for one stage: batch arithmetic stated in full, ZeRO stage, precision, AdamW.

    train_batch_size = micro_batch_size × gradient_accumulation_steps × world_size, spelled out so
    DeepSpeed never guesses. The optimizer is torch's AdamW (no JIT-compiled fused kernel) unless
    optimizer states are offloaded, where DeepSpeed's CPU Adam is required.
    """
    if dist.offload_params and dist.zero_stage != 3:
        raise ConfigError("distributed.offload_params needs distributed.zero_stage=3")
    if dist.offload_optimizer and dist.zero_stage == 0:
        raise ConfigError("distributed.offload_optimizer needs distributed.zero_stage 1, 2 or 3")
    zero: dict[str, Any] = {"stage": dist.zero_stage}
    if dist.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_bucket_size=5e7, allgather_bucket_size=5e7)
    if dist.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=1e4)
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": dist.use_gpu}
    if dist.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": dist.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
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
