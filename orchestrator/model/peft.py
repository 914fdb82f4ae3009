"""LoRA adapters (peft): attach for training, merge into the base for export."""

from __future__ import annotations

import logging
from typing import Any

import torch

from orchestrator.config import LoraConfig

log = logging.getLogger(__name__)


def apply_lora(model: Any, lora: LoraConfig) -> Any:
    """Wrap `model` in a peft LoRA model; only adapter (and modules_to_save) weights stay trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    peft_config = PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        modules_to_save=list(lora.modules_to_save) or None,
    )
    model = get_peft_model(model, peft_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))
    return model


def merge_adapter(base_dir: str, adapter_dir: str, dtype: torch.dtype = torch.float32) -> Any:
    """Base model + LoRA adapter → a plain transformers model with the adapter folded in."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return merged


def merge_adapters(base_dir: str, adapter_dirs: list[str], dtype: torch.dtype = torch.float32) -> tuple[Any, float]:
    """Fold LoRA adapters into a base model, in order. Returns (merged model, max |logit difference|).

    Each merge is checked: the merged model's logits on a probe input must equal base+adapter's.
    A vocabulary mismatch (adapter trained on a resized embedding) raises a clear error.
    """
    from peft import PeftConfig, PeftModel
    from safetensors import SafetensorError, safe_open
    from transformers import AutoModelForCausalLM

    from orchestrator.errors import CheckpointError

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    worst = 0.0
    for adapter_dir in adapter_dirs:
        try:
            PeftConfig.from_pretrained(adapter_dir)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{adapter_dir}: not a peft adapter directory ({exc})") from exc
        vocab = model.get_input_embeddings().weight.shape[0]
        weights = f"{adapter_dir}/adapter_model.safetensors"
        try:
            with safe_open(weights, framework="pt") as handle:
                rows = {handle.get_slice(k).get_shape()[0] for k in handle.keys()
                        if k.endswith(("embed_tokens.weight", "lm_head.weight"))}
        except (OSError, SafetensorError) as exc:  # missing or corrupt safetensors
            raise CheckpointError(f"{adapter_dir}: cannot read adapter weights ({exc})") from exc
        if len(rows) > 1 or (rows and min(rows) < vocab):
            raise CheckpointError(
                f"{adapter_dir}: the adapter's embedding/LM-head rows ({', '.join(map(str, sorted(rows)))}) do not "
                f"match the base model's vocabulary of {vocab}"
            )
        if rows and min(rows) > vocab:  # trained on an extended vocabulary: grow the base first
            log.info("resizing the base vocabulary %d -> %d for %s", vocab, min(rows), adapter_dir)
            model.resize_token_embeddings(min(rows))
            vocab = min(rows)
        try:
            wrapped = PeftModel.from_pretrained(model, adapter_dir).eval()
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{adapter_dir}: adapter does not fit the base model {base_dir}: {exc}") from exc
        probe = torch.arange(min(16, vocab)).unsqueeze(0) % vocab
        with torch.no_grad():
            before = wrapped(probe).logits
            model = wrapped.merge_and_unload()
            after = model(probe).logits
        worst = max(worst, (before - after).abs().max().item())
        log.info("merged %s (max |logit diff| %.3g)", adapter_dir, worst)
    return model, worst
