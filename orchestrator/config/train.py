"""Config sections: the optimisation settings of a stage and its fine-tuning method."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from orchestrator.errors import ConfigError
from orchestrator.config.base import Section


DEFAULT_LR_FULL = 2e-5


DEFAULT_LR_LORA = 2e-4


DEFAULT_LR_PROMPT = 1e-2


FULL_WEIGHT_METHODS = ("full", "freeze")  # save the whole model


ADAPTER_METHODS = ("lora", "adalora", "prompt_tuning", "p_tuning", "prefix_tuning")  # save a peft adapter


MERGEABLE_METHODS = ("lora", "adalora")  # adapters that fold into the weights


PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")  # virtual tokens: served as adapters


def resolve_precision(requested: str, use_gpu: bool, bf16_supported: bool) -> str:
    """What `train.precision` means on this hardware: 'auto' → bf16 on GPUs that support it, fp16 (with loss
    scaling) on older GPUs, fp32 on CPU. The trainer, the workers and the memory planner all read it here."""
    if requested == "auto":
        if not use_gpu:
            return "fp32"
        return "bf16" if bf16_supported else "fp16"
    if requested == "fp16" and not use_gpu:
        raise ConfigError("train.precision=fp16 needs GPUs (distributed.use_gpu=true): DeepSpeed refuses fp16 on "
                          "CPU; use bf16 (supported on CPU) or fp32")
    if requested == "bf16" and use_gpu and not bf16_supported:
        raise ConfigError("train.precision=bf16 but this GPU has no bf16 support; use fp16 or fp32")
    return requested


class LoraConfig(Section):
    """LoRA adapter settings (peft)."""

    r: int = Field(8, gt=0, description="Rank of the update matrices.")
    alpha: int = Field(16, gt=0, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names to adapt (LLaMA names by default: all linear layers).",
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full next to the adapter (e.g. embed_tokens, lm_head; "
        "both are added automatically when the stage extends the vocabulary)."
    )


class AdaLoraSettings(Section):
    """AdaLoRA (peft): LoRA whose rank budget is reallocated during training by importance."""

    init_r: int = Field(12, gt=0, description="Starting rank of every adapted matrix.")
    target_r: int = Field(8, gt=0, description="Average rank left after the budget schedule.")
    tinit: int = Field(0, ge=0, description="Optimizer steps of warm-up before ranks are pruned.")
    tfinal: int = Field(0, ge=0, description="Final optimizer steps with the rank pattern fixed.")
    delta_t: int = Field(1, gt=0, description="Optimizer steps between two budget reallocations.")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance (sensitivity) estimate.")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance uncertainty.")
    orth_reg_weight: float = Field(0.5, gt=0, description="Weight of the orthogonal regularisation added to the loss.")


class PromptLearningConfig(Section):
    """prompt_tuning, p_tuning and prefix_tuning (peft): trained virtual tokens, base weights frozen."""

    num_virtual_tokens: int = Field(20, gt=0, description="Virtual tokens prepended to every input.")
    init_text: Optional[str] = Field(
        None, description="prompt_tuning: initialise the virtual tokens from this text's embeddings (else random)."
    )
    encoder_hidden_size: int = Field(128, gt=0, description="p_tuning: hidden size of the prompt encoder MLP.")
    prefix_projection: bool = Field(False, description="prefix_tuning: reparameterise the prefix through an MLP.")


class FreezeConfig(Section):
    """Freeze-tuning: train only the last N decoder layers (and any extra modules), the rest stays frozen."""

    trainable_layers: int = Field(2, gt=0, description="Number of last decoder layers that are trained.")
    extra_modules: list[str] = Field(
        default_factory=list, description="Other modules trained too, by name prefix, e.g. [lm_head, model.norm]."
    )


class TrainConfig(Section):
    """Optimisation settings of one stage."""

    method: Literal["full", "freeze", "lora", "adalora", "prompt_tuning", "p_tuning", "prefix_tuning"] = Field(
        "lora",
        description="full: every weight; freeze: the last N layers; lora / adalora: low-rank adapters (merged on "
        "export); prompt_tuning / p_tuning / prefix_tuning: trained virtual tokens (served as adapters).",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings (lora; target modules for adalora).")
    adalora: AdaLoraSettings = Field(default_factory=AdaLoraSettings, description="AdaLoRA rank schedule (adalora).")
    prompt: PromptLearningConfig = Field(
        default_factory=PromptLearningConfig, description="Virtual tokens (prompt_tuning, p_tuning, prefix_tuning)."
    )
    freeze: FreezeConfig = Field(default_factory=FreezeConfig, description="Which layers train (method: freeze).")
    learning_rate: Optional[float] = Field(
        None, gt=0, description=f"Peak learning rate. Default: {DEFAULT_LR_FULL} for full and freeze, "
        f"{DEFAULT_LR_LORA} for lora and adalora, {DEFAULT_LR_PROMPT} for the prompt methods."
    )
    epochs: int = Field(1, gt=0, description="Passes over the training data.")
    micro_batch_size: int = Field(4, gt=0, description="Examples per worker per forward pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    global_batch_size: Optional[int] = Field(
        None, gt=0, description="Examples per optimizer step over all workers. When set, gradient_accumulation_steps "
        "is derived: global / (micro_batch_size x workers), which must divide exactly.",
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of optimizer steps spent warming up.")
    warmup_steps: Optional[int] = Field(None, ge=0, description="Warm-up steps; overrides warmup_ratio.")
    schedule: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off).")
    seed: int = Field(42, description="Seed for model init, dropout and data order.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, else fp32. fp16 needs a GPU."
    )
    log_every_n_steps: int = Field(10, gt=0, description="Optimizer steps between progress lines.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    torch_compile: bool = Field(False, description="Compile the model with torch.compile (DeepSpeed's engine.compile).")
    torch_compile_backend: str = Field(
        "inductor", description="torch.compile backend: inductor (fused kernels; compiles for minutes on CPU), "
        "aot_eager (graph capture only, fast to compile), or any registered backend."
    )
    log_row_ids: bool = Field(
        False, description="Append the ids of the prepared rows each worker trains, micro-batch by micro-batch, to "
        "logs/<stage>/rows-<rank>.jsonl (stages 1 and 2): which data a model saw, and proof that a resumed run "
        "trained exactly the rows an uninterrupted one would have.",
    )
    fail_at_step: Optional[int] = Field(
        None, ge=1, description="Testing aid: raise after this optimizer step (to exercise resume). Never in production."
    )

    @property
    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        if self.method in FULL_WEIGHT_METHODS:
            return DEFAULT_LR_FULL
        return DEFAULT_LR_PROMPT if self.method in PROMPT_METHODS else DEFAULT_LR_LORA

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step: stated, or derived from global_batch_size (which must divide)."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by micro_batch_size "
                f"{self.micro_batch_size} x {world_size} workers = {per_step}; use a multiple of {per_step} "
                f"(e.g. {max(per_step, self.global_batch_size // per_step * per_step)})"
            )
        return self.global_batch_size // per_step
