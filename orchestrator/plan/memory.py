"""Memory estimates for one training worker: model states (DeepSpeed ZeRO 0-3, offload), activations,
temporary buffers and allocator headroom.

Model states follow DeepSpeed's own accounting (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`), generalised to trainable subsets (LoRA, freeze tuning),
ZeRO stages 0 and 1 and other precisions; for full bf16 training at ZeRO 2 and 3 the numbers are
DeepSpeed's exactly. Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation
in Large Transformer Models"), whose GPT layer stores sbh(34 + 5as/h) bytes in 16-bit, re-derived
term by term for transformers' LLaMA implementation (RMSNorm with an fp32 upcast, SwiGLU, GQA, no
dropout, SDPA/flash or eager attention) and for frozen weights, whose layers save less.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from orchestrator.plan.model_shape import (
    ATTENTION_LINEARS,
    MLP_LINEARS,
    MethodSpec,
    ModelShape,
    ParameterCounts,
    count_parameters,
)

GIB = 2**30
PRECISIONS: tuple[str, ...] = ("fp32", "amp", "bf16", "pure_bf16")
PRECISION_LABELS = {
    "fp32": "fp32",
    "amp": "fp32 weights + 16-bit autocast (AMP)",
    "bf16": "bf16 mixed (fp32 master weights)",
    "pure_bf16": "pure bf16",
}

# Allocator and runtime overheads: rules of thumb, not measurements of this project's runs.
ALLOCATOR_FRAGMENTATION = 0.10  # share of allocated bytes the caching allocator cannot hand out again
CUDA_CONTEXT_BYTES = int(0.75 * GIB)  # CUDA context, cuBLAS/NCCL workspaces: outside torch's allocator
# Communication buckets (elements): DeepSpeed defaults for ZeRO 0/1, our DeepSpeed config's for ZeRO 2/3.
BUCKET_ELEMENTS = {0: 5e8, 1: 5e8, 2: 5e7, 3: 5e7}
DEEPSPEED_BUFFER_FACTOR = 1.5  # DeepSpeed's `additional_buffer_factor` for CPU memory


@dataclass(frozen=True)
class PrecisionBytes:
    """Bytes per parameter (or activation element) of each copy a precision keeps."""

    weight: int  # the working copy forward/backward use
    grad: int  # gradient in the working dtype
    grad_fp32: int  # extra fp32 gradient copy the mixed-precision optimizer steps on
    master: int  # fp32 master copy of trainable weights (mixed precision)
    optimizer: int  # AdamW exp_avg + exp_avg_sq
    activation: int  # element size of stored activations


def precision_bytes(precision: str, zero_stage: int) -> PrecisionBytes:
    """Bytes per element for a precision. fp32 under ZeRO >= 1 gains DeepSpeed's flat fp32 partition copy."""
    if precision == "fp32":
        return PrecisionBytes(4, 4, 0, 4 if zero_stage >= 1 else 0, 8, 4)
    if precision == "amp":
        return PrecisionBytes(4, 4, 0, 4 if zero_stage >= 1 else 0, 8, 2)
    if precision == "bf16":
        return PrecisionBytes(2, 2, 4, 4, 8, 2)
    if precision == "pure_bf16":
        return PrecisionBytes(2, 2, 0, 0, 4, 2)
    raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class ModelStates:
    """Per-GPU (and per-node CPU) bytes of weights, gradients and optimizer states."""

    weights: float  # base model weights on the GPU
    adapter: float  # LoRA / prompt parameters on the GPU
    gradients: float  # working-dtype and fp32 gradient (partitions) on the GPU
    master: float  # fp32 master weights on the GPU
    optimizer: float  # optimizer states on the GPU
    gathered: float  # ZeRO-3: params + grads of the largest module, gathered whole
    cpu_offloaded: float  # per GPU: what offload keeps in CPU memory
    cpu_per_node: float  # DeepSpeed's "per CPU" figure: max(model loading, offloaded) x buffer factor

    @property
    def gpu(self) -> float:
        """DeepSpeed's "per GPU" figure (model states only)."""
        return self.weights + self.adapter + self.gradients + self.master + self.optimizer + self.gathered


def model_state_bytes(
    total_params: int,
    trainable_params: Optional[int] = None,
    *,
    adapter_params: int = 0,
    largest_module_params: int = 0,
    zero_stage: int = 2,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    gpus_per_node: int = 1,
    nodes: int = 1,
    precision: str = "bf16",
    zero_init: bool = False,
    load_bytes_per_param: int = 4,
    additional_buffer_factor: float = DEEPSPEED_BUFFER_FACTOR,
    quantized_weight_bytes: Optional[float] = None,
) -> ModelStates:
    """Weights, gradients, master weights and optimizer states of one GPU under ZeRO `zero_stage`.

    `total_params` includes `adapter_params` (LoRA, prompts); `trainable_params` defaults to all.
    Conventions are DeepSpeed's: ZeRO-1 partitions optimizer states and master weights, ZeRO-2 also
    gradients, ZeRO-3 also weights, plus (working + gradient bytes) x the largest module gathered
    whole. Under ZeRO-3 DeepSpeed counts the gradient partition once, in fp32. Offloading the
    optimizer moves fp32 gradients, master weights and optimizer states to CPU (and at ZeRO 2/3
    reduced gradients leave the GPU as they are produced); offloading parameters (ZeRO-3) moves
    the weight partition too. CPU memory per node is DeepSpeed's: the larger of loading the model
    (every local process materialises it, `load_bytes_per_param` each, or one module at a time with
    `zero_init`) and the offloaded states of the node's GPUs, times `additional_buffer_factor`.
    `quantized_weight_bytes` replaces the frozen base weights' bytes (QLoRA).
    """
    if trainable_params is None:
        trainable_params = total_params
    n = gpus_per_node * nodes
    b = precision_bytes(precision, zero_stage)
    base = total_params - adapter_params
    trainable = trainable_params
    z = zero_stage

    weight_partition = n if z == 3 else 1
    weights = (quantized_weight_bytes if quantized_weight_bytes is not None else b.weight * base) / weight_partition
    adapter = b.weight * adapter_params / weight_partition

    fp32_grad_bytes = max(b.grad, b.grad_fp32) if z == 3 else b.grad_fp32
    if z == 0:
        grads_lp, grads_fp32 = b.grad * trainable, b.grad_fp32 * trainable
    elif z == 1:
        grads_lp, grads_fp32 = b.grad * trainable, b.grad_fp32 * trainable / n
    elif z == 2:
        grads_lp, grads_fp32 = b.grad * trainable / n, b.grad_fp32 * trainable / n
    else:
        grads_lp, grads_fp32 = 0.0, fp32_grad_bytes * trainable / n
    state_partition = n if z >= 1 else 1
    master = b.master * trainable / state_partition
    optimizer = b.optimizer * trainable / state_partition
    gathered = (b.weight + b.grad) * largest_module_params if z == 3 else 0.0

    cpu = 0.0
    if offload_optimizer:
        # The gradient partition the optimizer steps on goes to CPU, in fp32 where it steps in fp32.
        cpu += max(b.grad, b.grad_fp32) * trainable / n + master + optimizer
        grads_fp32 = 0.0
        if z >= 2:
            grads_lp = 0.0
        master = optimizer = 0.0
    grads = grads_lp + grads_fp32
    if offload_params:
        cpu += weights + adapter
        weights = adapter = 0.0

    loading = load_bytes_per_param * (largest_module_params if zero_init else total_params) * gpus_per_node
    cpu_per_node = max(loading, cpu * gpus_per_node) * additional_buffer_factor
    return ModelStates(
        weights=weights,
        adapter=adapter,
        gradients=grads,
        master=master,
        optimizer=optimizer,
        gathered=gathered,
        cpu_offloaded=cpu,
        cpu_per_node=cpu_per_node,
    )


@dataclass(frozen=True)
class ActivationEstimate:
    """Activation bytes of one worker for one micro-batch.

    `saved` is what autograd holds at the end of the forward pass (what a saved-tensors hook
    sees); `peak` adds the loss's transient logits copies and, with checkpointing, one layer's
    recomputed activations.
    """

    per_layer: float  # one recording decoder layer, no checkpointing
    per_layer_checkpointed: float  # one checkpointed layer: its input
    first_layer_saving: float  # what the first recording layer keeps less when its input needs no gradient
    recording_layers: int
    outside_layers: float  # final norm, LM head input, saved log-probabilities, token ids, RoPE tables
    logits_transient: float
    checkpointing: bool

    @property
    def layers(self) -> float:
        if self.checkpointing:
            return self.per_layer_checkpointed * self.recording_layers
        if not self.recording_layers:
            return 0.0
        return self.per_layer * self.recording_layers - self.first_layer_saving

    @property
    def saved(self) -> float:
        return self.layers + self.outside_layers

    @property
    def peak(self) -> float:
        recompute = self.per_layer if self.checkpointing and self.recording_layers else 0.0
        return self.saved + self.logits_transient + recompute


def korthikanti_layer_bytes(seq_len: int, micro_batch: int, hidden: int, heads: int) -> float:
    """Korthikanti et al. 2022: activations of one GPT layer, 16-bit, no parallelism: sbh(34 + 5as/h)."""
    s, b, h, a = seq_len, micro_batch, hidden, heads
    return s * b * h * (34 + 5 * a * s / h)


def activation_bytes(
    shape: ModelShape,
    method: MethodSpec,
    *,
    seq_len: int,
    micro_batch: int,
    activation_bytes_per_element: int = 2,
    attention: str = "sdpa",
    gradient_checkpointing: bool = False,
    on_gpu: bool = True,
    counts: Optional[ParameterCounts] = None,
) -> ActivationEstimate:
    """Activations autograd keeps for one micro-batch of transformers' LLaMA, term by term.

    Korthikanti's GPT layer (16-bit) stores 11sbh + 5as²b in attention, 19sbh in the MLP and 4sbh
    in two LayerNorms. For LLaMA (e = bytes per element, g = kv heads / heads, I = MLP width):
    - each RMSNorm keeps its input upcast to fp32 (4sbh), an fp32 rsqrt (4sb) and, when its
      weight trains, the normalised copy (e·sbh);
    - linear layers keep their input only when their weight (or a LoRA on them) trains; LoRA with
      dropout keeps a dropped-out copy (e) and a mask per adapted module instead (1 byte on GPUs'
      fused dropout, an e-byte noise tensor on CPU);
    - attention keeps q, k, v (e·sb·(q + 2kv)) and its output; SDPA/flash kernels add only an fp32
      log-sum-exp (4asb), eager attention the fp32 softmax and its cast (4 + e)·as²b (Korthikanti's
      5as²b term) plus GQA's repeated k and v;
    - the SwiGLU MLP keeps gate, SiLU and up outputs (3e·sbI) and the down-projection input;
    - no dropout (LLaMA has none), hence no masks.
    - when nothing below the first recording layer trains (LoRA, freeze tuning), that layer's
      input needs no gradient, so its first RMSNorm keeps nothing for the input's sake and its
      q/k/v dropouts keep no masks.
    With gradient checkpointing (one checkpoint per decoder layer, as transformers does) a layer
    keeps only its input (e·sbh) and one layer's activations are rebuilt at a time in backward;
    the training loop then makes the embeddings' output require grad, so every layer records.
    """
    counts = counts or count_parameters(shape, method)
    e = activation_bytes_per_element
    s, b = seq_len + (method.num_virtual_tokens if method.kind in ("prompt", "p_tuning") else 0), micro_batch
    sb = s * b
    h, i, q, kv = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.kv_dim
    a = shape.num_heads
    layer_trains = method.kind in ("full", "freeze")  # in freeze tuning the recording layers are the trained ones
    lora_targets = set(method.lora_targets) if method.has_adapter else set()
    dropout = method.has_adapter and method.lora_dropout > 0
    mask = 1 if on_gpu else e

    def linear_inputs(modules: tuple[str, ...], width: int, saved_anyway: bool = False) -> float:
        """Bytes kept for the inputs of `modules`, which share one input tensor of `width`."""
        if layer_trains:
            return 0.0 if saved_anyway else e * sb * width
        adapted = [m for m in modules if m in lora_targets]
        if not adapted:
            return 0.0
        if dropout:
            return len(adapted) * (e + mask) * sb * width
        return 0.0 if saved_anyway else e * sb * width

    norm = 2 * (4 * sb * h + 4 * sb + (e * sb * h if layer_trains else 0))
    sdpa = attention != "eager"
    qkv = e * sb * (q + 2 * kv)
    if sdpa:
        attn = 4 * a * sb + e * sb * q  # log-sum-exp + the kernel's output (= o_proj's input)
    else:
        softmax = (4 + (e if e < 4 else 0)) * a * s * s * b
        repeated_kv = 2 * e * sb * (q - kv) if kv < q else 0
        attn = softmax + repeated_kv
    inputs = (
        linear_inputs(ATTENTION_LINEARS[:3], h)
        + linear_inputs(("o_proj",), q, saved_anyway=sdpa)
        + linear_inputs(MLP_LINEARS[:2], h)
        + linear_inputs(("down_proj",), i)
    )
    mlp = 3 * e * sb * i
    lora_hidden = e * sb * method.lora_rank * len([t for t in lora_targets if t in shape.linear_dims()])
    per_layer = norm + qkv + attn + inputs + mlp + lora_hidden

    first_layer_saving = 0.0
    trains_below = method.kind in ("full", "prompt", "p_tuning") or "embed_tokens" in lora_targets or (
        "embed_tokens" in method.modules_to_save
    )
    if not trains_below and not gradient_checkpointing:
        first_layer_saving = 4 * sb * h + 4 * sb
        if dropout:
            first_layer_saving += mask * sb * h * len(lora_targets & set(ATTENTION_LINEARS[:3]))

    trains_head = method.kind == "full" or "lm_head" in lora_targets or "lm_head" in method.modules_to_save
    trains_embed = method.kind == "full" or "embed_tokens" in lora_targets or "embed_tokens" in method.modules_to_save
    final_norm = 4 * sb * h + 4 * sb + (e * sb * h if method.kind == "full" else 0)
    head_input = e * sb * h if trains_head else 0
    log_probs = 4 * sb * shape.vocab_size
    ids = 8 * sb * (2 if trains_embed else 1)  # loss targets (+ input ids for the embedding's gradient)
    rope = 0 if gradient_checkpointing else 2 * e * s * shape.dim_per_head
    outside = final_norm + head_input + log_probs + ids + rope
    logits_transient = (e + 4) * sb * shape.vocab_size  # logits in compute dtype + the fp32 gradient
    return ActivationEstimate(
        per_layer=per_layer,
        per_layer_checkpointed=e * sb * h,
        first_layer_saving=first_layer_saving,
        recording_layers=counts.recording_layers,
        outside_layers=outside,
        logits_transient=logits_transient,
        checkpointing=gradient_checkpointing,
    )


@dataclass(frozen=True)
class MemoryBreakdown:
    """Everything one worker holds at its peak, in bytes, and the CPU memory of its node."""

    weights: float
    adapter: float
    gradients: float
    optimizer: float
    master: float
    activations: float
    buffers: float  # communication buckets, autocast cache, dequantisation, backward working set
    gathered: float  # ZeRO-3 gathered module
    headroom: float  # allocator fragmentation + CUDA context
    cpu_per_node: float
    cpu_offloaded_per_gpu: float
    activation_detail: ActivationEstimate
    model_states: ModelStates
    reference: float = 0.0  # stage 3's frozen reference copy (full / freeze with a reference-based loss)

    @property
    def total(self) -> float:
        return (
            self.weights + self.adapter + self.gradients + self.optimizer + self.master
            + self.activations + self.buffers + self.gathered + self.headroom + self.reference
        )

    def items(self) -> list[tuple[str, float]]:
        """(label, bytes) rows in display order."""
        return [
            ("weights", self.weights),
            ("LoRA / prompt parameters", self.adapter),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer),
            ("master weights (fp32)", self.master),
            ("activations", self.activations),
            ("ZeRO-3 gathered module", self.gathered),
            *([("reference model (frozen)", self.reference)] if self.reference else []),
            ("temporary buffers", self.buffers),
            ("allocator headroom", self.headroom),
        ]


def quantized_base_bytes(shape: ModelShape, bits: int) -> float:
    """Base weights under QLoRA: decoder linears quantized (bitsandbytes), everything else 16-bit.

    4-bit NF4 with double quantization costs 4.127 bits per weight (QLoRA paper); LLM.int8 8-bit
    one byte plus an fp32 scale per output row.
    """
    dims = shape.linear_dims()
    linear_weights = shape.num_layers * sum(i * o for i, o, _ in dims.values())
    rows = shape.num_layers * sum(o for _, o, _ in dims.values())
    if bits == 4:
        quantized = linear_weights * 4.127 / 8
    elif bits == 8:
        quantized = linear_weights + 4 * rows
    else:
        raise ValueError(f"QLoRA bits must be 4 or 8, got {bits}")
    return quantized + 2 * (shape.total_params - linear_weights)


def estimate_memory(
    shape: ModelShape,
    method: MethodSpec,
    *,
    precision: str,
    zero_stage: int,
    offload_optimizer: bool,
    offload_params: bool,
    gpus_per_node: int,
    nodes: int,
    seq_len: int,
    micro_batch: int,
    gradient_checkpointing: bool,
    attention: str = "sdpa",
    on_gpu: bool = True,
    load_bytes_per_param: Optional[int] = None,
) -> MemoryBreakdown:
    """The per-worker memory breakdown of one training configuration."""
    counts = count_parameters(shape, method)
    b = precision_bytes(precision, zero_stage)
    world = gpus_per_node * nodes
    quantized = quantized_base_bytes(shape, method.quant_bits) if method.kind == "qlora" else None
    states = model_state_bytes(
        counts.total,
        counts.trainable,
        adapter_params=counts.adapter,
        largest_module_params=counts.largest_module,
        zero_stage=zero_stage,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        precision=precision,
        zero_init=zero_stage == 3,  # the recipe loads ZeRO-3 bases partitioned (deepspeed.zero.Init)
        load_bytes_per_param=load_bytes_per_param or b.weight,
        quantized_weight_bytes=quantized,
    )
    acts = activation_bytes(
        shape,
        method,
        seq_len=seq_len,
        micro_batch=micro_batch,
        activation_bytes_per_element=b.activation,
        attention=attention,
        gradient_checkpointing=gradient_checkpointing,
        on_gpu=on_gpu,
        counts=counts,
    )
    s, mb = seq_len, micro_batch
    buffers = b.activation * s * mb * 2 * (shape.hidden_size + shape.intermediate_size)  # backward working set
    if world > 1:
        bucket = BUCKET_ELEMENTS[zero_stage]
        buffers += b.grad * min(bucket, counts.trainable)
        if zero_stage >= 2:
            buffers += b.weight * min(bucket, counts.total)
    if precision == "amp":
        buffers += 2 * counts.trainable / (world if zero_stage == 3 else 1)  # autocast's cached 16-bit weights
    if method.kind == "qlora":
        dims = shape.linear_dims().values()
        buffers += 2 * max(i * o for i, o, _ in dims)  # one dequantised weight at a time
    allocated = states.gpu + acts.peak + buffers
    headroom = ALLOCATOR_FRAGMENTATION * allocated + (CUDA_CONTEXT_BYTES if on_gpu else 0)
    return MemoryBreakdown(
        weights=states.weights,
        adapter=states.adapter,
        gradients=states.gradients,
        optimizer=states.optimizer,
        master=states.master,
        activations=acts.peak,
        buffers=buffers,
        gathered=states.gathered,
        headroom=headroom,
        cpu_per_node=states.cpu_per_node,
        cpu_offloaded_per_gpu=states.cpu_offloaded,
        activation_detail=acts,
        model_states=states,
    )
