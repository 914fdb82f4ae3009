"""The command line: options before or after positionals; the job storage-path guard (orchestrator.runtime)."""

from __future__ import annotations

import json
import logging

import pytest

from orchestrator.cli.parser import build_parser
from orchestrator.config import CheckpointConfig
from orchestrator.errors import ConfigError
from orchestrator.runtime import check_storage_outlives_job


@pytest.mark.parametrize("argv", [
    ["config", "show", "--config", "configs/tiny.yaml", "distributed.zero_stage=3"],  # the README's form
    ["config", "--config", "configs/tiny.yaml", "show", "distributed.zero_stage=3"],
])
def test_config_show_takes_options_before_or_after_the_action(argv):
    args = build_parser().parse_args(argv)
    assert (args.what, args.config, args.overrides) == ("show", "configs/tiny.yaml", ["distributed.zero_stage=3"])


def test_training_commands_take_overrides_around_options():
    args = build_parser().parse_args(["pretrain", "a.b=1", "--config", "x.yaml", "--strict", "c.d=2"])
    assert (args.config, args.strict, args.overrides) == ("x.yaml", True, ["a.b=1", "c.d=2"])
    args = build_parser().parse_args(["k8s", "validate", "one", "--crds", "crds", "two"])
    assert (args.paths, args.crds) == (["one", "two"], "crds")


@pytest.fixture
def in_a_job_with_working_dir(tmp_path, monkeypatch):
    package = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    package.mkdir(parents=True)
    monkeypatch.chdir(package)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}, "metadata": {}}))
    return package


def test_a_relative_storage_path_in_a_job_working_dir_is_refused(in_a_job_with_working_dir):
    with pytest.raises(ConfigError) as info:
        check_storage_outlives_job(CheckpointConfig(storage_path="runs"))
    message = str(info.value)
    assert "checkpoint.storage_path 'runs' resolves to" in message and "_ray_pkg_abc" in message
    assert "s3://" in message and "checkpoint.allow_job_working_dir=true" in message
    with pytest.raises(ConfigError):
        check_storage_outlives_job(CheckpointConfig(storage_path=str(in_a_job_with_working_dir / "out")))


def test_shared_paths_s3_and_the_explicit_setting_pass_in_a_job(in_a_job_with_working_dir, tmp_path, caplog):
    check_storage_outlives_job(CheckpointConfig(storage_path=str(tmp_path / "shared")))
    check_storage_outlives_job(CheckpointConfig(storage_path="s3://bucket/runs"))
    with caplog.at_level(logging.WARNING):
        check_storage_outlives_job(CheckpointConfig(storage_path="runs", allow_job_working_dir=True))
    assert "kept there because checkpoint.allow_job_working_dir=true" in caplog.text


def test_a_relative_storage_path_outside_a_job_or_without_working_dir_passes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    check_storage_outlives_job(CheckpointConfig(storage_path="runs"))
    # A RayJob on KubeRay runs in the image's directory (a mounted volume there), with no working_dir.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}, "metadata": {}}))
    check_storage_outlives_job(CheckpointConfig(storage_path="runs"))


def test_prepare_and_data_inspect_take_stages_and_overrides():
    args = build_parser().parse_args(["prepare", "--config", "x.yaml", "--stage", "sft", "sft.data.block_size=64"])
    assert (args.command, args.stage, args.overrides) == ("prepare", ["sft"], ["sft.data.block_size=64"])
    args = build_parser().parse_args(["data", "inspect", "-c", "x.yaml", "-n", "5", "--part", "eval"])
    assert (args.command, args.action, args.n, args.part, args.stage) == ("data", "inspect", 5, "eval", None)
    with pytest.raises(SystemExit):  # stage 3 prepares in memory: no shard set to prepare or inspect
        build_parser().parse_args(["prepare", "--config", "x.yaml", "--stage", "preference"])
