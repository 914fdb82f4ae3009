"""A run checkpointed by 2 workers continues with 1 worker (real Ray Train, DeepSpeed ZeRO-2, LoRA, torch.compile)."""

from __future__ import annotations

import json
import os

import pytest

from orchestrator.config import config_from_dict
from orchestrator.checkpoint import DEEPSPEED_CONFIG, TRAINER_STATE, latest_complete_checkpoint
from orchestrator.train.metrics_log import read_metrics
from orchestrator.layout import RunLayout
from orchestrator.train.stage import TrainingFailed, run_stage
from test_pipeline import make_config, sft_section

pytestmark = pytest.mark.integration


def test_two_workers_checkpoint_then_one_worker_continues(ray_cluster, tmp_path, shared_data):
    tree = make_config(tmp_path, shared_data, 2, sft=sft_section(shared_data, "lora", epochs=1, log_every_n_steps=1))
    tree["distributed"]["deepspeed_config"] = {"zero_optimization": {"reduce_bucket_size": 20_000_000}}
    first = run_stage(config_from_dict(tree), "sft")
    with open(os.path.join(first.checkpoint_uri, TRAINER_STATE)) as handle:
        two_worker_steps = json.load(handle)["global_step"]
    with open(os.path.join(first.checkpoint_uri, DEEPSPEED_CONFIG)) as handle:
        saved_ds = json.load(handle)  # the merged DeepSpeed config travels with the checkpoint
    assert saved_ds["zero_optimization"]["reduce_bucket_size"] == 20_000_000 and saved_ds["train_batch_size"] == 16

    one_worker = {**tree, "distributed": {**tree["distributed"], "num_workers": 1}}
    # The continuation also runs compiled (graph-capture backend: compiles in seconds on CPU).
    one_worker["sft"] = {**tree["sft"], "train": {**tree["sft"]["train"], "epochs": 2, "torch_compile": True,
                                                  "torch_compile_backend": "aot_eager"}}
    refusing = {**one_worker, "checkpoint": {**one_worker["checkpoint"], "on_world_size_change": "fail"}}
    with pytest.raises(TrainingFailed, match="written by 2 workers and this run has 1"):
        run_stage(config_from_dict(refusing), "sft")

    config = config_from_dict(one_worker)
    result = run_stage(config, "sft")
    records = read_metrics(RunLayout.of(config).logs("sft"))
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert [r["step"] for r in resumed] == [two_worker_steps]
    after = [r["step"] for r in records if "train_loss" in r and r["step"] > two_worker_steps]
    assert after and after[0] == two_worker_steps + 1, after  # the step counter continues
    # Epoch 2 with one worker: every micro-batch of the whole set is this worker's, so twice the steps.
    with open(os.path.join(result.checkpoint_uri, TRAINER_STATE)) as handle:
        final = json.load(handle)
    assert final["epoch"] == 2 and final["global_step"] == after[-1] > two_worker_steps
    assert final["global_step"] - two_worker_steps >= 2 * two_worker_steps - 1
    assert latest_complete_checkpoint(os.path.join(RunLayout.of(config).root, "sft")) == result.checkpoint_uri
