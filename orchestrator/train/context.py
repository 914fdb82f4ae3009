"""How the worker recipe reaches Ray Train: one small context object, replaceable in a test.

In the spirit of Ray Train V2's `train_fn_utils` and its local testing context: the recipe asks the
context for its rank, device, dataset shards and the checkpoint to resume from, and hands it metrics
and checkpoint directories. `RayTrainContext` delegates to `ray.train` (imported inside it);
`LocalTrainContext` runs the recipe in one plain process (unit tests, debugging) and keeps what was
reported in memory and its checkpoints in a local directory laid out as Ray lays out a run.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Protocol, Sequence

import numpy as np
import torch


class CheckpointHandle(Protocol):
    """What the recipe uses of a checkpoint handed to it (`ray.train.Checkpoint` has both)."""

    path: str

    def as_directory(self) -> contextlib.AbstractContextManager[str]: ...


class TrainContext(Protocol):
    """The recipe's whole view of the distributed runtime."""

    world_rank: int
    world_size: int
    local_rank: int

    def device(self) -> torch.device: ...

    def get_dataset_shard(self, name: str) -> Any:
        """This worker's part of dataset `name`; it offers `iter_batches` like Ray's DataIterator."""

    def get_checkpoint(self) -> Optional[CheckpointHandle]:
        """The checkpoint the runtime says to resume from, or None."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str] = None,
               checkpoint_dir_name: Optional[str] = None, upload_async: bool = False) -> None:
        """Report metrics, and with `checkpoint_dir` this rank's files of a checkpoint. The context owns that directory
        from here on and deletes it once its files are stored: before it returns, or with `upload_async` in the
        background while training goes on (a failed upload then fails the run at a later step)."""


class RayTrainContext:
    """The context of a Ray Train worker: everything delegates to `ray.train`."""

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.world_rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.local_rank = context.get_local_rank()

    def device(self) -> torch.device:
        from ray.train.torch import get_device

        return get_device()

    def get_dataset_shard(self, name: str) -> Any:
        import ray.train

        return ray.train.get_dataset_shard(name)

    def get_checkpoint(self) -> Optional[CheckpointHandle]:
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str] = None,
               checkpoint_dir_name: Optional[str] = None, upload_async: bool = False) -> None:
        import ray.train
        from ray.train import CheckpointUploadMode

        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        mode = CheckpointUploadMode.ASYNC if upload_async else CheckpointUploadMode.SYNC
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                         checkpoint_dir_name=checkpoint_dir_name, checkpoint_upload_mode=mode,
                         delete_local_checkpoint_after_upload=True)


@dataclass(frozen=True)
class LocalCheckpoint:
    """A checkpoint directory on this machine."""

    path: str

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        yield self.path


class LocalShard:
    """Rows held in memory, read back in batches the way the recipe reads a Ray Data shard.

    `rows` are dicts of column → value (a pyarrow table's `to_pylist()`). Shuffling is a seeded shuffle
    of all rows (Ray shuffles within a buffer; the recipe only relies on "seeded").
    """

    def __init__(self, rows: Sequence[dict[str, Any]]):
        self.rows = list(rows)

    def iter_batches(self, batch_size: int, batch_format: str = "numpy", drop_last: bool = False,
                     local_shuffle_buffer_size: Optional[int] = None,
                     local_shuffle_seed: Optional[int] = None) -> Iterator[dict[str, np.ndarray]]:
        if batch_format != "numpy":
            raise ValueError(f"LocalShard.iter_batches: batch_format {batch_format!r}, only 'numpy' is offered")
        rows = list(self.rows)
        if local_shuffle_buffer_size is not None:
            random.Random(local_shuffle_seed).shuffle(rows)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            if drop_last and len(chunk) < batch_size:
                return
            yield {name: _object_column([row[name] for row in chunk]) for name in chunk[0]}


def _object_column(values: list) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value
    return column


@dataclass
class LocalReport:
    metrics: dict[str, Any]
    checkpoint_path: Optional[str]


@dataclass
class LocalTrainContext:
    """One process, rank 0 of 1: shards from memory, reports recorded, checkpoints copied to `storage_dir`.

    Checkpoints land in `<storage_dir>/<checkpoint_dir_name>`, as Ray puts them under `<run>/<stage>/`.
    torch.distributed must be initialised (world size 1) before the recipe runs: DeepSpeed needs it.
    """

    storage_dir: str
    shards: dict[str, LocalShard] = field(default_factory=dict)
    checkpoint: Optional[CheckpointHandle] = None
    reports: list[LocalReport] = field(default_factory=list)
    world_rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def device(self) -> torch.device:
        return torch.device("cpu")

    def get_dataset_shard(self, name: str) -> Any:
        if name not in self.shards:
            raise KeyError(f"LocalTrainContext has no dataset {name!r} (it has: {sorted(self.shards)})")
        return self.shards[name]

    def get_checkpoint(self) -> Optional[CheckpointHandle]:
        return self.checkpoint

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str] = None,
               checkpoint_dir_name: Optional[str] = None, upload_async: bool = False) -> None:
        saved = None
        if checkpoint_dir is not None:  # stored at once, whatever upload_async says
            saved = os.path.join(self.storage_dir, checkpoint_dir_name or f"checkpoint_{len(self.reports):06d}")
            shutil.copytree(checkpoint_dir, saved)
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            self.checkpoint = LocalCheckpoint(saved)  # as Ray does: the latest reported one resumes
        self.reports.append(LocalReport(dict(metrics), saved))
