"""The dimensions of a LLaMA-style decoder and the parameter counts that follow from them.

A `ModelShape` comes from a Hugging Face `config.json` (a local directory or a storage URI), from
the config's `model.tiny` section, or from a named preset (LLaMA-2 7B/13B/70B, CodeLlama-34B).
Counting is exact for transformers' `LlamaForCausalLM` (tied embeddings and GQA included) and for
peft's LoRA adapters; tests compare both against the real modules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from orchestrator import storage
from orchestrator.errors import ConfigError, StorageError

# Module names of one decoder layer's linear layers, in forward order.
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
LAYER_LINEARS = ATTENTION_LINEARS + MLP_LINEARS
WHOLE_MODEL_MODULES = ("embed_tokens", "lm_head")

Method = Literal["full", "freeze", "lora", "qlora", "prompt", "p_tuning"]
METHODS: tuple[str, ...] = ("full", "freeze", "lora", "qlora", "prompt", "p_tuning")


@dataclass(frozen=True)
class ModelShape:
    """A LLaMA-architecture decoder (RMSNorm, RoPE, SwiGLU MLP, optional GQA and biases)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: Optional[int] = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        """Width of the queries (and of the attention output)."""
        return self.num_heads * self.dim_per_head

    @property
    def kv_dim(self) -> int:
        """Width of the keys and of the values (smaller than q_dim under GQA)."""
        return self.num_kv_heads * self.dim_per_head

    def linear_dims(self) -> dict[str, tuple[int, int, bool]]:
        """name -> (in_features, out_features, has_bias) of one decoder layer's linear layers."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim, self.qkv_bias),
            "k_proj": (h, self.kv_dim, self.qkv_bias),
            "v_proj": (h, self.kv_dim, self.qkv_bias),
            "o_proj": (self.q_dim, h, self.o_bias),
            "gate_proj": (h, i, self.mlp_bias),
            "up_proj": (h, i, self.mlp_bias),
            "down_proj": (i, h, self.mlp_bias),
        }

    @property
    def layer_linear_params(self) -> int:
        """Weights and biases of one layer's linear layers (the ones that are matmuls)."""
        return sum(i * o + (o if bias else 0) for i, o, bias in self.linear_dims().values())

    @property
    def layer_params(self) -> int:
        """All parameters of one decoder layer: linear layers plus its two RMSNorm weights."""
        return self.layer_linear_params + 2 * self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Parameters the LM head adds (none when it shares the input embedding)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        """Every distinct parameter of `LlamaForCausalLM` (a tied weight counted once)."""
        return (
            self.embedding_params
            + self.num_layers * self.layer_params
            + self.hidden_size  # final norm
            + self.lm_head_params
        )

    @property
    def matmul_params(self) -> int:
        """Weights used in a matmul per token: every layer's linears plus the LM head (tied or not)."""
        return self.num_layers * self.layer_linear_params + self.vocab_size * self.hidden_size

    @property
    def largest_module_params(self) -> int:
        """Most parameters held directly by one module (DeepSpeed's "largest layer" for ZeRO-3)."""
        linears = [i * o + (o if bias else 0) for i, o, bias in self.linear_dims().values()]
        return max([self.embedding_params, *linears])


@dataclass(frozen=True)
class MethodSpec:
    """What is trained: the whole model, the last layers, a LoRA adapter or a soft prompt."""

    kind: Method = "lora"
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = LAYER_LINEARS
    lora_dropout: float = 0.05
    modules_to_save: tuple[str, ...] = ()
    freeze_trainable_layers: int = 2
    num_virtual_tokens: int = 20
    quant_bits: int = 4

    @property
    def has_adapter(self) -> bool:
        return self.kind in ("lora", "qlora")

    @property
    def label(self) -> str:
        if self.kind == "lora":
            return f"LoRA r={self.lora_rank}"
        if self.kind == "qlora":
            return f"QLoRA {self.quant_bits}-bit r={self.lora_rank}"
        if self.kind == "freeze":
            return f"freeze (last {self.freeze_trainable_layers} layers trained)"
        if self.kind in ("prompt", "p_tuning"):
            return f"{'prompt tuning' if self.kind == 'prompt' else 'p-tuning'} ({self.num_virtual_tokens} tokens)"
        return "full"


@dataclass(frozen=True)
class ParameterCounts:
    """How many parameters there are and which of them train.

    `base` is the model's own parameters; `adapter` the ones a method adds (LoRA matrices, soft
    prompts, prompt encoders, modules_to_save copies); `trainable` counts what the optimizer steps.
    """

    base: int
    adapter: int
    trainable_base: int
    trainable_adapter: int
    largest_module: int
    recording_layers: int
    lora_modules: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.base + self.adapter

    @property
    def trainable(self) -> int:
        return self.trainable_base + self.trainable_adapter

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def count_parameters(shape: ModelShape, method: MethodSpec) -> ParameterCounts:
    """Total, trainable and adapter parameter counts of `shape` trained with `method`.

    LoRA follows peft: for every targeted `nn.Linear` (in, out) it adds A (r x in) and B (out x r);
    a targeted embedding adds r x (vocab + hidden); `modules_to_save` adds a trainable copy of the
    module. `recording_layers` is how many decoder layers autograd records (all, except in freeze
    tuning where layers below the first trained one need no backward).
    """
    base = shape.total_params
    r = method.lora_rank
    lora_modules: dict[str, int] = {}
    adapter = 0
    trainable_base = 0
    recording = shape.num_layers
    if method.kind == "full":
        trainable_base = base
    elif method.kind == "freeze":
        k = method.freeze_trainable_layers
        if not 1 <= k <= shape.num_layers:
            raise ConfigError(
                f"freeze tuning: trainable layers must be between 1 and {shape.num_layers}, got {k}"
            )
        trainable_base = k * shape.layer_params
        recording = k
    elif method.kind in ("lora", "qlora"):
        dims = shape.linear_dims()
        for target in method.lora_targets:
            if target in dims:
                fan_in, fan_out, _ = dims[target]
                lora_modules[target] = r * (fan_in + fan_out)
                adapter += shape.num_layers * lora_modules[target]
            elif target in WHOLE_MODEL_MODULES:
                lora_modules[target] = r * (shape.vocab_size + shape.hidden_size)
                adapter += lora_modules[target]
            else:
                allowed = ", ".join(LAYER_LINEARS + WHOLE_MODEL_MODULES)
                raise ConfigError(f"LoRA target {target!r} is not a module of a LLaMA-style model; use {allowed}")
        for name in method.modules_to_save:
            if name not in WHOLE_MODEL_MODULES:
                raise ConfigError(
                    f"modules_to_save entry {name!r}: the planner models {', '.join(WHOLE_MODEL_MODULES)}"
                )
            adapter += shape.vocab_size * shape.hidden_size
    elif method.kind == "prompt":
        adapter = method.num_virtual_tokens * shape.hidden_size
    elif method.kind == "p_tuning":
        h = shape.hidden_size
        # peft's PromptEncoder (MLP): Linear(h, h), ReLU, Linear(h, h), ReLU, Linear(h, h), plus the embeddings.
        adapter = method.num_virtual_tokens * h + 3 * (h * h + h)
    else:
        raise ConfigError(f"unknown training method {method.kind!r}; use one of {', '.join(METHODS)}")
    return ParameterCounts(
        base=base,
        adapter=adapter,
        trainable_base=trainable_base,
        trainable_adapter=adapter,
        largest_module=shape.largest_module_params,
        recording_layers=recording,
        lora_modules=lora_modules,
    )


# Published LLaMA-family shapes (vocabulary 32,000; 34B is CodeLlama-34B, 70B is LLaMA-2-70B, both GQA).
PRESETS: dict[str, ModelShape] = {
    "7b": ModelShape("LLaMA-2-7B", 4096, 11008, 32, 32, 32, 32000),
    "13b": ModelShape("LLaMA-2-13B", 5120, 13824, 40, 40, 40, 32000),
    "34b": ModelShape("CodeLlama-34B", 8192, 22016, 48, 64, 8, 32000),
    "70b": ModelShape("LLaMA-2-70B", 8192, 28672, 80, 64, 8, 32000),
}


def preset_shape(name: str) -> ModelShape:
    """A named preset ('7b', '13b', '34b', '70b'; case-insensitive, 'B' suffix optional)."""
    key = name.strip().lower()
    if not key.endswith("b"):
        key += "b"
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[key]


def shape_from_hf_config(config: dict[str, Any], name: str = "model") -> ModelShape:
    """A ModelShape from the fields of a Hugging Face `config.json` of a LLaMA-style decoder."""
    if any(key in config for key in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise ConfigError(f"{name}: mixture-of-experts models are not modelled by the planner")
    if "text_config" in config and "hidden_size" not in config:
        config = config["text_config"]
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [key for key in required if config.get(key) is None]
    if missing:
        raise ConfigError(f"{name}: config.json lacks {', '.join(missing)} (expected a LLaMA-style decoder config)")
    model_type = str(config.get("model_type", ""))
    attention_bias = bool(config.get("attention_bias", False))
    qkv_bias = attention_bias or model_type in ("qwen2",)
    return ModelShape(
        name=name,
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=int(config["num_attention_heads"]),
        num_kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
        vocab_size=int(config["vocab_size"]),
        head_dim=int(config["head_dim"]) if config.get("head_dim") else None,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
    )


def shape_from_model_dir(uri: str) -> ModelShape:
    """Read `<uri>/config.json` (local directory or storage URI) into a ModelShape."""
    path = storage.join(uri, "config.json")
    try:
        config = json.loads(storage.read_bytes(path).decode("utf-8"))
    except (StorageError, OSError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    return shape_from_hf_config(config, name=uri.rstrip("/").rsplit("/", 1)[-1] or uri)


def shape_from_tiny(tiny: Any, vocab_size: int, name: str = "tiny") -> ModelShape:
    """A ModelShape from the config's `model.tiny` section (a TinyModelConfig) and a vocabulary size."""
    return ModelShape(
        name=name,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_layers=tiny.num_hidden_layers,
        num_heads=tiny.num_attention_heads,
        num_kv_heads=tiny.num_key_value_heads or tiny.num_attention_heads,
        vocab_size=vocab_size,
        tie_word_embeddings=tiny.tie_word_embeddings,
    )
