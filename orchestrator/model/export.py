"""A stage's final checkpoint → a plain Hugging Face model directory (LoRA merged into its base)."""

from __future__ import annotations

import logging
import shutil
import tempfile

import torch

from orchestrator import storage
from orchestrator.model.loading import load_tokenizer
from orchestrator.model.peft import merge_adapter
from orchestrator.train.checkpoint import MODEL_DIR, verify_checkpoint

log = logging.getLogger(__name__)


def export_model(checkpoint_uri: str, base_model_uri: str, method: str, out_uri: str,
                 dtype: torch.dtype = torch.float32) -> str:
    """Write the stage's final model to `out_uri` so `AutoModelForCausalLM.from_pretrained` loads it.

    Full fine-tuning: the checkpoint's model directory as is. LoRA: base + adapter merged.
    """
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        checkpoint_dir = storage.download_dir(checkpoint_uri, f"{tmp}/checkpoint")
        verify_checkpoint(checkpoint_dir)
        model_dir = f"{checkpoint_dir}/{MODEL_DIR}"
        out_local = f"{tmp}/out"
        if method == "lora":
            base_dir = storage.download_dir(base_model_uri, f"{tmp}/base")
            merged = merge_adapter(base_dir, model_dir, dtype)
            tokenizer = load_tokenizer(model_dir)
            _set_generation_eos(merged, tokenizer)
            merged.save_pretrained(out_local, safe_serialization=True)
            tokenizer.save_pretrained(out_local)
        else:
            shutil.copytree(model_dir, out_local)
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(out_local)
            tokenizer = load_tokenizer(out_local)
            _set_generation_eos(model, tokenizer)
            model.generation_config.save_pretrained(out_local)
        storage.upload_dir(out_local, out_uri)
    log.info("exported %s model to %s", method, out_uri)
    return out_uri


def _set_generation_eos(model, tokenizer) -> None:
    """Stop generation at the tokenizer's EOS and at <|im_end|> (chatml answers end with it)."""
    eos = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        eos.add(im_end)
    eos.discard(None)
    model.generation_config.eos_token_id = sorted(eos)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
