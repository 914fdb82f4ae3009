"""PEFT methods: attach for training (LoRA, AdaLoRA, prompt-tuning, p-tuning, prefix-tuning, freeze),
merge into the base for export (the methods that can be merged)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from orchestrator.config import FreezeConfig, LoraConfig, TrainConfig
from orchestrator.errors import CheckpointError, ConfigError
from orchestrator.model.loading import full_numel

log = logging.getLogger(__name__)


def apply_method(model: Any, train: TrainConfig, total_steps: int, tokenizer_dir: str) -> Any:
    """Make only what `train.method` trains trainable; peft methods wrap `model` in a PeftModel.

    AdaLoRA's rank schedule is laid out over `total_steps` optimizer steps; prompt_tuning can start
    from the embeddings of `train.prompt.init_text` (tokenized with the tokenizer in `tokenizer_dir`).
    """
    method = train.method
    if method == "full":
        return model
    if method == "freeze":
        freeze_all_but_last_layers(model, train.freeze)
        return model
    if method == "lora":
        return apply_lora(model, train.lora)
    from peft import get_peft_model

    peft_config = _peft_config(train, total_steps, tokenizer_dir, _embedding_tying(model, train.lora.modules_to_save))
    model = get_peft_model(model, peft_config)
    _log_trainable(model, method)
    return model


def _peft_config(train: TrainConfig, total_steps: int, tokenizer_dir: str, tying: dict[str, bool]) -> Any:
    import peft

    method, prompt = train.method, train.prompt
    if method == "adalora":
        ada = train.adalora
        if ada.target_r > ada.init_r:
            raise ConfigError(f"train.adalora.target_r={ada.target_r} must not exceed train.adalora.init_r={ada.init_r}")
        if ada.tinit + ada.tfinal >= total_steps:
            raise ConfigError(
                f"AdaLoRA's budget schedule needs train.adalora.tinit ({ada.tinit}) + tfinal ({ada.tfinal}) < the "
                f"total optimizer steps ({total_steps}); lower them or train longer"
            )
        return peft.AdaLoraConfig(
            task_type=peft.TaskType.CAUSAL_LM, init_r=ada.init_r, target_r=ada.target_r, tinit=ada.tinit,
            tfinal=ada.tfinal, deltaT=ada.delta_t, beta1=ada.beta1, beta2=ada.beta2,
            orth_reg_weight=ada.orth_reg_weight, total_step=total_steps, lora_alpha=train.lora.alpha,
            lora_dropout=train.lora.dropout, target_modules=list(train.lora.target_modules),
            modules_to_save=list(train.lora.modules_to_save) or None, **tying,
        )
    if method == "prompt_tuning":
        init = {"prompt_tuning_init": peft.PromptTuningInit.RANDOM}
        if prompt.init_text:
            init = {"prompt_tuning_init": peft.PromptTuningInit.TEXT, "prompt_tuning_init_text": prompt.init_text,
                    "tokenizer_name_or_path": tokenizer_dir}
        return peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM,
                                       num_virtual_tokens=prompt.num_virtual_tokens, **init)
    if method == "p_tuning":
        return peft.PromptEncoderConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=prompt.num_virtual_tokens,
                                        encoder_hidden_size=prompt.encoder_hidden_size)
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=prompt.num_virtual_tokens,
                                       prefix_projection=prompt.prefix_projection)
    raise ConfigError(f"train.method={method!r} is not a peft method")


def decoder_layers(model: Any) -> Any:
    """The ModuleList of decoder layers of a causal LM (LLaMA-style `model.layers`, GPT-style `transformer.h`)."""
    for path in ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, torch.nn.ModuleList):
            return node
    raise ConfigError(f"train.method=freeze: cannot find the decoder layers of {type(model).__name__}")


def freeze_all_but_last_layers(model: Any, freeze: FreezeConfig) -> None:
    """Freeze-tuning: only the last `trainable_layers` decoder layers (and `extra_modules`) keep gradients."""
    layers = decoder_layers(model)
    if freeze.trainable_layers > len(layers):
        raise ConfigError(f"train.freeze.trainable_layers={freeze.trainable_layers} but the model has only "
                          f"{len(layers)} decoder layers")
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in list(layers)[-freeze.trainable_layers:]:
        for param in layer.parameters():
            param.requires_grad_(True)
    names = dict(model.named_parameters())
    for prefix in freeze.extra_modules:
        matched = [name for name in names if name == prefix or name.startswith(prefix + ".")]
        if not matched:
            raise ConfigError(f"train.freeze.extra_modules: no parameter of the model is named {prefix!r}* "
                              f"(e.g. {', '.join(list(names)[-3:])})")
        for name in matched:
            names[name].requires_grad_(True)
    _log_trainable(model, f"freeze (last {freeze.trainable_layers} layers)")


def _log_trainable(model: Any, what: str) -> None:
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(full_numel(p) for p in model.parameters())
    log.info("%s: %d trainable of %d parameters (%.2f%%)", what, trainable, total, 100 * trainable / max(total, 1))


def check_mergeable(adapter_dir: str) -> None:
    """Prompt-style adapters (virtual tokens) have no weights to fold in: say so and how to serve them."""
    import json
    import os

    config_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.exists(config_path):
        return
    with open(config_path, encoding="utf-8") as handle:
        peft_type = str(json.load(handle).get("peft_type", "")).upper()
    if peft_type in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        raise ConfigError(
            f"{adapter_dir}: a {peft_type.lower()} adapter prepends trained virtual tokens at run time and cannot be "
            "merged into the model weights; serve it as an adapter on its base model instead "
            "(serve.adapters: {name: <adapter URI>})"
        )


def _embedding_tying(model: Any, modules_to_save: list[str]) -> dict[str, bool]:
    """Tied input/output embeddings trained in full (modules_to_save) must stay one matrix in the adapter."""
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    return {"ensure_weight_tying": True} if tied and modules_to_save else {}


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
        **_embedding_tying(model, lora.modules_to_save),
    )
    model = get_peft_model(model, peft_config)
    _log_trainable(model, "LoRA")
    return model


def merge_adapter(base_dir: str, adapter_dir: str, dtype: torch.dtype = torch.float32) -> Any:
    """Base model + LoRA adapter → a plain transformers model with the adapter folded in (vocabulary sizes
    checked and logits verified as in `merge_adapters`)."""
    return merge_adapters(base_dir, [adapter_dir], dtype)[0]


def merge_adapters(base_dir: str, adapter_dirs: list[str], dtype: torch.dtype = torch.float32) -> tuple[Any, float]:
    """Fold LoRA adapters into a base model, in order. Returns (merged model, max |logit difference|).

    Each merge is checked: the merged model's logits on a probe input must equal base+adapter's.
    A vocabulary mismatch (adapter trained on a resized embedding) raises a clear error.
    """
    from peft import PeftConfig, PeftModel
    from safetensors import SafetensorError, safe_open
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    worst = 0.0
    for adapter_dir in adapter_dirs:
        check_mergeable(adapter_dir)
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
