"""Stage 3 in the memory planner (policy + reference) and in sweeps (beta, reward accuracy)."""

from __future__ import annotations

import pytest

from orchestrator.config import load_config
from orchestrator.errors import ConfigError
from orchestrator.plan.planner import plan_stage
from orchestrator.tune.space import check_sweep, trial_config

CONFIG = "configs/tiny-preference.yaml"


def test_full_fine_tuning_counts_a_frozen_reference_and_adapters_do_not(repo_root):
    lora = plan_stage(load_config(repo_root / CONFIG), "preference")
    full = plan_stage(load_config(repo_root / CONFIG, ["preference.train.method=full"]), "preference")
    orpo = plan_stage(load_config(repo_root / CONFIG, ["preference.train.method=full",
                                                       "preference.train.loss=orpo"]), "preference")
    precomputed = plan_stage(load_config(repo_root / CONFIG, ["preference.train.method=full",
                                                              "preference.train.precompute_reference=true"]),
                             "preference")
    assert lora.memory.reference == 0 and orpo.memory.reference == 0 and precomputed.memory.reference == 0
    assert full.memory.reference == pytest.approx(full.counts.total * 4)  # fp32 weights, whole under ZeRO-2
    assert ("reference model (frozen)", full.memory.reference) in full.memory.items()
    zero3 = plan_stage(load_config(repo_root / CONFIG, ["preference.train.method=full",
                                                        "distributed.zero_stage=3"]), "preference")
    assert zero3.memory.reference == pytest.approx(full.memory.reference / 2)  # partitioned over 2 workers
    sft = plan_stage(load_config(repo_root / CONFIG), "sft")
    assert lora.setup.micro_batch == 2 * sft.setup.micro_batch  # chosen + rejected rows


def test_sweeps_over_beta_and_reward_accuracy(repo_root):
    config = load_config(repo_root / CONFIG)
    check_sweep(config, "preference")
    trial = trial_config(config, "preference", {"beta": 0.5, "learning_rate": 0.002})
    assert trial.preference.train.beta == 0.5 and trial.preference.train.learning_rate == 0.002
    with pytest.raises(ConfigError, match="ranks preference sweeps only"):
        check_sweep(load_config(repo_root / CONFIG, ["tune.search_space.epochs={values: [1, 2]}"]), "sft")
    with pytest.raises(ConfigError, match="beta: only the preference stage"):
        check_sweep(load_config(repo_root / CONFIG, ["tune.metric=eval_loss", "tune.mode=min",
                                                     "tune.search_space.beta={values: [0.1]}"]), "sft")
