"""The two-stage pipeline on real data, a real local Ray cluster, 2 workers, DeepSpeed ZeRO-2 and ZeRO-3.

Coverage matrix: ZeRO-3 + LoRA (stage 1) and ZeRO-3 + full (stage 2) in the pipeline test,
ZeRO-2 + full in the resume test, ZeRO-2 + LoRA in the automatic-restart test (which then continues at
another world size).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from orchestrator.config import config_from_dict
from orchestrator.checkpoint import DEEPSPEED_CONFIG, TRAINER_STATE, latest_complete_checkpoint, verify_checkpoint
from orchestrator.errors import CheckpointError
from orchestrator.train.metrics_log import read_metrics
from orchestrator.layout import RunLayout
from orchestrator.pipeline import run_pipeline
from orchestrator.train.stage import run_stage

pytestmark = pytest.mark.integration


def make_config(tmp_path: Path, shared: Path, zero_stage: int, pretrain: dict | None = None,
                sft: dict | None = None, **distributed) -> dict:
    tree = {
        "run_name": "it",
        "model": {"tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "max_position_embeddings": 512}},
        "tokenizer": {"path": str(shared / "tokenizers" / "minimind")},
        "distributed": {"num_workers": 2, "cpus_per_worker": 1, "zero_stage": zero_stage, **distributed},
        "checkpoint": {"storage_path": str(tmp_path / "runs"), "keep": 3},
        "eval": {"max_batches": 4},
    }
    if pretrain is not None:
        tree["pretrain"] = pretrain
    if sft is not None:
        tree["sft"] = sft
    return tree


def pretrain_section(shared: Path, method: str, **train) -> dict:
    return {
        "data": {"sources": [{"path": str(shared / "pretrain" / "legal"), "text_unit": "line", "max_records": 400}],
                 "block_size": 128, "eval_split": 0.05},
        "train": {"method": method, "learning_rate": 3e-3, "epochs": 2, "micro_batch_size": 8,
                  "log_every_n_steps": 5, **train},
    }


def sft_section(shared: Path, method: str, **train) -> dict:
    return {
        "data": {"sources": [
            {"path": str(shared / "sft" / "medical_alpaca.jsonl"), "format": "alpaca", "max_records": 160},
            {"path": str(shared / "multiturn" / "medical_history.json"), "format": "alpaca", "max_records": 40},
        ], "max_length": 192, "eval_split": 0.1},
        "train": {"method": method, "learning_rate": 3e-3, "epochs": 2, "micro_batch_size": 8,
                  "log_every_n_steps": 5, **train},
    }


def eval_losses(config, stage: str) -> list[float]:
    records = read_metrics(RunLayout.of(config).logs(stage))
    evals = [r for r in records if "eval_loss" in r]
    return [r["eval_loss"] for r in sorted(evals, key=lambda r: (r["step"], r["epoch"]))]


def generate_tokens(model_dir: str, n: int = 6) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer("患者发热三天", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return out[0, inputs["input_ids"].shape[1]:]


def test_pipeline_lora_then_full_under_zero3(ray_cluster, tmp_path, shared_data):
    """Stage 1 LoRA → merged → stage 2 full fine-tuning, both under ZeRO-3, on statutes and medical SFT."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = config_from_dict(make_config(tmp_path, shared_data, 3, pretrain_section(shared_data, "lora"),
                                          sft_section(shared_data, "full")))
    result = run_pipeline(config)
    assert [s.stage for s in result.stages] == ["pretrain", "sft"]

    for stage in ("pretrain", "sft"):
        losses = eval_losses(config, stage)
        assert len(losses) == 3, losses  # before training + 2 epochs
        assert losses[-1] < losses[0], f"{stage}: eval loss did not fall: {losses}"
        assert len(generate_tokens(os.path.join(RunLayout.of(config).root, "models", stage))) == 6

    # ZeRO-3 LoRA checkpoint: the adapter holds the real gathered tensors, and they were trained.
    stage1 = result.stages[0]
    manifest = verify_checkpoint(stage1.checkpoint_uri, check_hashes=True)
    assert manifest["trainer_state"]["global_step"] > 0
    adapter = load_file(os.path.join(stage1.checkpoint_uri, "model", "adapter_model.safetensors"))
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.numel() > 0 for t in adapter.values())
    assert any(t.abs().sum() > 0 for t in lora_b), "LoRA B matrices are still zero: nothing was saved/trained"

    # The exported stage-1 model equals base + adapter.
    base_dir = os.path.join(RunLayout.of(config).root, "base")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                          os.path.join(stage1.checkpoint_uri, "model")).eval()
    merged = AutoModelForCausalLM.from_pretrained(stage1.model_uri).eval()
    ids = torch.tensor([[5, 17, 300, 1200, 42, 7]])
    with torch.no_grad():
        diff = (reference(ids).logits - merged(ids).logits).abs().max().item()
    assert diff < 1e-4, diff

    # ZeRO-3 full fine-tuning: the checkpoint's model is consolidated (full shapes), not shards.
    sft_model = AutoModelForCausalLM.from_pretrained(os.path.join(result.stages[1].checkpoint_uri, "model"))
    assert sft_model.model.embed_tokens.weight.shape == (6400, 64)


def test_killed_run_resumes_from_its_checkpoint(ray_cluster, mlflow_server, tmp_path, shared_data):
    """ZeRO-2 full: the run dies after its step-2 checkpoint; running it again continues at step 3, on exactly
    the rows an uninterrupted run trains after that point (row ids), in the same MLflow and W&B (offline) runs."""
    tree = make_config(tmp_path, shared_data, 2, pretrain=pretrain_section(shared_data, "full", log_every_n_steps=1,
                                                                           log_row_ids=True))
    tree["checkpoint"]["every_n_steps"] = 2
    mlflow_uri = mlflow_server  # a real tracking server (SQLite backend, artifacts over HTTP)
    tree["tracking"] = {"mlflow": {"tracking_uri": mlflow_uri, "experiment": "killed-run"},
                        "wandb": {"project": "it", "mode": "offline", "dir": str(tmp_path / "wandb")}}
    tree["storage"] = {"s3": {"secret_access_key": "not-for-params"}}
    failing = config_from_dict({**tree, "pretrain": {**tree["pretrain"],
                                                     "train": {**tree["pretrain"]["train"], "fail_at_step": 3}}})
    with pytest.raises(Exception, match="fault injection"):
        run_stage(failing, "pretrain")
    stage_dir = os.path.join(RunLayout.of(failing).root, "pretrain")
    first = latest_complete_checkpoint(stage_dir)
    assert first is not None and first.endswith("checkpoint_step00000002")

    config = config_from_dict(tree)
    result = run_stage(config, "pretrain")
    records = read_metrics(RunLayout.of(config).logs("pretrain"))
    resumed = [i for i, r in enumerate(records) if r.get("event") == "resumed"]
    assert len(resumed) == 1 and records[resumed[0]]["step"] == 2
    steps_after = [r["step"] for r in records[resumed[0]:] if "train_loss" in r]
    assert steps_after[0] == 3, steps_after  # steps 1-2 are not trained again
    steps_per_epoch = max(r["step"] for r in records if r.get("epoch") == 1 and "eval_loss" in r)
    with open(os.path.join(result.checkpoint_uri, TRAINER_STATE)) as handle:
        assert json.load(handle)["global_step"] == 2 * steps_per_epoch
    assert_resumed_on_the_same_rows(config, resumed_at_micro=2)
    assert_tracked(config, mlflow_uri, tmp_path / "wandb", 2 * steps_per_epoch)


def assert_resumed_on_the_same_rows(config, resumed_at_micro: int) -> None:
    """Each worker's row log: the killed attempt trained the order of (seed, epoch 0) from its start, the resumed
    attempt that same order from the checkpoint's micro-batch on, then epoch 1: together exactly the rows of an
    uninterrupted run, in its order (the micro-batches after the checkpoint are trained again, the same rows)."""
    from orchestrator.data.epoch_order import worker_row_ids
    from orchestrator.data.shards import complete_sets
    from orchestrator.train.recipe import schedule_for

    train = config.pretrain.train
    [manifest] = complete_sets(RunLayout.of(config).data("pretrain"))
    counts = [s.rows for s in manifest.part("train")]
    per_epoch = schedule_for(sum(counts), 2, train.micro_batch_size, train.accumulation_steps(2),
                             train.epochs).micro_batches_per_epoch
    for rank in (0, 1):
        lines = Path(RunLayout.of(config).logs("pretrain"), f"rows-{rank}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
        assert len(starts) == 2 and records[starts[1]]["micro_step_in_epoch"] == resumed_at_micro
        killed, resumed = records[starts[0] + 1:starts[1]], records[starts[1] + 1:]
        assert [(r["epoch"], r["micro"]) for r in resumed] == (
            [(0, m) for m in range(resumed_at_micro, per_epoch)] + [(1, m) for m in range(per_epoch)])
        for epoch in (0, 1):
            expected = worker_row_ids(counts, train.seed, epoch, 2, rank, 0, per_epoch * train.micro_batch_size)
            trained = [i for r in resumed if r["epoch"] == epoch for i in r["ids"]]
            if epoch == 0:
                before = [i for r in killed if r["micro"] < resumed_at_micro for i in r["ids"]]
                assert [i for r in killed for i in r["ids"]] == expected[:len(killed) * train.micro_batch_size].tolist()
                trained = before + trained
            assert trained == expected.tolist(), (rank, epoch)


def assert_tracked(config, mlflow_uri: str, wandb_dir: Path, last_step: int) -> None:
    """Both runs of the killed and the resumed attempt went to one MLflow run and one W&B run id."""
    from mlflow.tracking import MlflowClient

    ids = json.loads(Path(RunLayout.of(config).tracking).read_text())
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("killed-run").experiment_id])
    assert [run.info.run_id for run in runs] == [ids["mlflow_run_id"]]
    run = runs[0]
    assert run.data.params["pretrain.train.method"] == "full"
    assert run.data.params["storage.s3.secret_access_key"] == "**********"
    assert "not-for-params" not in json.dumps(run.data.params)
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "pretrain/train_loss")}
    assert steps == set(range(1, last_step + 1))  # steps 1-2 from the killed attempt, the rest resumed
    assert client.get_metric_history(run.info.run_id, "pretrain/eval_loss")
    assert [a.path for a in client.list_artifacts(run.info.run_id, "lineage/pretrain")] == [
        "lineage/pretrain/lineage.json"]
    # W&B offline: every attempt writes a run directory for the same run id, with the same metrics.
    logged = [item for run_file in wandb_dir.glob(f"wandb/offline-run-*-{ids['wandb_run_id']}/run-*.wandb")
              for item in wandb_history(run_file)]
    assert {int(float(h["pretrain/step"])) for h in logged if "pretrain/train_loss" in h} == steps


def wandb_history(path: Path) -> list[dict[str, str]]:
    """The history rows of a W&B offline run file (a LevelDB-style log of protobuf records)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, rows, pos, pending, block = path.read_bytes(), [], 7, b"", 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def test_worker_failure_restarts_automatically_then_one_worker_continues(ray_cluster, tmp_path, shared_data):
    """ZeRO-2 LoRA SFT with max_failures=1: a crash at step 2 is absorbed by one restart from the checkpoint. The
    finished 2-worker run then continues for a third epoch with 1 worker (torch.compile on): refused under
    on_world_size_change=fail before a worker starts, continued from its weights under reload_weights."""
    tree = make_config(tmp_path, shared_data, 2, sft=sft_section(shared_data, "lora", log_every_n_steps=1,
                                                                 fail_at_step=2), max_failures=1)
    tree["checkpoint"]["every_n_steps"] = 2
    tree["distributed"]["deepspeed_config"] = {"zero_optimization": {"reduce_bucket_size": 20_000_000}}
    config = config_from_dict(tree)
    first = run_stage(config, "sft")
    records = read_metrics(RunLayout.of(config).logs("sft"))
    assert [r["step"] for r in records if r.get("event") == "resumed"] == [2]
    losses = eval_losses(config, "sft")
    assert losses[-1] < losses[0], losses
    assert len(generate_tokens(first.model_uri)) == 6
    with open(os.path.join(first.checkpoint_uri, TRAINER_STATE)) as handle:
        two_worker = json.load(handle)
    two_worker_steps, steps_per_epoch = two_worker["global_step"], two_worker["global_step"] // 2
    assert two_worker["epoch"] == 2
    with open(os.path.join(first.checkpoint_uri, DEEPSPEED_CONFIG)) as handle:
        saved_ds = json.load(handle)  # the merged DeepSpeed config travels with the checkpoint
    assert saved_ds["zero_optimization"]["reduce_bucket_size"] == 20_000_000 and saved_ds["train_batch_size"] == 16

    one_worker = {**tree, "distributed": {**tree["distributed"], "num_workers": 1}}
    # The continuation runs compiled (graph-capture backend: compiles in seconds on CPU).
    train = {k: v for k, v in tree["sft"]["train"].items() if k != "fail_at_step"}
    one_worker["sft"] = {**tree["sft"], "train": {**train, "epochs": 3, "torch_compile": True,
                                                  "torch_compile_backend": "aot_eager"}}
    refusing = {**one_worker, "checkpoint": {**one_worker["checkpoint"], "on_world_size_change": "fail"}}
    # Refused before a worker starts (the driver reads the latest complete checkpoint's manifest).
    with pytest.raises(CheckpointError, match="written by 2 workers and this run has 1"):
        run_stage(config_from_dict(refusing), "sft")

    config = config_from_dict(one_worker)
    result = run_stage(config, "sft")
    records = read_metrics(RunLayout.of(config).logs("sft"))
    resumed = [r["step"] for r in records if r.get("event") == "resumed"]
    assert resumed == [2, two_worker_steps], resumed
    after = [r["step"] for r in records if "train_loss" in r and r["step"] > two_worker_steps]
    assert after and after[0] == two_worker_steps + 1, after  # the step counter continues
    # Epoch 3 with one worker: every micro-batch of the whole set is this worker's, so twice the steps.
    with open(os.path.join(result.checkpoint_uri, TRAINER_STATE)) as handle:
        final = json.load(handle)
    assert final["epoch"] == 3 and final["global_step"] == after[-1] > two_worker_steps
    assert final["global_step"] - two_worker_steps >= 2 * steps_per_epoch - 1
    assert latest_complete_checkpoint(os.path.join(RunLayout.of(config).root, "sft")) == result.checkpoint_uri
