"""PEFT methods on a tiny model in-process: what each makes trainable, and the errors users can act on."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.config import TinyModelConfig, TrainConfig, config_from_dict
from orchestrator.errors import ConfigError
from orchestrator.model.loading import create_tiny_model
from orchestrator.model.peft import apply_method, check_mergeable
from orchestrator.checkpoint import TrainerState
from orchestrator.train.recipe import continue_with_new_world_size

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)


@pytest.fixture
def model(small_tokenizer):
    return create_tiny_model(TINY, small_tokenizer, seed=0)


def _trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_freeze_trains_the_last_layers_and_extra_modules(model):
    apply_method(model, TrainConfig(method="freeze", freeze={"trainable_layers": 2, "extra_modules": ["lm_head"]}), 10, "")
    names = _trainable(model)
    assert names and all(n.startswith(("model.layers.1.", "model.layers.2.", "lm_head.")) for n in names)
    assert any(n.startswith("model.layers.1.") for n in names) and "lm_head.weight" in names


def test_freeze_errors_name_the_key(model):
    with pytest.raises(ConfigError, match="trainable_layers=5 but the model has only 3 decoder layers"):
        apply_method(model, TrainConfig(method="freeze", freeze={"trainable_layers": 5}), 10, "")
    with pytest.raises(ConfigError, match="train.freeze.extra_modules: no parameter of the model is named 'head'"):
        apply_method(model, TrainConfig(method="freeze", freeze={"extra_modules": ["head"]}), 10, "")


@pytest.mark.parametrize("method, marker", [("lora", "lora_A"), ("adalora", "lora_E"),
                                            ("prompt_tuning", "prompt_encoder"), ("p_tuning", "prompt_encoder"),
                                            ("prefix_tuning", "prompt_encoder")])
def test_peft_methods_train_only_their_own_weights(model, method, marker, small_tokenizer, tmp_path):
    small_tokenizer.save_pretrained(tmp_path)
    wrapped = apply_method(model, TrainConfig(method=method, prompt={"num_virtual_tokens": 3, "init_text": "fever"}),
                           20, str(tmp_path))
    names = _trainable(wrapped)
    assert names and all(marker in n or "lora_" in n for n in names), sorted(names)[:5]
    ids = torch.tensor([[5, 6, 7, 8]])
    loss = wrapped(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in wrapped.named_parameters() if p.requires_grad and marker in n)


def test_adalora_adds_its_orthogonal_regularisation_to_the_loss(model):
    wrapped = apply_method(model, TrainConfig(method="adalora", adalora={"orth_reg_weight": 5.0}), 20, "")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        with_reg = wrapped(input_ids=ids, labels=ids).loss
        plain = wrapped.base_model.model(input_ids=ids, labels=ids).loss
    assert with_reg > plain


def test_adalora_budget_must_fit_the_run(model):
    with pytest.raises(ConfigError, match=r"tinit \(8\) \+ tfinal \(4\) < the total optimizer steps \(10\)"):
        apply_method(model, TrainConfig(method="adalora", adalora={"tinit": 8, "tfinal": 4}), 10, "")
    with pytest.raises(ConfigError, match="target_r=16 must not exceed train.adalora.init_r=12"):
        apply_method(model, TrainConfig(method="adalora", adalora={"target_r": 16}), 10, "")


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"])
def test_prompt_style_adapters_cannot_be_merged(tmp_path, peft_type):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    with pytest.raises(ConfigError, match="cannot be merged into the model weights; serve it as an adapter"):
        check_mergeable(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    check_mergeable(str(tmp_path))


def _pipeline(method: str, zero_stage: int, with_sft: bool) -> dict:
    tree = {"model": {"tiny": {}}, "tokenizer": {"train": {}}, "distributed": {"zero_stage": zero_stage},
            "pretrain": {"train": {"method": method}}}
    if with_sft:
        tree["sft"] = {"train": {"method": "lora"}}
    return tree


def test_adalora_under_zero3_is_rejected_naming_the_keys():
    with pytest.raises(ConfigError, match="pretrain.train.method=adalora does not work with distributed.zero_stage=3"):
        config_from_dict(_pipeline("adalora", 3, False))
    config_from_dict(_pipeline("adalora", 2, False))


def test_prompt_method_cannot_feed_a_second_stage():
    with pytest.raises(ConfigError, match="pretrain.train.method=p_tuning trains virtual tokens"):
        config_from_dict(_pipeline("p_tuning", 2, True))
    config_from_dict(_pipeline("p_tuning", 2, False))


@pytest.mark.parametrize("saved, new_micro, accumulation, expected", [
    (TrainerState(epoch=1, micro_step_in_epoch=10, global_step=30, micro_batches_per_epoch=20), 40, 2, 20),
    (TrainerState(epoch=1, micro_step_in_epoch=6, global_step=30, micro_batches_per_epoch=20), 40, 4, 12),
    (TrainerState(epoch=2, micro_step_in_epoch=0, global_step=40, micro_batches_per_epoch=20), 10, 1, 0),
    (TrainerState(epoch=0, micro_step_in_epoch=5, global_step=5, micro_batches_per_epoch=0), 10, 1, 0),
])
def test_new_world_size_keeps_the_step_counter_and_the_share_of_the_epoch(saved, new_micro, accumulation, expected):
    state = continue_with_new_world_size(saved, new_micro, accumulation)
    assert (state.epoch, state.global_step, state.micro_step_in_epoch) == (saved.epoch, saved.global_step, expected)
    assert state.micro_batches_per_epoch == new_micro


def test_flash_attention_without_its_package_or_a_gpu_is_a_clear_error(tmp_path):
    from orchestrator.model.loading import load_causal_lm

    with pytest.raises(ConfigError, match="flash_attention_2 needs a CUDA GPU and the flash-attn package"):
        load_causal_lm(str(tmp_path), torch.float32, "flash_attention_2")
