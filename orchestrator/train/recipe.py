"""The per-worker training function that Ray Train runs on every worker.

One readable recipe: build the model (+LoRA), wrap it in DeepSpeed, resume if Ray Train hands us a
checkpoint, then epochs of micro-batches from this worker's Ray Data shard with gradient
accumulation, warm-up + schedule and clipping (DeepSpeed steps both), evaluation each epoch, and
checkpoints reported through `ray.train.report`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict
from functools import partial
from typing import Any, Iterator, Optional

import numpy as np
import torch

from orchestrator import storage
from orchestrator.config import ADAPTER_METHODS, PipelineConfig, config_from_dict
from orchestrator.model.loading import load_tokenizer
from orchestrator import checkpoint as ckpt
from orchestrator.train.deepspeed_config import build_deepspeed_config, resolve_precision
from orchestrator.train.metrics_log import MetricsLog
from orchestrator.train.model_setup import adalora_update, build_training_model

log = logging.getLogger("orchestrator.train")
IGNORE_INDEX = -100


def schedule_for(rows: int, world_size: int, micro_batch_size: int, accumulation: int, epochs: int) -> dict[str, int]:
    """Micro-batches per epoch per worker (a whole number of optimizer steps) and optimizer steps in total.

    Ray Data's equal split gives every worker rows // world_size rows; partial micro-batches and
    partial accumulation windows at the end of an epoch are dropped so every epoch ends on an
    optimizer step and every worker runs the same number of collectives.
    """
    micro = (rows // world_size) // micro_batch_size
    steps_per_epoch = micro // accumulation
    return {
        "micro_batches_per_epoch": steps_per_epoch * accumulation,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": steps_per_epoch * epochs,
    }


def collate(batch: dict[str, np.ndarray], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Pad a numpy batch of token lists to its longest row; labels default to the inputs (stage 1)."""
    rows = batch["input_ids"]
    labels = batch.get("labels")
    longest = max(len(r) for r in rows)
    input_ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    label_ids = np.full((len(rows), longest), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, row in enumerate(rows):
        n = len(row)
        input_ids[i, :n] = row
        label_ids[i, :n] = row if labels is None else labels[i]
        mask[i, :n] = 1
    return {
        "input_ids": torch.from_numpy(input_ids).to(device),
        "attention_mask": torch.from_numpy(mask).to(device),
        "labels": torch.from_numpy(label_ids).to(device),
    }


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _make_scheduler(optimizer: Any, name: str, warmup: int, total: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total, 1))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and norm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _batches(shard: Any, micro_batch_size: int, seed: int, pad_id: int, device: torch.device,
             prebatched: bool) -> Iterator[dict]:
    """This worker's micro-batches for one epoch, shuffled with `seed`.

    `prebatched`: every row already is a micro-batch (length-grouped stage 2 data).
    """
    rows = 1 if prebatched else micro_batch_size
    for batch in shard.iter_batches(
        batch_size=rows,
        batch_format="numpy",
        drop_last=True,
        local_shuffle_buffer_size=max(rows * 16, 256),
        local_shuffle_seed=seed,
    ):
        if prebatched:
            batch = {name: list(column[0]) for name, column in batch.items()}
        yield collate(batch, pad_id, device)


def evaluate(engine: Any, eval_data: Any, micro_batch_size: int, pad_id: int, device: torch.device,
             max_batches: Optional[int]) -> dict[str, float]:
    """Token-weighted mean loss and perplexity on the held-out set (every worker sees all of it)."""
    engine.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(eval_data.iter_batches(batch_size=micro_batch_size, batch_format="numpy")):
            if max_batches is not None and i >= max_batches:
                break
            batch = collate(batch, pad_id, device)
            count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if count == 0:
                continue
            loss_sum += float(engine(**batch).loss.float()) * count
            tokens += count
    engine.train()
    if tokens == 0:
        return {}
    loss = loss_sum / tokens
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": tokens}


def save_hf_model(engine: Any, tokenizer: Any, out_dir: str, zero_stage: int, rank: int, is_adapter: bool) -> None:
    """Hugging Face directory of the current weights: the whole model, or the peft adapter.

    ZeRO-3 keeps only a shard of every parameter per rank, so a plain save_pretrained would write
    empty placeholders. Full weights: DeepSpeed's consolidated state dict (gathered to rank 0 one
    module at a time, so no rank ever holds two full copies). Adapters: the trainable tensors are
    gathered (collective) around peft's save_pretrained. Every rank must call this.
    """
    import deepspeed

    module = engine.module
    if zero_stage == 3 and not is_adapter:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # rank 0 gets the tensors, others {}
        if rank == 0:
            module.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    elif zero_stage == 3:
        trainable = [param for param in module.parameters() if param.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            if rank == 0:
                module.save_pretrained(out_dir, safe_serialization=True)
    elif rank == 0:
        module.save_pretrained(out_dir, safe_serialization=True)
    if rank == 0:
        tokenizer.save_pretrained(out_dir)


def _save_checkpoint(engine: Any, tokenizer: Any, state: ckpt.TrainerState, extra: dict, zero_stage: int,
                     is_adapter: bool, logs: Optional[MetricsLog], metrics: dict) -> None:
    """Write this rank's part of a checkpoint into a temp dir and report it (Ray merges the ranks' dirs)."""
    import ray.train
    import torch.distributed as dist

    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
        save_hf_model(engine, tokenizer, os.path.join(tmp, ckpt.MODEL_DIR), zero_stage, rank, is_adapter)
        engine.save_checkpoint(
            os.path.join(tmp, ckpt.DEEPSPEED_DIR),
            tag=ckpt.DEEPSPEED_TAG,
            client_state={"trainer_state": asdict(state)},
            exclude_frozen_parameters=is_adapter,
        )
        ckpt.save_rng(tmp, rank)
        if rank == 0:
            ckpt.write_trainer_state(tmp, state)
            with open(os.path.join(tmp, ckpt.DEEPSPEED_CONFIG), "w", encoding="utf-8") as handle:
                json.dump(extra["deepspeed_config"], handle, indent=1, sort_keys=True)
            if logs is not None:
                logs.copy_into(tmp)
        # The manifest lists every rank's files and is written last: an upload cut short never verifies.
        files = ckpt.file_entries(tmp)
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, files)
        if rank == 0:
            merged = {k: v for part in gathered for k, v in part.items()}
            ckpt.write_manifest(tmp, merged, state, extra)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=ckpt.checkpoint_dir_name(state.global_step),
        )


def _resume_source(stage_uri: str, cache: str, stack: contextlib.ExitStack) -> tuple[Optional[str], Optional[dict]]:
    """(local directory, manifest) of the checkpoint to resume from, or (None, None) for a fresh start.

    Ray Train's own record first; when it has none (its record can miss a checkpoint that finished
    uploading just before a crash, or the job was resubmitted), the newest manifest-verified
    checkpoint in storage, which is the ground truth.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        root = stack.enter_context(checkpoint.as_directory())
        source = checkpoint.path
    else:
        source = ckpt.latest_complete_checkpoint(stage_uri)
        if source is None:
            return None, None
        root = storage.download_dir(source, os.path.join(cache, "resume"))
    manifest = ckpt.verify_checkpoint(root)
    return root, {**manifest, "source": source}


def continue_with_new_world_size(saved: ckpt.TrainerState, micro_batches_per_epoch: int,
                                 accumulation: int) -> ckpt.TrainerState:
    """Where to continue when the worker count changed: same epoch and step counter, the same share of
    the epoch done (rounded down to a whole optimizer step of the new micro-batch count)."""
    done = saved.micro_step_in_epoch / saved.micro_batches_per_epoch if saved.micro_batches_per_epoch else 0.0
    position = int(done * micro_batches_per_epoch) // accumulation * accumulation
    return ckpt.TrainerState(epoch=saved.epoch, micro_step_in_epoch=position, global_step=saved.global_step,
                             metrics=dict(saved.metrics), micro_batches_per_epoch=micro_batches_per_epoch)


def _resume(engine: Any, root: str, is_adapter: bool, rank: int) -> ckpt.TrainerState:
    """Load engine (module, optimizer shards, scheduler), RNG and trainer state from a local checkpoint."""
    load_path, client = engine.load_checkpoint(
        os.path.join(root, ckpt.DEEPSPEED_DIR), tag=ckpt.DEEPSPEED_TAG, load_module_strict=not is_adapter
    )
    if load_path is None:
        raise ckpt.CheckpointError(f"{root}: DeepSpeed found no engine state to resume from")
    ckpt.load_rng(root, rank)
    return ckpt.TrainerState(**client["trainer_state"])


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point run by Ray Train on each worker. `loop_config` is built by orchestrator.train.trainer."""
    import deepspeed
    import ray
    import ray.train
    import torch.distributed as dist
    from ray.train.torch import get_device

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    storage.configure(ray.get(loop_config["s3_settings"]))
    config: PipelineConfig = config_from_dict(loop_config["config"], "train_loop_config")
    stage: str = loop_config["stage"]
    train_cfg = config.stage(stage).train
    dist_cfg = config.distributed
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(dist_cfg.cpus_per_worker)))
    device = get_device()
    precision = resolve_precision(
        train_cfg.precision, dist_cfg.use_gpu, dist_cfg.use_gpu and torch.cuda.is_bf16_supported()
    )
    _seed_everything(train_cfg.seed)

    cache = tempfile.mkdtemp(prefix="orchestrator-model-")
    model_dir = storage.download_dir(loop_config["base_model"], os.path.join(cache, "base"))
    tokenizer_dir = storage.download_dir(loop_config["tokenizer"], os.path.join(cache, "tokenizer"))
    tokenizer = load_tokenizer(tokenizer_dir)
    is_adapter = train_cfg.method in ADAPTER_METHODS
    schedule = loop_config["schedule"]
    total_steps = schedule["total_steps"]
    micro_per_epoch = schedule["micro_batches_per_epoch"]
    accumulation = train_cfg.accumulation_steps(world)
    warmup = train_cfg.warmup_steps if train_cfg.warmup_steps is not None else math.ceil(train_cfg.warmup_ratio * total_steps)
    logs = MetricsLog(loop_config["logs_dir"] if rank == 0 else None, stage)
    logs_for_checkpoint = logs if loop_config["logs_into_checkpoints"] else None

    with contextlib.ExitStack() as stack:
        resume_root, manifest = _resume_source(loop_config["stage_uri"], cache, stack)
        saved_world = int(manifest.get("world_size") or world) if manifest else world
        new_world = resume_root is not None and saved_world != world
        if new_world and config.checkpoint.on_world_size_change == "fail":
            raise ckpt.CheckpointError(
                f"{manifest['source']} was written by {saved_world} workers and this run has {world}; "
                "set checkpoint.on_world_size_change=reload_weights to continue from its weights with a fresh "
                f"optimizer, or run with distributed.num_workers={saved_world}"
            )
        model = build_training_model(config, train_cfg, model_dir, tokenizer, tokenizer_dir, precision, total_steps,
                                     os.path.join(resume_root, ckpt.MODEL_DIR) if new_world else None)
        ds_config = build_deepspeed_config(train_cfg, dist_cfg, world, precision, loop_config["deepspeed_user_config"])
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=_param_groups(model, train_cfg.weight_decay),
            config=ds_config,
            lr_scheduler=partial(_make_scheduler, name=train_cfg.schedule, warmup=warmup, total=total_steps),
            dist_init_required=False,
        )
        if train_cfg.torch_compile:
            engine.compile(backend=train_cfg.torch_compile_backend)
        state = ckpt.TrainerState(micro_batches_per_epoch=micro_per_epoch)
        if new_world:
            state = continue_with_new_world_size(ckpt.read_trainer_state(resume_root), micro_per_epoch, accumulation)
            for _ in range(state.global_step):
                engine.lr_scheduler.step()  # the schedule continues where it was; optimizer moments start afresh
            if rank == 0:
                log.warning("%s: checkpoint %s was written by %d workers, this run has %d: continuing from its "
                            "weights with a FRESH optimizer state at step %d (epoch %d, micro-batch %d of %d)",
                            stage, manifest["source"], saved_world, world, state.global_step, state.epoch + 1,
                            state.micro_step_in_epoch, micro_per_epoch)
        elif resume_root is not None:
            state = _resume(engine, resume_root, is_adapter, rank)
            state.micro_batches_per_epoch = micro_per_epoch
        if resume_root is not None and logs_for_checkpoint is not None:
            logs.restore_from(resume_root)
    resumed_from = manifest["source"] if manifest else None
    if resumed_from is not None:
        log.info("resumed from %s at epoch %d, step %d", resumed_from, state.epoch, state.global_step)

    extra = {"stage": stage, "method": train_cfg.method, "zero_stage": dist_cfg.zero_stage, "world_size": world,
             "precision": precision, "base_model": loop_config["base_model"], "deepspeed_config": ds_config}
    if rank == 0:
        log.info("%s: %d workers, precision %s, ZeRO-%d, %d optimizer steps (%d per epoch), warmup %d, "
                 "DeepSpeed config %s", stage, world, precision, dist_cfg.zero_stage, total_steps,
                 schedule["steps_per_epoch"], warmup, json.dumps(ds_config))

    if resumed_from is not None:
        logs.write(state.global_step, {"event": "resumed", "resumed_from": resumed_from})
    train_shard = ray.train.get_dataset_shard("train")
    eval_data = ray.train.get_dataset_shard("eval") if loop_config["has_eval"] else None
    pad_id = tokenizer.pad_token_id
    is_adalora = train_cfg.method == "adalora"
    eval_batch = config.eval.micro_batch_size or train_cfg.micro_batch_size
    every_n = config.checkpoint.every_n_steps

    if eval_data is not None and config.eval.at_start and resumed_from is None:
        initial = evaluate(engine, eval_data, eval_batch, pad_id, device, config.eval.max_batches)
        logs.write(0, {"epoch": 0, **initial})
        if rank == 0:
            log.info("%s before training: %s", stage, ", ".join(f"{k} {v:.4g}" for k, v in initial.items()))

    window_loss, window_micro, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    run_tokens, run_start = 0, time.perf_counter()
    engine.train()
    for epoch in range(state.epoch, train_cfg.epochs):
        skip = state.micro_step_in_epoch if epoch == state.epoch else 0
        for micro, batch in enumerate(_batches(train_shard, train_cfg.micro_batch_size, train_cfg.seed + epoch,
                                               pad_id, device, loop_config["prebatched"])):
            if micro >= micro_per_epoch:
                break
            if micro < skip:
                continue  # resume: these micro-batches were trained before the checkpoint
            loss = engine(**batch).loss
            engine.backward(loss)
            if is_adalora and (micro + 1) % accumulation == 0:
                adalora_update(engine.module, state.global_step, dist_cfg.zero_stage)  # before step() clears grads
            engine.step()
            window_loss += float(loss.detach().float())
            window_micro += 1
            tokens = int(batch["attention_mask"].sum())
            window_tokens += tokens
            run_tokens += tokens
            if (micro + 1) % accumulation:
                continue
            state.global_step += 1
            state.epoch, state.micro_step_in_epoch = epoch, micro + 1
            step = state.global_step
            if step % train_cfg.log_every_n_steps == 0 or step == total_steps:
                counts = torch.tensor([window_tokens, window_loss, window_micro], dtype=torch.float64)
                dist.all_reduce(counts)
                elapsed = time.perf_counter() - window_start
                metrics = {"train_loss": counts[1].item() / max(counts[2].item(), 1),
                           "learning_rate": engine.get_lr()[0], "tokens_per_s": counts[0].item() / elapsed,
                           "epoch": epoch + 1, "step": step}
                if device.type == "cuda":
                    metrics["gpu_max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                logs.write(step, metrics)
                if rank == 0:
                    log.info("%s epoch %d/%d step %d/%d loss %.4f lr %.3g tok/s %.0f", stage, epoch + 1,
                             train_cfg.epochs, step, total_steps, metrics["train_loss"], metrics["learning_rate"],
                             metrics["tokens_per_s"])
                window_loss, window_micro, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
            end_of_epoch = micro + 1 == micro_per_epoch
            if every_n and step % every_n == 0 and not (end_of_epoch and config.checkpoint.at_epoch_end):
                # Every checkpoint carries an eval loss: Ray keeps the best N by it.
                metrics = {"step": step, "epoch": epoch + 1}
                if eval_data is not None:
                    metrics.update(evaluate(engine, eval_data, eval_batch, pad_id, device, config.eval.max_batches))
                    logs.write(step, metrics)
                state.metrics = metrics
                _save_checkpoint(engine, tokenizer, state, extra, dist_cfg.zero_stage, is_adapter, logs_for_checkpoint,
                                 metrics)
            if train_cfg.fail_at_step is not None and step == train_cfg.fail_at_step:
                raise RuntimeError(f"fault injection: train.fail_at_step={step} reached (testing aid)")
        # End of epoch: evaluate, report, checkpoint.
        state.epoch, state.micro_step_in_epoch = epoch + 1, 0
        metrics = {"epoch": epoch + 1, "step": state.global_step,
                   "tokens_per_s_run": run_tokens * world / max(time.perf_counter() - run_start, 1e-9)}
        if eval_data is not None:
            metrics.update(evaluate(engine, eval_data, eval_batch, pad_id, device, config.eval.max_batches))
        logs.write(state.global_step, metrics)
        state.metrics = metrics
        if rank == 0:
            log.info("%s epoch %d/%d done: %s", stage, epoch + 1, train_cfg.epochs,
                     ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if config.checkpoint.at_epoch_end or epoch + 1 == train_cfg.epochs:
            _save_checkpoint(engine, tokenizer, state, extra, dist_cfg.zero_stage, is_adapter, logs_for_checkpoint, metrics)
        else:
            ray.train.report(metrics)
    logs.close()
    shutil.rmtree(cache, ignore_errors=True)  # downloaded base model / resume state
