"""Stage 2 micro-batches grouped by length, so padding stays small.

Random batches of SFT conversations are mostly padding (on the medical SFT data, 8 random
conversations padded to the longest are ~37% real tokens). Sorting by length and cutting
micro-batches from the sorted order puts similar lengths together (~99% real tokens); the
micro-batches themselves are then shuffled, so training still sees them in random order.
The workers' shard reader (orchestrator.data.shard_reader) groups each reading window this way.
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


def lengths_of(table: pa.Table) -> list[int]:
    """Token count of every row of a tokenized table."""
    offsets = table.column("input_ids").combine_chunks().offsets.to_numpy()
    return np.diff(offsets).tolist()
