"""Step time, tokens per second and wall time from FLOPs at an assumed model FLOPs utilisation.

Training FLOPs per token follow the usual accounting (Kaplan et al. 2020; PaLM appendix B): a
matmul weight costs 2 FLOPs per token forward, 2 for the input gradient and 2 for the weight
gradient, so full training is 6·N per token, plus 12·L·s·d_attn for attention scores. Frozen
weights skip their weight gradient (LoRA ≈ 4·N + 6·N_adapter), layers below the first trained one
skip backward entirely (freeze tuning), and gradient checkpointing repeats the forward of every
checkpointed layer. Offloading adds host-device copies over PCIe that are not overlapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from orchestrator.plan.model_shape import MethodSpec, ModelShape, ParameterCounts, count_parameters

PCIE_BYTES_PER_S = 25e9  # effective host<->device bandwidth per GPU (PCIe 4.0 x16)


@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token, split by where they go."""

    forward: float
    backward: float
    recompute: float

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.recompute


def training_flops_per_token(
    shape: ModelShape,
    method: MethodSpec,
    seq_len: int,
    gradient_checkpointing: bool = False,
    counts: Optional[ParameterCounts] = None,
) -> FlopsPerToken:
    """FLOPs one token costs in one training step of `shape` with `method`."""
    counts = counts or count_parameters(shape, method)
    layer = shape.layer_linear_params
    head = shape.vocab_size * shape.hidden_size
    attn_fwd = 4 * seq_len * shape.q_dim  # QK^T and attention x V, per layer, per token
    n_layers = shape.num_layers
    forward = 2 * shape.matmul_params + n_layers * attn_fwd
    if method.kind == "full":
        backward = 4 * shape.matmul_params + 2 * n_layers * attn_fwd
    elif method.kind == "freeze":
        k = counts.recording_layers
        # input gradients through the LM head and the trained layers, weight gradients for the latter
        backward = 2 * head + 2 * k * layer + 2 * k * layer + 2 * k * attn_fwd
    else:  # LoRA, QLoRA, soft prompts: input gradients everywhere, weight gradients for the adapter only
        backward = 2 * shape.matmul_params + 2 * n_layers * attn_fwd + 4 * counts.trainable_adapter
        forward += 2 * counts.trainable_adapter
    recompute = 0.0
    if gradient_checkpointing:
        recompute = counts.recording_layers * (2 * layer + attn_fwd)
    return FlopsPerToken(forward=forward, backward=backward, recompute=recompute)


@dataclass(frozen=True)
class Throughput:
    """Estimated speed of one configuration and, when the token count is known, its duration."""

    flops_per_token: FlopsPerToken
    tokens_per_step: int
    step_seconds: float
    compute_seconds: float
    offload_seconds: float
    tokens_per_second: float
    optimizer_steps: Optional[int]
    wall_seconds: Optional[float]
    gpu_hours: Optional[float]


def estimate_throughput(
    shape: ModelShape,
    method: MethodSpec,
    *,
    seq_len: int,
    micro_batch: int,
    gradient_accumulation: int,
    world_size: int,
    gradient_checkpointing: bool,
    mfu: float,
    peak_tflops: float,
    dataset_tokens: Optional[int] = None,
    epochs: int = 1,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    weight_bytes: int = 2,
    counts: Optional[ParameterCounts] = None,
) -> Throughput:
    """Step time and tokens/s at `mfu` x `peak_tflops` per GPU; wall time and GPU-hours for the data.

    The MFU is applied to all FLOPs the GPU executes, recomputation included. Data parallelism is
    assumed perfect beyond what the MFU absorbs; offload transfers are added on top (optimizer
    offload: gradients down and updated weights up once per optimizer step; parameter offload: the
    weight partition up for every forward, backward and recompute pass).
    """
    counts = counts or count_parameters(shape, method)
    flops = training_flops_per_token(shape, method, seq_len, gradient_checkpointing, counts)
    tokens_per_micro = seq_len * micro_batch
    tokens_per_step = tokens_per_micro * gradient_accumulation * world_size
    compute = flops.total * tokens_per_micro * gradient_accumulation / (mfu * peak_tflops * 1e12)
    offload = 0.0
    if offload_optimizer:
        per_rank = counts.trainable / world_size
        offload += (4 + weight_bytes) * per_rank / PCIE_BYTES_PER_S
    if offload_params:
        passes = 3 if gradient_checkpointing else 2
        offload += passes * gradient_accumulation * weight_bytes * counts.total / world_size / PCIE_BYTES_PER_S
    step = compute + offload
    tokens_per_second = tokens_per_step / step
    steps = wall = gpu_hours = None
    if dataset_tokens is not None:
        total_tokens = dataset_tokens * epochs
        steps = max(1, int(total_tokens // tokens_per_step))
        wall = total_tokens / tokens_per_second
        gpu_hours = wall * world_size / 3600
    return Throughput(
        flops_per_token=flops,
        tokens_per_step=tokens_per_step,
        step_seconds=step,
        compute_seconds=compute,
        offload_seconds=offload,
        tokens_per_second=tokens_per_second,
        optimizer_steps=steps,
        wall_seconds=wall,
        gpu_hours=gpu_hours,
    )
