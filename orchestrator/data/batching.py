"""Stage 2 micro-batches grouped by length, so padding stays small.

Random batches of SFT conversations are mostly padding (on the medical SFT data, 8 random
conversations padded to the longest are ~37% real tokens). Sorting by length and cutting
micro-batches from the sorted order puts similar lengths together (~99% real tokens); the
micro-batches themselves are then shuffled, so training still sees them in random order.
Each micro-batch becomes one row of the table handed to Ray Data, which keeps the grouping
intact through sharding and shuffling.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import pyarrow as pa


def group_by_length(lengths: Sequence[int], micro_batch_size: int, seed: int) -> list[list[int]]:
    """Indices of examples in micro-batches of similar length, the micro-batches in random order."""
    rng = random.Random(seed)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    rng.shuffle(batches)
    return batches


def padding_efficiency(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Real tokens / tokens after padding each batch to its longest member."""
    real = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches if batch)
    return real / padded if padded else 1.0


def consecutive_batches(n: int, micro_batch_size: int) -> list[list[int]]:
    """Rows in their given order, cut into micro-batches (what ungrouped training does)."""
    return [list(range(i, min(i + micro_batch_size, n))) for i in range(0, n, micro_batch_size)]


def prebatch_table(table: pa.Table, batches: Sequence[Sequence[int]]) -> pa.Table:
    """One row per micro-batch: every column becomes a list of the batch's rows (list<list<int32>>).

    Done in Arrow (one `take` and new offsets), so it costs about as much as the table itself.
    """
    order = pa.array([i for batch in batches for i in batch], type=pa.int64())
    offsets = pa.array(np.concatenate([[0], np.cumsum([len(b) for b in batches])]).astype(np.int32))
    taken = table.take(order)
    return pa.table({name: pa.ListArray.from_arrays(offsets, taken.column(name).combine_chunks())
                     for name in table.column_names})


def lengths_of(table: pa.Table) -> list[int]:
    """Token count of every row of a tokenized table."""
    offsets = table.column("input_ids").combine_chunks().offsets.to_numpy()
    return np.diff(offsets).tolist()
