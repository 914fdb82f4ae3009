"""Length-grouped micro-batches for stage 2."""

import numpy as np
import pyarrow as pa

from orchestrator.data.batching import (
    consecutive_batches,
    group_by_length,
    lengths_of,
    padding_efficiency,
)
from orchestrator.train.recipe import schedule_for


def test_every_example_lands_in_exactly_one_micro_batch_of_similar_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 400, size=203).tolist()
    batches = group_by_length(lengths, 8, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(203))
    assert all(1 <= len(b) <= 8 for b in batches) and sum(len(b) == 8 for b in batches) == 25
    assert padding_efficiency(lengths, batches) > 0.95 > padding_efficiency(lengths, consecutive_batches(203, 8))
    assert group_by_length(lengths, 8, seed=1) == batches  # deterministic for a seed
    assert group_by_length(lengths, 8, seed=2) != batches  # the micro-batch order is shuffled


def test_padding_efficiency_is_exact():
    assert padding_efficiency([2, 4, 4, 1], [[0, 1], [2, 3]]) == (2 + 4 + 4 + 1) / (4 * 2 + 4 * 2)
    assert consecutive_batches(5, 2) == [[0, 1], [2, 3], [4]]


def test_lengths_of_a_token_table_and_a_schedule_of_micro_batches():
    table = pa.table({"input_ids": pa.array([[1, 2], [3], [4, 5, 6]], type=pa.list_(pa.int32()))})
    assert lengths_of(table) == [2, 1, 3]
    # 10 rows, 2 workers, micro-batches of 2, accumulation 2: 5 rows each -> 2 micro-batches -> 1 step an epoch
    assert schedule_for(10, 2, 2, 2, 3).total_steps == 3
