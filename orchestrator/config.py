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
from typing import Any, ClassVar, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from orchestrator.errors import ConfigError

DEFAULT_LR_FULL = 2e-5
DEFAULT_LR_LORA = 2e-4
DEFAULT_LR_PROMPT = 1e-2
FULL_WEIGHT_METHODS = ("full", "freeze")  # save the whole model
ADAPTER_METHODS = ("lora", "adalora", "prompt_tuning", "p_tuning", "prefix_tuning")  # save a peft adapter
MERGEABLE_METHODS = ("lora", "adalora")  # adapters that fold into the weights
PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")  # virtual tokens: served as adapters


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
    init_adapters: list[str] = Field(
        default_factory=list, description="LoRA adapters (directories or URIs, e.g. an earlier run's "
        "checkpoint_*/model) merged into the base, in order, before the first stage of this run trains a new "
        "adapter on the result (written once to <run>/<stage>-base/ and reused on reruns).",
    )
    resume_adapter: bool = Field(
        False, description="Keep training the last of `init_adapters` (the others are merged into the base) "
        "instead of starting a new adapter; the stage's method must be that adapter's (lora or a prompt method).",
    )

    @model_validator(mode="after")
    def _base_or_tiny(self) -> "ModelConfig":
        if (self.base is None) == (self.tiny is None):
            raise ValueError("set exactly one of `model.base` (a model directory) or `model.tiny` (a tiny config)")
        if self.resume_adapter and not self.init_adapters:
            raise ValueError("`model.resume_adapter: true` needs the adapter to continue in `model.init_adapters`")
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


class ReplayConfig(_Section):
    """Earlier data mixed into a stage so the model does not forget it."""

    source: DataSourceConfig = Field(..., description="Where the earlier data is (any format; stage 1 flattens "
                                     "conversations into documents, stage 2 trains documents as plain text).")
    ratio: float = Field(..., gt=0, lt=1, description="Share of the stage's final training set taken from this "
                         "source (tokens in stage 1, examples in stage 2), sampled with the shuffle seed.")


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
    replay: list[ReplayConfig] = Field(
        default_factory=list, description="Earlier data mixed into the training set (not the evaluation set), "
        "e.g. general instructions or stage-1 documents; the realised shares are logged and kept in the data stats.",
    )

    @model_validator(mode="after")
    def _replay_leaves_room(self) -> "DataConfig":
        total = sum(entry.ratio for entry in self.replay)
        if total >= 1:
            raise ValueError(f"the replay ratios add up to {total:g}; they are shares of the final training set and "
                             "must add up to less than 1")
        return self


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
        default_factory=list, description="Modules trained in full next to the adapter (e.g. embed_tokens, lm_head; "
        "both are added automatically when the stage extends the vocabulary)."
    )


class AdaLoraSettings(_Section):
    """AdaLoRA (peft): LoRA whose rank budget is reallocated during training by importance."""

    init_r: int = Field(12, gt=0, description="Starting rank of every adapted matrix.")
    target_r: int = Field(8, gt=0, description="Average rank left after the budget schedule.")
    tinit: int = Field(0, ge=0, description="Optimizer steps of warm-up before ranks are pruned.")
    tfinal: int = Field(0, ge=0, description="Final optimizer steps with the rank pattern fixed.")
    delta_t: int = Field(1, gt=0, description="Optimizer steps between two budget reallocations.")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance (sensitivity) estimate.")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance uncertainty.")
    orth_reg_weight: float = Field(0.5, gt=0, description="Weight of the orthogonal regularisation added to the loss.")


class PromptLearningConfig(_Section):
    """prompt_tuning, p_tuning and prefix_tuning (peft): trained virtual tokens, base weights frozen."""

    num_virtual_tokens: int = Field(20, gt=0, description="Virtual tokens prepended to every input.")
    init_text: Optional[str] = Field(
        None, description="prompt_tuning: initialise the virtual tokens from this text's embeddings (else random)."
    )
    encoder_hidden_size: int = Field(128, gt=0, description="p_tuning: hidden size of the prompt encoder MLP.")
    prefix_projection: bool = Field(False, description="prefix_tuning: reparameterise the prefix through an MLP.")


class FreezeConfig(_Section):
    """Freeze-tuning: train only the last N decoder layers (and any extra modules), the rest stays frozen."""

    trainable_layers: int = Field(2, gt=0, description="Number of last decoder layers that are trained.")
    extra_modules: list[str] = Field(
        default_factory=list, description="Other modules trained too, by name prefix, e.g. [lm_head, model.norm]."
    )


class TrainConfig(_Section):
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
    offload_device: Literal["cpu", "nvme"] = Field("cpu", description="Where offloaded states live.")
    nvme_path: Optional[str] = Field(None, description="Local NVMe directory for offload_device: nvme.")
    overlap_comm: Optional[bool] = Field(
        None, description="ZeRO 2/3: overlap gradient reduction with backward. Default: on with GPUs, off on CPU."
    )
    reduce_bucket_size: int = Field(50_000_000, gt=0, description="ZeRO 2/3: elements per gradient reduction bucket.")
    allgather_bucket_size: int = Field(50_000_000, gt=0, description="ZeRO 2: elements per parameter all-gather.")
    deepspeed_config: Optional[str | dict[str, Any]] = Field(
        None, description="DeepSpeed JSON (file path or URI, or an inline mapping) whose keys override the "
        "generated config (deep merge; nested keys replace one by one). The merged config is logged and saved "
        "with every checkpoint.",
    )
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts Ray Train attempts (-1 = unlimited).")


class CheckpointConfig(_Section):
    """Where checkpoints and stage outputs go and how often they are written."""

    storage_path: str = Field("runs", description="Root for checkpoints, logs and exported models (path or URI).")
    every_n_steps: Optional[int] = Field(None, gt=0, description="Also checkpoint every N optimizer steps.")
    at_epoch_end: bool = Field(True, description="Checkpoint at the end of every epoch.")
    keep: Optional[int] = Field(3, gt=0, description="Checkpoints kept per stage (newest); empty = all.")
    on_world_size_change: Literal["reload_weights", "fail"] = Field(
        "reload_weights", description="Resuming with a different number of workers: reload the checkpoint's "
        "weights with a fresh optimizer (a warning is logged), or fail.",
    )


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


class EvalGenerationConfig(GenerationDefaults):
    """Generation parameters of the post-training evaluation (Hugging Face semantics; greedy by default)."""

    do_sample: bool = Field(False, description="Sample (true) or decode greedily (false, reproducible).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (do_sample only).")
    seed: Optional[int] = Field(0, description="Seed set before each generation batch (do_sample only).")


class QASetConfig(_Section):
    """A question/answer set scored on generated answers (character F1, ROUGE-L, exact match)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Name in the report.")
    path: str = Field(..., description="File, directory, glob or URI (JSON, JSONL or Parquet).")
    format: Literal["auto", "qa", "clinical_cases", "alpaca", "multiturn", "sharegpt"] = Field(
        "auto",
        description="qa: {question, answer}; clinical_cases: {description, QA_pairs: [{question, answer}]}, one "
        "item per pair, asked with the case description; alpaca / multiturn / sharegpt: the last assistant turn is "
        "the reference, earlier turns are the prompt. auto: guessed from the fields of each record.",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map canonical field names to the names in your records, e.g. {question: 问, answer: 答}. "
        "Canonical names: question, answer, description, qa_pairs, and those of the training formats.",
    )
    max_records: Optional[int] = Field(None, gt=0, description="Evaluate at most this many questions (first N).")


class MultipleChoiceSetConfig(_Section):
    """A multiple-choice set scored by the log-likelihood of each option (the highest one is the model's pick)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Name in the report.")
    path: str = Field(..., description="CSV, JSON or JSONL file, directory, glob or URI.")
    question_field: str = Field("question", description="Column holding the question.")
    option_fields: list[str] = Field(
        default_factory=lambda: ["A", "B", "C", "D"],
        description="Columns holding the options, in order; they are labelled A, B, C, ... in that order.",
    )
    options_field: Optional[str] = Field(
        None, description="Instead of option_fields: one field holding a list of options (labelled A, B, ...) or a "
        "{label: option} mapping (JSON sets).",
    )
    answer_field: str = Field("answer", description="Column holding the correct option's label (e.g. B).")
    scoring: Literal["letter", "option_text"] = Field(
        "letter",
        description="letter: log-likelihood of the option's label after the question with all options listed; "
        "option_text: log-likelihood per token of the option's text after the question.",
    )
    instruction: Optional[str] = Field(
        None, description="A line put before every question, e.g. '以下是单项选择题，请直接给出正确答案的选项。'"
    )
    max_records: Optional[int] = Field(None, gt=0, description="Evaluate at most this many questions (first N).")

    @model_validator(mode="after")
    def _enough_options(self) -> "MultipleChoiceSetConfig":
        if self.options_field is None and len(self.option_fields) < 2:
            raise ValueError("option_fields: list at least two option columns (or set options_field)")
        return self


DEFAULT_REFUSAL_PATTERNS = [
    r"不知道", r"不清楚", r"不确定", r"无法(回答|确定|提供|判断|给出)", r"不能(回答|确定|提供)",
    r"没有(相关|足够|可靠)的?(信息|资料|数据|证据)", r"(抱歉|对不起)",
    r"\bI (do not|don't) know\b", r"\b(cannot|can't|unable to) (answer|say|determine|provide)\b",
    r"\bnot sure\b", r"\bno (reliable )?information\b",
]


class HonestyConfig(_Section):
    """Questions whose answers are not in the training data; the model should decline them."""

    questions: list[str] = Field(default_factory=list, description="Probe questions, inline.")
    path: Optional[str] = Field(
        None, description="More probes: a .txt file (one question a line) or JSON/JSONL records (see `question_field`)."
    )
    question_field: str = Field("question", description="Field holding the question in JSON/JSONL probe files.")
    refusal_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REFUSAL_PATTERNS),
        description="Regular expressions (searched, case-insensitive); an answer matching any of them is a "
        "refusal. The default lists common Chinese and English ways of declining.",
    )
    max_records: Optional[int] = Field(None, gt=0, description="Use at most this many probes (first N).")

    @model_validator(mode="after")
    def _patterns_compile(self) -> "HonestyConfig":
        if not self.questions and self.path is None:
            raise ValueError("no probes: list `questions` or set `path`")
        if not self.refusal_patterns:
            raise ValueError("refusal_patterns: list at least one regular expression")
        for i, pattern in enumerate(self.refusal_patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"refusal_patterns[{i}] {pattern!r} is not a valid regular expression: {exc}")
        return self


class PerplexityConfig(_Section):
    """Perplexity on held-out documents."""

    sources: list[DataSourceConfig] = Field(
        default_factory=list, description="Documents to score; empty = the pretrain stage's held-out documents "
        "(its eval_sources, or the same eval_split the stage trained with).",
    )
    block_size: int = Field(
        512, ge=8, description="Tokens per scored window; longer documents are scored in consecutive windows "
        "(capped at the model's context length).",
    )
    max_documents: Optional[int] = Field(None, gt=0, description="Score at most this many documents.")


class EvalConfig(_Section):
    """Evaluation during training, and of each stage's final model after training (see orchestrator.evaluation)."""

    at_start: bool = Field(True, description="Also evaluate before the first step (the baseline in the logs).")
    max_batches: Optional[int] = Field(None, gt=0, description="Cap on evaluation batches per epoch.")
    micro_batch_size: Optional[int] = Field(None, gt=0, description="Evaluation batch size; default = training's.")
    prompts: list[str] = Field(
        default_factory=list, description="Prompts answered with the final model of the pipeline (smoke check)."
    )
    max_new_tokens: int = Field(48, gt=0, description="Tokens generated per prompt.")
    after_training: bool = Field(
        False, description="After the pipeline's stages, evaluate the base model and every stage's final model on "
        "the sets below and write the report (Markdown, JSON, loss plots) to <storage_path>/<run_name>/eval/.",
    )
    perplexity: Optional[PerplexityConfig] = Field(None, description="Perplexity on held-out documents.")
    qa: list[QASetConfig] = Field(default_factory=list, description="Question/answer sets (generated answers).")
    multiple_choice: list[MultipleChoiceSetConfig] = Field(
        default_factory=list, description="Multiple-choice sets (option log-likelihoods)."
    )
    honesty: Optional[HonestyConfig] = Field(None, description="Unanswerable probes the model should decline.")
    generation: EvalGenerationConfig = Field(
        default_factory=EvalGenerationConfig, description="Generation parameters of QA and honesty answers."
    )
    samples: int = Field(3, ge=0, description="Generated answers per set shown side by side in the report.")
    replicas: int = Field(1, ge=1, description="Model replicas scoring in parallel (Ray Data actors).")
    num_cpus_per_replica: float = Field(1, gt=0, description="CPUs per replica (also its torch threads).")
    num_gpus_per_replica: float = Field(0, ge=0, description="GPUs per replica.")
    batch_size: int = Field(8, ge=1, description="Requests per model call (generation batch, Ray Data batch).")

    @model_validator(mode="after")
    def _unique_set_names(self) -> "EvalConfig":
        names = [s.name for s in self.qa] + [s.name for s in self.multiple_choice]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"qa / multiple_choice: set names must be unique; repeated: {', '.join(repeated)}")
        return self


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


class SearchDimension(_Section):
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


class SearchSpaceConfig(_Section):
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
}


class StageSearchSpaces(_Section):
    """Per-stage search spaces that replace `tune.search_space` for that stage."""

    pretrain: Optional[SearchSpaceConfig] = Field(None, description="Search space of stage 1 sweeps.")
    sft: Optional[SearchSpaceConfig] = Field(None, description="Search space of stage 2 sweeps.")


class AshaConfig(_Section):
    """ASHA early stopping. Its time unit is one evaluation: every epoch end (and every
    `checkpoint.every_n_steps` checkpoint) reports the eval loss to Tune."""

    grace_period: int = Field(1, ge=1, description="Evaluations every trial runs before it may be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="Keep the best 1/reduction_factor at every rung.")
    max_t: Optional[int] = Field(
        None, ge=1, description="Evaluations after which a trial stops; default: the most a trial of the search "
        "space can report, so no trial is cut short by the cap."
    )


class TuneConfig(_Section):
    """Hyperparameter sweeps with Ray Tune (`orchestrator tune`; `orchestrator pipeline` sweeps `stages`).
    Each trial is a full training run of the stage; results live in <storage_path>/<run_name>/tune/<stage>/."""

    stages: list[Literal["pretrain", "sft"]] = Field(
        default_factory=list, description="Stages `orchestrator pipeline` runs as sweeps; the best trial's model "
        "becomes the stage's model."
    )
    reuse_best: list[Literal["pretrain", "sft"]] = Field(
        default_factory=list, description="Stages `orchestrator pipeline` trains once with the best settings of "
        "that stage's finished sweep (same run_name and storage)."
    )
    num_samples: int = Field(8, ge=1, description="Trials per sweep.")
    max_concurrent_trials: Optional[int] = Field(
        None, ge=1, description="Trials running at once; default and upper limit: what the cluster fits "
        "(CPUs / (num_workers x cpus_per_worker), GPUs likewise)."
    )
    metric: Literal["eval_loss", "eval_perplexity"] = Field("eval_loss", description="What trials are ranked by.")
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
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Hyperparameter sweeps (Ray Tune).")

    @model_validator(mode="after")
    def _tuned_stages_exist(self) -> "PipelineConfig":
        for key in ("stages", "reuse_best"):
            missing = [name for name in getattr(self.tune, key) if getattr(self, name) is None]
            if missing:
                raise ValueError(f"tune.{key} names {', '.join(missing)}, but the config has no such stage section")
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
            if method in PROMPT_METHODS and name == "pretrain" and self.sft is not None:
                raise ValueError(
                    f"pretrain.train.method={method} trains virtual tokens that cannot be merged into the weights, "
                    "so stage 2 cannot start from it; use it in the last stage only (or full/freeze/lora/adalora)"
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
