"""Sweep search spaces and results without Ray: validation, trial configs, resources, tables, best config."""

from __future__ import annotations

import csv
import io
import random

import numpy as np
import pytest
import yaml

from orchestrator.config import SEARCH_PARAMETER_KEYS, SearchSpaceConfig, config_from_dict, load_config
from orchestrator.errors import ConfigError
from orchestrator.tune.results import (
    TrialRow,
    best_config_tree,
    changed_keys,
    format_table,
    pick_best,
    results_csv,
    sweep_identity,
)
from orchestrator.tune.space import (
    check_sweep,
    concurrent_trials,
    evaluations_upper_bound,
    trial_config,
    trial_overrides,
    trial_resources,
    tune_search_space,
)

LR = {"distribution": "loguniform", "low": 1e-4, "high": 1e-2}


def tree(tune: dict | None = None, **train) -> dict:
    return {
        "run_name": "t",
        "model": {"tiny": {"hidden_size": 64}},
        "tokenizer": {"train": {"vocab_size": 600}},
        "distributed": {"num_workers": 2, "cpus_per_worker": 1.5},
        "checkpoint": {"storage_path": "/tmp/runs"},
        "pretrain": {"data": {"sources": [{"path": "x.txt"}], "eval_split": 0.1},
                     "train": {"method": "full", "epochs": 2, "micro_batch_size": 4, **train}},
        "sft": {"data": {"sources": [{"path": "y.jsonl"}]}, "train": {"method": "lora"}},
        "tune": tune if tune is not None else {"search_space": {"learning_rate": LR}},
    }


def rejected(tune: dict, **train) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(tree(tune, **train), "sweep.yaml")
    return str(info.value)


def test_negative_learning_rate_bound_is_rejected_naming_the_key():
    message = rejected({"search_space": {"learning_rate": {"distribution": "loguniform", "low": -1e-3, "high": 1e-2}}})
    assert "tune.search_space.learning_rate.low: must be > 0 (got -0.001)" in message
    assert "sweep.yaml" in message


def test_unknown_parameter_is_rejected_listing_the_allowed_ones():
    message = rejected({"search_space": {"lr": LR}})
    assert "tune.search_space.lr: unknown key; allowed keys here: " in message
    assert all(name in message for name in SEARCH_PARAMETER_KEYS)
    assert "tune.stage_search_space.sft.lr: unknown key" in rejected({"stage_search_space": {"sft": {"lr": LR}}})


@pytest.mark.parametrize("space, expected", [
    ({"epochs": {"values": [0, 2]}}, "tune.search_space.epochs.values: every value must be >= 1; 0 does not"),
    ({"epochs": {"values": [1.5]}}, "tune.search_space.epochs.values: every value must be a whole number"),
    ({"epochs": {"distribution": "uniform", "low": 1, "high": 3}},
     "tune.search_space.epochs: distribution uniform does not fit this parameter; use one of int, choice"),
    ({"warmup_ratio": {"distribution": "uniform", "low": 0.0, "high": 1.0}},
     "tune.search_space.warmup_ratio.high: must be < 1"),
    ({"learning_rate": {"distribution": "loguniform", "low": 1e-2, "high": 1e-4}},
     "tune.search_space.learning_rate: low (0.01) must be below high (0.0001)"),
    ({"weight_decay": {"distribution": "loguniform", "low": 0, "high": 0.1}},
     "tune.search_space.weight_decay: a loguniform range needs low > 0"),
    ({"learning_rate": {"low": 1e-4, "high": 1e-2}}, "tune.search_space.learning_rate: set `distribution`"),
    ({"lora_r": {"distribution": "int", "low": 4, "high": 16, "values": [8]}},
     "tune.search_space.lora_r: a int range needs `low` and `high` (and no values)"),
    ({"micro_batch_size": {"values": []}}, "tune.search_space.micro_batch_size.values: must list at least one value"),
])
def test_bad_dimensions_name_their_key(space, expected):
    assert expected in rejected({"search_space": space})


def test_swept_stages_must_exist_and_not_also_be_reused():
    config = tree({"stages": ["sft"], "search_space": {"learning_rate": LR}})
    del config["sft"]
    with pytest.raises(ConfigError, match="tune.stages names sft, but the config has no such stage section"):
        config_from_dict(config)
    assert "both name pretrain" in rejected({"stages": ["pretrain"], "reuse_best": ["pretrain"]})


def test_dimensions_keep_integers_and_infer_choice():
    space = SearchSpaceConfig.model_validate({"epochs": {"values": [2, 3.0]}, "lora_r": {"distribution": "int",
                                                                                         "low": 4, "high": 16}})
    assert space.epochs.distribution == "choice" and space.epochs.values == [2, 3]
    assert all(isinstance(v, int) for v in space.epochs.values)
    assert list(space.dimensions()) == ["epochs", "lora_r"]


def check(tune: dict, storage: dict | None = None, stage: str = "pretrain", **train) -> None:
    raw = tree(tune, **train)
    if storage is not None:
        raw.update(storage)
    check_sweep(config_from_dict(raw), stage)


@pytest.mark.parametrize("tune, train, expected", [
    ({}, {}, "tune.search_space is empty"),
    ({"search_space": {"lora_r": {"values": [4, 8]}}}, {}, "tune.search_space.lora_r: pretrain.train.method is full"),
    ({"search_space": {"warmup_ratio": {"distribution": "uniform", "low": 0, "high": 0.2}}}, {"warmup_steps": 3},
     "tune.search_space.warmup_ratio has no effect: pretrain.train.warmup_steps is set"),
    ({"search_space": {"gradient_accumulation_steps": {"values": [1, 2]}}}, {"global_batch_size": 16},
     "gradient_accumulation_steps has no effect"),
])
def test_sweeps_that_cannot_work_are_rejected_before_they_start(tune, train, expected):
    with pytest.raises(ConfigError, match=expected):
        check(tune, **train)


def test_sweep_needs_held_out_data_and_no_secrets_in_remote_state():
    raw = tree()
    raw["pretrain"]["data"]["eval_split"] = 0
    with pytest.raises(ConfigError, match="needs held-out data: set pretrain.data.eval_split > 0"):
        check_sweep(config_from_dict(raw), "pretrain")
    remote = {"checkpoint": {"storage_path": "s3://b/runs"},
              "storage": {"s3": {"access_key_id": "AKIA", "secret_access_key": "s3cr3t"}}}
    with pytest.raises(ConfigError, match="AWS default chain") as info:
        check({"search_space": {"learning_rate": LR}}, remote)
    assert "s3cr3t" not in str(info.value)
    check({"search_space": {"learning_rate": LR}}, {"checkpoint": {"storage_path": "s3://b/runs"}})  # chain: fine


def test_stage_search_space_replaces_the_shared_one():
    config = config_from_dict(tree({"search_space": {"learning_rate": LR},
                                    "stage_search_space": {"sft": {"lora_r": {"values": [4, 8]}}}}))
    assert list(config.tune.space_for("pretrain").dimensions()) == ["learning_rate"]
    assert list(config.tune.space_for("sft").dimensions()) == ["lora_r"]
    check_sweep(config, "sft")  # lora_r is fine for a LoRA stage
    with pytest.raises(ConfigError, match="tune.stage_search_space.sft is empty"):
        check_sweep(config_from_dict(tree({"search_space": {"learning_rate": LR},
                                           "stage_search_space": {"sft": {}}})), "sft")


def test_trial_values_arrive_through_dotted_overrides():
    config = config_from_dict(tree())
    params = {"learning_rate": np.float64(1e-5), "epochs": np.int64(3), "lora_r": 12}
    assert trial_overrides("sft", params) == ["sft.train.epochs=3", "sft.train.learning_rate=1e-05",
                                              "sft.train.lora.r=12"]
    trial = trial_config(config, "sft", params)
    assert trial.sft.train.learning_rate == 1e-5 and trial.sft.train.epochs == 3 and trial.sft.train.lora.r == 12
    assert trial.pretrain == config.pretrain and trial.sft.data == config.sft.data
    with pytest.raises(ConfigError, match="unknown search parameter"):
        trial_overrides("sft", {"dropout": 0.1})


def test_tune_distributions_cover_the_configured_ranges():
    space = {"learning_rate": LR, "epochs": {"distribution": "int", "low": 2, "high": 4},
             "micro_batch_size": {"values": [2, 8]}}
    domains = tune_search_space(config_from_dict(tree({"search_space": space})), "pretrain")
    rng = random.Random(0)
    lrs = [domains["learning_rate"].sample(random_state=np.random.RandomState(rng.randrange(2**31)))
           for _ in range(200)]
    epochs = {int(domains["epochs"].sample(random_state=np.random.RandomState(i))) for i in range(200)}
    batches = {int(domains["micro_batch_size"].sample(random_state=np.random.RandomState(i))) for i in range(50)}
    assert 1e-4 <= min(lrs) and max(lrs) <= 1e-2 and min(lrs) < 1e-3 < max(lrs)
    assert epochs == {2, 3, 4}  # both ends included
    assert batches == {2, 8}


def test_asha_cap_counts_every_evaluation_a_trial_can_report():
    space = {"epochs": {"values": [2, 5]}, "micro_batch_size": {"distribution": "int", "low": 2, "high": 8}}
    config = config_from_dict(tree({"search_space": space}))
    assert evaluations_upper_bound(config, "pretrain", 100) == 5  # one per epoch
    raw = tree({"search_space": space})
    raw["checkpoint"]["every_n_steps"] = 10
    # 100 rows / (2 workers x micro-batch 2) = 25 steps per epoch: checkpoints at 10, 20 + the epoch end.
    assert evaluations_upper_bound(config_from_dict(raw), "pretrain", 100) == 5 * 3


def test_concurrent_trials_never_oversubscribe_the_cluster():
    config = config_from_dict(tree())
    per_trial = trial_resources(config)
    assert per_trial == {"CPU": 3.0}
    assert concurrent_trials({"CPU": 8}, per_trial, None) == 2
    assert concurrent_trials({"CPU": 8}, per_trial, 1) == 1
    assert concurrent_trials({"CPU": 8}, per_trial, 5) == 2
    assert concurrent_trials({"CPU": 6, "GPU": 3}, {"CPU": 2, "GPU": 2}, None) == 1
    with pytest.raises(ConfigError, match="CPU 3 \\(cluster has 2\\)"):
        concurrent_trials({"CPU": 2}, per_trial, None)


def rows() -> list[TrialRow]:
    return [
        TrialRow("a_00000", "TERMINATED", {"learning_rate": 0.001, "epochs": 2}, 5.9, 2, False, 40.0, "/r/a/ck"),
        TrialRow("a_00001", "TERMINATED", {"learning_rate": 0.005, "epochs": 3}, 5.5, 3, False, 50.0, "/r/b/ck"),
        TrialRow("a_00002", "TERMINATED", {"learning_rate": 0.0003, "epochs": 3}, 6.2, 1, True, 12.0, "/r/c/ck"),
        TrialRow("a_00003", "ERROR", {"learning_rate": 0.002, "epochs": 2}, None, 0, False, 3.0, None, "boom"),
    ]


def test_best_trial_table_and_csv():
    assert pick_best(rows(), "min").trial_id == "a_00001"
    assert pick_best(rows(), "max").trial_id == "a_00002"
    with pytest.raises(ConfigError, match="no trial of the sweep reported the metric"):
        pick_best(rows()[3:], "min")
    table = format_table(rows(), "eval_loss").splitlines()
    assert table[0].split() == ["trial", "status", "epochs", "learning_rate", "best", "eval_loss", "epochs", "run",
                                "stopped", "early", "wall", "s"]
    assert table[3].split() == ["a_00002", "TERMINATED", "3", "0.0003", "6.2", "1", "yes", "12.0"]
    parsed = list(csv.DictReader(io.StringIO(results_csv(rows(), "eval_loss"))))
    assert [r["best_eval_loss"] for r in parsed] == ["5.9", "5.5", "6.2", ""]
    assert parsed[3]["error"] == "boom" and parsed[2]["stopped_early"] == "True"


def test_best_config_is_the_full_config_with_the_best_values(tmp_path):
    raw = tree({"stages": ["pretrain"], "search_space": {"learning_rate": LR}})
    raw["storage"] = {"s3": {"access_key_id": "AKIA", "secret_access_key": "s3cr3t"}}
    config = config_from_dict(raw)
    best = best_config_tree(config, "pretrain", {"learning_rate": 0.0042, "epochs": 3})
    text = yaml.safe_dump(best)
    assert "s3cr3t" not in text and "****" not in text
    path = tmp_path / "best.yaml"
    path.write_text(text)
    loaded = load_config(path)
    assert loaded.pretrain.train.learning_rate == 0.0042 and loaded.pretrain.train.epochs == 3
    assert loaded.tune.stages == []  # runs directly, no new sweep
    assert loaded.sft == config.sft and loaded.model == config.model and loaded.distributed == config.distributed


def test_sweep_identity_ignores_what_the_sweep_does_not_train():
    base = config_from_dict(tree({"search_space": {"learning_rate": LR}}))
    other_stage = config_from_dict(tree({"search_space": {"learning_rate": LR}, "stages": ["pretrain"],
                                         "stage_search_space": {"sft": {"lora_r": {"values": [4]}}}}))
    assert changed_keys(sweep_identity(base, "pretrain"), sweep_identity(other_stage, "pretrain")) == []
    more = config_from_dict(tree({"search_space": {"learning_rate": LR}, "num_samples": 16}, epochs=4))
    assert changed_keys(sweep_identity(base, "pretrain"), sweep_identity(more, "pretrain")) == [
        "trained.pretrain.train.epochs", "tune.num_samples"]
    older = sweep_identity(base, "pretrain")
    del older["trained"]["pretrain"]["train"]["seed"]  # a record written before a setting existed
    assert changed_keys(older, sweep_identity(base, "pretrain")) == []


def test_cli_rejects_a_bad_search_space_before_starting_ray(tmp_path, capsys):
    import ray

    from orchestrator.cli.main import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tree({"search_space": {"learning_rate": {"distribution": "loguniform",
                                                                             "low": -1, "high": 1}}})))
    assert main(["tune", "--config", str(path)]) == 2
    assert "tune.search_space.learning_rate.low: must be > 0" in capsys.readouterr().err
    path.write_text(yaml.safe_dump(tree({"search_space": {"lora_r": {"values": [4, 8]}}})))
    assert main(["tune", "--config", str(path), "--stage", "pretrain"]) == 2
    assert "tune.search_space.lora_r: pretrain.train.method is full" in capsys.readouterr().err
    assert not ray.is_initialized()
