"""The order of an epoch over a fixed shard set: a pure function of (seed, epoch), so a resumed run
skips exactly the rows it already trained (the same rows, not only the same count).

An epoch's sequence is the shards in a seeded order, each shard's rows in a seeded order of their own.
Worker `rank` of `world_size` trains the contiguous positions
[rank * share, (rank + 1) * share) of that sequence, share = total_rows // world_size, so every worker
gets the same number of rows and reads only the shards its range touches. Memory is O(shards), never
O(rows of the corpus). A row's id is its place in the manifest's shard list (shard offset + row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np


@dataclass(frozen=True)
class Segment:
    """Consecutive positions of a worker's sequence that lie in one shard: which rows of it, in order."""

    shard: int  # index into the shard list
    rows: np.ndarray  # row numbers inside the shard


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]))


def derived_seed(*keys: int) -> int:
    """A 32-bit seed from several integers (for per-window shuffles)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0])


def shard_order(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The shards' order in `epoch`."""
    return _rng(seed, epoch).permutation(n_shards)


def row_order(n_rows: int, seed: int, epoch: int, shard: int) -> np.ndarray:
    """The order of one shard's rows in `epoch`."""
    return _rng(seed, epoch, shard, 1).permutation(n_rows)


def worker_share(total_rows: int, world_size: int) -> int:
    """Rows every worker trains per epoch (the remainder, < world_size rows, sits the epoch out)."""
    return total_rows // world_size


def row_offsets(row_counts: Sequence[int]) -> np.ndarray:
    """Global id of each shard's first row (ids follow the manifest's shard list)."""
    return np.concatenate([[0], np.cumsum(np.asarray(row_counts, dtype=np.int64))])[:-1]


def worker_segments(row_counts: Sequence[int], seed: int, epoch: int, world_size: int, rank: int,
                    start: int = 0, stop: int | None = None) -> Iterator[Segment]:
    """Positions [start, stop) of worker `rank`'s sequence in `epoch`, shard by shard."""
    counts = np.asarray(row_counts, dtype=np.int64)
    share = worker_share(int(counts.sum()), world_size)
    stop = share if stop is None else min(stop, share)
    if start >= stop:
        return
    lo, hi = rank * share + start, rank * share + stop  # positions in the epoch's whole sequence
    order = shard_order(len(counts), seed, epoch)
    ends = np.cumsum(counts[order])
    begins = ends - counts[order]
    for slot in np.nonzero((ends > lo) & (begins < hi))[0]:
        shard = int(order[slot])
        rows = row_order(int(counts[shard]), seed, epoch, shard)
        yield Segment(shard, rows[max(lo - begins[slot], 0): min(hi, ends[slot]) - begins[slot]])


def worker_row_ids(row_counts: Sequence[int], seed: int, epoch: int, world_size: int, rank: int,
                   start: int = 0, stop: int | None = None) -> np.ndarray:
    """Global row ids of positions [start, stop) of a worker's sequence (what it trains, in order)."""
    offsets = row_offsets(row_counts)
    parts = [offsets[s.shard] + s.rows for s in worker_segments(row_counts, seed, epoch, world_size, rank, start, stop)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
