"""Raw records → Documents and Conversations, validation messages, bad-record policy, weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config import DataSourceConfig
from orchestrator.data.formats import (
    Conversation,
    Document,
    Message,
    alpaca_to_conversation,
    conversation_to_document,
    convert_record,
    detect_format,
    load_examples,
    multiturn_to_conversation,
    sharegpt_to_conversation,
    to_document,
)
from orchestrator.data.readers import read_source
from orchestrator.errors import DataError, DataValidationError, RecordError

O = "f.jsonl:7"


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _msgs(*pairs) -> tuple[Message, ...]:
    return tuple(Message(role, content) for role, content in pairs)


# --- converters -------------------------------------------------------------------------------


def test_alpaca_joins_input_with_a_newline():
    conv = alpaca_to_conversation({"instruction": "Translate", "input": "你好", "output": "Hello"}, O, {})
    assert conv == Conversation(_msgs(("user", "Translate\n你好"), ("assistant", "Hello")), O)


def test_alpaca_blank_input_is_ignored():
    conv = alpaca_to_conversation({"instruction": "Q", "input": "  ", "output": "A"}, O, {})
    assert conv.messages == _msgs(("user", "Q"), ("assistant", "A"))


def test_alpaca_system_and_history_come_first():
    record = {
        "system": "You are a doctor.",
        "instruction": "And now?",
        "input": "",
        "output": "Rest.",
        "history": [["I have a fever.", "Drink water."], ["It is 39 C.", "Take paracetamol."]],
    }
    conv = alpaca_to_conversation(record, O, {})
    assert conv.messages == _msgs(
        ("system", "You are a doctor."),
        ("user", "I have a fever."),
        ("assistant", "Drink water."),
        ("user", "It is 39 C."),
        ("assistant", "Take paracetamol."),
        ("user", "And now?"),
        ("assistant", "Rest."),
    )
    assert conv.system == "You are a doctor."
    assert conv.turns == [
        ("I have a fever.", "Drink water."),
        ("It is 39 C.", "Take paracetamol."),
        ("And now?", "Rest."),
    ]


def test_alpaca_blank_system_is_dropped():
    conv = alpaca_to_conversation({"system": " ", "instruction": "Q", "output": "A"}, O, {})
    assert conv.system is None
    assert conv.messages == _msgs(("user", "Q"), ("assistant", "A"))


def test_multiturn_prompt_response_history():
    record = {"prompt": "p2", "response": "r2", "history": [["p1", "r1"]], "system": "sys"}
    conv = multiturn_to_conversation(record, O, {})
    assert conv.messages == _msgs(("system", "sys"), ("user", "p1"), ("assistant", "r1"), ("user", "p2"), ("assistant", "r2"))


def test_sharegpt_with_system():
    record = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "user", "value": "Fever?"},
            {"from": "assistant", "value": "Rest."},
        ]
    }
    conv = sharegpt_to_conversation(record, O, {})
    assert conv.messages == _msgs(
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Fever?"), ("assistant", "Rest.")
    )
    assert conv.turns == [("Hi", "Hello"), ("Fever?", "Rest.")]


def test_field_mapping():
    fields = {"instruction": "问", "output": "答"}
    record = {"问": "发烧怎么办？", "答": "多喝水。"}
    assert detect_format(record, fields) == "alpaca"
    conv = alpaca_to_conversation(record, O, fields)
    assert conv.messages == _msgs(("user", "发烧怎么办？"), ("assistant", "多喝水。"))


def test_field_mapping_through_a_source(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", [{"问": "Q1", "答": "A1"}, {"问": "Q2", "答": "A2"}])
    source = DataSourceConfig(path=str(path), fields={"instruction": "问", "output": "答"})
    convs, report = load_examples([source], "conversations")
    assert [c.turns for c in convs] == [[("Q1", "A1")], [("Q2", "A2")]]
    assert [c.origin for c in convs] == [f"{path}:1", f"{path}:2"]
    assert report.records == 2 and report.skipped == 0


@pytest.mark.parametrize(
    "record, mapping, expected",
    [
        ("plain text", {}, "document"),
        ({"text": "t"}, {}, "document"),
        ({"content": "t"}, {}, "document"),
        ({"instruction": "q", "output": "a"}, {}, "alpaca"),
        ({"prompt": "q", "response": "a"}, {}, "multiturn"),
        ({"conversations": []}, {}, "sharegpt"),
        ({"conversations": [], "instruction": "q"}, {}, "sharegpt"),
        ({"instruction": "q", "text": "t"}, {}, "alpaca"),
        ({"body": "t"}, {"text": "body"}, "document"),
        ({"msgs": []}, {"conversations": "msgs"}, "sharegpt"),
        ({"question": "q"}, {}, "unknown"),
        (42, {}, "unknown"),
    ],
)
def test_detect_format(record, mapping, expected):
    assert detect_format(record, mapping) == expected


def test_to_document():
    assert to_document("text", O, {}) == Document("text", O)
    assert to_document({"content": "c"}, O, {}) == Document("c", O)
    assert to_document({"body": "b"}, O, {"text": "body"}) == Document("b", O)
    with pytest.raises(RecordError) as info:
        to_document({"title": "x"}, O, {})
    assert str(info.value) == "f.jsonl:7: field 'text': expected a document field 'content' or 'text' (field is missing)"


def test_stage1_conversion_of_a_conversation():
    conv = Conversation(_msgs(("system", "S"), ("user", "U"), ("assistant", "A")), O)
    assert conversation_to_document(conv) == Document("S\nU\nA", O)


# --- bad records: exact message shapes --------------------------------------------------------


def _error_for(tmp_path, line: str, **source_kwargs) -> RecordError:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "ok", "output": "ok"}\n' + line + "\n", encoding="utf-8")
    source = DataSourceConfig(path=str(path), **source_kwargs)
    raw = list(read_source(source))[1]
    with pytest.raises(RecordError) as info:
        convert_record(raw, source)
    assert str(info.value).startswith(f"{path}:2: field '")
    assert info.value.origin == f"{path}:2"
    return info.value


def test_bad_invalid_json(tmp_path):
    err = _error_for(tmp_path, '{"instruction": "q", "output": }')
    assert err.field == "(line)"
    assert str(err) == f"{err.origin}: field '(line)': expected a JSON object, got 'invalid JSON: Expecting value at column 32'"


def test_bad_missing_field(tmp_path):
    err = _error_for(tmp_path, '{"instruction": "q"}', format="alpaca")
    assert str(err) == f"{err.origin}: field 'output': expected a string (field is missing)"


def test_bad_missing_mapped_field_names_the_record_field(tmp_path):
    err = _error_for(tmp_path, '{"问": "q"}', fields={"instruction": "问", "output": "答"})
    assert str(err) == f"{err.origin}: field '答': expected a string (field is missing)"


def test_bad_wrong_type(tmp_path):
    err = _error_for(tmp_path, '{"instruction": "q", "output": 42}')
    assert str(err) == f"{err.origin}: field 'output': expected a string, got 42"


def test_bad_empty_answer(tmp_path):
    err = _error_for(tmp_path, '{"instruction": "q", "output": ""}')
    assert str(err) == f"{err.origin}: field 'output': expected a non-empty string, got ''"


def test_bad_history_pair(tmp_path):
    err = _error_for(tmp_path, '{"instruction": "q", "output": "a", "history": [["u", "a"], ["only one"]]}')
    assert str(err) == f"{err.origin}: field 'history[1]': expected a [user, assistant] pair, got ['only one']"


def test_bad_history_empty_answer(tmp_path):
    err = _error_for(tmp_path, '{"instruction": "q", "output": "a", "history": [["u", ""]]}')
    assert str(err) == f"{err.origin}: field 'history[0][1]': expected a non-empty string, got ''"


def test_bad_history_not_a_list(tmp_path):
    err = _error_for(tmp_path, '{"instruction": "q", "output": "a", "history": "u"}')
    assert str(err) == f"{err.origin}: field 'history': expected a list of [user, assistant] pairs, got 'u'"


def test_bad_sharegpt_non_alternating(tmp_path):
    line = json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]})
    err = _error_for(tmp_path, line)
    assert err.field == "conversations[1].from"
    assert str(err) == (
        f"{err.origin}: field 'conversations[1].from': expected an assistant message (turns must alternate), "
        "got 'human'"
    )


def test_bad_sharegpt_unknown_role(tmp_path):
    line = json.dumps({"conversations": [{"from": "robot", "value": "a"}]})
    err = _error_for(tmp_path, line)
    assert str(err) == (
        f"{err.origin}: field 'conversations[0].from': expected one of assistant, bard, bing, chatgpt, gpt, human, "
        "system, user, got 'robot'"
    )


def test_bad_sharegpt_ending_with_user(tmp_path):
    line = json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}]})
    err = _error_for(tmp_path, line)
    assert str(err) == f"{err.origin}: field 'conversations': expected a conversation ending with an assistant (gpt) message"


def test_bad_sharegpt_late_system(tmp_path):
    line = json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "system", "value": "s"}]})
    err = _error_for(tmp_path, line)
    assert str(err) == f"{err.origin}: field 'conversations[1].from': expected 'system' only as the first message, got 'system'"


def test_bad_unknown_record(tmp_path):
    err = _error_for(tmp_path, '{"question": "q"}')
    assert err.field == "(record)"
    assert "expected a record with 'text'/'content', 'instruction'/'output'" in str(err)


def test_bad_record_not_an_object(tmp_path):
    err = _error_for(tmp_path, "[1, 2]", format="alpaca")
    assert str(err) == f"{err.origin}: field '(record)': expected a JSON object, got [1, 2]"


def test_long_values_are_shortened_in_messages():
    with pytest.raises(RecordError) as info:
        alpaca_to_conversation({"instruction": "q", "output": ["x" * 200]}, O, {})
    shown = str(info.value).split(", got ", 1)[1]
    assert len(shown) == 60 and shown.endswith("...")


# --- load_examples: policy, weights, stage kinds ---------------------------------------------


def _mixed_file(tmp_path) -> Path:
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        "\n".join(
            [
                '{"instruction": "q1", "output": "a1"}',
                '{"instruction": "q2"}',
                '{"instruction": "q3", "output": "a3"}',
                "not json",
                '{"instruction": "q5", "output": ""}',
                '{"instruction": "q6", "output": "a6"}',
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    return path


def test_bad_records_error_lists_all_and_counts(tmp_path):
    path = _mixed_file(tmp_path)
    with pytest.raises(DataValidationError) as info:
        load_examples([DataSourceConfig(path=str(path))], "conversations", bad_records="error")
    err = info.value
    assert err.total == 3
    assert [e.origin for e in err.errors] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    message = str(err)
    assert message.startswith("3 bad record(s); fix them or set data.bad_records=skip to drop them:\n")
    assert f"  - {path}:2: field 'output': expected a string (field is missing)" in message
    assert f"  - {path}:4: field '(line)': expected a JSON object" in message
    assert f"  - {path}:5: field 'output': expected a non-empty string, got ''" in message
    assert "more" not in message


def test_bad_records_error_lists_at_most_ten(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{"instruction": f"q{i}"} for i in range(13)] + [{"instruction": "q", "output": "a"}])
    with pytest.raises(DataValidationError) as info:
        load_examples([DataSourceConfig(path=str(path))], "conversations")
    assert info.value.total == 13
    assert len(info.value.errors) == 10
    assert str(info.value).startswith("13 bad record(s)")
    assert str(info.value).endswith("\n  ... and 3 more")


def test_bad_records_skip_returns_good_ones(tmp_path):
    path = _mixed_file(tmp_path)
    convs, report = load_examples([DataSourceConfig(path=str(path))], "conversations", bad_records="skip")
    assert [c.turns for c in convs] == [[("q1", "a1")], [("q3", "a3")], [("q6", "a6")]]
    assert report.records == 3
    assert report.skipped == 3
    assert [e.origin for e in report.errors] == [f"{path}:2", f"{path}:4", f"{path}:5"]


def test_all_records_bad_with_skip_is_an_error(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{"instruction": "q"}])
    with pytest.raises(DataError, match="no usable records in"):
        load_examples([DataSourceConfig(path=str(path))], "conversations", bad_records="skip")


def _qa_file(tmp_path, n: int, name: str = "qa.jsonl") -> Path:
    return _jsonl(tmp_path / name, [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(n)])


def test_weight_two_duplicates(tmp_path):
    path = _qa_file(tmp_path, 3)
    convs, report = load_examples([DataSourceConfig(path=str(path), weight=2.0)], "conversations")
    assert [c.turns[0][0] for c in convs] == ["q0", "q1", "q2", "q0", "q1", "q2"]
    assert report.records == 3


def test_weight_half_samples_half_without_repeats(tmp_path):
    path = _qa_file(tmp_path, 10)
    convs, _ = load_examples([DataSourceConfig(path=str(path), weight=0.5)], "conversations", seed=3)
    questions = [c.turns[0][0] for c in convs]
    assert len(questions) == 5
    assert len(set(questions)) == 5
    assert set(questions) <= {f"q{i}" for i in range(10)}
    again, _ = load_examples([DataSourceConfig(path=str(path), weight=0.5)], "conversations", seed=3)
    assert [c.turns[0][0] for c in again] == questions  # seeded


def test_weight_one_and_a_half(tmp_path):
    path = _qa_file(tmp_path, 4)
    convs, _ = load_examples([DataSourceConfig(path=str(path), weight=1.5)], "conversations")
    questions = [c.turns[0][0] for c in convs]
    assert questions[:4] == ["q0", "q1", "q2", "q3"]
    assert len(questions) == 6
    assert set(questions[4:]) <= {"q0", "q1", "q2", "q3"} and len(set(questions[4:])) == 2


def test_stage1_converts_conversations_to_documents(tmp_path):
    qa = _jsonl(tmp_path / "qa.jsonl", [{"instruction": "q", "input": "i", "output": "a", "system": "s"}])
    notes = tmp_path / "notes.txt"
    notes.write_text("note one\nnote two\n", encoding="utf-8")
    docs, report = load_examples([DataSourceConfig(path=str(notes)), DataSourceConfig(path=str(qa))], "documents")
    assert docs == [
        Document("note one", f"{notes}:1"),
        Document("note two", f"{notes}:2"),
        Document("s\nq\ni\na", f"{qa}:1"),
    ]
    assert report.records == 3


def test_stage1_rejects_conversations_when_not_mixed_in(tmp_path):
    qa = _qa_file(tmp_path, 1)
    with pytest.raises(DataError, match="conversations_as_documents=true"):
        load_examples([DataSourceConfig(path=str(qa))], "documents", conversations_as_documents=False)


def test_stage2_rejects_documents(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("just text\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_examples([DataSourceConfig(path=str(notes))], "conversations")
    assert "stage 2 needs conversations" in str(info.value)
    assert f"{notes}:1 is a plain document" in str(info.value)
