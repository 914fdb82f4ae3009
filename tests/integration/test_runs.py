"""`orchestrator runs list|show` on a local run root and the same root on moto's S3 server (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator import storage
from orchestrator.checkpoint import TrainerState, file_entries, write_manifest
from orchestrator.cli.main import main
from s3_support import ACCESS_KEY, REGION, SECRET_KEY

pytestmark = pytest.mark.integration
BUCKET = "orchestrator-test"


def _checkpoint(stage_dir: Path, step: int, eval_loss: float, complete: bool = True) -> None:
    root = stage_dir / f"checkpoint_step{step:08d}"
    (root / "model").mkdir(parents=True)
    (root / "model" / "model.safetensors").write_bytes(b"\0" * 4096)
    if complete:
        write_manifest(str(root), file_entries(str(root)),
                       TrainerState(epoch=1, global_step=step, metrics={"eval_loss": eval_loss}), {})


def make_runs(root: Path) -> None:
    """alpha: pretrain done (2 checkpoints, model), sft swept, one sft checkpoint cut off; empty: nothing."""
    run = root / "alpha"
    _checkpoint(run / "pretrain", 4, 2.5)
    _checkpoint(run / "pretrain", 8, 2.0)
    _checkpoint(run / "sft", 2, 1.0, complete=False)
    (run / "models" / "pretrain").mkdir(parents=True)
    (run / "models" / "pretrain" / "lineage.json").write_text(json.dumps({
        "stage": "pretrain", "base_model": "runs/alpha/base", "tokenizer": "tok", "git_revision": "abc123",
        "checkpoint": str(run / "pretrain" / "checkpoint_step00000008"), "metrics": {"step": 8, "eval_loss": 2.0},
        "data_files": {"notes.txt": "0" * 64}}))
    (run / "tune" / "sft").mkdir(parents=True)
    (run / "tune" / "sft" / "results.json").write_text(json.dumps({"best": {"trial_id": "t0002",
                                                                          "params": {"learning_rate": 0.001}}}))
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("not a run")


def check_listing(capsys, root: str, *config: str) -> None:
    assert main(["runs", "list", root, *config]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split()[:2] == ["run", "stages"]
    assert lines[1].split() == ["alpha", "pretrain,sft", "pretrain", "2.0000", "pretrain/checkpoint_step00000008",
                                "models/pretrain", "sft", "t0002"]
    assert main(["runs", "list", root, "--json", *config]) == 0
    (alpha,) = json.loads(capsys.readouterr().out)
    pretrain, sft = alpha["stages"]
    assert (pretrain["done"], pretrain["best_eval_loss"], pretrain["steps"]) == (True, 2.0, 8)
    assert pretrain["latest_complete_checkpoint"].endswith("alpha/pretrain/checkpoint_step00000008")
    assert sft["done"] is False and sft["latest_complete_checkpoint"] is None
    assert sft["checkpoints"][0]["complete"] is False and sft["sweep_best"]["trial_id"] == "t0002"

    assert main(["runs", "show", f"{root}/alpha", *config]) == 0
    shown = capsys.readouterr().out
    assert "pretrain: done, 8 steps" in shown and "sft: not exported" in shown
    assert "fingerprint " in shown and "git_revision abc123" in shown and "metrics      step 8, eval_loss 2" in shown
    assert "checkpoint_step00000004  step 4  eval_loss 2.5000" in shown
    assert "checkpoint_step00000002  step None  no eval" in shown and "INCOMPLETE (no manifest.json" in shown
    assert "sweep best   t0002 {'learning_rate': 0.001}" in shown
    assert main(["runs", "show", f"{root}/nothing-here", *config]) == 1


def test_runs_list_and_show_on_a_local_root(tmp_path, capsys):
    make_runs(tmp_path / "runs")
    check_listing(capsys, str(tmp_path / "runs"))


def test_runs_list_and_show_on_s3(s3_server, tmp_path, capsys):
    make_runs(tmp_path / "runs")
    config = tmp_path / "s3.yaml"
    config.write_text(yaml.safe_dump({"model": {"tiny": {}}, "tokenizer": {"train": {}}, "storage": {"s3": {
        "endpoint_url": s3_server.endpoint, "region": REGION, "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY}}}))
    storage.configure(storage.S3Settings(endpoint_url=s3_server.endpoint, region=REGION, access_key_id=ACCESS_KEY,
                                         secret_access_key=SECRET_KEY))
    storage.upload_dir(str(tmp_path / "runs"), f"s3://{BUCKET}/glance")
    check_listing(capsys, f"s3://{BUCKET}/glance", "--config", str(config))


def test_the_driver_log_of_a_remote_run_is_kept_with_the_run(s3_server, capsys):
    """On S3 the driver log is written in local scratch; when the command ends, failed or not, it is
    copied to <run>/logs/driver-<time>-<pid>.log, which the closing summary names."""
    import logging

    from orchestrator.cli.output import configure_output, outputs_summary, remote_driver_log, run_log
    from orchestrator.layout import RunLayout

    storage.configure(storage.S3Settings(endpoint_url=s3_server.endpoint, region=REGION, access_key_id=ACCESS_KEY,
                                         secret_access_key=SECRET_KEY))
    layout = RunLayout(f"s3://{BUCKET}/logged", "failing")
    restore = configure_output(verbose=False)  # as the CLI's main does
    try:
        with pytest.raises(RuntimeError):
            with run_log(layout):
                logging.getLogger("orchestrator.train").info("pretrain: fitting with 2 workers")
                raise RuntimeError("the worker group died")
    finally:
        restore()
    target = remote_driver_log(layout)
    assert target.startswith(f"s3://{BUCKET}/logged/failing/logs/driver-")
    assert "pretrain: fitting with 2 workers" in storage.read_bytes(target).decode("utf-8")
    assert f"logs        {target}  (metrics.jsonl, TensorBoard and worker logs travel in each checkpoint)" \
        in outputs_summary(layout)
