"""Stage 1 through `run_stage` on a real local Ray cluster with a domain-extended tokenizer, LoRA, and an
earlier LoRA adapter to continue from (`model.init_adapters`), 2 workers under ZeRO-3: trains, saves, merges
and generates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.config import DataSourceConfig, TinyModelConfig, config_from_dict
from orchestrator.model.embeddings import padded_rows
from orchestrator.model.generate import generate_text, load_for_generation
from orchestrator.model.loading import create_tiny_model, load_causal_lm, load_tokenizer
from orchestrator.layout import RunLayout
from orchestrator.train.stage import run_stage
from orchestrator.train.stage_base import DERIVED_BASE_RECORD
from orchestrator.vocab.build import VocabBuildSettings, build_domain_vocab
from orchestrator.vocab.merge import merge_vocabulary

pytestmark = pytest.mark.integration
TARGETS = ["q_proj", "v_proj"]


def lora_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    settings = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    return {key.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight"):
            settings["lora_alpha"] / settings["r"] * weights[key.replace("lora_A", "lora_B")] @ a
            for key, a in weights.items() if ".lora_A." in key}


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory) -> Path:
    """A tiny base with the minimind tokenizer, an earlier adapter A on it, and minimind extended for statutes."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("vocab-stage")
    tokenizer = load_tokenizer(str(shared_data / "tokenizers" / "minimind"))
    model = create_tiny_model(TinyModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, max_position_embeddings=256), tokenizer, seed=0)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    earlier = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in earlier.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    earlier.save_pretrained(root / "adapter_a")
    build_domain_vocab([DataSourceConfig(path=str(shared_data / "pretrain" / "legal"), text_unit="paragraph")],
                       str(root / "domain"), VocabBuildSettings(vocab_size=2000))
    merge_vocabulary(str(shared_data / "tokenizers" / "minimind"), [str(root / "domain")], str(root / "extended"))
    return root


def test_extended_vocabulary_lora_stage_continuing_an_adapter(ray_cluster, inputs, shared_data):
    config = config_from_dict({
        "run_name": "vocab-lora",
        "model": {"base": str(inputs / "base"), "init_adapters": [str(inputs / "adapter_a")]},
        "tokenizer": {"path": str(inputs / "extended")},
        "distributed": {"num_workers": 2, "cpus_per_worker": 1, "zero_stage": 3},  # ZeRO-3: gathered saves
        "checkpoint": {"storage_path": str(inputs / "runs")},
        "eval": {"max_batches": 2},
        "pretrain": {
            "data": {"sources": [{"path": str(shared_data / "pretrain" / "legal"), "text_unit": "line",
                                  "max_records": 300}], "block_size": 64, "eval_split": 0.05},
            "train": {"method": "lora", "learning_rate": 5e-3, "epochs": 1, "micro_batch_size": 8,
                      "lora": {"r": 4, "alpha": 8, "target_modules": TARGETS}, "log_every_n_steps": 5},
        },
    })
    result = run_stage(config, "pretrain")
    tokens = len(load_tokenizer(str(inputs / "extended")))
    rows = padded_rows(tokens)
    assert tokens > 7000 and rows % 64 == 0

    # The derived base: A merged in (init_adapters), the vocabulary grown, written once under the run.
    derived = Path(RunLayout.of(config).root) / "pretrain-base"
    record = json.loads((derived / DERIVED_BASE_RECORD).read_text())
    assert record["embedding_rows"] == rows and record["vocabulary"]["tokens"] == tokens
    assert record["derived_on"]["pid"] != os.getpid()  # built by a Ray task, not in the driver
    base = load_causal_lm(str(inputs / "base"), torch.float32).state_dict()
    derived_model = load_causal_lm(str(derived), torch.float32)
    derived_weights = derived_model.state_dict()
    for name, delta in lora_deltas(inputs / "adapter_a").items():
        torch.testing.assert_close(derived_weights[name], base[name] + delta)

    # The new adapter trained the grown embedding and LM head in full (modules_to_save, added automatically).
    checkpoint = Path(result.checkpoint_uri) / "model"
    adapter_config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert sorted(adapter_config["modules_to_save"]) == ["embed_tokens", "lm_head"]
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    [embedding] = [t for k, t in adapter.items() if k.endswith("embed_tokens.weight")]
    assert embedding.shape == (rows, 64)
    new_rows = slice(6400, tokens)
    assert not torch.allclose(embedding[new_rows], derived_weights["model.embed_tokens.weight"][new_rows])
    assert result.data_stats["train_tokens"] > 0 and result.metrics["eval_loss"] > 0

    # Merged and exported with the larger vocabulary: equal to derived base + the new adapter.
    merged = load_causal_lm(result.model_uri, torch.float32).eval()
    assert merged.get_input_embeddings().weight.shape == (rows, 64) and merged.config.vocab_size == rows
    assert len(load_tokenizer(result.model_uri)) == tokens
    from peft import PeftModel

    reference = PeftModel.from_pretrained(derived_model, str(checkpoint)).eval()
    ids = torch.tensor([[5, 300, 6400, tokens - 1, 1200, 7000]])
    with torch.no_grad():
        assert (reference(ids).logits - merged(ids).logits).abs().max().item() < 1e-4
    lineage = json.loads((Path(result.model_uri) / "lineage.json").read_text())
    assert lineage["base_model"] == str(derived) and lineage["stage_base"]["uri"] == str(derived)

    # It generates, and never a padding id.
    model, tokenizer = load_for_generation(result.model_uri)
    text = generate_text(model, tokenizer, "第一条 为了保护民事主体的合法权益", max_new_tokens=12, chat=False)
    assert isinstance(text, str) and text
    inputs_ids = tokenizer("当事人", return_tensors="pt")
    out = model.generate(**inputs_ids, max_new_tokens=12, min_new_tokens=12, do_sample=True, top_k=0,
                         pad_token_id=tokenizer.pad_token_id)
    assert int(out.max()) < tokens
    assert os.path.isdir(derived)


def test_vocabulary_and_derived_base_on_s3(s3_server, inputs, shared_data):
    """Build and merge a vocabulary from and to S3, derive the stage base in S3 (reused on rerun) and load an
    adapter to continue from S3, against a real S3 server on 127.0.0.1."""
    from s3_support import ACCESS_KEY, REGION, SECRET_KEY

    from orchestrator import storage
    from orchestrator.train.model_setup import load_trainable_adapter
    from orchestrator.train.stage_base import prepare_stage_base

    storage.configure(storage.S3Settings(endpoint_url=s3_server.endpoint, region=REGION, access_key_id=ACCESS_KEY,
                                         secret_access_key=SECRET_KEY))
    root = "s3://orchestrator-test/vocab"
    for name in ("criminal_law.md", "civil_code_03_contracts.md"):
        storage.write_bytes(f"{root}/corpus/{name}", (shared_data / "pretrain" / "legal" / name).read_bytes())
    for name in ("base", "adapter_a"):
        storage.upload_dir(str(inputs / name), f"{root}/{name}")
    build = build_domain_vocab([DataSourceConfig(path=f"{root}/corpus", text_unit="paragraph")], f"{root}/domain",
                               VocabBuildSettings(vocab_size=1500))
    assert build["held_out"] == f"{root}/domain/held_out.jsonl" and len(build["files"]) == 2
    report = merge_vocabulary(f"{root}/base", [f"{root}/domain"], f"{root}/extended")
    assert report["new_tokens"] > 300 and report["sample"]["tokens_per_char_reduction"] > 0.2

    config = config_from_dict({
        "run_name": "s3-vocab",
        "model": {"base": f"{root}/base", "init_adapters": [f"{root}/adapter_a"]},
        "tokenizer": {"path": f"{root}/extended"},
        "checkpoint": {"storage_path": f"{root}/runs"},
        "pretrain": {"data": {"sources": [{"path": "unused"}]}, "train": {"method": "adalora"}},
    })
    stage_base = prepare_stage_base(config, "pretrain", f"{root}/base", f"{root}/extended", RunLayout.of(config))
    assert stage_base.model_uri == f"{root}/runs/s3-vocab/pretrain-base"
    assert stage_base.config.pretrain.train.lora.modules_to_save == ["embed_tokens", "lm_head"]
    keys = set(storage.list_files(stage_base.model_uri))
    assert {"model.safetensors", "tokenizer.json", DERIVED_BASE_RECORD} <= keys
    again = prepare_stage_base(config, "pretrain", f"{root}/base", f"{root}/extended", RunLayout.of(config))
    assert again.lineage == stage_base.lineage

    model = load_causal_lm(str(inputs / "base"), torch.float32)
    continued = load_trainable_adapter(model, f"{root}/adapter_a")
    assert any(p.requires_grad for n, p in continued.named_parameters() if "lora_B" in n)
