"""Stage 3 on a real local Ray cluster: 2 workers, DeepSpeed on CPU, through `run_stage` (data, Ray Train, export).

* LoRA + sigmoid DPO under ZeRO-2 on a trivially separable set: a worker crash right after the step-2
  checkpoint is absorbed by one restart from it; held-out reward accuracy rises to 1 and the policy's
  chosen-over-rejected log-prob margin grows past the starting model's; the exported (merged) model loads with `from_pretrained`.
* Full fine-tuning + DPO under ZeRO-3 on MedicalGPT's real pairs: the frozen reference is a second,
  partitioned engine; at the start the policy equals it (loss log 2 on every pair), training lowers the loss.
* Full fine-tuning + ORPO (no reference) under ZeRO-3 on the same real pairs: TRL's ORPO metrics, loss and NLL fall.
* LoRA + KTO under ZeRO-2 on the separable set split into unpaired answers: the KL reference point is logged,
  held-out reward accuracy rises.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from orchestrator.config import config_from_dict
from orchestrator.layout import RunLayout
from orchestrator.train.metrics_log import read_metrics
from orchestrator.train.stage import run_stage

pytestmark = pytest.mark.integration

QUESTIONS = ["发烧了怎么办？", "头疼怎么办？", "咳嗽怎么办？", "嗓子疼怎么办？", "失眠怎么办？", "胃疼怎么办？"]


def make_config(tmp_path: Path, shared: Path, zero_stage: int, preference: dict, **distributed) -> dict:
    return {
        "run_name": "pref",
        "model": {"tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "max_position_embeddings": 256}},
        "tokenizer": {"path": str(shared / "tokenizers" / "minimind")},
        "distributed": {"num_workers": 2, "cpus_per_worker": 1, "zero_stage": zero_stage, **distributed},
        "checkpoint": {"storage_path": str(tmp_path / "runs"), "keep": 2},
        "preference": preference,
    }


def separable_pairs(path: Path, n: int) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            record = {"conversations": [{"from": "human", "value": f"{QUESTIONS[i % len(QUESTIONS)]}（第{i}次）"}],
                      "chosen": "好的，请多喝水，注意休息。", "rejected": "不。"}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def stage_records(config) -> list[dict]:
    return read_metrics(RunLayout.of(config).logs("preference"))


def full_zero3_on_real_pairs(tmp_path: Path, shared: Path, loss: str):
    """(config, result) of full fine-tuning under ZeRO-3 with `loss` on 44 of MedicalGPT's pairs, 2 epochs."""
    tree = make_config(tmp_path, shared, 3, {
        "data": {"sources": [{"path": str(shared / "preference" / "dpo_zh_500.jsonl"), "max_records": 44}],
                 "max_length": 128, "eval_split": 0.1},
        "train": {"method": "full", "loss": loss, "beta": 0.1, "learning_rate": 3e-3, "epochs": 2,
                  "micro_batch_size": 4, "warmup_steps": 0, "log_every_n_steps": 1, "precision": "fp32"},
    })
    config = config_from_dict(tree)
    return config, run_stage(config, "preference")


def test_lora_dpo_zero2_learns_survives_a_crash_and_exports(ray_cluster, tmp_path, shared_data):
    from transformers import AutoModelForCausalLM

    data = separable_pairs(tmp_path / "pairs.jsonl", 50)
    tree = make_config(tmp_path, shared_data, 2, {
        "data": {"sources": [{"path": str(data)}], "max_length": 96, "eval_split": 0.2},
        "train": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "loss": "sigmoid", "beta": 0.1,
                  "learning_rate": 1e-2, "epochs": 2, "micro_batch_size": 4, "warmup_steps": 0,
                  "log_every_n_steps": 1, "precision": "fp32", "fail_at_step": 2},
    }, max_failures=1)
    tree["checkpoint"]["every_n_steps"] = 2
    config = config_from_dict(tree)
    result = run_stage(config, "preference")

    records = stage_records(config)
    assert [r["step"] for r in records if r.get("event") == "resumed"] == [2]  # one restart, from step 2
    trained = sorted({r["step"] for r in records if "train_loss" in r})
    assert trained == list(range(1, 11))  # 40 pairs / 2 workers / 4 per micro-batch = 5 steps per epoch
    assert all("rewards/accuracies" in r and "rewards/margins" in r for r in records if "train_loss" in r)
    evals = sorted((r for r in records if "eval_loss" in r), key=lambda r: r["step"])
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and first["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["eval_rewards/accuracies"] == 0.0 and last["eval_rewards/accuracies"] == 1.0
    assert last["eval_loss"] < 0.5 * first["eval_loss"]
    # the policy's own log-prob margin (chosen − rejected) grew over the starting (reference) model's
    assert (last["eval_logps/chosen"] - last["eval_logps/rejected"]
            > first["eval_logps/chosen"] - first["eval_logps/rejected"] + 1.0)
    assert last["eval_preference_accuracy"] >= first["eval_preference_accuracy"]
    assert result.metrics["eval_rewards/accuracies"] == 1.0

    model = AutoModelForCausalLM.from_pretrained(result.model_uri)  # LoRA merged: a plain model directory
    assert not os.path.exists(os.path.join(result.model_uri, "adapter_config.json"))
    assert model.config.vocab_size >= 6400
    lineage = json.loads(Path(result.model_uri, "lineage.json").read_text(encoding="utf-8"))
    assert lineage["stage"] == "preference" and lineage["data_stats"]["kind"] == "pairs"


def test_full_dpo_zero3_with_a_partitioned_reference_on_real_pairs(ray_cluster, tmp_path, shared_data):
    from transformers import AutoModelForCausalLM

    config, result = full_zero3_on_real_pairs(tmp_path, shared_data, "sigmoid")
    records = stage_records(config)
    steps = sorted((r for r in records if "train_loss" in r), key=lambda r: r["step"])
    assert [r["step"] for r in steps] == list(range(1, 11))  # 40 pairs / 2 workers / 4 = 5 steps per epoch
    assert steps[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == partitioned reference
    second_epoch = steps[5:]  # the same pairs again: the policy now prefers their chosen answers
    assert sum(r["train_loss"] for r in second_epoch) / 5 < math.log(2)
    assert sum(r["rewards/margins"] for r in second_epoch) / 5 > 0
    evals = [r for r in records if "eval_loss" in r]
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    AutoModelForCausalLM.from_pretrained(result.model_uri)


def test_full_orpo_zero3_without_a_reference_on_real_pairs(ray_cluster, tmp_path, shared_data):
    """ORPO (reference-free: NLL of the chosen answer minus beta x log-odds term), full fine-tuning under ZeRO-3 on
    MedicalGPT's pairs: no reference pass, TRL's ORPO metrics per step, the loss falls from the first epoch to the
    second, and the exported model loads."""
    from transformers import AutoModelForCausalLM

    config, result = full_zero3_on_real_pairs(tmp_path, shared_data, "orpo")
    steps = sorted((r for r in stage_records(config) if "train_loss" in r), key=lambda r: r["step"])
    assert [r["step"] for r in steps] == list(range(1, 11))
    for record in steps:
        assert {"nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/accuracies"} <= set(record)
        # loss = nll - beta * log_odds_ratio (log_odds_ratio = mean log sigmoid(.) <= 0)
        assert record["log_odds_ratio"] <= 0
    first_epoch, second_epoch = steps[:5], steps[5:]
    assert sum(r["train_loss"] for r in second_epoch) < sum(r["train_loss"] for r in first_epoch)
    assert sum(r["nll_loss"] for r in second_epoch) < sum(r["nll_loss"] for r in first_epoch)
    AutoModelForCausalLM.from_pretrained(result.model_uri)


def test_lora_kto_zero2_on_unpaired_answers_learns_the_labels(ray_cluster, tmp_path, shared_data):
    """KTO with the pairs split into desirable and undesirable answers, LoRA under ZeRO-2, 2 workers: the KL
    reference point is logged (>= 0, one value for the batch of both workers) and the held-out reward accuracy
    (a reward of the label's sign) rises from the starting model's."""
    data = separable_pairs(tmp_path / "pairs.jsonl", 40)
    tree = make_config(tmp_path, shared_data, 2, {
        "data": {"sources": [{"path": str(data)}], "max_length": 96, "eval_split": 0.2},
        "train": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "loss": "kto", "beta": 0.1,
                  "learning_rate": 1e-2, "epochs": 1, "micro_batch_size": 4, "warmup_steps": 0,
                  "log_every_n_steps": 1, "precision": "fp32"},
    })
    config = config_from_dict(tree)
    run_stage(config, "preference")
    records = stage_records(config)
    steps = [r for r in records if "train_loss" in r]
    assert steps and all(r["kl"] >= 0 and math.isfinite(r["kl"]) for r in steps)
    evals = sorted((r for r in records if "eval_loss" in r), key=lambda r: r["step"])
    assert evals[0]["step"] == 0 and evals[-1]["step"] > 0
    assert evals[-1]["eval_rewards/accuracies"] > evals[0]["eval_rewards/accuracies"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
