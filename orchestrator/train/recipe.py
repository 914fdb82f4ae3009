"""The worker recipe: what every Ray Train worker runs for one stage, top to bottom.

`train_loop_per_worker` (the function Ray Train starts) unpacks the typed `WorkerPlan` the driver
built (orchestrator.train.trainer) and hands it to `run_recipe` with a `RayTrainContext`; a test hands
`run_recipe` a `LocalTrainContext` instead and no Ray is started. `WorkerRecipe` has one method per
step: `setup` (runtime, tokenizer, model + DeepSpeed engine, resume), `train_epoch` (micro-batches of
this worker's shard with gradient accumulation; DeepSpeed steps the optimizer, warm-up + schedule and
clipping), `evaluate`, `save_checkpoint` (reported through the context; Ray merges the ranks' parts)
and `cleanup`. Window counters live in a `StepMeter`; training progress is the checkpoint's
`TrainerState`.
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
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from orchestrator import storage
from orchestrator.config import (
    ADAPTER_METHODS,
    CheckpointConfig,
    DistributedConfig,
    EvalConfig,
    ModelConfig,
    NodeCacheConfig,
    PreferenceTrainConfig,
    TrainConfig,
)
from orchestrator.data.shard_reader import MaterialisedPart, ShardReader
from orchestrator.data.shards import ShardManifest
from orchestrator.data.sft import IGNORE_INDEX
from orchestrator.model.loading import full_numel, full_shape, load_tokenizer
from orchestrator import checkpoint as ckpt
from orchestrator import node_cache
from orchestrator.train.context import RayTrainContext, TrainContext
from orchestrator.config import resolve_precision
from orchestrator.train.deepspeed_config import build_deepspeed_config
from orchestrator.tracking import TrackingTarget
from orchestrator.train.metrics_log import MetricsLog
from orchestrator.train.model_setup import adalora_update, build_training_model, zero3_partitioned_loading
from orchestrator.train.preference_step import (
    PreferenceObjective,
    build_reference_engine,
    precompute_reference_logps,
    read_reference_logps,
    write_reference_logps,
)

log = logging.getLogger("orchestrator.train")


@dataclass(frozen=True)
class Schedule:
    """Micro-batches per epoch per worker, optimizer steps per epoch and in total."""

    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int


def schedule_for(rows: int, world_size: int, micro_batch_size: int, accumulation: int, epochs: int) -> Schedule:
    """Micro-batches per epoch per worker (a whole number of optimizer steps) and optimizer steps in total.

    Ray Data's equal split gives every worker rows // world_size rows; partial micro-batches and
    partial accumulation windows at the end of an epoch are dropped so every epoch ends on an
    optimizer step and every worker runs the same number of collectives.
    """
    micro = (rows // world_size) // micro_batch_size
    steps_per_epoch = micro // accumulation
    return Schedule(micro_batches_per_epoch=steps_per_epoch * accumulation, steps_per_epoch=steps_per_epoch,
                    total_steps=steps_per_epoch * epochs)


def train_schedule(train: TrainConfig, rows: int, world_size: int) -> Schedule:
    """`schedule_for` with the stage's micro-batch size, accumulation at that world size, and epochs."""
    return schedule_for(rows, world_size, train.micro_batch_size, train.accumulation_steps(world_size), train.epochs)


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs for one stage; built on the driver, pickled to every worker.

    Only the config sections the worker reads travel (no storage credentials: those go through the
    object store, see orchestrator.train.trainer).
    """

    stage: str
    model: ModelConfig
    train: TrainConfig
    distributed: DistributedConfig
    checkpoint: CheckpointConfig
    eval: EvalConfig
    base_model: str  # URI of the weights to start from
    tokenizer: str  # URI of the tokenizer directory
    train_rows: int  # training rows (stage 1 blocks, stage 2 examples, stage 3 pairs); the schedule follows from them
    stage_uri: str  # where this stage's checkpoints live (resume falls back to the newest complete one)
    logs_dir: str
    logs_into_checkpoints: bool  # remote storage: the logs travel inside each checkpoint
    has_eval: bool
    # Stages 1 and 2: the prepared shard set every worker reads its share of an epoch from (the order is a
    # function of train.seed and the epoch, so a resumed worker starts at exactly its micro-batch). None: the
    # datasets come through the context (stage 3).
    shard_set_uri: Optional[str] = None
    shard_manifest: Optional[ShardManifest] = None
    group_by_length: bool = False  # stage 2: micro-batches of similar length within each reading window
    deepspeed_user_config: Optional[dict[str, Any]] = None
    tracking: Optional[TrackingTarget] = None  # the run's MLflow / W&B runs (rank 0 logs its metrics there)
    reference_logps_uri: Optional[str] = None  # stage 3 with precompute_reference: where the pass writes them
    node_cache: NodeCacheConfig = field(default_factory=NodeCacheConfig)  # remote inputs: one download per node

    def schedule_at(self, world_size: int) -> Schedule:
        """The step schedule with `world_size` workers: each worker derives it from the size it runs at, which
        under elastic training (distributed.min_workers) may be less than distributed.num_workers."""
        return train_schedule(self.train, self.train_rows, world_size)


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
        (no_decay if len(full_shape(param)) < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _loaded_share(model: torch.nn.Module) -> str:
    """How much of the model this rank materialised: its partitions against the whole parameter count."""
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    whole = sum(full_numel(p) for p in model.parameters())
    return f"{local:,} of {whole:,} parameters ({100 * local / max(whole, 1):.1f}%)"


def _batches(shard: Any, micro_batch_size: int, seed: int, collate_rows: Any) -> Iterator[dict]:
    """Micro-batches of a Ray Data shard for one epoch, shuffled with `seed` (stage 3's in-memory datasets)."""
    for batch in shard.iter_batches(
        batch_size=micro_batch_size,
        batch_format="numpy",
        drop_last=True,
        local_shuffle_buffer_size=max(micro_batch_size * 16, 256),
        local_shuffle_seed=seed,
    ):
        yield collate_rows(batch)


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
    module at a time, so no rank ever holds two full copies). Adapters: the trainable tensors and the
    embeddings (which peft saves too when the vocabulary grew) are gathered (collective) around peft's
    save_pretrained. Every rank must call this.
    """
    import deepspeed

    module = engine.module
    if zero_stage == 3 and not is_adapter:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # rank 0 gets the tensors, others {}
        if rank == 0:
            module.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    elif zero_stage == 3:
        # peft also saves the (frozen) embeddings when the vocabulary grew: gather them with the adapter.
        embeddings = [layer.weight for layer in (module.get_input_embeddings(), module.get_output_embeddings())
                      if layer is not None]
        trainable = [param for param in module.parameters() if param.requires_grad]
        to_gather = list({id(p): p for p in trainable + embeddings}.values())
        with deepspeed.zero.GatheredParameters(to_gather, modifier_rank=None):
            if rank == 0:
                module.save_pretrained(out_dir, safe_serialization=True)
    elif rank == 0:
        module.save_pretrained(out_dir, safe_serialization=True)
    if rank == 0:
        tokenizer.save_pretrained(out_dir)


def continue_with_new_world_size(saved: ckpt.TrainerState, micro_batches_per_epoch: int,
                                 accumulation: int) -> ckpt.TrainerState:
    """Where to continue when the worker count changed: same epoch and step counter, the same share of
    the epoch done (rounded down to a whole optimizer step of the new micro-batch count)."""
    done = saved.micro_step_in_epoch / saved.micro_batches_per_epoch if saved.micro_batches_per_epoch else 0.0
    position = int(done * micro_batches_per_epoch) // accumulation * accumulation
    return ckpt.TrainerState(epoch=saved.epoch, micro_step_in_epoch=position, global_step=saved.global_step,
                             metrics=dict(saved.metrics), micro_batches_per_epoch=micro_batches_per_epoch)


@dataclass
class StepMeter:
    """Loss and tokens since the last logged step (the window), and tokens of the whole run."""

    loss_sum: float = 0.0
    micro_batches: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    run_tokens: int = 0
    run_started: float = field(default_factory=time.perf_counter)
    extras: dict[str, float] = field(default_factory=dict)  # sums of per-micro-batch metrics (preference rewards)

    def add(self, loss: float, tokens: int, extras: Optional[dict[str, float]] = None) -> None:
        self.loss_sum += loss
        self.micro_batches += 1
        self.tokens += tokens
        self.run_tokens += tokens
        for name, value in (extras or {}).items():
            self.extras[name] = self.extras.get(name, 0.0) + value

    def take_window(self) -> dict[str, float]:
        """Mean loss (and extras) and token throughput of the window over all ranks (collective); starts a new
        window. Every rank has the same extras' names (the same objective)."""
        names = sorted(self.extras)
        counts = torch.tensor([self.tokens, self.loss_sum, self.micro_batches, *(self.extras[n] for n in names)],
                              dtype=torch.float64)
        dist.all_reduce(counts)
        elapsed = time.perf_counter() - self.started
        self.loss_sum, self.micro_batches, self.tokens, self.extras = 0.0, 0, 0, {}
        self.started = time.perf_counter()
        micro = max(counts[2].item(), 1)
        return {"train_loss": counts[1].item() / micro, "tokens_per_s": counts[0].item() / elapsed,
                **{name: counts[3 + i].item() / micro for i, name in enumerate(names)}}

    def run_tokens_per_s(self, world_size: int) -> float:
        return self.run_tokens * world_size / max(time.perf_counter() - self.run_started, 1e-9)


@dataclass(frozen=True)
class ResumePoint:
    """A local copy of the checkpoint to continue from."""

    root: str
    source: str  # where it came from (URI or Ray's checkpoint path)
    world_size: int  # workers that wrote it


def _format(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


class WorkerRecipe:
    """One worker's run of one stage; `run_recipe` calls the steps in order."""

    def __init__(self, plan: WorkerPlan, context: TrainContext):
        self.plan, self.context = plan, context
        self.rank, self.world = context.world_rank, context.world_size
        self.logs = MetricsLog(plan.logs_dir if self.rank == 0 else None, plan.stage, plan.tracking)
        self.accumulation = plan.train.accumulation_steps(self.world)
        self.schedule = plan.schedule_at(self.world)
        warmup_steps = plan.train.warmup_steps
        self.warmup = (warmup_steps if warmup_steps is not None
                       else math.ceil(plan.train.warmup_ratio * self.schedule.total_steps))
        self.is_adapter = plan.train.method in ADAPTER_METHODS
        self.eval_batch = plan.eval.micro_batch_size or plan.train.micro_batch_size
        self.meter = StepMeter()
        self.engine: Any = None
        self.objective: Optional[PreferenceObjective] = None  # stage 3: the preference loss instead of the LM loss
        self.partitioned_loading: Optional[Any] = None  # ZeRO-3: alive as long as the engine

    # --- setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Runtime, tokenizer, model + engine, then the resume (which decides how the model is built)."""
        plan = self.plan
        self._setup_runtime()
        model_dir = self._fetch(plan.base_model)
        tokenizer_dir = self._fetch(plan.tokenizer)
        self.tokenizer = load_tokenizer(tokenizer_dir)
        with contextlib.ExitStack() as stack:  # a checkpoint Ray downloaded lives until the engine loaded it
            resume = self._find_resume_point(stack)
            new_world = resume is not None and resume.world_size != self.world
            self.engine, self.ds_config = self._setup_engine(model_dir, tokenizer_dir,
                                                             resume.root if new_world else None)
            self.state = self._resume(resume, new_world)
        if isinstance(plan.train, PreferenceTrainConfig):
            self.objective = self._setup_preference(model_dir)
        self.resumed_from = resume.source if resume is not None else None
        self._setup_data()
        self.checkpoint_extra = {
            "stage": plan.stage, "method": plan.train.method, "zero_stage": plan.distributed.zero_stage,
            "world_size": self.world, "precision": self.precision, "base_model": plan.base_model,
            "deepspeed_config": self.ds_config,
        }
        if self.rank == 0:
            log.info("%s: %d workers, precision %s, ZeRO-%d, %d optimizer steps (%d per epoch), warmup %d, "
                     "DeepSpeed config %s", plan.stage, self.world, self.precision, plan.distributed.zero_stage,
                     self.schedule.total_steps, self.schedule.steps_per_epoch, self.warmup, json.dumps(self.ds_config))
        if self.resumed_from is not None:
            self.logs.write(self.state.global_step, {"event": "resumed", "resumed_from": self.resumed_from,
                                                     "world_size": self.world})

    def _setup_data(self) -> None:
        """This worker's reading of the train set, and the (small) eval set held in memory."""
        plan = self.plan
        self.train_reader: Optional[ShardReader] = None
        self.row_log = None
        if plan.shard_set_uri is not None:
            self.train_reader = ShardReader(plan.shard_set_uri, plan.shard_manifest, "train")
            self.eval_data = MaterialisedPart(plan.shard_set_uri, plan.shard_manifest) if plan.has_eval else None
            if plan.train.log_row_ids:
                os.makedirs(plan.logs_dir, exist_ok=True)
                self.row_log = open(os.path.join(plan.logs_dir, f"rows-{self.rank}.jsonl"), "a", encoding="utf-8")
                self._log_rows({"event": "start", "global_step": self.state.global_step, "epoch": self.state.epoch,
                                "micro_step_in_epoch": self.state.micro_step_in_epoch})
        else:
            self.train_shard = self.context.get_dataset_shard("train")
            self.eval_data = self.context.get_dataset_shard("eval") if plan.has_eval else None

    def _log_rows(self, record: dict[str, Any]) -> None:
        self.row_log.write(json.dumps(record) + "\n")
        self.row_log.flush()  # a killed worker's lines are all there

    def _setup_runtime(self) -> None:
        """Threads, device, precision ("bf16 where the hardware has it"), seeds."""
        train, use_gpu = self.plan.train, self.plan.distributed.use_gpu
        torch.set_num_threads(max(1, int(self.plan.distributed.cpus_per_worker)))
        self.device = self.context.device()
        self.precision = resolve_precision(train.precision, use_gpu, use_gpu and torch.cuda.is_bf16_supported())
        _seed_everything(train.seed)

    def _setup_engine(self, model_dir: str, tokenizer_dir: str, weights_from: Optional[str]) -> tuple[Any, dict]:
        """The model (+ method), wrapped in DeepSpeed. `weights_from`: a checkpoint whose weights to load."""
        import deepspeed

        plan = self.plan
        ds_config = build_deepspeed_config(plan.train, plan.distributed, self.world, self.precision,
                                           plan.deepspeed_user_config)
        self.partitioned_loading = zero3_partitioned_loading(ds_config, plan.distributed.use_gpu)
        model = build_training_model(plan.model, plan.train, model_dir, self.tokenizer, tokenizer_dir, self.precision,
                                     self.schedule.total_steps,
                                     os.path.join(weights_from, ckpt.MODEL_DIR) if weights_from else None)
        if self.rank == 0 and self.partitioned_loading is not None:
            log.info("%s: ZeRO-3 partitioned loading, this rank holds %s", plan.stage, _loaded_share(model))
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=_param_groups(model, plan.train.weight_decay),
            config=ds_config,
            lr_scheduler=partial(_make_scheduler, name=plan.train.schedule, warmup=self.warmup,
                                 total=self.schedule.total_steps),
            dist_init_required=False,
        )
        if plan.train.torch_compile:
            engine.compile(backend=plan.train.torch_compile_backend)
        return engine, ds_config

    def _fetch(self, uri: str) -> str:
        """A remote input as a local directory, downloaded once per node (the node cache)."""
        return node_cache.fetch(uri, self.plan.node_cache.dir, self.plan.node_cache.max_gb)

    def _setup_preference(self, model_dir: str) -> PreferenceObjective:
        """Stage 3's objective; full and freeze get a frozen reference copy of the stage base (adapter methods
        disable their adapters instead, reference-free losses need none)."""
        plan, reference = self.plan, None
        if plan.train.needs_reference and not self.is_adapter and not plan.train.precompute_reference:
            from orchestrator.model.loading import align_vocab, load_causal_lm, resolve_dtype

            model = load_causal_lm(model_dir, resolve_dtype(plan.model.dtype, self.precision),
                                   plan.model.attn_implementation, plan.model.trust_remote_code)
            align_vocab(model, self.tokenizer)
            reference = build_reference_engine(model, self.ds_config, plan.distributed.zero_stage)
        objective = PreferenceObjective(plan.train, self.tokenizer.pad_token_id, self.device, reference)
        if plan.train.precompute_reference:
            objective.precomputed = self._reference_logps(objective)
        return objective

    def _reference_logps(self, objective: PreferenceObjective) -> dict[int, tuple[float, float]]:
        """The precomputed reference log-probs: read back when a pass already wrote them, else one pass now."""
        uri = self.plan.reference_logps_uri
        if uri is None:
            raise RuntimeError("precompute_reference is set, but the driver gave no reference_logps_uri")
        if storage.exists(uri):
            log.info("reusing the reference log-probs in %s", uri)
            return read_reference_logps(uri)
        if self.state.global_step > 0 and not self.is_adapter:
            raise ckpt.CheckpointError(f"{uri} is missing and the weights have trained {self.state.global_step} "
                                       "steps, so the reference can no longer be recomputed; start the stage afresh")
        shards = [self.context.get_dataset_shard("reference")]
        if self.plan.has_eval:
            shards.append(self.context.get_dataset_shard("eval"))
        started = time.perf_counter()
        table = precompute_reference_logps(objective, self.engine, shards, self.eval_batch, self.rank, self.world)
        if self.rank == 0:
            write_reference_logps(uri, table)
            log.info("reference log-probs of %d examples computed in %.1f s, written to %s", len(table),
                     time.perf_counter() - started, uri)
        return table

    def collate_rows(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Table rows → a padded micro-batch for this stage's objective."""
        if self.objective is not None:
            return self.objective.collate(batch)
        return collate(batch, self.tokenizer.pad_token_id, self.device)

    # --- resume ------------------------------------------------------------------------------------
    def _find_resume_point(self, stack: contextlib.ExitStack) -> Optional[ResumePoint]:
        """The checkpoint to resume from, or None for a fresh start.

        The runtime's own record first; when it has none (its record can miss a checkpoint that finished
        uploading just before a crash, or the job was resubmitted), the newest manifest-verified
        checkpoint in storage, which is the ground truth.
        """
        checkpoint = self.context.get_checkpoint()
        if checkpoint is not None and not storage.is_remote(self.plan.stage_uri):
            root = stack.enter_context(checkpoint.as_directory())
            source = checkpoint.path
        else:
            source = (ckpt.latest_complete_checkpoint(self.plan.stage_uri) if checkpoint is None
                      else storage.join(self.plan.stage_uri, os.path.basename(checkpoint.path.rstrip("/"))))
            if source is None:
                return None
            root = self._fetch(source)
        manifest = ckpt.verify_checkpoint(root)
        resume = ResumePoint(root, source, int(manifest.get("world_size") or self.world))
        if resume.world_size != self.world and self.plan.checkpoint.on_world_size_change == "fail":
            raise ckpt.world_size_change_refused(source, resume.world_size, self.world)
        return resume

    def _resume(self, resume: Optional[ResumePoint], new_world: bool) -> ckpt.TrainerState:
        """Training progress: fresh, the checkpoint's (engine, RNG, state), or its share of the epoch at a new
        world size (weights only; the schedule continues, optimizer moments start afresh)."""
        per_epoch = self.schedule.micro_batches_per_epoch
        if resume is None:
            return ckpt.TrainerState(micro_batches_per_epoch=per_epoch)
        if new_world:
            state = continue_with_new_world_size(ckpt.read_trainer_state(resume.root), per_epoch, self.accumulation)
            for _ in range(state.global_step):
                self.engine.lr_scheduler.step()
            if self.rank == 0:
                log.warning("%s: checkpoint %s was written by %d workers, this run has %d: continuing from its "
                            "weights with a FRESH optimizer state at step %d (epoch %d, micro-batch %d of %d)",
                            self.plan.stage, resume.source, resume.world_size, self.world, state.global_step,
                            state.epoch + 1, state.micro_step_in_epoch, per_epoch)
        else:
            load_path, client = self.engine.load_checkpoint(os.path.join(resume.root, ckpt.DEEPSPEED_DIR),
                                                            tag=ckpt.DEEPSPEED_TAG,
                                                            load_module_strict=not self.is_adapter)
            if load_path is None:
                raise ckpt.CheckpointError(f"{resume.root}: DeepSpeed found no engine state to resume from")
            ckpt.load_rng(resume.root, self.rank)
            state = ckpt.TrainerState(**client["trainer_state"])
            state.micro_batches_per_epoch = per_epoch
        if self.plan.logs_into_checkpoints:
            self.logs.restore_from(resume.root)
        log.info("resumed from %s at epoch %d, step %d", resume.source, state.epoch, state.global_step)
        return state

    # --- train -------------------------------------------------------------------------------------
    def evaluate_at_start(self) -> None:
        """The baseline in the logs (not on resume)."""
        if self.eval_data is None or not self.plan.eval.at_start or self.resumed_from is not None:
            return
        initial = self.evaluate()
        self.logs.write(0, {"epoch": 0, **initial})
        if self.rank == 0:
            log.info("%s before training: %s", self.plan.stage, _format(initial))

    def start_training(self) -> None:
        self.engine.train()
        self.meter = StepMeter()  # the run's throughput counts from the first step, not from setup

    def train_epoch(self, epoch: int) -> None:
        """This worker's micro-batches of `epoch`, skipping those a resumed checkpoint already trained."""
        state, per_epoch = self.state, self.schedule.micro_batches_per_epoch
        skip = state.micro_step_in_epoch if epoch == state.epoch else 0
        for micro, batch in self._epoch_batches(epoch, skip):
            if micro >= per_epoch:
                break
            optimizer_step = (micro + 1) % self.accumulation == 0
            self._train_micro_batch(batch, optimizer_step)
            if optimizer_step:
                state.global_step += 1
                state.epoch, state.micro_step_in_epoch = epoch, micro + 1
                self._after_optimizer_step(end_of_epoch=micro + 1 == per_epoch)

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(index, micro-batch) of this worker's epoch from micro-batch `skip` on. A shard set is read from that
        very position (nothing before it is read); Ray Data shards are iterated past the skipped ones."""
        plan = self.plan
        if self.train_reader is None:
            batches = _batches(self.train_shard, plan.train.micro_batch_size, plan.train.seed + epoch, self.collate_rows)
            yield from ((micro, batch) for micro, batch in enumerate(batches) if micro >= skip)
            return
        reading = self.train_reader.epoch_micro_batches(epoch, plan.train.seed, self.world, self.rank,
                                                        plan.train.micro_batch_size, plan.group_by_length, skip)
        for micro, rows in enumerate(reading, start=skip):
            if self.row_log is not None and micro < self.schedule.micro_batches_per_epoch:
                self._log_rows({"epoch": epoch, "micro": micro, "ids": rows.row_ids.tolist()})
            yield micro, self.collate_rows(rows.columns)

    def _train_micro_batch(self, batch: dict[str, torch.Tensor], optimizer_step: bool) -> None:
        engine, extras = self.engine, None
        if self.objective is not None:
            loss, extras = self.objective.loss(engine, batch)
        else:
            loss = engine(**batch).loss
        engine.backward(loss)
        if self.plan.train.method == "adalora" and optimizer_step:
            # before step(), which clears the gradients AdaLoRA reads
            adalora_update(engine.module, self.state.global_step, self.plan.distributed.zero_stage)
        engine.step()  # DeepSpeed steps the optimizer and schedule only at the end of an accumulation window
        self.meter.add(float(loss.detach().float()), int(batch["attention_mask"].sum()), extras)

    def _after_optimizer_step(self, end_of_epoch: bool) -> None:
        """Log the window, checkpoint every N steps, inject a fault when asked."""
        plan, step, epoch = self.plan, self.state.global_step, self.state.epoch
        if step % plan.train.log_every_n_steps == 0 or step == self.schedule.total_steps:
            window = self.meter.take_window()
            metrics = {**window, "learning_rate": self.engine.get_lr()[0], "epoch": epoch + 1, "step": step}
            if self.device.type == "cuda":
                metrics["gpu_max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.logs.write(step, metrics)
            if self.rank == 0:
                log.info("%s epoch %d/%d step %d/%d loss %.4f lr %.3g tok/s %.0f%s", plan.stage, epoch + 1,
                         plan.train.epochs, step, self.schedule.total_steps, metrics["train_loss"],
                         metrics["learning_rate"], metrics["tokens_per_s"],
                         f" reward acc {metrics['rewards/accuracies']:.2f}" if "rewards/accuracies" in metrics else "")
        every_n = plan.checkpoint.every_n_steps
        if every_n and step % every_n == 0 and not (end_of_epoch and plan.checkpoint.at_epoch_end):
            # Every checkpoint carries an eval loss: Ray keeps the best N by it.
            metrics = {"step": step, "epoch": epoch + 1}
            if self.eval_data is not None:
                metrics.update(self.evaluate())
                self.logs.write(step, metrics)
            self.save_checkpoint(metrics)
        if plan.train.fail_at_step is not None and step == plan.train.fail_at_step:
            raise RuntimeError(f"fault injection: train.fail_at_step={step} reached (testing aid)")

    def end_epoch(self, epoch: int) -> None:
        """Evaluate, log, and report: with a checkpoint at epoch ends (and always after the last epoch)."""
        plan, state = self.plan, self.state
        state.epoch, state.micro_step_in_epoch = epoch + 1, 0
        metrics = {"epoch": epoch + 1, "step": state.global_step,
                   "tokens_per_s_run": self.meter.run_tokens_per_s(self.world)}
        if self.eval_data is not None:
            metrics.update(self.evaluate())
        self.logs.write(state.global_step, metrics)
        if self.rank == 0:
            log.info("%s epoch %d/%d done: %s", plan.stage, epoch + 1, plan.train.epochs, _format(metrics))
        if plan.checkpoint.at_epoch_end or epoch + 1 == plan.train.epochs:
            self.save_checkpoint(metrics)
        else:
            state.metrics = metrics
            self.context.report(metrics)

    # --- evaluate ----------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        if self.objective is not None:
            return self.objective.evaluate(self.engine, self.eval_data, self.eval_batch, self.plan.eval.max_batches)
        return evaluate(self.engine, self.eval_data, self.eval_batch, self.tokenizer.pad_token_id, self.device,
                        self.plan.eval.max_batches)

    # --- save --------------------------------------------------------------------------------------
    def save_checkpoint(self, metrics: dict[str, Any]) -> None:
        """Write this rank's part of a checkpoint into a temp dir and report it (Ray merges the ranks' dirs)."""
        state, rank, engine = self.state, self.rank, self.engine
        state.metrics = metrics
        started, size = time.perf_counter(), 0
        self.logs.write(state.global_step, {"event": "checkpoint", "checkpoint": "saving"})
        tmp = tempfile.mkdtemp(prefix="ckpt-")  # the context deletes it once stored (checkpoint.upload: async or sync)
        try:
            save_hf_model(engine, self.tokenizer, os.path.join(tmp, ckpt.MODEL_DIR), self.plan.distributed.zero_stage,
                          rank, self.is_adapter)
            engine.save_checkpoint(
                os.path.join(tmp, ckpt.DEEPSPEED_DIR),
                tag=ckpt.DEEPSPEED_TAG,
                client_state={"trainer_state": asdict(state)},
                exclude_frozen_parameters=self.is_adapter,
            )
            ckpt.save_rng(tmp, rank)
            if rank == 0:
                ckpt.write_trainer_state(tmp, state)
                with open(os.path.join(tmp, ckpt.DEEPSPEED_CONFIG), "w", encoding="utf-8") as handle:
                    json.dump(self.ds_config, handle, indent=1, sort_keys=True)
                if self.plan.logs_into_checkpoints:
                    self.logs.copy_into(tmp)
            # The manifest lists every rank's files and is written last: an upload cut short never verifies.
            files = ckpt.file_entries(tmp)
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, files)
            if rank == 0:
                merged = {k: v for part in gathered for k, v in part.items()}
                ckpt.write_manifest(tmp, merged, state, self.checkpoint_extra)
                size = sum(entry["size"] for entry in merged.values())
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        upload_async = self.plan.checkpoint.upload == "async"
        self.context.report(metrics, checkpoint_dir=tmp, checkpoint_dir_name=ckpt.checkpoint_dir_name(state.global_step),
                            upload_async=upload_async)
        # Written and stored (sync: Ray Train has uploaded every rank's part) or handed to the async upload.
        self.logs.write(state.global_step, {"event": "checkpoint", "checkpoint": "uploading" if upload_async else "saved",
                                            "checkpoint_mib": round(size / 2**20, 1),
                                            "checkpoint_seconds": round(time.perf_counter() - started, 2)})

    # --- clean up ----------------------------------------------------------------------------------
    def cleanup(self) -> None:
        if getattr(self, "row_log", None) is not None:
            self.row_log.close()
        self.logs.close()  # remote inputs stay in the node cache for the next stage, restart or trial


def run_recipe(plan: WorkerPlan, context: TrainContext) -> None:
    """Train one stage on this worker: setup and resume, epochs of steps with eval and checkpoints."""
    recipe = WorkerRecipe(plan, context)
    try:
        recipe.setup()
        recipe.evaluate_at_start()
        recipe.start_training()
        for epoch in range(recipe.state.epoch, plan.train.epochs):
            recipe.train_epoch(epoch)
            recipe.end_epoch(epoch)
    finally:
        recipe.cleanup()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point run by Ray Train on each worker: {"plan": WorkerPlan, "storage_settings": ObjectRef}."""
    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    storage.configure(ray.get(loop_config["storage_settings"]))
    context = RayTrainContext()
    log_worker_to_file(loop_config["plan"].logs_dir, context.world_rank)
    run_recipe(loop_config["plan"], context)


def log_worker_to_file(logs_dir: str, rank: int) -> None:
    """This worker's log lines (ours, DeepSpeed's, library warnings) also go to `<logs_dir>/worker-<rank>.log`,
    where a quiet CLI (which does not stream worker output) still keeps them."""
    os.makedirs(logs_dir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(logs_dir, f"worker-{rank}.log"), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)
    for logger in (logging.getLogger(), logging.getLogger("DeepSpeed")):  # DeepSpeed's does not propagate
        logger.addHandler(handler)
