"""Plain Hugging Face generation from a model directory (the `orchestrator generate` command)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from orchestrator import storage
from orchestrator.data.templates import encode_text, prompt_for_generation, select_template
from orchestrator.model.embeddings import check_tokenizer_fits
from orchestrator.model.export import adapter_base
from orchestrator.model.loading import load_tokenizer


def load_for_generation(model_dir: str) -> tuple[Any, Any]:
    """A model directory, or an adapter directory (prompt-style methods) on the base it names."""
    import tempfile

    from transformers import AutoModelForCausalLM

    base_uri = adapter_base(model_dir)
    if base_uri is not None:
        from peft import PeftModel

        base_dir = storage.download_dir(base_uri, tempfile.mkdtemp(prefix="base-"))
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    tokenizer = load_tokenizer(model_dir)
    check_tokenizer_fits(model, tokenizer, model_dir)
    return model, tokenizer


def format_prompt(tokenizer: Any, prompt: str, chat: bool = True, template: str = "auto",
                  system: Optional[str] = None) -> str:
    """The text the model sees: the prompt stage 2 trained after (as serving builds it), or the raw prompt
    (chat=False)."""
    if not chat:
        return prompt
    messages = ([("system", system)] if system else []) + [("user", prompt)]
    return prompt_for_generation(select_template(template, tokenizer), messages)


def generate_text(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64, chat: bool = True,
                  do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  repetition_penalty: float = 1.0, template: str = "auto") -> str:
    """Completion of `prompt` (only the new text)."""
    ids = encode_text(tokenizer, format_prompt(tokenizer, prompt, chat, template))
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=top_p if do_sample else None,
            repetition_penalty=repetition_penalty,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
