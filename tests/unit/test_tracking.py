"""Experiment tracking without Ray: MLflow's client on a local file store (orchestrator.tracking)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.layout import RunLayout
from orchestrator.tracking import flat_params, log_files, numeric_metrics, start_tracking
from orchestrator.train.metrics_log import MetricsLog

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def test_params_are_the_resolved_config_with_secrets_masked():
    config = load_config(TINY, ["storage.s3.secret_access_key=hunter2", "sft.train.lora.r=8"])
    params = flat_params(config)
    assert params["sft.train.lora.r"] == "8" and params["run_name"] == "tiny-demo"
    assert params["storage.s3.secret_access_key"] == "**********"
    assert not any("hunter2" in value for value in params.values())
    assert json.loads(params["sft.train.lora.target_modules"]) == config.sft.train.lora.target_modules


def test_metrics_are_the_numbers_keyed_by_stage():
    assert numeric_metrics("sft", {"train_loss": 1.5, "step": 3, "event": "resumed", "ok": True, "epoch": 1}) == {
        "sft/train_loss": 1.5, "sft/epoch": 1.0}


def test_tracking_is_off_by_default():
    assert start_tracking(load_config(TINY)) is None


def test_mlflow_run_gets_params_metrics_artifacts_and_is_continued(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    config = load_config(TINY, [f"checkpoint.storage_path={tmp_path / 'runs'}", f"tracking.mlflow.tracking_uri={uri}",
                                "tracking.mlflow.experiment=unit", "storage.s3.secret_access_key=hunter2"])
    target = start_tracking(config)
    logs = MetricsLog(str(tmp_path / "logs"), "pretrain", target)
    for step, loss in ((1, 2.0), (2, 1.5)):
        logs.write(step, {"train_loss": loss, "learning_rate": 1e-3, "epoch": 1, "step": step})
    logs.write(2, {"event": "resumed", "resumed_from": "x"})
    logs.close()
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    log_files(target, [str(report), str(tmp_path / "missing.json")], "eval", {"eval/sft/qa_f1": 0.25})

    client = MlflowClient(uri)
    run = client.get_run(target.mlflow_run_id)
    assert run.info.run_name == "tiny-demo"
    assert client.get_experiment(run.info.experiment_id).name == "unit"
    assert run.data.params["distributed.zero_stage"] == "2"
    assert "hunter2" not in json.dumps(run.data.params)
    history = client.get_metric_history(target.mlflow_run_id, "pretrain/train_loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 2.0), (2, 1.5)]
    assert run.data.metrics["eval/sft/qa_f1"] == 0.25
    assert [a.path for a in client.list_artifacts(target.mlflow_run_id, "eval")] == ["eval/report.md"]
    assert json.loads(Path(RunLayout.of(config).tracking).read_text())["mlflow_run_id"] == target.mlflow_run_id

    again = start_tracking(load_config(TINY, [f"checkpoint.storage_path={tmp_path / 'runs'}",
                                              f"tracking.mlflow.tracking_uri={uri}", "tracking.mlflow.experiment=unit",
                                              "sft.train.epochs=9"]))
    assert again.mlflow_run_id == target.mlflow_run_id  # the same run, continued
    assert client.get_run(target.mlflow_run_id).data.params["sft.train.epochs"] == "3"  # params are immutable

    child = start_tracking(config, RunLayout.of(config).trial("sft", "t1"), parent=target, name="sft-t1")
    child_run = client.get_run(child.mlflow_run_id)
    assert child.mlflow_run_id != target.mlflow_run_id
    assert child_run.data.tags["mlflow.parentRunId"] == target.mlflow_run_id and child_run.info.run_name == "sft-t1"


def test_a_bad_tracking_section_is_refused_with_the_key():
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError, match="tracking.wandb.mode"):
        load_config(TINY, ["tracking.wandb.project=p", "tracking.wandb.mode=sometimes"])
    with pytest.raises(ConfigError, match="tracking.mlfow: unknown key; did you mean 'mlflow'"):
        load_config(TINY, ["tracking.mlfow.tracking_uri=x"])


def test_a_failed_stage_marks_its_mlflow_run_failed_and_a_rerun_running(tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import finish_tracking

    uri = (tmp_path / "mlruns").as_uri()
    overrides = [f"checkpoint.storage_path={tmp_path / 'runs'}", f"tracking.mlflow.tracking_uri={uri}"]
    target = start_tracking(load_config(TINY, overrides))
    finish_tracking(target, failed=True)
    assert MlflowClient(uri).get_run(target.mlflow_run_id).info.status == "FAILED"
    start_tracking(load_config(TINY, overrides))
    assert MlflowClient(uri).get_run(target.mlflow_run_id).info.status == "RUNNING"
