"""Which models a run evaluates, `--model` values and the run's loss curves (no Ray)."""

from __future__ import annotations

import pytest

from orchestrator.config import config_from_dict
from orchestrator.errors import ConfigError
from orchestrator.evaluation.runner import ModelSpec, parse_model_arg, run_models, training_curves
from orchestrator.train.metrics_log import MetricsLog
from orchestrator.layout import RunLayout


def _config(tmp_path, **model) -> object:
    return config_from_dict({"run_name": "r", "model": model or {"tiny": {}}, "tokenizer": {"path": "/tok"},
                             "checkpoint": {"storage_path": str(tmp_path)},
                             "pretrain": {"data": {"sources": [{"path": "x"}]}}, "sft": {}})


def test_run_models_in_pipeline_order_and_only_those_that_exist(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        run_models(config)
    for sub, marker in (("base", "config.json"), ("models/sft", "config.json"), ("models/x", "config.json"),
                        ("models/pretrain", "adapter_config.json")):  # prompt-style stages export an adapter
        (tmp_path / "r" / sub).mkdir(parents=True)
        (tmp_path / "r" / sub / marker).write_text("{}")
    assert run_models(config) == [ModelSpec("base", str(tmp_path / "r" / "base")),
                                  ModelSpec("pretrain", str(tmp_path / "r" / "models" / "pretrain")),
                                  ModelSpec("sft", str(tmp_path / "r" / "models" / "sft"))]
    # a configured base model is evaluated with the configured tokenizer
    assert run_models(_config(tmp_path, base="/models/llama"))[0] == ModelSpec("base", "/models/llama", "/tok")


def test_model_arguments_with_and_without_a_name():
    assert parse_model_arg("tuned=s3://b/models/sft") == ModelSpec("tuned", "s3://b/models/sft")
    assert parse_model_arg("runs/x/models/sft/") == ModelSpec("sft", "runs/x/models/sft/")
    assert parse_model_arg("/data/a=b/model v2") == ModelSpec("model_v2", "/data/a=b/model v2")


def test_training_curves_come_from_each_stage_metrics_log(tmp_path):
    config = _config(tmp_path)
    logs = MetricsLog(RunLayout.of(config).logs("pretrain"), "pretrain")
    logs.write(0, {"epoch": 0, "eval_loss": 3.0})
    logs.write(5, {"train_loss": 2.5, "epoch": 1, "step": 5})
    logs.write(5, {"epoch": 1, "step": 5, "eval_loss": 2.0})
    logs.close()
    curves = training_curves(config)  # sft has no logs yet: left out
    assert list(curves) == ["pretrain"]
    assert curves["pretrain"]["train_loss"].steps == (5,)
    assert curves["pretrain"]["eval_loss"].values == (3.0, 2.0)
