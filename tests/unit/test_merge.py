"""Merging LoRA adapters into a base: logits preserved, extended vocabularies resized, mismatches named."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from orchestrator.errors import CheckpointError
from orchestrator.model.peft import merge_adapters


def tiny(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def adapter_on(model: LlamaForCausalLM, out, modules_to_save=None) -> str:
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                  modules_to_save=modules_to_save))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return str(out)


def test_merged_logits_equal_base_plus_adapter(tmp_path):
    tiny(64).save_pretrained(tmp_path / "base")
    adapter = adapter_on(tiny(64), tmp_path / "adapter")
    merged, diff = merge_adapters(str(tmp_path / "base"), [adapter])
    assert diff < 1e-5
    assert merged.get_input_embeddings().weight.shape[0] == 64


def test_an_extended_vocabulary_is_resized_before_merging(tmp_path):
    tiny(64).save_pretrained(tmp_path / "base")
    grown = tiny(64)
    grown.resize_token_embeddings(72)
    adapter = adapter_on(grown, tmp_path / "adapter", modules_to_save=["embed_tokens", "lm_head"])
    merged, diff = merge_adapters(str(tmp_path / "base"), [adapter])
    assert merged.get_input_embeddings().weight.shape[0] == 72 and diff < 1e-5


def test_a_smaller_adapter_vocabulary_is_a_clear_error(tmp_path):
    tiny(72).save_pretrained(tmp_path / "base")
    adapter = adapter_on(tiny(64), tmp_path / "adapter", modules_to_save=["embed_tokens", "lm_head"])
    with pytest.raises(CheckpointError, match=r"rows \(64\) do not match the base model's vocabulary of 72"):
        merge_adapters(str(tmp_path / "base"), [adapter])
