"""A worker's reading of a prepared shard set: its share of an epoch, in micro-batches, from any position.

Every worker computes its own rows from the manifest (orchestrator.data.epoch_order); no split is
coordinated between workers, so a resumed worker starts at exactly the micro-batch it stopped at.
Rows are read one shard at a time, a window of micro-batches at a time: memory stays bounded however
large the corpus grows. With `group_by_length` (stage 2) each window's rows are cut into micro-batches
of similar length, the micro-batches shuffled (seeded by seed, epoch, rank and window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from orchestrator.data.batching import consecutive_batches, group_by_length
from orchestrator.data.epoch_order import derived_seed, row_offsets, worker_segments, worker_share
from orchestrator.data.shards import ShardInfo, ShardManifest, read_shard

WINDOW_MICRO_BATCHES = 256  # micro-batches grouped by length together (rows in memory: this x micro_batch_size)


@dataclass(frozen=True)
class MicroBatch:
    """Rows of one micro-batch: their global ids and token columns (one array per row)."""

    row_ids: np.ndarray
    columns: dict[str, list[np.ndarray]]


def _rows_of(table: pa.Table, rows: np.ndarray) -> dict[str, list[np.ndarray]]:
    taken = table.take(pa.array(rows, type=pa.int64()))
    out = {}
    for name in taken.column_names:
        column = taken.column(name).combine_chunks()
        offsets = column.offsets.to_numpy()
        values = column.values.to_numpy(zero_copy_only=False)
        out[name] = [values[offsets[i]:offsets[i + 1]] for i in range(len(rows))]
    return out


class ShardReader:
    """Reads one part (train or eval) of a shard set."""

    def __init__(self, set_uri: str, manifest: ShardManifest, part: str = "train"):
        self.set_uri = set_uri
        self.shards: list[ShardInfo] = manifest.part(part)
        self.row_counts = [s.rows for s in self.shards]
        self.offsets = row_offsets(self.row_counts)
        self._cached: tuple[Optional[int], Optional[pa.Table]] = (None, None)

    @property
    def total_rows(self) -> int:
        return int(sum(self.row_counts))

    def micro_batches_per_epoch(self, world_size: int, micro_batch_size: int) -> int:
        return worker_share(self.total_rows, world_size) // micro_batch_size

    def _table(self, shard: int) -> pa.Table:
        if self._cached[0] != shard:  # one shard in memory at a time
            self._cached = (shard, read_shard(self.set_uri, self.shards[shard]))
        return self._cached[1]

    def _positions(self, seed: int, epoch: int, world_size: int, rank: int, start: int,
                   stop: int) -> tuple[np.ndarray, dict[str, list[np.ndarray]]]:
        ids, columns = [], {}
        for segment in worker_segments(self.row_counts, seed, epoch, world_size, rank, start, stop):
            ids.append(self.offsets[segment.shard] + segment.rows)
            for name, values in _rows_of(self._table(segment.shard), segment.rows).items():
                columns.setdefault(name, []).extend(values)
        return (np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)), columns

    def epoch_micro_batches(self, epoch: int, seed: int, world_size: int, rank: int, micro_batch_size: int,
                            group_lengths: bool = False, skip: int = 0) -> Iterator[MicroBatch]:
        """Worker `rank`'s micro-batches of `epoch` from micro-batch `skip` on (partial ones dropped)."""
        total = self.micro_batches_per_epoch(world_size, micro_batch_size)
        for window in range(skip // WINDOW_MICRO_BATCHES, -(-total // WINDOW_MICRO_BATCHES)):
            first = window * WINDOW_MICRO_BATCHES
            count = min(WINDOW_MICRO_BATCHES, total - first)
            ids, columns = self._positions(seed, epoch, world_size, rank, first * micro_batch_size,
                                           (first + count) * micro_batch_size)
            if group_lengths:
                lengths = [len(row) for row in columns["input_ids"]]
                batches = group_by_length(lengths, micro_batch_size, derived_seed(seed, epoch, rank, window))
            else:
                batches = consecutive_batches(len(ids), micro_batch_size)
            for index, batch in enumerate(batches):
                if first + index >= skip:
                    yield MicroBatch(ids[batch], {name: [values[i] for i in batch] for name, values in columns.items()})

    def iter_batches(self, batch_size: int, batch_format: str = "numpy") -> Iterator[dict[str, list[np.ndarray]]]:
        """Every row in stored order, in batches (the evaluation set, which every worker reads whole)."""
        for shard in range(len(self.shards)):
            table = self._table(shard)
            for start in range(0, table.num_rows, batch_size):
                yield _rows_of(table, np.arange(start, min(start + batch_size, table.num_rows)))


class MaterialisedPart:
    """A small part of a shard set (the evaluation set, small by construction) read whole once, so every
    evaluation reads it from memory rather than from storage again."""

    def __init__(self, set_uri: str, manifest: ShardManifest, part: str = "eval"):
        tables = [read_shard(set_uri, shard) for shard in manifest.part(part)]
        self.table = pa.concat_tables(tables) if tables else None

    @property
    def total_rows(self) -> int:
        return 0 if self.table is None else self.table.num_rows

    def iter_batches(self, batch_size: int, batch_format: str = "numpy") -> Iterator[dict[str, list[np.ndarray]]]:
        """Every row in stored order, in batches."""
        for start in range(0, self.total_rows, batch_size):
            yield _rows_of(self.table, np.arange(start, min(start + batch_size, self.total_rows)))

