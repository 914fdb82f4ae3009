"""The worker recipe run in this process, without Ray: a LocalTrainContext stands in for Ray Train.

A tiny LLaMA trains for two epochs on real English text (minimind tokenizer, blocks written as a prepared
shard set) under DeepSpeed ZeRO-2 on a one-process gloo group; checkpoints every 2 steps and at epoch ends.
Then a second run resumes from the mid-epoch checkpoint of step 6 and must continue at step 7 with the very
losses and the very rows (ids logged per micro-batch) the first run had.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import CheckpointConfig, DistributedConfig, EvalConfig, ModelConfig, TinyModelConfig, TrainConfig
from orchestrator.model.loading import create_tiny_model, load_tokenizer
from orchestrator import checkpoint as ckpt
from orchestrator.data.epoch_order import worker_row_ids
from orchestrator.data.shards import ShardManifest, read_manifest, shard_name, token_table, write_manifest, write_shard
from orchestrator.train.context import LocalCheckpoint, LocalTrainContext
from orchestrator.train.metrics_log import read_metrics
from orchestrator import progress
from orchestrator.train.recipe import WorkerPlan, run_recipe
from orchestrator.train.trainer import show_progress

BLOCK = 32
TRAIN_ROWS, EVAL_ROWS = 16, 4


@pytest.fixture(scope="module")
def workspace(shared_data, tmp_path_factory):
    """A tiny base model directory and a shard set of blocks of real text (two train shards, one eval shard):
    (base dir, set dir, manifest)."""
    root = tmp_path_factory.mktemp("recipe")
    tokenizer = load_tokenizer(str(shared_data / "tokenizers" / "minimind"))
    base = root / "base"
    create_tiny_model(TinyModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=128), tokenizer, seed=0
                      ).save_pretrained(base)
    tokenizer.save_pretrained(base)
    text = (shared_data / "pretrain" / "english" / "en_article_tail500.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    blocks = [ids[i:i + BLOCK] for i in range(0, (TRAIN_ROWS + EVAL_ROWS) * BLOCK, BLOCK)]
    assert len(blocks[-1]) == BLOCK, "the shared text is too short for this test's blocks"
    arrays = [np.asarray(b, dtype=np.int32) for b in blocks]
    set_dir = str(root / "data")
    written = [write_shard(set_dir, shard_name("train", 0), "train", token_table(arrays[:10])),
               write_shard(set_dir, shard_name("train", 1), "train", token_table(arrays[10:TRAIN_ROWS])),
               write_shard(set_dir, shard_name("eval", 0), "eval", token_table(arrays[TRAIN_ROWS:]))]
    write_manifest(set_dir, ShardManifest("test", "pretrain", tuple(written)))
    return base, set_dir, read_manifest(set_dir)


def _plan(workspace, stage_dir: Path, logs_dir: Path) -> WorkerPlan:
    base, set_dir, manifest = workspace
    train = TrainConfig(method="full", epochs=2, micro_batch_size=2, gradient_accumulation_steps=2,
                        learning_rate=3e-3, warmup_steps=1, log_every_n_steps=1, precision="fp32", log_row_ids=True)
    distributed = DistributedConfig(num_workers=1, zero_stage=2, cpus_per_worker=1)
    return WorkerPlan(
        stage="pretrain", model=ModelConfig(base=str(base)), train=train, distributed=distributed,
        checkpoint=CheckpointConfig(every_n_steps=2, at_epoch_end=True), eval=EvalConfig(at_start=True),
        base_model=str(base), tokenizer=str(base),
        train_rows=TRAIN_ROWS,
        stage_uri=str(stage_dir), logs_dir=str(logs_dir), logs_into_checkpoints=False, has_eval=True,
        shard_set_uri=set_dir, shard_manifest=manifest,
    )


def _context(stage_dir: Path, checkpoint=None) -> LocalTrainContext:
    stage_dir.mkdir(parents=True)
    return LocalTrainContext(storage_dir=str(stage_dir), checkpoint=checkpoint)


def _row_ids(logs_dir: Path) -> dict[tuple[int, int], list[int]]:
    """(epoch, micro-batch) → the row ids trained, from the worker's row log."""
    lines = [json.loads(line) for line in (logs_dir / "rows-0.jsonl").read_text().splitlines()]
    return {(r["epoch"], r["micro"]): r["ids"] for r in lines if "ids" in r}


def _train_losses(logs_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(str(logs_dir)) if "train_loss" in r}


@pytest.fixture(scope="module")
def first_run(process_group, workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("first")
    plan = _plan(workspace, root / "pretrain", root / "logs")
    context = _context(root / "pretrain")
    run_recipe(plan, context)
    return plan, context, root / "logs"


def test_recipe_trains_reports_and_checkpoints_without_ray(first_run):
    plan, context, logs_dir = first_run
    assert plan.schedule_at(1).total_steps == 8  # 16 rows / micro-batch 2 / accumulation 2, two epochs
    # every 2 steps; steps 4 and 8 end an epoch and are saved once, as epoch-end checkpoints
    assert [os.path.basename(r.checkpoint_path) for r in context.reports] == [
        ckpt.checkpoint_dir_name(step) for step in (2, 4, 6, 8)]
    assert [r.metrics["step"] for r in context.reports] == [2, 4, 6, 8]
    for report in context.reports:
        manifest = ckpt.verify_checkpoint(report.checkpoint_path, check_hashes=True)
        assert manifest["world_size"] == 1 and manifest["zero_stage"] == 2
        assert math.isfinite(report.metrics["eval_loss"])
    last = ckpt.read_trainer_state(context.reports[-1].checkpoint_path)
    assert (last.epoch, last.micro_step_in_epoch, last.global_step) == (2, 0, 8)
    mid = ckpt.read_trainer_state(context.reports[2].checkpoint_path)
    assert (mid.epoch, mid.micro_step_in_epoch, mid.global_step) == (1, 4, 6)
    assert os.path.isfile(os.path.join(context.reports[-1].checkpoint_path, ckpt.MODEL_DIR, "model.safetensors"))

    records = read_metrics(str(logs_dir))
    losses = _train_losses(logs_dir)
    assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(v) for v in losses.values())
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert records[0]["step"] == 0 and "eval_loss" in records[0]  # the baseline before training
    assert len(evals) == 5 and all(b < a for a, b in zip(evals, evals[1:])), f"eval loss did not fall: {evals}"
    assert evals[-1] < evals[0] - 0.1
    assert losses[8] < losses[1]
    # every row of the set once per epoch, in the order of (seed, epoch)
    counts = [s.rows for s in plan.shard_manifest.part("train")]
    rows = _row_ids(logs_dir)
    for epoch in (0, 1):
        trained = [i for micro in range(8) for i in rows[(epoch, micro)]]
        assert trained == worker_row_ids(counts, plan.train.seed, epoch, 1, 0).tolist()
        assert sorted(trained) == list(range(TRAIN_ROWS))


def test_each_checkpoint_is_logged_while_saving_and_once_stored_and_shows_on_the_training_bar(first_run):
    _, context, logs_dir = first_run
    records = [r for r in read_metrics(str(logs_dir)) if r.get("event") == "checkpoint"]
    assert [(r["step"], r["checkpoint"]) for r in records] == [
        (step, phase) for step in (2, 4, 6, 8) for phase in ("saving", "uploading")]  # checkpoint.upload: async
    for saved, report in zip(records[1::2], context.reports):
        files = ckpt.verify_checkpoint(report.checkpoint_path)["files"]
        assert saved["checkpoint_mib"] == round(sum(f["size"] for f in files.values()) / 2**20, 1) > 0
        assert saved["checkpoint_seconds"] > 0

    bar = progress.Step("pretrain: train", 8, "step", None)
    show_progress(bar, records[-2])
    assert bar.fields["ckpt"] == "saving step 8…"
    show_progress(bar, records[-1])
    assert bar.fields["ckpt"] == (f"step 8, {records[-1]['checkpoint_mib']} MiB in {records[-1]['checkpoint_seconds']} s"
                                  " (uploading)")
    show_progress(bar, {**records[-1], "checkpoint": "saved"})  # checkpoint.upload: sync
    assert not bar.fields["ckpt"].endswith("(uploading)")
    show_progress(bar, {"step": 6, "event": "resumed", "resumed_from": "x"})
    assert bar.done == 6 and bar.fields["ckpt"] == "resumed from step 6"


def test_resume_continues_at_the_next_step_with_the_same_losses(first_run, workspace, tmp_path):
    _, first_context, first_logs = first_run
    step6 = first_context.reports[2].checkpoint_path
    plan = _plan(workspace, tmp_path / "pretrain", tmp_path / "logs")
    context = _context(tmp_path / "pretrain", checkpoint=LocalCheckpoint(step6))
    run_recipe(plan, context)

    records = read_metrics(str(tmp_path / "logs"))
    assert records[0]["event"] == "resumed" and records[0]["resumed_from"] == step6 and records[0]["step"] == 6
    assert not any(r["step"] == 0 for r in records)  # no baseline eval on resume
    resumed = _train_losses(tmp_path / "logs")
    assert sorted(resumed) == [7, 8]  # skipped the 4 micro-batches of epoch 2 trained before the checkpoint
    # the rows of micro-batches 4-7 of epoch 2, exactly those the uninterrupted run trained
    rows, expected_rows = _row_ids(tmp_path / "logs"), _row_ids(first_logs)
    assert sorted(rows) == [(1, micro) for micro in range(4, 8)]
    assert all(rows[key] == expected_rows[key] for key in rows)
    expected = _train_losses(first_logs)
    for step in (7, 8):  # same data order, RNG, optimizer moments and schedule as the uninterrupted run
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5)
    assert [r.metrics["step"] for r in context.reports] == [8]
    assert json.loads(Path(context.reports[0].checkpoint_path, ckpt.TRAINER_STATE).read_text())["global_step"] == 8


def test_a_worker_derives_its_schedule_from_the_world_size_it_runs_at(workspace, tmp_path):
    """Elastic training restarts at other sizes: the plan carries rows, each worker its own schedule."""
    plan = _plan(workspace, tmp_path / "stage", tmp_path / "logs")
    one, two = plan.schedule_at(1), plan.schedule_at(2)
    assert one.micro_batches_per_epoch == (TRAIN_ROWS // 2) // 2 * 2
    assert two.steps_per_epoch == ((TRAIN_ROWS // 2) // 2) // 2 and one.steps_per_epoch >= 2 * two.steps_per_epoch
    assert one.total_steps == one.steps_per_epoch * plan.train.epochs
