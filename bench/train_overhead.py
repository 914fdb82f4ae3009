"""Measure 1: steady-state training tokens/s of our Ray Train + DeepSpeed path vs a bare PyTorch loop.

Our path is `orchestrator.train.stage.run_stage` (1 worker, ZeRO-0 and ZeRO-2) on a tiny LLaMA,
stage 1 on the shared legal corpus (one document per line, blocks of 256, micro-batch 8, 2 epochs,
a checkpoint at each epoch end). Its tokens/s come from the per-step log windows of the run's
metrics JSONL, leaving out the first windows (worker, Ray Data and allocator start-up) and every
window that spans an evaluation or checkpoint. The baseline is a single-process loop over the same
tokenized blocks with the same model, micro-batch, `collate`, AdamW, clipping and torch threads,
timed in windows of the same number of steps. Baseline runs are interleaved with the fits
(baseline, ZeRO-0, baseline, ZeRO-2, baseline) and each fit is compared with its two neighbours,
so load from other jobs on the machine hits both sides alike as far as possible.

Next to wall-clock tokens/s, both sides are also timed in CPU seconds (the worker process's, sampled
when each window's record lands; the bare loop's thread time): tokens per CPU-second do not drop when
other jobs take the cores, so the two ratios together tell overhead from contention.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from rows import Row, median

from orchestrator.config import PipelineConfig, config_from_dict
from orchestrator.data.prepare import PreparedData, prepare_stage_data
from orchestrator.model.loading import create_tiny_model, load_tokenizer
from orchestrator.train.recipe import collate
from orchestrator.train.metrics_log import METRICS_FILE, read_metrics
from orchestrator.layout import RunLayout
from orchestrator.train.stage import TrainingFailed, run_stage

log = logging.getLogger("bench.train")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOKENIZER = SHARED / "tokenizers" / "minimind"
CORPUS = SHARED / "pretrain" / "legal"
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 512}
WINDOW_STEPS = 5  # train.log_every_n_steps: one tokens/s sample per 5 optimizer steps
SKIPPED_START_WINDOWS = 2  # the first ~10 steps run while Ray Data's pipeline and the allocator warm up
BASELINE_STEPS = 50  # per baseline run: 10 windows, the first ones dropped like the fits'
GOAL_RATIO = 0.95
GOAL = f">= {GOAL_RATIO}"

# From profiling on this 2-core machine (2026-11-28); the report adds the run's own CPU-time ratio.
PROFILE = (
    "Profiling: the same steps in one process with and without each layer put the DeepSpeed engine at ~0% "
    "extra per step for ZeRO-0 and ~5% for ZeRO-2, and Ray Data's iter_batches + collate at 0-3%. py-spy of "
    "ZeRO-2 steps: forward 35%, backward 58%, AdamW 3%, and ~5% DeepSpeed bookkeeping even with 1 worker "
    "(gradient hooks copying into the flat fp32 partition, the optimizer-step wrapper, global-norm clipping, "
    "a world-size-1 all-reduce). In the Ray worker the training thread does all the work (Ray's own threads "
    "<1%); in one run under heavy load it got ~91% of a core. Epoch-boundary costs (eval, checkpoint, a new "
    "Ray Data execution per iter_batches call) are outside the steady windows."
)
def bench_config(storage_root: str, zero_stage: int) -> PipelineConfig:
    """The tiny stage-1 run the brief describes, with its own run name per ZeRO stage."""
    return config_from_dict({
        "run_name": f"bench-zero{zero_stage}",
        "model": {"tiny": TINY},
        "tokenizer": {"path": str(TOKENIZER)},
        "distributed": {"num_workers": 1, "cpus_per_worker": 1, "zero_stage": zero_stage},
        "checkpoint": {"storage_path": storage_root, "at_epoch_end": True, "every_n_steps": None, "keep": 1},
        "eval": {"at_start": False, "max_batches": 4},
        "pretrain": {
            "data": {"sources": [{"path": str(CORPUS), "text_unit": "line"}], "block_size": 256},
            "train": {"method": "full", "epochs": 2, "micro_batch_size": 8, "learning_rate": 1e-3,
                      "log_every_n_steps": WINDOW_STEPS},
        },
    }, "bench")


def steady_windows(records: list[dict[str, Any]], skip_first: int = SKIPPED_START_WINDOWS) -> list[int]:
    """Indices (among window records) of windows that span neither start-up nor an evaluation or checkpoint.

    Window records carry `tokens_per_s`; any other record (evaluation, epoch end — which is followed
    by the epoch's checkpoint —, resume) falls inside the next window's time span, so that window
    is left out.
    """
    kept, window, disturbed = [], -1, False
    for record in records:
        if "tokens_per_s" not in record:
            disturbed = True
            continue
        window += 1
        if window >= skip_first and not disturbed:
            kept.append(window)
        disturbed = False
    return kept


class WorkerCpuClock:
    """CPU seconds of this driver's Ray Train worker, read each time a new window record is logged."""

    def __init__(self, metrics_path: str):
        self.metrics_path = metrics_path
        self.readings: dict[int, float] = {}  # window index -> worker CPU seconds when its record appeared
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "WorkerCpuClock":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def window_cpu(self, window: int) -> float:
        """CPU seconds the worker spent in window `window` (NaN when a reading is missing)."""
        if window in self.readings and window - 1 in self.readings:
            return self.readings[window] - self.readings[window - 1]
        return float("nan")

    @staticmethod
    def _find_worker() -> Optional[Any]:
        import psutil

        for child in psutil.Process().children(recursive=True):  # raylet and its workers are our children
            try:
                if child.cmdline()[:1] and child.cmdline()[0].startswith("ray::RayTrainWorker"):
                    return child
            except psutil.Error:
                continue
        return None

    def _windows_logged(self) -> int:
        try:
            with open(self.metrics_path, encoding="utf-8") as handle:
                return sum(1 for line in handle if '"tokens_per_s"' in line)
        except OSError:
            return 0

    def _run(self) -> None:
        worker, seen = None, 0
        while not self._stop.wait(0.02):
            worker = worker or self._find_worker()
            logged = self._windows_logged() if worker is not None else 0
            if logged <= seen:
                continue
            try:
                times = worker.cpu_times()
            except Exception:  # the worker exited between the check and the read
                return
            seen = logged
            self.readings[logged - 1] = times.user + times.system


def bare_loop_windows(config: PipelineConfig, data: PreparedData, tokenizer: Any, steps: int) -> list[tuple[float, float]]:
    """(tokens per wall second, tokens per CPU second) per window of a plain PyTorch loop on the same blocks."""
    import torch

    train = config.stage("pretrain").train
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(config.distributed.cpus_per_worker)))
    try:
        model = create_tiny_model(config.model.tiny, tokenizer, train.seed)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=train.resolved_learning_rate,
                                      betas=train.adam_betas, eps=train.adam_epsilon,
                                      weight_decay=train.weight_decay)
        rows = data.train.column("input_ids").to_numpy(zero_copy_only=False)
        order = np.random.default_rng(train.seed).permutation(len(rows))
        mbs, device = train.micro_batch_size, torch.device("cpu")
        windows, tokens = [], 0
        wall, cpu = time.perf_counter(), time.thread_time()
        for step in range(steps):
            first = (step * mbs) % (len(rows) - mbs + 1)
            batch = collate({"input_ids": rows[order[first: first + mbs]]}, tokenizer.pad_token_id, device)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            float(loss.detach())  # the loop reads the loss every step too
            tokens += int(batch["attention_mask"].sum())
            if (step + 1) % WINDOW_STEPS == 0:
                windows.append((tokens / (time.perf_counter() - wall), tokens / (time.thread_time() - cpu)))
                tokens, wall, cpu = 0, time.perf_counter(), time.thread_time()
        return windows[SKIPPED_START_WINDOWS:]
    finally:
        torch.set_num_threads(threads)


def fit_windows(config: PipelineConfig) -> tuple[list[tuple[float, float]], dict[str, Any]]:
    """Run the stage through Ray Train + DeepSpeed; (wall, CPU) tokens/s of its steady windows, run facts."""
    logs = RunLayout.of(config).logs("pretrain")
    with WorkerCpuClock(os.path.join(logs, METRICS_FILE)) as clock:
        result = run_stage(config, "pretrain")
    records = read_metrics(logs)
    windows = [r for r in records if "tokens_per_s" in r]
    kept = steady_windows(records)
    out = []
    for i in kept:
        seconds = windows[i]["time"] - windows[i - 1]["time"]  # i >= 1: the first window is always skipped
        tokens = windows[i]["tokens_per_s"] * seconds
        cpu = clock.window_cpu(i)
        out.append((windows[i]["tokens_per_s"], tokens / cpu if cpu > 0 else float("nan")))
    facts = {"wall_s": round(result.wall_seconds, 1), "windows": len(windows), "steady_windows": len(kept),
             "cpu_readings": len(clock.readings)}
    return out, facts


def fit_windows_retrying(config: PipelineConfig) -> tuple[list[tuple[float, float]], dict[str, Any]]:
    """`fit_windows`, run once more under a new run name if Ray Train loses the worker group.

    On a host shared with other Ray clusters, Ray Train's PlacementGroupCleaner can query another
    cluster's State API (it finds clusters by scanning the host, and `ray start` leaves
    /tmp/ray/ray_current_cluster behind), miss our controller there, take it for dead and remove our
    live placement group. One retry keeps the suite's result; the failure is kept in the notes.
    """
    try:
        return fit_windows(config)
    except TrainingFailed as exc:
        log.warning("fit failed, retrying once: %s", exc)
        windows, facts = fit_windows(config.model_copy(update={"run_name": config.run_name + "-retry"}))
        facts["retried_after"] = str(exc).splitlines()[0][:200]
        return windows, facts


def _median_of(windows: list[tuple[float, float]], which: int) -> float:
    values = [w[which] for w in windows if w[which] == w[which]]  # drop NaN (a missed CPU reading)
    return median(values) if values else float("nan")


def _row(zero_stage: int, ours: list[tuple[float, float]], baseline: list[tuple[float, float]],
         facts: dict[str, Any]) -> Row:
    ours_m, base_m = _median_of(ours, 0), _median_of(baseline, 0)
    cpu_ratio = _median_of(ours, 1) / _median_of(baseline, 1)
    if cpu_ratio >= GOAL_RATIO:
        verdict = (f"Per CPU-second our path reaches {cpu_ratio:.2f}x the bare loop: the wall-clock gap in this run "
                   "is mostly the worker getting less of a core (other jobs and Ray's own processes on 2 cores), "
                   "not extra work per step. ")
    else:
        verdict = (f"Per CPU-second our path reaches {cpu_ratio:.2f}x the bare loop, so the gap is extra work per "
                   "step, not only contention. ")
    return Row(
        measure=f"Training tokens/s, Ray Train + DeepSpeed ZeRO-{zero_stage} (1 worker, 1 thread) vs bare PyTorch loop",
        ours=f"{ours_m:,.0f} tok/s (median of {len(ours)} windows)",
        baseline=f"{base_m:,.0f} tok/s (median of {len(baseline)} windows)",
        ratio=ours_m / base_m,
        goal=GOAL,
        bound=verdict + PROFILE + " To close it: ZeRO-0 when one worker holds the model (ZeRO-2 only pays off "
              "across workers), more tokens per step (micro_batch_size, accumulation) so DeepSpeed's per-step "
              "cost shrinks relative to compute, and a quieter machine (or CPU-time ratios) to judge it.",
        details={"cpu_ratio": cpu_ratio, "ours_windows": ours, "baseline_windows": baseline, **facts,
                 "notes": [f"Training ZeRO-{zero_stage}: tokens per CPU-second, ours / bare loop = {cpu_ratio:.2f} "
                           f"(wall clock {ours_m / base_m:.2f}); fit wall time {facts['wall_s']} s, "
                           f"{facts['steady_windows']} of {facts['windows']} windows steady"
                           + (f"; the first fit failed and was retried ({facts['retried_after']})"
                              if "retried_after" in facts else "") + "."]},
    )


def measure() -> list[Row]:
    """Baseline, ZeRO-0, baseline, ZeRO-2, baseline on one local Ray started here and shut down after."""
    import ray

    storage_root = tempfile.mkdtemp(prefix="bench-train-")
    ray_dir = tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp")
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=ray_dir, log_to_driver=False)
    try:
        first = bench_config(storage_root, 0)
        tokenizer = load_tokenizer(str(TOKENIZER))
        data = prepare_stage_data("pretrain", first.stage("pretrain").data, tokenizer)
        baselines = [bare_loop_windows(first, data, tokenizer, BASELINE_STEPS)]
        rows = []
        for zero_stage in (0, 2):
            config = bench_config(storage_root, zero_stage)
            ours, facts = fit_windows_retrying(config)
            log.info("ZeRO-%d: %s", zero_stage, facts)
            baselines.append(bare_loop_windows(config, data, tokenizer, BASELINE_STEPS))
            rows.append(_row(zero_stage, ours, baselines[-2] + baselines[-1], facts))
        return rows
    finally:
        ray.shutdown()
        for path in (storage_root, ray_dir):
            shutil.rmtree(path, ignore_errors=True)
