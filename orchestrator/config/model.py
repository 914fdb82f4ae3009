"""Config sections: the base model and the tokenizer."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from orchestrator.config.base import Section


class TinyModelConfig(Section):
    """A small LLaMA-architecture model initialised from scratch (tests, demos, smoke runs)."""

    hidden_size: int = Field(64, gt=0, description="Width of the residual stream.")
    intermediate_size: int = Field(128, gt=0, description="Width of the MLP.")
    num_hidden_layers: int = Field(2, gt=0, description="Number of decoder layers.")
    num_attention_heads: int = Field(4, gt=0, description="Attention heads per layer.")
    num_key_value_heads: Optional[int] = Field(None, gt=0, description="KV heads (GQA); default = attention heads.")
    max_position_embeddings: int = Field(1024, gt=0, description="Longest sequence the model accepts.")
    tie_word_embeddings: bool = Field(False, description="Share input embedding and LM head weights.")


class ModelConfig(Section):
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


class TokenizerTrainingConfig(Section):
    """Train a byte-level BPE tokenizer on the configured documents (for tiny models only)."""

    vocab_size: int = Field(2000, ge=300, description="Target vocabulary size including special tokens.")
    max_documents: int = Field(20000, gt=0, description="Documents read for training the tokenizer.")


class TokenizerConfig(Section):
    """Which tokenizer to use. Resolution: `path`, else the base model's, else `train`."""

    path: Optional[str] = Field(None, description="Tokenizer directory (AutoTokenizer.from_pretrained).")
    train: Optional[TokenizerTrainingConfig] = Field(
        None, description="Train a byte-level BPE tokenizer from the stage data when no path or base is given."
    )
