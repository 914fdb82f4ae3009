"""One stage's data end to end on the real shared data with the minimind tokenizer."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from orchestrator.config import DataConfig, DataSourceConfig
from orchestrator.data.prepare import prepare_stage_data, split_eval
from orchestrator.data.sft import IGNORE_INDEX
from orchestrator.errors import DataError


def test_split_eval():
    train, held = split_eval(list(range(100)), 0.1, seed=7)
    assert len(train) == 90 and len(held) == 10
    assert sorted(train + held) == list(range(100))
    assert split_eval(list(range(100)), 0.1, seed=7) == (train, held)  # seeded
    assert [len(x) for x in split_eval(list(range(10)), 0.01, 0)] == [9, 1]  # at least one
    assert [len(x) for x in split_eval(list(range(10)), 0.0, 0)] == [10, 0]
    assert [len(x) for x in split_eval([1], 0.5, 0)] == [1, 0]
    assert [len(x) for x in split_eval(list(range(3)), 0.9, 0)] == [1, 2]  # never all of them


def test_empty_sources_is_an_error():
    with pytest.raises(DataError, match="sft.data.sources is empty"):
        prepare_stage_data("sft", DataConfig(), tokenizer=None)


def test_prepare_pretrain_on_statutes(shared_data, minimind_tokenizer):
    data = DataConfig(
        sources=[DataSourceConfig(path=str(shared_data / "pretrain" / "legal"), text_unit="line", max_records=400)],
        eval_split=0.1,
        block_size=128,
    )
    prepared = prepare_stage_data("pretrain", data, minimind_tokenizer)
    stats = prepared.stats
    assert stats["records"] == 400
    assert stats["skipped_records"] == 0
    assert (stats["train_documents"], stats["eval_documents"]) == (360, 40)
    assert prepared.train.column_names == ["input_ids"]
    assert prepared.train.num_rows == stats["train_blocks"] > 0
    assert prepared.eval is not None and prepared.eval.column_names == ["input_ids"]
    assert prepared.eval.num_rows == stats["eval_blocks"] > 0
    assert prepared.train.schema.field("input_ids").type == pa.list_(pa.int32())
    rows = prepared.train.column("input_ids").to_pylist()
    assert {len(r) for r in rows} == {128}
    assert prepared.train_tokens == stats["train_tokens"] == 128 * len(rows)
    assert 0 <= stats["dropped_tail_tokens"] < 128
    flat = np.concatenate([np.asarray(r) for r in rows])
    assert not (flat == minimind_tokenizer.pad_token_id).any()
    # 360 training documents, each followed by one EOS; the tail may have cut some off
    n_eos = int((flat == minimind_tokenizer.eos_token_id).sum())
    assert 360 - stats["dropped_tail_tokens"] <= n_eos <= 360


def test_prepare_sft_on_medical_data(shared_data, minimind_tokenizer):
    max_length = 256
    data = DataConfig(
        sources=[
            DataSourceConfig(path=str(shared_data / "sft" / "medical_alpaca.jsonl"), max_records=200),
            DataSourceConfig(path=str(shared_data / "multiturn" / "medical_history.json"), max_records=50),
        ],
        eval_split=0.1,
        max_length=max_length,
    )
    prepared = prepare_stage_data("sft", data, minimind_tokenizer)
    stats = prepared.stats
    assert stats["records"] == 250
    assert stats["skipped_records"] == 0
    assert stats["template"] == "tokenizer"
    assert stats["dropped_untrainable"] == 0
    assert (stats["train_examples"], stats["eval_examples"]) == (225, 25)
    for table, n in ((prepared.train, 225), (prepared.eval, 25)):
        assert table is not None
        assert table.column_names == ["input_ids", "labels"]
        assert table.num_rows == n
        ids_rows = table.column("input_ids").to_pylist()
        label_rows = table.column("labels").to_pylist()
        for ids, labels in zip(ids_rows, label_rows):
            assert len(ids) == len(labels) <= max_length
            trained = [(i, l) for i, l in zip(ids, labels) if l != IGNORE_INDEX]
            assert trained, "an example without a trainable token"
            assert all(i == l for i, l in trained)
            assert labels[0] == IGNORE_INDEX  # every example starts with a masked prompt token
    assert stats["max_length"] <= max_length
    assert stats["train_tokens"] == sum(len(r) for r in prepared.train.column("input_ids").to_pylist())
    assert 0 < stats["trainable_tokens"] < stats["train_tokens"]


def test_prepare_sft_rejects_documents(shared_data, minimind_tokenizer):
    data = DataConfig(sources=[DataSourceConfig(path=str(shared_data / "pretrain" / "medical" / "fever.txt"), max_records=5)])
    with pytest.raises(DataError, match="stage 2 needs conversations"):
        prepare_stage_data("sft", data, minimind_tokenizer)
