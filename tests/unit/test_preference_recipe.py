"""Stage 3 through the worker recipe in this process (LocalTrainContext, no Ray), on a trivially separable set.

Chosen answers say "yes, drink water and rest", rejected ones "no"; a tiny random LLaMA must learn to prefer
the first. LoRA + sigmoid DPO under ZeRO-2 (the reference is the policy with its adapter disabled), full +
sigmoid DPO under ZeRO-3 (a frozen, partitioned reference engine) — and the same with precomputed reference
log-probs, which must give the same losses without any reference model — and LoRA + KTO.
"""

from __future__ import annotations

import math

import pytest

from orchestrator.config import (
    CheckpointConfig,
    DistributedConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    PreferenceTrainConfig,
    TinyModelConfig,
)
from orchestrator.data.formats import Message
from orchestrator.data.preference import PreferencePair, as_unpaired, encode_pairs, encode_unpaired
from orchestrator.data.templates import select_template
from orchestrator.model.loading import create_tiny_model, load_tokenizer
from orchestrator.train.context import LocalShard, LocalTrainContext
from orchestrator.train.metrics_log import read_metrics
from orchestrator.train.recipe import WorkerPlan, run_recipe

TRAIN_PAIRS, EVAL_PAIRS = 24, 8
QUESTIONS = ["发烧了怎么办？", "头疼怎么办？", "咳嗽怎么办？", "嗓子疼怎么办？", "失眠怎么办？", "胃疼怎么办？"]


def separable_pairs(n: int, offset: int = 0) -> list[PreferencePair]:
    return [PreferencePair((Message("user", f"{QUESTIONS[i % len(QUESTIONS)]}（第{i + offset}次）"),),
                           "好的，请多喝水，注意休息。", "不。", f"pairs#{i + offset}") for i in range(n)]


@pytest.fixture(scope="module")
def workspace(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("preference-recipe")
    tokenizer = load_tokenizer(str(shared_data / "tokenizers" / "minimind"))
    base = root / "base"
    create_tiny_model(TinyModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=256), tokenizer, seed=0
                      ).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return root, base, tokenizer, select_template("auto", tokenizer)


def _rows(columns: dict[str, list]) -> list[dict]:
    names = list(columns)
    return [{name: columns[name][i] for name in names} for i in range(len(columns["example_id"]))]


def _run(workspace, name: str, train: PreferenceTrainConfig, zero_stage: int):
    root, base, tokenizer, template = workspace
    encode = encode_unpaired if train.loss == "kto" else encode_pairs
    shape = as_unpaired if train.loss == "kto" else list
    train_rows = _rows(encode(shape(separable_pairs(TRAIN_PAIRS)), tokenizer, template, 128))
    eval_rows = _rows(encode(shape(separable_pairs(EVAL_PAIRS, 100)), tokenizer, template, 128, first_id=1000))
    stage_dir, logs_dir = root / name / "preference", root / name / "logs"
    reference_uri = str(root / name / "data" / "reference-logps.json")
    stage_dir.mkdir(parents=True)
    plan = WorkerPlan(
        stage="preference", model=ModelConfig(base=str(base)), train=train,
        distributed=DistributedConfig(num_workers=1, zero_stage=zero_stage, cpus_per_worker=1),
        checkpoint=CheckpointConfig(at_epoch_end=True), eval=EvalConfig(at_start=True),
        base_model=str(base), tokenizer=str(base),
        train_rows=len(train_rows),
        stage_uri=str(stage_dir), logs_dir=str(logs_dir), logs_into_checkpoints=False, has_eval=True,
        reference_logps_uri=reference_uri,
    )
    context = LocalTrainContext(storage_dir=str(stage_dir),
                                shards={"train": LocalShard(train_rows), "eval": LocalShard(eval_rows),
                                        "reference": LocalShard(train_rows)})
    run_recipe(plan, context)
    return read_metrics(str(logs_dir)), context


def _evals(records: list[dict]) -> list[dict]:
    return [r for r in records if "eval_loss" in r]


def test_lora_dpo_learns_the_separable_preference(process_group, workspace):
    train = PreferenceTrainConfig(method="lora", lora=LoraConfig(r=8, alpha=16, dropout=0.0), loss="sigmoid",
                                  beta=0.1, learning_rate=1e-2, epochs=2, micro_batch_size=4, warmup_steps=0,
                                  log_every_n_steps=1, precision="fp32")
    records, context = _run(workspace, "lora-dpo", train, zero_stage=2)
    evals = _evals(records)
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and first["eval_rewards/accuracies"] == 0.0  # policy == reference: rewards 0
    assert first["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert last["eval_rewards/accuracies"] == 1.0 and last["eval_loss"] < 0.5 * math.log(2)
    assert last["eval_rewards/margins"] > 0 and last["eval_rewards/chosen"] > last["eval_rewards/rejected"]
    steps = [r for r in records if "train_loss" in r]
    assert len(steps) == 12 and all("rewards/accuracies" in r and "logps/chosen" in r for r in steps)
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]
    assert context.reports[-1].metrics["eval_rewards/accuracies"] == 1.0


FULL_DPO = dict(method="full", loss="sigmoid", beta=0.1, learning_rate=3e-3, epochs=1, micro_batch_size=4,
                warmup_steps=0, log_every_n_steps=1, precision="fp32")


@pytest.fixture(scope="module")
def full_dpo_run(process_group, workspace):
    return _run(workspace, "full-dpo", PreferenceTrainConfig(**FULL_DPO), zero_stage=3)[0]


def test_full_dpo_with_a_frozen_reference_under_zero3(full_dpo_run):
    evals = _evals(full_dpo_run)
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)  # the reference is the starting policy
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.05
    assert evals[-1]["eval_rewards/accuracies"] > 0.5


def test_precomputed_reference_gives_the_live_reference_losses(full_dpo_run, workspace):
    import json

    records, _ = _run(workspace, "full-dpo-precomputed", PreferenceTrainConfig(**FULL_DPO, precompute_reference=True),
                      zero_stage=3)
    live = {r["step"]: r["train_loss"] for r in full_dpo_run if "train_loss" in r}
    precomputed = {r["step"]: r["train_loss"] for r in records if "train_loss" in r}
    assert sorted(precomputed) == sorted(live) == list(range(1, 7))
    for step in live:
        assert precomputed[step] == pytest.approx(live[step], rel=1e-4, abs=1e-5)
    assert _evals(records)[-1]["eval_loss"] == pytest.approx(_evals(full_dpo_run)[-1]["eval_loss"], rel=1e-4)
    written = json.loads((workspace[0] / "full-dpo-precomputed" / "data" / "reference-logps.json").read_text())
    assert sorted(written["example_id"]) == list(range(TRAIN_PAIRS)) + list(range(1000, 1000 + EVAL_PAIRS))


def test_lora_kto_separates_desirable_from_undesirable(process_group, workspace):
    train = PreferenceTrainConfig(method="lora", lora=LoraConfig(r=8, alpha=16, dropout=0.0), loss="kto",
                                  beta=0.1, learning_rate=1e-2, epochs=1, micro_batch_size=4, warmup_steps=0,
                                  log_every_n_steps=3, precision="fp32")
    records, _ = _run(workspace, "lora-kto", train, zero_stage=0)
    evals = _evals(records)
    assert evals[0]["eval_loss"] == pytest.approx(0.5, abs=1e-4)  # 1 − σ(0) for every example
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["eval_rewards/margins"] > 0 and "eval_kl" in evals[-1]
