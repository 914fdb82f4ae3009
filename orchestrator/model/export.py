"""A stage's final checkpoint → a plain Hugging Face model directory (LoRA / AdaLoRA merged into its
base), or — for prompt-style methods, which cannot be merged — the adapter naming its base; with a
lineage manifest saying where it came from."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any, Optional

import torch

from orchestrator import node_cache, storage
from orchestrator.config import MERGEABLE_METHODS, PROMPT_METHODS, NodeCacheConfig
from orchestrator.errors import CheckpointError
from orchestrator.model.loading import load_tokenizer
from orchestrator.model.peft import merge_adapter
from orchestrator.checkpoint import MODEL_DIR, check_stored_checkpoint
from orchestrator.runtime import where_this_runs

log = logging.getLogger(__name__)
LINEAGE = "lineage.json"


def fetch_checkpoint_model(checkpoint_uri: str, local_dir: str) -> tuple[str, dict[str, Any]]:
    """Check a checkpoint is complete (manifest vs. listing) and fetch only its `model/` directory."""
    manifest, problem = check_stored_checkpoint(checkpoint_uri)
    if problem:
        raise CheckpointError(f"{checkpoint_uri}: incomplete checkpoint: {problem}")
    model_uri = storage.join(checkpoint_uri, MODEL_DIR)
    if storage.is_remote(model_uri):
        return storage.download_dir(model_uri, local_dir), manifest
    return storage.local_path(model_uri), manifest


def export_model(checkpoint_uri: str, base_model_uri: str, method: str, out_uri: str,
                 dtype: torch.dtype = torch.float32, lineage: Optional[dict[str, Any]] = None,
                 cache: Optional[NodeCacheConfig] = None) -> str:
    """Write the stage's final model to `out_uri` so `AutoModelForCausalLM.from_pretrained` loads it.

    Full / freeze: the checkpoint's model directory as is. LoRA / AdaLoRA: base + adapter merged.
    prompt_tuning / p_tuning / prefix_tuning: the adapter, its `base_model_name_or_path` set to
    `base_model_uri` (load it with `load_for_generation`, or serve it through `serve.adapters`).
    `lineage` (base model, data digests, metrics, versions, ...) is saved beside it as lineage.json.
    A remote base is read through the node cache (`cache`), where the stage's workers left it.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        model_dir, manifest = fetch_checkpoint_model(checkpoint_uri, f"{tmp}/checkpoint")
        out_local = f"{tmp}/out"
        if method in PROMPT_METHODS:
            shutil.copytree(model_dir, out_local)
            _point_adapter_at_base(out_local, base_model_uri)
        elif method in MERGEABLE_METHODS:
            cache = cache or NodeCacheConfig()
            base_dir = node_cache.fetch(base_model_uri, cache.dir, cache.max_gb)
            merged = merge_adapter(base_dir, model_dir, dtype)
            tokenizer = load_tokenizer(model_dir)
            _set_generation_eos(merged.generation_config, tokenizer)
            merged.save_pretrained(out_local, safe_serialization=True)
            tokenizer.save_pretrained(out_local)
        else:
            shutil.copytree(model_dir, out_local)
            tokenizer = load_tokenizer(out_local)
            try:
                generation = GenerationConfig.from_pretrained(out_local)
            except OSError:
                generation = GenerationConfig.from_model_config(AutoModelForCausalLM.from_pretrained(out_local).config)
            _set_generation_eos(generation, tokenizer)
            generation.save_pretrained(out_local)
        record = {"checkpoint": checkpoint_uri, "method": method, "base_model": base_model_uri,
                  "trainer_state": manifest.get("trainer_state"), "exported_on": where_this_runs(), **(lineage or {})}
        with open(f"{out_local}/{LINEAGE}", "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1, ensure_ascii=False, default=str)
        storage.upload_dir(out_local, out_uri)
    log.info("exported %s model to %s", method, out_uri)
    return out_uri


def _point_adapter_at_base(adapter_dir: str, base_model_uri: str) -> None:
    path = f"{adapter_dir}/adapter_config.json"
    with open(path, encoding="utf-8") as handle:
        adapter_config = json.load(handle)
    adapter_config["base_model_name_or_path"] = base_model_uri
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(adapter_config, handle, indent=2)


def adapter_base(model_dir: str) -> Optional[str]:
    """The base model an adapter directory names (stages trained with prompt-style methods export an
    adapter, not merged weights); None for a model directory."""
    path = os.path.join(model_dir, "adapter_config.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)["base_model_name_or_path"]


def _set_generation_eos(generation: Any, tokenizer: Any) -> None:
    """Stop generation at the tokenizer's EOS and at <|im_end|> (chatml answers end with it)."""
    eos = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        eos.add(im_end)
    eos.discard(None)
    generation.eos_token_id = sorted(eos)
    generation.pad_token_id = tokenizer.pad_token_id


def merge_to(base_uri: str, adapter_uris: list[str], out_uri: str, dtype: torch.dtype = torch.float32) -> float:
    """`orchestrator merge`: base + adapters (in order) → a model directory; returns max |logit diff|."""
    from orchestrator.model.peft import merge_adapters

    with tempfile.TemporaryDirectory(prefix="merge-") as tmp:
        base_dir = storage.download_dir(base_uri, f"{tmp}/base")
        adapters = [storage.download_dir(uri, f"{tmp}/adapter{i}") for i, uri in enumerate(adapter_uris)]
        model, diff = merge_adapters(base_dir, adapters, dtype)
        tokenizer_dir = adapters[-1] if storage.exists(f"{adapters[-1]}/tokenizer_config.json") else base_dir
        tokenizer = load_tokenizer(tokenizer_dir)
        _set_generation_eos(model.generation_config, tokenizer)
        model.save_pretrained(f"{tmp}/out", safe_serialization=True)
        tokenizer.save_pretrained(f"{tmp}/out")
        storage.upload_dir(f"{tmp}/out", out_uri)
    return diff
