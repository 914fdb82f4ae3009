"""Replay: a configured share of earlier data in a stage's training set, realised within ±2%."""

from __future__ import annotations

import pytest

from orchestrator.config import DataConfig
from orchestrator.data.prepare import prepare_stage_data
from orchestrator.data.replay import replay_amounts, take_tokens
from orchestrator.data.sft import IGNORE_INDEX
from orchestrator.errors import ConfigError


def test_replay_amounts_make_up_their_share_of_the_total():
    assert replay_amounts(800, [0.2]) == [200]  # 200 / (800 + 200)
    assert replay_amounts(500, [0.25, 0.25]) == [250, 250]


def test_take_tokens_hits_the_target_exactly_and_cycles():
    pool = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]  # 12 tokens with one EOS each
    taken = take_tokens(pool, 30, seed=0)
    assert sum(len(ids) + 1 for ids in taken) == 30  # 2.5 passes, the last piece cut short
    assert sorted(map(tuple, taken[:3])) == sorted(map(tuple, pool))
    assert take_tokens(pool, 30, seed=0) == taken  # seeded


def test_replay_ratios_must_leave_room_for_the_stage_data():
    with pytest.raises(ConfigError, match="replay ratios add up to 1.1"):
        from orchestrator.config import config_from_dict

        config_from_dict({"model": {"tiny": {}}, "tokenizer": {"path": "t"}, "pretrain": {"data": {"replay": [
            {"source": {"path": "a"}, "ratio": 0.6}, {"source": {"path": "b"}, "ratio": 0.5}]}}})


def test_stage_one_replays_instructions_as_documents(shared_data, minimind_tokenizer):
    legal = {"path": str(shared_data / "pretrain" / "legal"), "text_unit": "line", "max_records": 2000}
    replay = {"path": str(shared_data / "sft" / "medical_alpaca.jsonl"), "format": "alpaca"}
    plain = prepare_stage_data("pretrain", DataConfig(sources=[legal], block_size=128), minimind_tokenizer)
    mixed = prepare_stage_data("pretrain", DataConfig(sources=[legal], block_size=128,
                                                      replay=[{"source": replay, "ratio": 0.2}]), minimind_tokenizer)
    [entry] = mixed.stats["replay"]
    assert entry["ratio"] == 0.2 and abs(entry["realised"] - 0.2) <= 0.02
    assert mixed.stats["replay_share"] == entry["realised"]
    assert str(shared_data / "sft" / "medical_alpaca.jsonl") in mixed.stats["files"]
    # Measured from the tables: the stage's own tokens did not change, the rest is replay.
    own = plain.stats["train_tokens"] + plain.stats["dropped_tail_tokens"]
    total = mixed.stats["train_tokens"] + mixed.stats["dropped_tail_tokens"]
    assert abs((total - own) / total - 0.2) <= 0.02
    assert mixed.eval.equals(plain.eval)  # replay stays out of evaluation


def test_stage_two_replays_documents_and_conversations(shared_data, minimind_tokenizer):
    config = DataConfig(
        sources=[{"path": str(shared_data / "sft" / "medical_alpaca.jsonl"), "max_records": 1000}], max_length=256,
        replay=[{"source": {"path": str(shared_data / "pretrain" / "legal"), "text_unit": "line", "max_records": 1000},
                 "ratio": 0.25},
                {"source": {"path": str(shared_data / "multiturn" / "medical_history.json"), "format": "alpaca"},
                 "ratio": 0.1}])
    prepared = prepare_stage_data("sft", config, minimind_tokenizer)
    documents, conversations = prepared.stats["replay"]
    assert abs(documents["realised"] - 0.25) <= 0.02 and abs(conversations["realised"] - 0.1) <= 0.02
    own = 950  # 1,000 records less the 5% held out
    assert own + documents["examples"] + conversations["examples"] == prepared.stats["train_examples"]
    # Replayed documents train every token; a conversation masks its prompt: count them in the table.
    labels = prepared.train.column("labels").to_pylist()
    fully_trained = sum(all(label != IGNORE_INDEX for label in row) for row in labels)
    assert abs(fully_trained / len(labels) - 0.25) <= 0.02
    again = prepare_stage_data("sft", config, minimind_tokenizer)
    assert again.train.equals(prepared.train)  # sampled with the shuffle seed
