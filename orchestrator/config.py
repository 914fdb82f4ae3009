"""The typed configuration tree.

One YAML file describes a whole run: the base model and tokenizer, the cluster shape, where
checkpoints go, and the two stages (``pretrain`` = continued pretraining, ``sft`` = supervised
fine-tuning), each with its own data and training settings. Any key can be overridden on the
command line with a dotted path, e.g. ``sft.train.learning_rate=1e-4``.

Every field carries a description; that text is the reference documentation
(``orchestrator config schema`` prints it).
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from orchestrator.errors import ConfigError

DEFAULT_LR_FULL = 2e-5
DEFAULT_LR_LORA = 2e-4


class _Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(_Section):
    """A small LLaMA-architecture model initialised from scratch (tests, demos, smoke runs)."""

    hidden_size: int = Field(64, gt=0, description="Width of the residual stream.")
    intermediate_size: int = Field(128, gt=0, description="Width of the MLP.")
    num_hidden_layers: int = Field(2, gt=0, description="Number of decoder layers.")
    num_attention_heads: int = Field(4, gt=0, description="Attention heads per layer.")
    num_key_value_heads: Optional[int] = Field(None, gt=0, description="KV heads (GQA); default = attention heads.")
    max_position_embeddings: int = Field(1024, gt=0, description="Longest sequence the model accepts.")
    tie_word_embeddings: bool = Field(False, description="Share input embedding and LM head weights.")


class ModelConfig(_Section):
    """Which base model to start from."""

    base: Optional[str] = Field(
        None,
        description="Hugging Face model directory (local path or URI) to start from. "
        "Leave empty and set `tiny` to initialise a small LLaMA model from a config instead.",
    )
    tiny: Optional[TinyModelConfig] = Field(
        None, description="Initialise a small LLaMA-architecture model from this config (when `base` is empty)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype the base weights are loaded in. auto = bfloat16 when training in bf16, else float32.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to from_pretrained."
    )
    trust_remote_code: bool = Field(False, description="Allow custom modelling code shipped with the base model.")

    @model_validator(mode="after")
    def _base_or_tiny(self) -> "ModelConfig":
        if (self.base is None) == (self.tiny is None):
            raise ValueError("set exactly one of `model.base` (a model directory) or `model.tiny` (a tiny config)")
        return self


class TokenizerTrainingConfig(_Section):
    """Train a byte-level BPE tokenizer on the configured documents (for tiny models only)."""

    vocab_size: int = Field(2000, ge=300, description="Target vocabulary size including special tokens.")
    max_documents: int = Field(20000, gt=0, description="Documents read for training the tokenizer.")


class TokenizerConfig(_Section):
    """Which tokenizer to use. Resolution: `path`, else the base model's, else `train`."""

    path: Optional[str] = Field(None, description="Tokenizer directory (AutoTokenizer.from_pretrained).")
    train: Optional[TokenizerTrainingConfig] = Field(
        None, description="Train a byte-level BPE tokenizer from the stage data when no path or base is given."
    )


class DataSourceConfig(_Section):
    """One input: a file, directory, glob or URI, in one format."""

    path: str = Field(..., description="File, directory, glob (`data/*.jsonl`) or URI (`s3://bucket/prefix/`).")
    format: Literal["auto", "document", "alpaca", "multiturn", "sharegpt"] = Field(
        "auto",
        description="Record format. document: {content|text} or plain text; alpaca: instruction/input/output "
        "(+system, history); multiturn: prompt/response/history; sharegpt: conversations of from/value. "
        "auto: guessed from the fields of each record.",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map canonical field names to the names in your records, e.g. {instruction: 问, output: 答}. "
        "Canonical names: text, instruction, input, output, system, history, prompt, response, conversations.",
    )
    text_unit: Literal["auto", "file", "line", "paragraph"] = Field(
        "auto",
        description="For .txt/.md files: one document per file, per non-empty line, or per blank-line separated "
        "paragraph. auto: .md -> file, .txt -> line.",
    )
    weight: float = Field(
        1.0, gt=0, description="Sampling multiplier: 1 = every record once, 2 = twice, 0.5 = a random half."
    )
    max_records: Optional[int] = Field(None, gt=0, description="Read at most this many records (first N).")


class DataConfig(_Section):
    """What a stage trains on and how it is turned into tokens."""

    sources: list[DataSourceConfig] = Field(default_factory=list, description="Input sources, read in order.")
    eval_split: float = Field(
        0.05, ge=0, lt=1, description="Share of examples held out for evaluation (at least one example)."
    )
    eval_sources: list[DataSourceConfig] = Field(
        default_factory=list, description="Explicit evaluation sources; when set, `eval_split` is ignored."
    )
    bad_records: Literal["error", "skip"] = Field(
        "error", description="error: stop before training on the first bad records; skip: drop them and report."
    )
    block_size: int = Field(512, ge=8, description="Stage 1: tokens per packed block.")
    max_length: int = Field(1024, ge=16, description="Stage 2: longest tokenized conversation (truncated beyond).")
    template: Literal["auto", "tokenizer", "alpaca", "chatml"] = Field(
        "auto",
        description="Stage 2 chat template. auto: the tokenizer's own when it has one, else chatml when the "
        "tokenizer knows <|im_start|>, else alpaca.",
    )
    train_on: Literal["all_assistant_turns", "last_assistant_turn"] = Field(
        "all_assistant_turns", description="Stage 2: which assistant turns carry loss."
    )
    group_by_length: bool = Field(
        True, description="Stage 2: form micro-batches of similar length (little padding), shuffled as whole batches."
    )
    conversations_as_documents: bool = Field(
        True, description="Stage 1: SFT sources (alpaca, multiturn, sharegpt) are flattened into plain documents."
    )
    shuffle_seed: int = Field(42, description="Seed for the train/eval split and the per-epoch shuffle.")


class LoraConfig(_Section):
    """LoRA adapter settings (peft)."""

    r: int = Field(8, gt=0, description="Rank of the update matrices.")
    alpha: int = Field(16, gt=0, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names to adapt (LLaMA names by default: all linear layers).",
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full next to the adapter (e.g. embed_tokens, lm_head)."
    )


class TrainConfig(_Section):
    """Optimisation settings of one stage."""

    method: Literal["full", "lora"] = Field("lora", description="full fine-tuning or a LoRA adapter.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings (method: lora).")
    learning_rate: Optional[float] = Field(
        None, gt=0, description=f"Peak learning rate. Default: {DEFAULT_LR_FULL} for full, {DEFAULT_LR_LORA} for LoRA."
    )
    epochs: int = Field(1, gt=0, description="Passes over the training data.")
    micro_batch_size: int = Field(4, gt=0, description="Examples per worker per forward pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
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
    fail_at_step: Optional[int] = Field(
        None, ge=1, description="Testing aid: raise after this optimizer step (to exercise resume). Never in production."
    )

    @property
    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return DEFAULT_LR_FULL if self.method == "full" else DEFAULT_LR_LORA


class StageConfig(_Section):
    """One training stage: its data and its optimisation settings."""

    data: DataConfig = Field(default_factory=DataConfig, description="Inputs of this stage.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation settings of this stage.")


class DistributedConfig(_Section):
    """How many workers, on what hardware, with which DeepSpeed ZeRO stage."""

    num_workers: int = Field(1, gt=0, description="Ray Train workers (one per GPU on GPU clusters).")
    use_gpu: bool = Field(False, description="Give each worker a GPU (NCCL backend); else CPU with gloo.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker (also its torch thread count).")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray resources per worker, e.g. {accelerator_type:A100: 0.01}."
    )
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage: 0 (DDP), 1, 2 or 3.")
    offload_optimizer: bool = Field(False, description="ZeRO 1-3: keep optimizer states in CPU memory.")
    offload_params: bool = Field(False, description="ZeRO 3: keep parameters in CPU memory.")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts Ray Train attempts (-1 = unlimited).")


class CheckpointConfig(_Section):
    """Where checkpoints and stage outputs go and how often they are written."""

    storage_path: str = Field("runs", description="Root for checkpoints, logs and exported models (path or URI).")
    every_n_steps: Optional[int] = Field(None, gt=0, description="Also checkpoint every N optimizer steps.")
    at_epoch_end: bool = Field(True, description="Checkpoint at the end of every epoch.")
    keep: Optional[int] = Field(3, gt=0, description="Checkpoints kept per stage (newest); empty = all.")


class S3Config(_Section):
    """S3 or an S3-compatible store (MinIO, Ceph). Empty fields use the AWS default chain
    (AWS_* environment variables, ~/.aws profiles, instance roles / IRSA)."""

    endpoint_url: Optional[str] = Field(
        None, description="e.g. http://minio:9000 for S3-compatible stores; default AWS_ENDPOINT_URL or AWS."
    )
    region: Optional[str] = Field(None, description="Region; default AWS_REGION / AWS_DEFAULT_REGION.")
    access_key_id: Optional[SecretStr] = Field(None, description="Access key (prefer environment or roles).")
    secret_access_key: Optional[SecretStr] = Field(None, description="Secret key (never logged or saved).")
    session_token: Optional[SecretStr] = Field(None, description="Session token for temporary credentials.")
    profile: Optional[str] = Field(None, description="Named profile from ~/.aws/config.")
    max_attempts: int = Field(10, ge=1, description="Attempts per S3 request (botocore/pyarrow standard retry).")
    multipart_threshold_mb: int = Field(64, ge=5, description="Files above this size upload in parts.")
    max_concurrency: int = Field(8, ge=1, description="Parallel transfers.")


class StorageConfig(_Section):
    """How to reach remote storage used by any path of the config."""

    s3: S3Config = Field(default_factory=S3Config, description="S3 settings.")


class EvalConfig(_Section):
    """Evaluation during training."""

    at_start: bool = Field(True, description="Also evaluate before the first step (the baseline in the logs).")
    max_batches: Optional[int] = Field(None, gt=0, description="Cap on evaluation batches per epoch.")
    micro_batch_size: Optional[int] = Field(None, gt=0, description="Evaluation batch size; default = training's.")
    prompts: list[str] = Field(
        default_factory=list, description="Prompts answered with the final model of the pipeline (smoke check)."
    )
    max_new_tokens: int = Field(48, gt=0, description="Tokens generated per prompt.")


class GenerationDefaults(_Section):
    """Generation parameters used when a request leaves them out (Hugging Face semantics)."""

    max_tokens: int = Field(128, gt=0, description="New tokens per answer.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0 = off).")
    do_sample: bool = Field(True, description="Sample (true) or decode greedily (false) by default.")
    num_beams: int = Field(1, ge=1, le=8, description="Beam search width (1 = off).")
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="1.0 = off; e.g. 1.8 against repetition.")
    no_repeat_ngram_size: int = Field(0, ge=0, description="Forbid repeating n-grams of this size (0 = off).")
    stop: list[str] = Field(default_factory=list, description="Stop strings (output is cut before them).")


class AutoscalingConfig(_Section):
    """Ray Serve autoscaling of the model deployment."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas.")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Requests per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(30.0, ge=0, description="Sustained load needed before adding replicas.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Sustained quiet needed before removing replicas.")
    metrics_interval_s: float = Field(10.0, gt=0, description="How often replicas report load.")
    look_back_period_s: float = Field(30.0, gt=0, description="Window over which load is averaged.")


class ServeConfig(_Section):
    """The OpenAI-compatible HTTP service (Ray Serve)."""

    model: Optional[str] = Field(
        None, description="Merged model directory or URI; default: the pipeline's final model "
        "(<storage_path>/<run_name>/models/sft, else models/pretrain)."
    )
    served_model_name: Optional[str] = Field(None, description="Name in /v1/models and responses; default run_name.")
    engine: Literal["hf", "vllm"] = Field("hf", description="hf: transformers generate (CPU/GPU); vllm: GPU only.")
    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 to expose it beyond this machine).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    num_replicas: int = Field(1, ge=1, description="Replicas when autoscaling is off.")
    autoscaling: Optional[AutoscalingConfig] = Field(None, description="Autoscale replicas on load.")
    num_cpus_per_replica: float = Field(1, gt=0, description="CPUs per replica (also its torch threads).")
    num_gpus_per_replica: float = Field(0, ge=0, description="GPUs per replica.")
    max_ongoing_requests: int = Field(32, ge=1, description="Concurrent requests a replica accepts.")
    max_batch_size: int = Field(8, ge=1, description="Dynamic batching: requests per generate call (1 = off).")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="Dynamic batching: wait this long to fill a batch.")
    max_tokens_limit: int = Field(1024, gt=0, description="Largest max_tokens a request may ask for.")
    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults, description="Generation defaults.")
    api_keys_env: Optional[str] = Field(
        None, description="Name of an environment variable holding comma-separated API keys (Bearer auth)."
    )
    api_keys_file: Optional[str] = Field(None, description="File with one API key per line (Bearer auth).")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="Multiplexing: model name -> LoRA adapter URI, served on the base model."
    )
    max_adapters_per_replica: int = Field(4, ge=1, description="Adapters kept loaded per replica (LRU).")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code of the served model.")

    @model_validator(mode="after")
    def _batching_fits(self) -> "ServeConfig":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("serve.max_ongoing_requests must be >= serve.max_batch_size, or batches never fill")
        return self


class PlanConfig(_Section):
    """Assumptions of the memory and throughput planner (`orchestrator plan` and the pre-launch check)."""

    gpu_memory_gib: float = Field(
        80.0, gt=0, description="Memory of one GPU in GiB (A100/H100 80GB: 80). With distributed.use_gpu=false: "
        "the memory budget of one CPU worker."
    )
    gpus_per_node: Optional[int] = Field(
        None, gt=0, description="GPUs (workers) per node; default distributed.num_workers / plan.nodes. "
        "gpus_per_node x nodes must equal distributed.num_workers."
    )
    nodes: int = Field(1, gt=0, description="Nodes the workers are spread over (sets CPU memory per node).")
    mfu: float = Field(
        0.4, gt=0, le=1, description="Assumed model FLOPs utilisation: share of peak_tflops the GPUs sustain on "
        "training FLOPs (recomputation included)."
    )
    peak_tflops: float = Field(
        312.0, gt=0, description="Peak dense 16-bit TFLOP/s of one GPU (A100 bf16: 312, H100 SXM: 989)."
    )
    strict: bool = Field(
        False, description="Refuse to launch a stage the planner says will not fit (else only warn)."
    )


class PipelineConfig(_Section):
    """The whole run: shared settings plus the two stages."""

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

    @model_validator(mode="after")
    def _tokenizer_resolvable(self) -> "PipelineConfig":
        if self.tokenizer.path is None and self.model.base is None and self.tokenizer.train is None:
            raise ValueError(
                "no tokenizer: set `tokenizer.path`, or `model.base` (its tokenizer is used), or `tokenizer.train`"
            )
        return self

    def stage(self, name: str) -> StageConfig:
        """The config of stage `name` ('pretrain' or 'sft'); an error if the file has none."""
        stage = getattr(self, name, None) if name in STAGES else None
        if stage is None:
            raise ConfigError(f"the config has no `{name}:` section; add one to run stage '{name}'")
        return stage


STAGES = ("pretrain", "sft")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (['a','b','c'], value parsed as YAML, so 1e-4, true, [a, b] and null work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    return key.split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Return a copy of `tree` with each dotted override set (list items by index: `a.sources.0.path=x`)."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = tree
        for i, part in enumerate(path[:-1]):
            where = ".".join(path[: i + 1])
            if isinstance(node, list):
                node = node[_list_index(part, node, where)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: `{where}` is not a section")
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        last = path[-1]
        if isinstance(node, list):
            node[_list_index(last, node, ".".join(path))] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override {text!r}: `{'.'.join(path[:-1])}` is not a section")
    return tree


def _list_index(part: str, node: list, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"`{where}`: expected a list index below {len(node)}, got {part!r}")
    return int(part)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = err["loc"][:-1]
            allowed = _allowed_keys(parent)
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  - {key}: unknown key{hint}")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  - {key}: {err['msg']}{shown}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names of the section at `loc` (walking the model classes), for error messages."""
    model: Any = PipelineConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = _section_type(field.annotation)
        if model is None:
            return []
    return sorted(model.model_fields) if hasattr(model, "model_fields") else []


def _section_type(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None) -> PipelineConfig:
    """Load a YAML config file, apply dotted overrides and validate the result.

    Raises ConfigError naming the offending key and what is allowed.
    """
    tree: dict = {}
    source = "overrides"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(loaded).__name__}")
        tree = loaded
    tree = apply_overrides(tree, overrides or [])
    return config_from_dict(tree, source)


def config_from_dict(tree: dict, source: str = "dict") -> PipelineConfig:
    """Validate a plain dict as a PipelineConfig (used by load_config and by workers)."""
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def describe_schema(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[str]:
    """Every config key with its type, default and description, one line each (reference docs)."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _section_type(field.annotation)
        if sub is not None and sub is not model:
            lines.append(f"{key}: {field.description or ''}")
            lines.extend(describe_schema(sub, key + ("[]." if "list" in str(field.annotation) else ".")))
        else:
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            lines.append(f"{key} (default {default}): {field.description or ''}")
    return lines


def s3_settings(config: PipelineConfig) -> "S3Settings":
    """The storage layer's S3 settings from the config (secrets revealed only here)."""
    from orchestrator.storage import S3Settings

    s3 = config.storage.s3

    def reveal(secret: Optional[SecretStr]) -> Optional[str]:
        return secret.get_secret_value() if secret is not None else None

    return S3Settings(
        endpoint_url=s3.endpoint_url,
        region=s3.region,
        access_key_id=reveal(s3.access_key_id),
        secret_access_key=reveal(s3.secret_access_key),
        session_token=reveal(s3.session_token),
        profile=s3.profile,
        max_attempts=s3.max_attempts,
        multipart_threshold_mb=s3.multipart_threshold_mb,
        max_concurrency=s3.max_concurrency,
    )
