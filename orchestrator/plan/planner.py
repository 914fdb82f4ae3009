"""Does a training configuration fit, what is the cheapest change that makes it fit, and how long will it take.

`plan_training` estimates one (model shape, training setup) pair; `plan_stage` builds the pair from
a pipeline config's stage; `check_fits` is the pre-launch check (warns, or refuses when
`plan.strict`); `requirements_table` regenerates a "hardware requirement" table (method x model
size) from the models' shapes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from orchestrator.config import PipelineConfig, apply_overrides, config_from_dict, resolve_precision
from orchestrator.errors import ConfigError
from orchestrator.plan.memory import GIB, PRECISIONS, MemoryBreakdown, estimate_memory, precision_bytes
from orchestrator.plan.model_shape import (
    LAYER_LINEARS,
    MethodSpec,
    ModelShape,
    ParameterCounts,
    count_parameters,
    shape_from_model_dir,
    shape_from_tiny,
)
from orchestrator.plan.throughput import Throughput, estimate_throughput

log = logging.getLogger(__name__)

MAX_GPUS = 1024  # the "more GPUs" suggestion stops here


@dataclass(frozen=True)
class TrainingSetup:
    """Everything the estimates depend on besides the model's shape."""

    method: MethodSpec = field(default_factory=MethodSpec)
    precision: str = "bf16"
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    gpus_per_node: int = 1
    nodes: int = 1
    gpu_memory_gib: float = 80.0
    host_memory_gib: Optional[float] = None  # RAM per node; None: host memory is estimated but not checked
    seq_len: int = 1024
    micro_batch: int = 1
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    on_gpu: bool = True
    mfu: float = 0.4
    peak_tflops: float = 312.0
    epochs: int = 1
    dataset_tokens: Optional[int] = None
    load_bytes_per_param: Optional[int] = None
    reference_model: bool = False  # stage 3 holds a frozen copy of the weights next to the policy

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    def validate(self) -> None:
        """Raise ConfigError for combinations DeepSpeed (or the planner) does not support."""
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if not 0 <= self.zero_stage <= 3:
            raise ConfigError(f"ZeRO stage must be 0-3, got {self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("distributed.offload_params needs distributed.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("distributed.offload_optimizer needs distributed.zero_stage 1, 2 or 3")
        if self.method.kind == "qlora" and self.zero_stage == 3:
            raise ConfigError("QLoRA with ZeRO-3 is not modelled; use ZeRO 0-2")
        if self.method.kind == "qlora" and self.method.quant_bits not in (4, 8):
            raise ConfigError(f"QLoRA bits must be 4 or 8, got {self.method.quant_bits}")


@dataclass(frozen=True)
class Suggestion:
    """The cheapest change found: config overrides in words, the changed setup, and whether it fits."""

    changes: tuple[str, ...]
    setup: TrainingSetup
    total_bytes: float
    fits: bool


@dataclass(frozen=True)
class PlanReport:
    """The planner's answer for one stage: memory, speed, fit, and what to change when it does not fit."""

    stage: str
    shape: ModelShape
    setup: TrainingSetup
    counts: ParameterCounts
    memory: MemoryBreakdown
    throughput: Throughput
    suggestion: Optional[Suggestion]
    notes: tuple[str, ...] = ()

    @property
    def budget_bytes(self) -> float:
        return self.setup.gpu_memory_gib * GIB

    @property
    def gpu_fits(self) -> bool:
        return self.memory.total <= self.budget_bytes

    @property
    def host_fits(self) -> bool:
        """Host RAM per node (loading, CPU offload) within plan.host_memory_gib; True when that is not set."""
        return self.setup.host_memory_gib is None or self.memory.cpu_per_node <= self.setup.host_memory_gib * GIB

    @property
    def fits(self) -> bool:
        return self.gpu_fits and self.host_fits


def estimate_setup(shape: ModelShape, setup: TrainingSetup) -> MemoryBreakdown:
    """The memory breakdown of `setup` (validated first)."""
    setup.validate()
    memory = estimate_memory(
        shape,
        setup.method,
        precision=setup.precision,
        zero_stage=setup.zero_stage,
        offload_optimizer=setup.offload_optimizer,
        offload_params=setup.offload_params,
        gpus_per_node=setup.gpus_per_node,
        nodes=setup.nodes,
        seq_len=setup.seq_len,
        micro_batch=setup.micro_batch,
        gradient_checkpointing=setup.gradient_checkpointing,
        attention=setup.attention,
        on_gpu=setup.on_gpu,
        load_bytes_per_param=setup.load_bytes_per_param,
    )
    if not setup.reference_model:
        return memory
    # The frozen reference: weights only, partitioned like the policy's under ZeRO-3, whole otherwise.
    per_param = setup.load_bytes_per_param or precision_bytes(setup.precision, setup.zero_stage).weight
    share = setup.world_size if setup.zero_stage == 3 else 1
    return replace(memory, reference=shape.total_params * per_param / share)


def plan_training(
    shape: ModelShape, setup: TrainingSetup, stage: str = "sft", notes: tuple[str, ...] = ()
) -> PlanReport:
    """Memory breakdown, fit, throughput and (when it does not fit) the cheapest fitting change."""
    memory = estimate_setup(shape, setup)
    counts = count_parameters(shape, setup.method)
    throughput = estimate_throughput(
        shape,
        setup.method,
        seq_len=setup.seq_len,
        micro_batch=setup.micro_batch,
        gradient_accumulation=setup.gradient_accumulation,
        world_size=setup.world_size,
        gradient_checkpointing=setup.gradient_checkpointing,
        mfu=setup.mfu,
        peak_tflops=setup.peak_tflops,
        dataset_tokens=setup.dataset_tokens,
        epochs=setup.epochs,
        offload_optimizer=setup.offload_optimizer,
        offload_params=setup.offload_params,
        weight_bytes=4 if setup.precision in ("fp32", "amp") else 2,
        counts=counts,
    )
    fits = memory.total <= setup.gpu_memory_gib * GIB
    suggestion = None if fits else suggest_change(shape, setup, stage)
    return PlanReport(stage, shape, setup, counts, memory, throughput, suggestion, notes)


# ----------------------------------------------------------------------------- what to change

Step = Callable[[ModelShape, TrainingSetup, str], Optional[tuple[TrainingSetup, str]]]


def _fits(shape: ModelShape, setup: TrainingSetup) -> bool:
    return estimate_setup(shape, setup).total <= setup.gpu_memory_gib * GIB


def _checkpointing(shape: ModelShape, setup: TrainingSetup, stage: str) -> Optional[tuple[TrainingSetup, str]]:
    if setup.gradient_checkpointing:
        return None
    return replace(setup, gradient_checkpointing=True), f"{stage}.train.gradient_checkpointing=true"


def _smaller_micro_batch(shape: ModelShape, setup: TrainingSetup, stage: str) -> Optional[tuple[TrainingSetup, str]]:
    if setup.micro_batch == 1:
        return None
    global_micro = setup.micro_batch * setup.gradient_accumulation
    chosen = None
    for micro in range(setup.micro_batch - 1, 0, -1):
        chosen = replace(setup, micro_batch=micro, gradient_accumulation=math.ceil(global_micro / micro))
        if _fits(shape, chosen):
            break
    assert chosen is not None
    return chosen, (
        f"{stage}.train.micro_batch_size={chosen.micro_batch} "
        f"{stage}.train.gradient_accumulation_steps={chosen.gradient_accumulation} (about the same global batch)"
    )


def _higher_zero(shape: ModelShape, setup: TrainingSetup, stage: str) -> Optional[tuple[TrainingSetup, str]]:
    top = 2 if setup.method.kind == "qlora" else 3
    if setup.world_size == 1 or setup.zero_stage >= top:
        return None  # partitioning over one GPU saves nothing
    chosen = None
    for zero in range(setup.zero_stage + 1, top + 1):
        chosen = replace(setup, zero_stage=zero)
        if _fits(shape, chosen):
            break
    assert chosen is not None
    return chosen, f"distributed.zero_stage={chosen.zero_stage}"


def _offload_optimizer(shape: ModelShape, setup: TrainingSetup, stage: str) -> Optional[tuple[TrainingSetup, str]]:
    if setup.offload_optimizer:
        return None
    zero = max(setup.zero_stage, 2)
    text = "distributed.offload_optimizer=true"
    if zero != setup.zero_stage:
        text += f" distributed.zero_stage={zero}"
    return replace(setup, zero_stage=zero, offload_optimizer=True), text


def _offload_params(shape: ModelShape, setup: TrainingSetup, stage: str) -> Optional[tuple[TrainingSetup, str]]:
    if setup.offload_params or setup.method.kind == "qlora":
        return None
    parts = ["distributed.offload_params=true"]
    if setup.zero_stage != 3:
        parts.append("distributed.zero_stage=3")
    if not setup.offload_optimizer:
        parts.append("distributed.offload_optimizer=true")
    return replace(setup, zero_stage=3, offload_params=True, offload_optimizer=True), " ".join(parts)


def _more_gpus(shape: ModelShape, setup: TrainingSetup, stage: str) -> Optional[tuple[TrainingSetup, str]]:
    if setup.zero_stage == 0:
        return None  # without ZeRO every GPU holds everything
    per_node, nodes = setup.gpus_per_node, setup.nodes
    while per_node * nodes < MAX_GPUS:
        if nodes == 1 and per_node < 8:
            per_node = min(8, per_node * 2)
        else:
            nodes *= 2
        candidate = replace(setup, gpus_per_node=per_node, nodes=nodes)
        if _fits(shape, candidate):
            world = per_node * nodes
            return candidate, f"distributed.num_workers={world} (plan.gpus_per_node={per_node}, plan.nodes={nodes})"
    return None


ESCALATION: tuple[Step, ...] = (
    _checkpointing,
    _smaller_micro_batch,
    _higher_zero,
    _offload_optimizer,
    _offload_params,
    _more_gpus,
)


def suggest_change(shape: ModelShape, setup: TrainingSetup, stage: str = "sft") -> Suggestion:
    """The cheapest change that makes `setup` fit, trying in order: gradient checkpointing, a smaller
    micro-batch (more accumulation), a higher ZeRO stage, optimizer offload, parameter offload, more
    GPUs. Each alone first; if none is enough, they are combined in that order until it fits.
    """
    for step in ESCALATION:
        found = step(shape, setup, stage)
        if found is not None and _fits(shape, found[0]):
            return Suggestion((found[1],), found[0], estimate_setup(shape, found[0]).total, True)
    current, changes = setup, []
    for step in ESCALATION:
        found = step(shape, current, stage)
        if found is None:
            continue
        current = found[0]
        changes.append(found[1])
        if _fits(shape, current):
            return Suggestion(tuple(changes), current, estimate_setup(shape, current).total, True)
    return Suggestion(tuple(changes), current, estimate_setup(shape, current).total, False)


# ----------------------------------------------------------------------------- from a pipeline config

METHOD_CHOICES = ("full", "freeze", "lora", "qlora-8bit", "qlora-4bit", "prompt", "p-tuning")
PRECISION_CHOICES = ("fp32", "amp", "bf16", "pure-bf16")


# Training methods of the config → the planner's kinds (same memory shape).
_PLANNER_METHOD = {"full": "full", "freeze": "freeze", "lora": "lora", "adalora": "lora",
                   "prompt_tuning": "prompt", "p_tuning": "p_tuning", "prefix_tuning": "p_tuning"}


def method_from_name(name: str, base: MethodSpec) -> MethodSpec:
    """A CLI method name ('qlora-4bit', 'p-tuning', ...) applied to `base` (keeps its LoRA settings)."""
    if name == "qlora-8bit":
        return replace(base, kind="qlora", quant_bits=8)
    if name == "qlora-4bit":
        return replace(base, kind="qlora", quant_bits=4)
    if name in ("full", "freeze", "lora", "prompt"):
        return replace(base, kind=name)
    if name == "p-tuning":
        return replace(base, kind="p_tuning")
    raise ConfigError(f"unknown method {name!r}; use one of {', '.join(METHOD_CHOICES)}")


def _tiny_vocab_size(config: PipelineConfig) -> int:
    """Vocabulary of a tiny model: the tokenizer directory's size, else the BPE training target."""
    if config.tokenizer.path is not None:
        try:
            from transformers import AutoTokenizer

            return len(AutoTokenizer.from_pretrained(config.tokenizer.path))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"tokenizer.path: cannot load a tokenizer from {config.tokenizer.path}: {exc}") from exc
    assert config.tokenizer.train is not None  # the config validator guarantees one of them
    return config.tokenizer.train.vocab_size


def model_shape_for(config: PipelineConfig) -> ModelShape:
    """The shape of the config's base model (`model.base`'s config.json, or `model.tiny`)."""
    if config.model.base is not None:
        return shape_from_model_dir(config.model.base)
    assert config.model.tiny is not None
    return shape_from_tiny(config.model.tiny, _tiny_vocab_size(config), name=f"tiny ({config.run_name})")


def world_layout(config: PipelineConfig) -> tuple[int, int]:
    """(gpus_per_node, nodes) for `distributed.num_workers` workers and the `plan` section."""
    workers, nodes = config.distributed.num_workers, config.plan.nodes
    per_node = config.plan.gpus_per_node
    if per_node is None:
        if workers % nodes:
            raise ConfigError(
                f"distributed.num_workers={workers} does not divide over plan.nodes={nodes}; set plan.gpus_per_node"
            )
        return workers // nodes, nodes
    if per_node * nodes != workers:
        raise ConfigError(
            f"plan.gpus_per_node x plan.nodes = {per_node} x {nodes} = {per_node * nodes}, "
            f"but distributed.num_workers = {workers}; make them agree"
        )
    return per_node, nodes


def setup_for_stage(
    config: PipelineConfig,
    stage: str,
    *,
    tokens: Optional[int] = None,
    method: Optional[str] = None,
    precision: Optional[str] = None,
) -> tuple[TrainingSetup, tuple[str, ...]]:
    """The TrainingSetup of stage `stage` of `config`, and notes on how config values were read.

    `method` and `precision` override the config (planner-only choices such as 'qlora-4bit' or
    'pure-bf16' included).
    """
    stage_config = config.stage(stage)
    train, data, dist = stage_config.train, stage_config.data, config.distributed
    notes: list[str] = []
    spec = MethodSpec(
        kind=_PLANNER_METHOD[train.method],
        lora_rank=train.adalora.init_r if train.method == "adalora" else train.lora.r,
        freeze_trainable_layers=train.freeze.trainable_layers,
        num_virtual_tokens=train.prompt.num_virtual_tokens,
        lora_targets=tuple(train.lora.target_modules),
        lora_dropout=train.lora.dropout,
        modules_to_save=tuple(train.lora.modules_to_save),
    )
    if method is not None:
        spec = method_from_name(method, spec)
    # Training's own reading of the setting, on a GPU with bf16 (A100/H100; older GPUs train fp16, planned alike)
    resolved = resolve_precision(train.precision, dist.use_gpu, bf16_supported=True)
    if train.precision == "auto":
        notes.append(f"{stage}.train.precision=auto read as {resolved} (distributed.use_gpu={dist.use_gpu})")
    if resolved == "fp16":
        resolved = "bf16"
        notes.append("fp16 mixed precision keeps the same copies as bf16 mixed; planned as bf16")
    if precision is not None:
        if precision not in PRECISION_CHOICES:
            raise ConfigError(f"unknown precision {precision!r}; use one of {', '.join(PRECISION_CHOICES)}")
        resolved = precision.replace("-", "_")
    load_dtype = config.model.dtype
    if load_dtype == "auto":
        load_bytes = 2 if resolved in ("bf16", "pure_bf16") else 4
    else:
        load_bytes = 4 if load_dtype == "float32" else 2
    per_node, nodes = world_layout(config)
    setup = TrainingSetup(
        method=spec,
        precision=resolved,
        zero_stage=dist.zero_stage,
        offload_optimizer=dist.offload_optimizer,
        offload_params=dist.offload_params,
        gpus_per_node=per_node,
        nodes=nodes,
        gpu_memory_gib=config.plan.gpu_memory_gib,
        host_memory_gib=config.plan.host_memory_gib,
        seq_len=data.block_size if stage == "pretrain" else data.max_length,
        micro_batch=train.micro_batch_size * (2 if stage == "preference" else 1),
        gradient_accumulation=train.gradient_accumulation_steps,
        gradient_checkpointing=train.gradient_checkpointing,
        attention=config.model.attn_implementation,
        on_gpu=dist.use_gpu,
        mfu=config.plan.mfu,
        peak_tflops=config.plan.peak_tflops,
        epochs=train.epochs,
        dataset_tokens=tokens,
        load_bytes_per_param=load_bytes,
    )
    if stage == "preference":
        reference = (train.needs_reference and train.method in ("full", "freeze")
                     and not train.precompute_reference)
        setup = replace(setup, reference_model=reference)
        notes.append("preference: a micro-batch of pairs is 2 x micro_batch_size sequences (chosen + rejected)"
                      + ("; a frozen reference copy of the weights is counted" if reference else
                         "; no second copy (adapters disabled, precomputed log-probs, or no reference)"))
    if not dist.use_gpu:
        notes.append("distributed.use_gpu=false: memory is per CPU worker, against plan.gpu_memory_gib")
    if stage == "sft":
        notes.append(f"sequence length = {stage}.data.max_length (the longest example; most are shorter)")
    return setup, tuple(notes)


def plan_stage(
    config: PipelineConfig,
    stage: str,
    *,
    shape: Optional[ModelShape] = None,
    tokens: Optional[int] = None,
    method: Optional[str] = None,
    precision: Optional[str] = None,
) -> PlanReport:
    """Plan stage `stage` of `config` (its model unless `shape` is given)."""
    setup, notes = setup_for_stage(config, stage, tokens=tokens, method=method, precision=precision)
    return plan_training(shape or model_shape_for(config), setup, stage, notes)


def check_fits(config: PipelineConfig, stage: str) -> Optional[PlanReport]:
    """Pre-launch check: warn when stage `stage` will not fit; with `plan.strict`, raise ConfigError.

    Returns the report; None when the planner could not read the model and `plan.strict` is off
    (the launch then goes ahead unchecked, with a warning).
    """
    try:
        report = plan_stage(config, stage)
    except ConfigError as exc:
        if config.plan.strict:
            raise
        log.warning("memory plan for stage %s skipped: %s", stage, exc)
        return None
    if report.fits:
        log.info(
            "memory plan for stage %s: %.1f GiB of %.0f GiB per worker", stage, report.memory.total / GIB,
            report.setup.gpu_memory_gib,
        )
        return report
    message = f"stage {stage} will likely not fit: {fit_summary(report)}"
    if config.plan.strict:
        raise ConfigError(message + " (plan.strict=true; set it to false to launch anyway)")
    log.warning("%s", message)
    return report


def fit_summary(report: PlanReport) -> str:
    """One line: estimated peak against the budget, and the cheapest change that fits."""
    line = (
        f"estimated peak {report.memory.total / GIB:.1f} GiB per worker, "
        f"plan.gpu_memory_gib={report.setup.gpu_memory_gib:g}"
    )
    if not report.host_fits:
        line += (f"; host memory {report.memory.cpu_per_node / GIB:.1f} GiB per node, "
                 f"plan.host_memory_gib={report.setup.host_memory_gib:g} (less CPU offload, fewer workers per node, "
                 "or ZeRO-3's partitioned loading lower it)")
    if report.suggestion is not None:
        if report.suggestion.fits:
            line += f"; cheapest change that fits: {'; '.join(report.suggestion.changes)}"
        else:
            line += "; nothing the planner tries makes it fit (a larger GPU, or a smaller model or sequence)"
    return line


def default_plan_config(overrides: Optional[list[str]] = None, stages: Optional[list[str]] = None) -> PipelineConfig:
    """A config for planning without a config file: GPU workers and default `stages` (default: sft).

    The model section is a placeholder; pass the model's shape (a preset or a directory) separately.
    """
    tree: dict = {"model": {"tiny": {}}, "tokenizer": {"train": {}}, "distributed": {"use_gpu": True}}
    for name in stages or ["sft"]:
        tree[name] = {}
    return config_from_dict(apply_overrides(tree, overrides or []), "plan defaults")


# ----------------------------------------------------------------------------- requirements table

@dataclass(frozen=True)
class TableRow:
    """One method of the requirements table."""

    label: str
    method: MethodSpec
    precision: str
    bits: int


def table_rows(lora_rank: int = 8) -> tuple[TableRow, ...]:
    """The methods of the classic "hardware requirement" tables, as the planner models them."""
    lora = MethodSpec(kind="lora", lora_rank=lora_rank, lora_targets=LAYER_LINEARS)
    return (
        TableRow("Full (fp32 weights, 16-bit AMP)", MethodSpec(kind="full"), "amp", 32),
        TableRow("Full (bf16 mixed, fp32 master; DeepSpeed)", MethodSpec(kind="full"), "bf16", 32),
        TableRow("Full (pure bf16)", MethodSpec(kind="full"), "pure_bf16", 16),
        TableRow("Freeze (last 2 layers, bf16 mixed)", MethodSpec(kind="freeze", freeze_trainable_layers=2),
                 "bf16", 16),
        TableRow(f"LoRA r={lora_rank} all linear (bf16)", lora, "bf16", 16),
        TableRow(f"QLoRA r={lora_rank} (8-bit base)", replace(lora, kind="qlora", quant_bits=8), "bf16", 8),
        TableRow(f"QLoRA r={lora_rank} (4-bit NF4 base)", replace(lora, kind="qlora", quant_bits=4), "bf16", 4),
    )


@dataclass(frozen=True)
class RequirementsTable:
    """Peak bytes per GPU for each (method row, model column), and the settings they assume."""

    columns: tuple[ModelShape, ...]
    rows: tuple[TableRow, ...]
    bytes: tuple[tuple[float, ...], ...]  # [row][column]
    seq_len: int
    micro_batch: int
    gradient_checkpointing: bool


def requirements_table(
    models: tuple[ModelShape, ...],
    *,
    seq_len: int = 1024,
    micro_batch: int = 1,
    gradient_checkpointing: bool = True,
    lora_rank: int = 8,
) -> RequirementsTable:
    """Regenerate a requirements table: one GPU, no ZeRO partitioning, `seq_len` x `micro_batch`."""
    rows = table_rows(lora_rank)
    values = []
    for row in rows:
        cells = []
        for shape in models:
            setup = TrainingSetup(
                method=row.method,
                precision=row.precision,
                seq_len=seq_len,
                micro_batch=micro_batch,
                gradient_checkpointing=gradient_checkpointing,
            )
            cells.append(estimate_setup(shape, setup).total)
        values.append(tuple(cells))
    return RequirementsTable(tuple(models), rows, tuple(values), seq_len, micro_batch, gradient_checkpointing)
