"""Paths a stage hands to its Ray Train workers, which run in a working directory of their own."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import load_config
from orchestrator.train.stage import materialize_base

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_relative_base_model_and_tokenizer_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as in a job: relative to the driver's working directory
    config = load_config(REPO_ROOT / "configs" / "cluster-dev.yaml",
                         ["model.base=runs/cluster-dev/models/pretrain", "model.tiny=null", "tokenizer.path=tok"])
    assert materialize_base(config) == (str(tmp_path / "runs" / "cluster-dev" / "models" / "pretrain"),
                                        str(tmp_path / "tok"))


def test_remote_base_model_is_left_alone():
    config = load_config(REPO_ROOT / "configs" / "cluster-a100.yaml")
    assert materialize_base(config) == ("s3://my-llm-bucket/models/base-7b", None)
