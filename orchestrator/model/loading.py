"""Base models and tokenizers: load from a directory, or create a tiny LLaMA model and a BPE tokenizer."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import torch

from orchestrator import storage
from orchestrator.config import TinyModelConfig
from orchestrator.data.templates import CHATML_END, CHATML_JINJA, CHATML_START
from orchestrator.errors import ConfigError

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", CHATML_START, CHATML_END)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on `texts`, with chatml special tokens and chat template.

    eos = <|im_end|> (ends an answer), pad = <|endoftext|>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=CHATML_END,
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=[CHATML_START],
    )
    tokenizer.chat_template = CHATML_JINJA
    return tokenizer


def load_tokenizer(path: str) -> Any:
    """AutoTokenizer from a local directory; pad_token falls back to eos_token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def create_tiny_model(tiny: TinyModelConfig, tokenizer: Any, seed: int) -> Any:
    """A randomly initialised LlamaForCausalLM sized to the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads or tiny.num_attention_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=tiny.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def resolve_dtype(name: str, precision: str) -> torch.dtype:
    """Load dtype: explicit, or bfloat16 when training in bf16, else float32.

    `precision` is a resolved training precision (bf16 | fp16 | fp32) or the config's `auto`, which
    off the workers (exports, derived bases on the driver) loads float32.
    """
    if name == "auto":
        return torch.bfloat16 if precision == "bf16" else torch.float32
    return DTYPES[name]


def load_causal_lm(path: str, dtype: torch.dtype, attn_implementation: str = "sdpa", trust_remote_code: bool = False) -> Any:
    """AutoModelForCausalLM from a local directory."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    if attn_implementation == "flash_attention_2" and (
        importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available()
    ):
        raise ConfigError("model.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn package "
                          "(pip install flash-attn --no-build-isolation); use sdpa otherwise")

    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a causal LM from {path}: {exc}") from exc


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def fetch_tokenizer(uri: str, local_dir: str) -> Any:
    """The tokenizer at a path or URI. Of a remote model directory only the small files travel, never the
    weights (the driver reads a 7B base's tokenizer without downloading the 7B)."""
    return load_tokenizer(storage.download_dir(uri, local_dir, skip_suffixes=WEIGHT_SUFFIXES))


def full_shape(param: Any) -> tuple[int, ...]:
    """A parameter's whole shape, also under ZeRO-3, where the local tensor is an empty placeholder."""
    return tuple(getattr(param, "ds_shape", param.shape))


def full_numel(param: Any) -> int:
    """A parameter's whole element count, also under ZeRO-3 (see `full_shape`)."""
    return int(getattr(param, "ds_numel", param.numel()))


def align_vocab(model: Any, tokenizer: Any, pad_to_multiple_of: Optional[int] = None) -> None:
    """Grow the embeddings when the tokenizer has more tokens than the model (never shrinks).

    Under ZeRO-3 the embeddings are partitioned: transformers gathers them to copy the old rows.
    """
    if len(tokenizer) > full_shape(model.get_input_embeddings().weight)[0]:
        log.info("resizing embeddings to %d tokens", len(tokenizer))
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of)
