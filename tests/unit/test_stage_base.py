"""The driver's stage base (no Ray): init_adapters merged, an extended vocabulary grown, written once to
<run>/<stage>-base and reused; continuing from a LoRA gives base + A + B; resume_adapter keeps training A."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.config import TinyModelConfig, config_from_dict
from orchestrator.errors import ConfigError
from orchestrator.model.loading import create_tiny_model, load_causal_lm, load_tokenizer
from orchestrator.model.peft import merge_adapters
from orchestrator.train.model_setup import build_training_model
from orchestrator.layout import RunLayout
from orchestrator.train.stage_base import DERIVED_BASE_RECORD, prepare_stage_base
from orchestrator.vocab.merge import merge_vocabulary

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def workspace(shared_data, tmp_path_factory) -> Path:
    """A tiny base with the minimind tokenizer, adapter A on it, and minimind extended by 300 law terms."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("stage-base")
    tokenizer = load_tokenizer(str(shared_data / "tokenizers" / "minimind"))
    model = create_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2), tokenizer, seed=0)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapter = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    adapter.save_pretrained(root / "adapter_a")
    merge_vocabulary(str(shared_data / "tokenizers" / "minimind"), [str(shared_data / "wordlists" / "THUOCL_law.txt")],
                     str(root / "extended"), max_terms=300)
    return root


def make_config(root: Path, run: str, tokenizer: str, method: str = "lora", **model) -> object:
    return config_from_dict({
        "run_name": run,
        "model": {"base": str(root / "base"), **model},
        "tokenizer": {"path": tokenizer},
        "checkpoint": {"storage_path": str(root / "runs")},
        "pretrain": {"data": {"sources": [{"path": "unused"}]},
                     "train": {"method": method,
                               "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": TARGETS}}},
    })


def prepare(config, stage: str = "pretrain", base=None):
    base = base or config.model.base
    return prepare_stage_base(config, stage, base, config.tokenizer.path or base, RunLayout.of(config))


def lora_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Base weight name → scale * B @ A of a LoRA adapter."""
    import json

    settings = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = settings["lora_alpha"] / settings["r"]
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    deltas = {}
    for key, a in weights.items():
        if ".lora_A." in key:
            name = key.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
            deltas[name] = scale * weights[key.replace("lora_A", "lora_B")] @ a
    return deltas


def test_adapters_and_an_extended_vocabulary_derive_a_base_once(workspace):
    config = make_config(workspace, "derive", str(workspace / "extended"), init_adapters=[str(workspace / "adapter_a")])
    stage_base = prepare(config)
    target = workspace / "runs" / "derive" / "pretrain-base"
    assert stage_base.model_uri == str(target)
    record = stage_base.lineage["stage_base"]
    assert record["recipe"]["init_adapters"] == [str(workspace / "adapter_a")]
    tokens = len(load_tokenizer(str(workspace / "extended")))
    assert record["vocabulary"]["tokens"] == tokens and record["embedding_rows"] % 64 == 0
    # LoRA trains the grown embedding and LM head in full: added automatically.
    assert stage_base.config.pretrain.train.lora.modules_to_save == ["embed_tokens", "lm_head"]
    assert config.pretrain.train.lora.modules_to_save == []  # the caller's config is not modified

    base = load_causal_lm(str(workspace / "base"), torch.float32).state_dict()
    derived = load_causal_lm(str(target), torch.float32)
    assert derived.get_input_embeddings().weight.shape[0] == record["embedding_rows"] >= tokens
    assert len(load_tokenizer(str(target))) == tokens
    for name, delta in lora_deltas(workspace / "adapter_a").items():
        torch.testing.assert_close(derived.state_dict()[name], base[name] + delta)
    assert torch.equal(derived.get_input_embeddings().weight[:6400], base["model.embed_tokens.weight"])

    # A rerun reuses it; a rerun asking for another base is refused.
    written = os.path.getmtime(target / "model.safetensors")
    assert prepare(config).lineage == stage_base.lineage
    assert os.path.getmtime(target / "model.safetensors") == written
    other = make_config(workspace, "derive", str(workspace / "extended"))
    with pytest.raises(ConfigError, match="pretrain-base was derived from .* but this run asks for"):
        prepare(other)


def test_a_stage_after_stage_one_merges_nothing_again(workspace):
    config = make_config(workspace, "later", str(workspace / "base"), init_adapters=[str(workspace / "adapter_a")],
                         resume_adapter=True)
    stage1_model = str(workspace / "base")  # stands for stage 1's exported model: not the configured base
    config = config.model_copy(update={"model": config.model.model_copy(update={"base": str(workspace / "elsewhere")})})
    stage_base = prepare(config, "pretrain", base=stage1_model)
    assert stage_base.model_uri == stage1_model and stage_base.lineage == {}
    assert stage_base.config.model.resume_adapter is False
    assert not (workspace / "runs" / "later").exists()


def test_continuing_from_a_lora_gives_base_plus_both_deltas(workspace, tmp_path):
    """Merge A into the base (the derived base), train a new adapter B on it, merge: base + ΔA + ΔB."""
    config = make_config(workspace, "continue", str(workspace / "base"), init_adapters=[str(workspace / "adapter_a")])
    stage_base = prepare(config)
    train = stage_base.config.pretrain.train
    assert train.lora.modules_to_save == []  # same vocabulary: only the adapter trains
    tokenizer = load_tokenizer(stage_base.model_uri)
    model = build_training_model(stage_base.config.model, train, stage_base.model_uri, tokenizer, stage_base.model_uri,
                                 "fp32", total_steps=3)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    torch.manual_seed(1)
    ids = torch.randint(40, 6400, (4, 16))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "adapter_b")

    merged, diff = merge_adapters(str(workspace / "base"), [str(workspace / "adapter_a"), str(tmp_path / "adapter_b")])
    assert diff < 1e-4
    base = load_causal_lm(str(workspace / "base"), torch.float32).state_dict()
    delta_a, delta_b = lora_deltas(workspace / "adapter_a"), lora_deltas(tmp_path / "adapter_b")
    assert set(delta_a) == set(delta_b) and all(d.abs().max() > 1e-4 for d in delta_b.values())
    for name, weight in merged.state_dict().items():
        expected = base[name] + delta_a.get(name, 0) + delta_b.get(name, 0)
        torch.testing.assert_close(weight, expected, atol=1e-5, rtol=1e-5)


def test_resume_adapter_keeps_training_the_last_adapter(workspace):
    config = make_config(workspace, "resume", str(workspace / "base"), init_adapters=[str(workspace / "adapter_a")],
                         resume_adapter=True)
    stage_base = prepare(config)
    assert stage_base.model_uri == str(workspace / "base")  # nothing to merge, nothing grows
    assert stage_base.config.model.resume_adapter is True
    tokenizer = load_tokenizer(str(workspace / "base"))
    model = build_training_model(stage_base.config.model, stage_base.config.pretrain.train, str(workspace / "base"),
                                 tokenizer, str(workspace / "base"), "fp32", total_steps=3)
    saved = load_file(workspace / "adapter_a" / "adapter_model.safetensors")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(saved) and all("lora_" in n for n in trainable)
    for key, tensor in saved.items():
        name = key.replace(".weight", ".default.weight")
        assert torch.equal(trainable[name], tensor), name  # A's trained values, not a fresh init


def test_resume_adapter_refuses_a_mismatched_method(workspace):
    config = make_config(workspace, "mismatch", str(workspace / "base"), method="prompt_tuning",
                         init_adapters=[str(workspace / "adapter_a")], resume_adapter=True)
    with pytest.raises(ConfigError, match="adapter_a is a lora adapter but the stage trains with method prompt_tuning"):
        prepare(config)


def test_an_extended_vocabulary_needs_a_method_that_trains_embeddings(workspace):
    config = make_config(workspace, "prompt", str(workspace / "extended"), method="prompt_tuning")
    with pytest.raises(ConfigError, match=r"trains only virtual tokens, so the embeddings of the \d+ new tokens"):
        prepare(config)
    assert not (workspace / "runs" / "prompt").exists()  # refused before any base was derived
    freeze = prepare(make_config(workspace, "freeze", str(workspace / "extended"), method="freeze"))
    assert freeze.config.pretrain.train.freeze.extra_modules == ["model.embed_tokens", "lm_head"]
    assert (workspace / "runs" / "freeze" / "pretrain-base" / DERIVED_BASE_RECORD).is_file()


def test_resume_adapter_needs_an_adapter():
    with pytest.raises(ConfigError, match="needs the adapter to continue in `model.init_adapters`"):
        config_from_dict({"model": {"tiny": {}, "resume_adapter": True}, "tokenizer": {"path": "t"}})


def test_tied_embeddings_stay_one_trained_matrix(workspace, shared_data, tmp_path):
    tokenizer = load_tokenizer(str(shared_data / "tokenizers" / "minimind"))
    tied = create_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, tie_word_embeddings=True), tokenizer, seed=0)
    tied.save_pretrained(tmp_path / "tied")
    tokenizer.save_pretrained(tmp_path / "tied")
    config = make_config(workspace, "tied", str(workspace / "extended"))
    config = config.model_copy(update={"model": config.model.model_copy(update={"base": str(tmp_path / "tied")})})
    stage_base = prepare(config)
    model = build_training_model(stage_base.config.model, stage_base.config.pretrain.train, stage_base.model_uri,
                                 load_tokenizer(stage_base.model_uri), stage_base.model_uri, "fp32", total_steps=1)
    inner = model.base_model.model
    embedding = inner.model.embed_tokens.modules_to_save["default"].weight
    head = inner.lm_head.modules_to_save["default"].weight
    assert embedding.requires_grad and embedding is head


def test_the_same_tokenizer_from_elsewhere_changes_nothing(workspace, shared_data):
    """The usual case (e.g. model.tiny with tokenizer.path): no adapters, no new tokens, no derived base."""
    config = make_config(workspace, "plain", str(shared_data / "tokenizers" / "minimind"))
    stage_base = prepare(config)
    assert (stage_base.model_uri, stage_base.lineage, stage_base.config) == (str(workspace / "base"), {}, config)
    assert not (workspace / "runs" / "plain").exists()
