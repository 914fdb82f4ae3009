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
