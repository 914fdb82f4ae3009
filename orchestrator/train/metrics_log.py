"""Training metrics as a JSONL file, TensorBoard event files and, when configured, the run's MLflow / W&B
runs (rank 0 only; other ranks get a no-op)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from typing import Any, Callable, Iterator, Optional

from orchestrator import storage
from orchestrator.checkpoint import latest_complete_checkpoint
from orchestrator.layout import RunLayout
from orchestrator.tracking import Tracker, TrackingTarget, numeric_metrics

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Append-only metric records in `<logs_dir>/metrics.jsonl` and `<logs_dir>/tensorboard/`."""

    def __init__(self, logs_dir: Optional[str], stage: str, tracking: Optional[TrackingTarget] = None):
        self.logs_dir = logs_dir
        self.stage = stage
        self._writer = None
        self._tracker = None
        if logs_dir is None:
            return
        if tracking is not None:
            self._tracker = Tracker(tracking)
        os.makedirs(logs_dir, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(os.path.join(logs_dir, "tensorboard"))
        except ImportError:  # tensorboard is optional at run time; the JSONL log is always written
            self._writer = None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if self.logs_dir is None:
            return
        record = {"time": time.time(), "stage": self.stage, "step": step, **metrics}
        with open(os.path.join(self.logs_dir, METRICS_FILE), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{self.stage}/{key}", value, step)
            self._writer.flush()
        if self._tracker is not None:
            self._tracker.log_metrics(numeric_metrics(self.stage, metrics), step)

    def restore_from(self, checkpoint_dir: str) -> None:
        """Continue the logs a checkpoint carries (a resumed run on remote storage starts from them)."""
        source = os.path.join(checkpoint_dir, "logs")
        if self.logs_dir is None or not os.path.isdir(source):
            return
        if self._writer is not None:
            self._writer.close()
        shutil.rmtree(self.logs_dir, ignore_errors=True)
        shutil.copytree(source, self.logs_dir)
        if self._writer is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(os.path.join(self.logs_dir, "tensorboard"))

    def copy_into(self, checkpoint_dir: str) -> None:
        """Put a copy of the logs into a checkpoint, so they travel with it to remote storage."""
        if self.logs_dir is not None and os.path.isdir(self.logs_dir):
            shutil.copytree(self.logs_dir, os.path.join(checkpoint_dir, "logs"))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None


def read_metrics(logs_dir: str) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    path = os.path.join(logs_dir, METRICS_FILE)
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_stage_metrics(layout: RunLayout, stage: str) -> list[dict[str, Any]]:
    """All metric records of a stage: from the local logs, or from its latest complete checkpoint (remote)."""
    if not layout.is_remote:
        return read_metrics(layout.logs(stage))
    latest = latest_complete_checkpoint(layout.stage(stage))
    if latest is None:
        return []
    text = storage.read_bytes(storage.join(latest, "logs", METRICS_FILE)).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@contextlib.contextmanager
def follow_metrics(logs_dir: str, on_record: Callable[[dict[str, Any]], None],
                   interval_s: float = 1.0) -> Iterator[None]:
    """Call `on_record` with each record of `<logs_dir>/metrics.jsonl` (those there and those appended)
    while the block runs: the driver's view of rank 0's progress, when it can see that directory."""
    stop = threading.Event()
    path = os.path.join(logs_dir, METRICS_FILE)

    def follow() -> None:
        offset = 0
        while True:
            last_round = stop.is_set()  # one more read after the block ended: the final records
            offset = _read_new_records(path, offset, on_record)
            if last_round:
                return
            stop.wait(interval_s)

    thread = threading.Thread(target=follow, name="follow-metrics", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _read_new_records(path: str, offset: int, on_record: Callable[[dict[str, Any]], None]) -> int:
    """Hand the complete lines after `offset` to `on_record`; returns the new offset."""
    try:
        if os.path.getsize(path) < offset:  # replaced (a resume restores the logs of its checkpoint)
            offset = 0
        with open(path, "rb") as handle:
            handle.seek(offset)
            while (line := handle.readline()).endswith(b"\n"):
                offset = handle.tell()
                on_record(json.loads(line))
    except (OSError, ValueError):
        pass  # not written yet, or a line cut short: read again next time
    return offset
