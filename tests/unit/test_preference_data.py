"""Stage 3 data: record shapes → pairs / unpaired examples, token-exact masked encoding, bad records, config."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.config import DataConfig, DataSourceConfig, load_config
from orchestrator.data.formats import Message
from orchestrator.data.prepare import prepare_stage_data
from orchestrator.data.preference import (
    PreferencePair,
    UnpairedExample,
    as_pairs,
    as_unpaired,
    encode_pairs,
    encode_unpaired,
    load_preference_records,
    record_to_preference,
    render_prompt_answer,
)
from orchestrator.data.sft import IGNORE_INDEX
from orchestrator.data.templates import ChatMLTemplate, select_template
from orchestrator.errors import ConfigError, DataError, DataValidationError

TWO_TURNS = {
    "conversations": [
        {"from": "human", "value": "我发烧了。"},
        {"from": "gpt", "value": "体温多少度？"},
        {"from": "human", "value": "39度，要吃药吗？"},
    ],
    "chosen": "可以服用退烧药，多喝水。",
    "rejected": "不用管。",
}


def _answer_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([int(t) for t, l in zip(ids, labels) if l != IGNORE_INDEX])


def test_medicalgpt_record_with_string_answers():
    pair = record_to_preference(TWO_TURNS, "f.jsonl:1", {})
    assert isinstance(pair, PreferencePair)
    assert [m.role for m in pair.prompt] == ["user", "assistant", "user"]
    assert (pair.chosen, pair.rejected) == ("可以服用退烧药，多喝水。", "不用管。")


def test_llamafactory_ranking_with_message_objects_and_system():
    record = {"conversations": [{"from": "human", "value": "hi"}], "system": "be kind",
              "chosen": {"from": "gpt", "value": "hello"}, "rejected": {"from": "gpt", "value": "go away"}}
    pair = record_to_preference(record, "f.json#0", {})
    assert pair.prompt == (Message("system", "be kind"), Message("user", "hi"))
    assert (pair.chosen, pair.rejected) == ("hello", "go away")


def test_plain_text_prompt_and_mapped_fields():
    pair = record_to_preference({"q": "what?", "good": "this", "bad": "that"}, "f:1",
                                {"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert pair.prompt == (Message("user", "what?"),) and pair.chosen == "this" and pair.rejected == "that"


def test_openai_message_lists_implicit_and_explicit_prompt():
    implicit = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    pair = record_to_preference(implicit, "f:1", {})
    assert pair.prompt == (Message("user", "q"),) and (pair.chosen, pair.rejected) == ("a", "b")
    explicit = {"prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    assert record_to_preference(explicit, "f:1", {}) == pair


def test_unpaired_kto_records():
    example = record_to_preference({"messages": [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"}], "label": False}, "f:1", {})
    assert example == UnpairedExample((Message("user", "q"),), "a", False, "f:1")
    example = record_to_preference({"prompt": "q", "completion": "a", "label": True}, "f:2", {})
    assert example.desirable and example.completion == "a"


@pytest.mark.parametrize("record, field, expected", [
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": "a"}, "rejected", "an answer"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}], "chosen": "a",
      "rejected": "b"}, "conversations", "ending with a user"),
    ({"conversations": [{"from": "robot", "value": "q"}], "chosen": "a", "rejected": "b"},
     "conversations[0].from", "one of"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "rejected", "non-empty"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": "yes"},
     "label", "true (desirable)"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
     "rejected", "same messages"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, field, expected):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in (good, record)) + "\n", encoding="utf-8")
    with pytest.raises(DataValidationError) as info:
        load_preference_records([DataSourceConfig(path=str(path))])
    message = str(info.value)
    assert f"pairs.jsonl:2: field '{field}'" in message and expected in message


def test_source_format_that_does_not_apply_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="format 'document' does not apply"):
        load_preference_records([DataSourceConfig(path=str(path), format="document")])


def test_alpaca_ranking_and_kto_tag_records():
    pair = record_to_preference({"instruction": "q", "input": "more", "chosen": "a", "rejected": "b"}, "f:1", {})
    assert pair.prompt == (Message("user", "q\nmore"),) and (pair.chosen, pair.rejected) == ("a", "b")
    example = record_to_preference({"messages": [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"}], "kto_tag": True}, "f:2", {})
    assert isinstance(example, UnpairedExample) and example.desirable


def test_llamafactory_dataset_entry_with_columns(tmp_path):
    records = [{"msgs": [{"from": "human", "value": "q"}], "good": {"from": "gpt", "value": "a"},
                "bad": {"from": "gpt", "value": "b"}}]
    (tmp_path / "pairs.json").write_text(json.dumps(records), encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"my_pairs": {
        "file_name": "pairs.json", "formatting": "sharegpt", "ranking": True,
        "columns": {"messages": "msgs", "chosen": "good", "rejected": "bad"}}}), encoding="utf-8")
    loaded, report = load_preference_records([DataSourceConfig(path=str(tmp_path), dataset="my_pairs")])
    assert loaded == [PreferencePair((Message("user", "q"),), "a", "b", loaded[0].origin)]
    assert any(name.endswith("dataset_info.json") for name in report.files)


def test_two_turn_prompt_labels_cover_exactly_each_answer_and_end_of_turn(small_tokenizer):
    template = ChatMLTemplate()
    pair = record_to_preference(TWO_TURNS, "f:1", {})
    columns = encode_pairs([pair], small_tokenizer, template, max_length=512)
    for side, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        ids, labels = columns[f"{side}_input_ids"][0], columns[f"{side}_labels"][0]
        assert _answer_text(small_tokenizer, ids, labels) == answer + "<|im_end|>"
        prompt_text, answer_text = render_prompt_answer(template, pair.prompt, answer, "f:1")
        # token-exact: the ids are those of the whole text tokenized at once
        assert ids.tolist() == small_tokenizer(prompt_text + answer_text, add_special_tokens=False)["input_ids"]
        first = int(np.flatnonzero(labels != IGNORE_INDEX)[0])
        assert (labels[:first] == IGNORE_INDEX).all() and (labels[first:] != IGNORE_INDEX).all()
        assert "体温多少度" in small_tokenizer.decode(ids[:first].tolist())  # the earlier answer is prompt


def test_real_medicalgpt_pairs_with_the_tokenizer_template(shared_data, minimind_tokenizer):
    path = shared_data / "preference" / "dpo_zh_500.jsonl"
    records, report = load_preference_records([DataSourceConfig(path=str(path), max_records=40)])
    assert report.records == 40 and report.skipped == 0
    pairs = as_pairs(records)
    template = select_template("auto", minimind_tokenizer)
    columns = encode_pairs(pairs, minimind_tokenizer, template, max_length=4096)
    for i, pair in enumerate(pairs):
        for side in ("chosen", "rejected"):
            _, answer_text = render_prompt_answer(template, pair.prompt, getattr(pair, side), pair.origin)
            text = _answer_text(minimind_tokenizer, columns[f"{side}_input_ids"][i], columns[f"{side}_labels"][i])
            assert text == answer_text, pair.origin
    assert columns["example_id"] == list(range(40))


def test_truncation_keeps_prompt_end_and_answer_start(small_tokenizer):
    pair = PreferencePair((Message("user", "fever " * 60),), "rest " * 60, "no", "f:1")
    columns = encode_pairs([pair], small_tokenizer, ChatMLTemplate(), max_length=40)
    ids, labels = columns["chosen_input_ids"][0], columns["chosen_labels"][0]
    assert len(ids) == 40
    n_prompt = int(np.flatnonzero(labels != IGNORE_INDEX)[0])
    assert n_prompt == 20  # half the budget each
    assert small_tokenizer.decode(ids[:n_prompt].tolist()).endswith("<|im_start|>assistant\n")
    assert small_tokenizer.decode(ids[n_prompt:].tolist()).startswith("rest")
    # the short answer stays whole; its prompt keeps the rest of the budget
    rejected = columns["rejected_input_ids"][0], columns["rejected_labels"][0]
    assert len(rejected[0]) == 40 and _answer_text(small_tokenizer, *rejected) == "no<|im_end|>"


def test_kto_unpairs_pairs_and_builds_mismatched_partners(small_tokenizer):
    pairs = [PreferencePair((Message("user", f"q{i}"),), f"good{i}", f"bad{i}", f"f:{i}") for i in range(2)]
    examples = as_unpaired(pairs)
    assert [(e.completion, e.desirable) for e in examples] == [("good0", True), ("bad0", False),
                                                                ("good1", True), ("bad1", False)]
    columns = encode_unpaired(examples, small_tokenizer, ChatMLTemplate(), 128, first_id=10)
    assert columns["desirable"] == [True, False, True, False] and columns["example_id"] == [10, 11, 12, 13]
    partner = columns["kl_input_ids"][0], columns["kl_labels"][0]
    assert _answer_text(small_tokenizer, *partner) == "bad0<|im_end|>"  # q0's prompt, the next example's answer
    assert "q0" in small_tokenizer.decode(partner[0].tolist())
    with pytest.raises(DataError, match="loss=kto"):
        as_pairs(examples)


def test_prepare_stage_data_for_preference(shared_data, minimind_tokenizer):
    data = DataConfig(sources=[DataSourceConfig(path=str(shared_data / "preference" / "dpo_zh_500.jsonl"),
                                                max_records=30)], eval_split=0.2, max_length=256)
    prepared = prepare_stage_data("preference", data, minimind_tokenizer)
    assert prepared.train.num_rows == 24 and prepared.eval.num_rows == 6
    assert set(prepared.train.column_names) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                                "rejected_labels", "example_id"}
    assert sorted(prepared.train.column("example_id").to_pylist() + prepared.eval.column("example_id").to_pylist()) \
        == list(range(30))
    assert max(len(r) for r in prepared.train.column("chosen_input_ids").to_pylist()) <= 256
    unpaired = prepare_stage_data("preference", data, minimind_tokenizer, unpaired=True)
    assert unpaired.train.num_rows == 48 and "kl_input_ids" in unpaired.train.column_names
    assert unpaired.stats["kind"] == "unpaired"


def test_preference_section_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {tiny: {}}\ntokenizer: {train: {}}\nsft: {}\n"
                    "preference: {train: {loss: simpo, beta: 2.0, simpo_gamma: 1.0, method: lora}}\n", encoding="utf-8")
    config = load_config(str(path))
    assert config.stage("preference").train.loss == "simpo" and not config.preference.train.needs_reference
    with pytest.raises(ConfigError, match="label_smoothing applies to the sigmoid and simpo"):
        load_config(str(path), ["preference.train.loss=ipo", "preference.train.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="loss"):
        load_config(str(path), ["preference.train.loss=hinge"])
    with pytest.raises(ConfigError, match="the simpo loss has no reference model to precompute"):
        load_config(str(path), ["preference.train.precompute_reference=true"])
    assert load_config(str(path), ["preference.train.loss=kto",
                                   "preference.train.precompute_reference=true"]).preference.train.precompute_reference
    with pytest.raises(ConfigError, match="sft.train.method=prompt_tuning .* so preference cannot start"):
        load_config(str(path), ["sft.train.method=prompt_tuning"])
