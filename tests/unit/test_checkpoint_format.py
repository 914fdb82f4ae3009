"""Checkpoint manifests and completeness; the pure helpers of the training loop."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.errors import CheckpointError
from orchestrator.checkpoint import (
    MANIFEST,
    TrainerState,
    check_resume_world_size,
    checkpoint_dir_name,
    file_entries,
    latest_complete_checkpoint,
    read_trainer_state,
    sha256_of,
    verify_checkpoint,
    write_manifest,
    write_trainer_state,
)
from orchestrator.train.recipe import IGNORE_INDEX, Schedule, collate, schedule_for


def _make_checkpoint(root: Path, step: int, complete: bool = True, world_size: int = 2) -> Path:
    ckpt = root / checkpoint_dir_name(step)
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "deepspeed" / "state").mkdir(parents=True)
    (ckpt / "model" / "model.safetensors").write_bytes(b"\x00" * 100 + bytes([step % 256]))
    (ckpt / "model" / "config.json").write_text('{"a": 1}', encoding="utf-8")
    (ckpt / "deepspeed" / "state" / "optim_rank0.pt").write_bytes(b"optimizer state")
    state = TrainerState(epoch=1, micro_step_in_epoch=3, global_step=step, metrics={"loss": 1.5})
    write_trainer_state(str(ckpt), state)
    if complete:
        write_manifest(str(ckpt), file_entries(str(ckpt)), state, {"stage": "sft", "world_size": world_size})
    return ckpt


def test_checkpoint_dir_name():
    assert checkpoint_dir_name(40) == "checkpoint_step00000040"
    assert checkpoint_dir_name(0) == "checkpoint_step00000000"


def test_file_entries_and_manifest(tmp_path):
    ckpt = _make_checkpoint(tmp_path, 40)
    manifest = verify_checkpoint(str(ckpt), check_hashes=True)
    assert sorted(manifest["files"]) == [
        "deepspeed/state/optim_rank0.pt",
        "model/config.json",
        "model/model.safetensors",
        "trainer_state.json",
    ]
    assert manifest["files"]["model/model.safetensors"]["size"] == 101
    assert manifest["files"]["model/config.json"]["sha256"] == sha256_of(ckpt / "model" / "config.json")
    assert manifest["format_version"] == 1
    assert manifest["stage"] == "sft"
    assert manifest["trainer_state"] == {"epoch": 1, "micro_step_in_epoch": 3, "global_step": 40, "metrics": {"loss": 1.5},
                                         "micro_batches_per_epoch": 0}
    assert not (ckpt / (MANIFEST + ".tmp")).exists()
    assert read_trainer_state(str(ckpt)) == TrainerState(1, 3, 40, {"loss": 1.5})
    # the manifest never lists itself
    assert MANIFEST not in file_entries(str(ckpt))


def test_sha256_of_known_value(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"abc")
    assert sha256_of(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_deleted_file_is_named(tmp_path):
    ckpt = _make_checkpoint(tmp_path, 40)
    os.remove(ckpt / "deepspeed" / "state" / "optim_rank0.pt")
    with pytest.raises(CheckpointError) as info:
        verify_checkpoint(str(ckpt))
    assert str(info.value) == (
        f"{ckpt}: incomplete checkpoint: deepspeed/state/optim_rank0.pt is listed in the manifest but missing"
    )


def test_truncated_file_is_named(tmp_path):
    ckpt = _make_checkpoint(tmp_path, 40)
    with open(ckpt / "model" / "model.safetensors", "r+b") as handle:
        handle.truncate(60)
    with pytest.raises(CheckpointError) as info:
        verify_checkpoint(str(ckpt))
    assert str(info.value) == (
        f"{ckpt}: incomplete checkpoint: model/model.safetensors has 60 bytes, manifest says 101"
    )


def test_same_size_corruption_needs_hash_check(tmp_path):
    ckpt = _make_checkpoint(tmp_path, 40)
    (ckpt / "model" / "config.json").write_text('{"a": 2}', encoding="utf-8")
    verify_checkpoint(str(ckpt))  # sizes still match
    with pytest.raises(CheckpointError) as info:
        verify_checkpoint(str(ckpt), check_hashes=True)
    assert str(info.value) == f"{ckpt}: model/config.json does not match its sha256 in the manifest"


def test_directory_without_manifest_is_incomplete(tmp_path):
    ckpt = _make_checkpoint(tmp_path, 40, complete=False)
    with pytest.raises(CheckpointError) as info:
        verify_checkpoint(str(ckpt))
    assert str(info.value) == f"{ckpt}: incomplete checkpoint (no manifest.json; it is written last)"


def test_latest_complete_checkpoint_skips_incomplete_newer(tmp_path):
    _make_checkpoint(tmp_path, 10)
    older = _make_checkpoint(tmp_path, 20)
    _make_checkpoint(tmp_path, 30, complete=False)
    broken = _make_checkpoint(tmp_path, 25)
    os.remove(broken / "model" / "config.json")
    (tmp_path / "not_a_checkpoint").mkdir()
    assert latest_complete_checkpoint(str(tmp_path)) == str(older)


def test_latest_complete_checkpoint_orders_numerically(tmp_path):
    _make_checkpoint(tmp_path, 9)
    newest = _make_checkpoint(tmp_path, 100)
    assert latest_complete_checkpoint(str(tmp_path)) == str(newest)


def test_latest_complete_checkpoint_none(tmp_path):
    assert latest_complete_checkpoint(str(tmp_path / "missing")) is None
    assert latest_complete_checkpoint(str(tmp_path)) is None
    _make_checkpoint(tmp_path, 5, complete=False)
    assert latest_complete_checkpoint(str(tmp_path)) is None


def test_resuming_at_another_world_size_is_refused_before_any_worker_starts(tmp_path):
    _make_checkpoint(tmp_path, 10, world_size=4)
    _make_checkpoint(tmp_path, 20, world_size=2)
    _make_checkpoint(tmp_path, 30, complete=False, world_size=1)  # never the one resumed from
    check_resume_world_size(str(tmp_path), 2, "fail")
    check_resume_world_size(str(tmp_path), 1, "reload_weights")
    check_resume_world_size(str(tmp_path / "fresh"), 1, "fail")  # nothing to resume from
    with pytest.raises(CheckpointError, match=r"checkpoint_step00000020 was written by 2 workers and this run has "
                                              r"1; set checkpoint.on_world_size_change=reload_weights"):
        check_resume_world_size(str(tmp_path), 1, "fail")


# --- pure helpers of the training loop --------------------------------------------------------


def test_schedule_for_arithmetic():
    # 103 rows over 2 workers: 51 each → 12 micro-batches of 4 → 4 steps of 3, all 12 used
    assert schedule_for(103, 2, 4, 3, 2) == Schedule(micro_batches_per_epoch=12, steps_per_epoch=4, total_steps=8)
    # 100 rows, 1 worker, micro 8: 12 micro-batches, accumulation 5 → 2 steps, 10 micro-batches used
    assert schedule_for(100, 1, 8, 5, 3) == Schedule(micro_batches_per_epoch=10, steps_per_epoch=2, total_steps=6)
    assert schedule_for(3, 4, 1, 1, 10) == Schedule(micro_batches_per_epoch=0, steps_per_epoch=0, total_steps=0)
    assert schedule_for(64, 2, 4, 1, 1) == Schedule(micro_batches_per_epoch=8, steps_per_epoch=8, total_steps=8)


def _ragged(rows):
    out = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):
        out[i] = np.asarray(row, dtype=np.int32)
    return out


def test_collate_pads_and_masks_labels():
    batch = {"input_ids": _ragged([[5, 6, 7], [8]]), "labels": _ragged([[-100, 6, 7], [8]])}
    out = collate(batch, pad_id=0, device=torch.device("cpu"))
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(t.dtype == torch.int64 for t in out.values())


def test_collate_without_labels_uses_inputs():
    batch = {"input_ids": np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.int32)}
    out = collate(batch, pad_id=99, device=torch.device("cpu"))
    assert out["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert out["labels"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]


def test_collate_ragged_without_labels_masks_padding():
    out = collate({"input_ids": _ragged([[1], [2, 3]])}, pad_id=7, device=torch.device("cpu"))
    assert out["input_ids"].tolist() == [[1, 7], [2, 3]]
    assert out["labels"].tolist() == [[1, -100], [2, 3]]
