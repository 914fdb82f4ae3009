"""Declared record shapes: each shape gives exact canonical records, each mapping mistake its message."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from orchestrator.config import DataSourceConfig, config_from_dict
from orchestrator.data.formats import Conversation, Document, Message, convert_record, load_examples
from orchestrator.data.readers import read_source
from orchestrator.data.shapes import RawRecord, locate_records, resolve_dataset, shape_record
from orchestrator.errors import ConfigError, DataError, DataValidationError, RecordError


def _write(path: Path, value) -> Path:
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return path


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _conv(origin: str, *pairs) -> Conversation:
    return Conversation(tuple(Message(role, content) for role, content in pairs), origin)


def _load(**source) -> list:
    items, _ = load_examples([DataSourceConfig(**source)], "conversations")
    return items


def _first_error(**source) -> RecordError:
    with pytest.raises(DataValidationError) as info:
        load_examples([DataSourceConfig(**source)], "conversations")
    return info.value.errors[0]


# --- where the records are --------------------------------------------------------------------


def test_wrapped_one_item_lists_are_unwrapped(tmp_path):
    path = _write(tmp_path / "wrapped.json", [[{"instruction": "头痛怎么办？", "output": "休息。"}],
                                              [{"instruction": "发烧？", "output": "多喝水。"}]])
    assert _load(path=str(path), unwrap=True) == [
        _conv(f"{path}#0", ("user", "头痛怎么办？"), ("assistant", "休息。")),
        _conv(f"{path}#1", ("user", "发烧？"), ("assistant", "多喝水。")),
    ]


def test_unwrap_names_a_record_that_is_not_a_one_item_list(tmp_path):
    path = _write(tmp_path / "wrapped.json", [[{"instruction": "Q", "output": "A"}], [{"a": 1}, {"b": 2}]])
    error = _first_error(path=str(path), unwrap=True)
    assert str(error) == f"{path}#1: field '(record)': expected a one-item list [ {{...}} ] (unwrap: true), got 'a list of 2 items'"


def test_id_keyed_object_adds_the_id_under_the_named_field(tmp_path):
    path = _write(tmp_path / "pubmedqa.json", {
        "21645374": {"QUESTION": "Do mitochondria matter?", "final_decision": "yes"},
        "16418930": {"QUESTION": "Is it safe?", "final_decision": "no"},
    })
    source = DataSourceConfig(path=str(path), keyed_by="pmid", fields={"instruction": "QUESTION", "output": "final_decision"})
    raws = list(read_source(source))
    assert [(r.origin, r.key) for r in raws] == [(f"{path}#21645374", "21645374"), (f"{path}#16418930", "16418930")]
    shaped = shape_record(raws[0], source)
    assert shaped.value == {"QUESTION": "Do mitochondria matter?", "final_decision": "yes", "pmid": "21645374"}
    assert convert_record(raws[1], source) == _conv(f"{path}#16418930", ("user", "Is it safe?"), ("assistant", "no"))
    # the id is a record key like any other, e.g. for a template
    templated = DataSourceConfig(path=str(path), keyed_by="pmid", prompt_template="[{pmid}] {QUESTION}",
                                 response_template="{final_decision}")
    assert _load(**templated.model_dump(exclude_defaults=True))[0].messages[0] == Message(
        "user", "[21645374] Do mitochondria matter?")


def test_keyed_by_needs_an_object_and_a_bare_object_of_objects_suggests_it(tmp_path):
    listed = _write(tmp_path / "list.json", [{"instruction": "Q", "output": "A"}])
    with pytest.raises(DataError, match=r"list.json: keyed_by='id' expects an object of id → record at the top level, got a list"):
        _load(path=str(listed), keyed_by="id")
    keyed = _write(tmp_path / "keyed.json", {"1": {"instruction": "Q", "output": "A"}, "2": {"instruction": "Q", "output": "A"}})
    with pytest.raises(DataError, match=r"keyed.json: an object of 2 objects \(first key '1'\); if it is keyed by record id, set keyed_by"):
        _load(path=str(keyed))


def test_keyed_by_refuses_a_record_whose_own_id_differs(tmp_path):
    path = _write(tmp_path / "keyed.json", {"7": {"id": "8", "instruction": "Q", "output": "A"}})
    error = _first_error(path=str(path), keyed_by="id")
    assert str(error) == f"{path}#7: field 'id': expected the record's id '7' (keyed_by: id) or no such field, got '8'"


def test_records_under_a_key_path(tmp_path):
    path = _write(tmp_path / "nested.json", {"version": 2, "data": {"items": [
        {"prompt": "胸闷", "response": "请就医。"}]}})
    assert _load(path=str(path), records="data.items") == [_conv(f"{path}#0", ("user", "胸闷"), ("assistant", "请就医。"))]


def test_records_path_error_names_the_missing_key_and_what_is_there(tmp_path):
    path = _write(tmp_path / "nested.json", {"data": {"rows": []}})
    with pytest.raises(DataError) as info:
        _load(path=str(path), records="data.items")
    assert str(info.value) == f"{path}: records='data.items': no key 'items' at data, which is an object (keys there: rows)"
    with pytest.raises(DataError, match=r"expected a list of records at records='data', got an object"):
        _load(path=str(path), records="data")


def test_records_path_in_each_jsonl_line(tmp_path):
    path = _jsonl(tmp_path / "pages.jsonl", [{"page": [{"instruction": "A", "output": "B"}, {"instruction": "C", "output": "D"}]}])
    assert [c.origin for c in _load(path=str(path), records="page")] == [f"{path}:1#0", f"{path}:1#1"]


def test_locate_records_is_a_pure_function():
    found = list(locate_records({"x": {"y": ["a", "b"]}}, "mem", records="x.y"))
    assert found == [RawRecord("a", "mem#0"), RawRecord("b", "mem#1")]


# --- prefixed turns -----------------------------------------------------------------------------


def test_history_as_prefixed_strings(tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", [{
        "instruction": "还需要复查吗？", "output": "一周后复查。",
        "history": ["病人：我咳嗽三天了。", "医生： 有发烧吗？", "病人：没有。", "医生：先吃止咳药。"],
    }])
    source = {"path": str(path), "prefixed_turns": {"user": "病人：", "assistant": "医生："}}
    assert _load(**source) == [_conv(
        f"{path}:1", ("user", "我咳嗽三天了。"), ("assistant", "有发烧吗？"), ("user", "没有。"),
        ("assistant", "先吃止咳药。"), ("user", "还需要复查吗？"), ("assistant", "一周后复查。"),
    )]


def test_whole_conversation_as_prefixed_strings(tmp_path):
    path = _jsonl(tmp_path / "dialogue.jsonl", [{"dialogue": [
        "System: Be brief.", "User: Hi", "Assistant: Hello.", "User: Fever?", "Assistant: Rest."]}])
    source = {"path": str(path), "format": "sharegpt", "fields": {"conversations": "dialogue"},
              "prefixed_turns": {"user": "User:", "assistant": "Assistant:", "system": "System:"}}
    assert _load(**source) == [_conv(f"{path}:1", ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."),
                                     ("user", "Fever?"), ("assistant", "Rest."))]


@pytest.mark.parametrize("history, field, expected", [
    (["User: a", "User: b"], "history[1]", "expected an assistant turn starting with 'Assistant:' (turns must alternate), got 'User: b'"),
    (["Patient: a"], "history[0]", "expected a user turn starting with 'User:', got 'Patient: a'"),
    (["User: a", "Assistant:  "], "history[1]", "expected text after the prefix 'Assistant:', got 'Assistant:  '"),
    (["User: a", ["x"]], "history[1]", "expected a string starting with 'Assistant:' (prefixed_turns), got ['x']"),
    (["User: a"], "history", "expected user/assistant pairs: the history ends with a user turn, got '1 turns'"),
])
def test_prefixed_turn_errors(tmp_path, history, field, expected):
    path = _jsonl(tmp_path / "chat.jsonl", [{"instruction": "Q", "output": "A", "history": history}])
    error = _first_error(path=str(path), prefixed_turns={"user": "User:", "assistant": "Assistant:"})
    assert str(error) == f"{path}:1: field '{field}': {expected}"


def test_prefixes_that_cannot_be_told_apart_are_a_config_error():
    with pytest.raises(ValueError, match="prefix 'A' is the start of 'AB'"):
        DataSourceConfig(path="x.jsonl", prefixed_turns={"user": "A", "assistant": "AB"})


# --- templates ----------------------------------------------------------------------------------


def test_context_is_folded_into_the_prompt(tmp_path):
    path = _jsonl(tmp_path / "rag.jsonl", [{
        "question": "合同何时成立？", "articles": ["第四百八十三条 承诺生效时合同成立。", "第四百九十条 ……"],
        "note": "你是法律助手。", "answer": "承诺生效时。", "input": "ignored",
    }])
    source = {"path": str(path), "prompt_template": "{question}\n\n参考法条：\n{articles}", "system_template": "{note}",
              "response_template": "{answer}"}
    assert _load(**source) == [_conv(
        f"{path}:1", ("system", "你是法律助手。"),
        ("user", "合同何时成立？\n\n参考法条：\n第四百八十三条 承诺生效时合同成立。\n第四百九十条 ……"),
        ("assistant", "承诺生效时。"),
    )]


def test_templates_with_nested_keys_and_multiturn(tmp_path):
    path = _jsonl(tmp_path / "mt.jsonl", [{"prompt": "p", "meta": {"title": "T", "year": 2020}, "response": "r"}])
    source = {"path": str(path), "format": "multiturn", "prompt_template": "{meta.title} ({meta.year}): {prompt}"}
    assert _load(**source) == [_conv(f"{path}:1", ("user", "T (2020): p"), ("assistant", "r"))]


def test_template_errors_name_the_key(tmp_path):
    path = _jsonl(tmp_path / "rag.jsonl", [{"question": "Q", "answer": "A"}, {"question": "Q", "context": {"a": 1}, "output": "A"}])
    with pytest.raises(DataValidationError) as info:
        _load(path=str(path), prompt_template="{question}\n\nContext: {context}", response_template="{answer}")
    first, second = info.value.errors
    assert str(first) == (f"{path}:1: field 'context': expected a field for {{context}} in prompt_template (field is "
                          "missing; the record has question, answer)")
    assert str(second) == f"{path}:2: field 'context': expected a string, number or list of strings for {{context}} in prompt_template, got {{'a': 1}}"


def test_template_config_errors():
    with pytest.raises(ValueError, match="names no record key"):
        DataSourceConfig(path="x", prompt_template="just text")
    with pytest.raises(ValueError, match=r"must name a record key .* got \{0\}|must name a record key .* got \{\}"):
        DataSourceConfig(path="x", prompt_template="{} and {0}")
    with pytest.raises(ValueError, match="a sharegpt conversation list already holds its turns"):
        DataSourceConfig(path="x", format="sharegpt", prompt_template="{q}")


# --- role tags ----------------------------------------------------------------------------------


def test_role_tags_read_role_content_messages(tmp_path):
    path = _jsonl(tmp_path / "messages.jsonl", [{"messages": [
        {"speaker": "sys", "text": "S"}, {"speaker": "patient", "text": "U"}, {"speaker": "doctor", "text": "A"}]}])
    source = {"path": str(path), "format": "sharegpt", "fields": {"conversations": "messages"},
              "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "patient", "assistant_tag": "doctor",
                       "system_tag": "sys"}}
    assert _load(**source) == [_conv(f"{path}:1", ("system", "S"), ("user", "U"), ("assistant", "A"))]


def test_openai_style_messages_are_read_without_tags(tmp_path):
    path = _jsonl(tmp_path / "messages.jsonl", [{"conversations": [
        {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}], "system": "S"}])
    assert _load(path=str(path)) == [_conv(f"{path}:1", ("system", "S"), ("user", "U"), ("assistant", "A"))]


def test_role_tag_errors(tmp_path):
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "observation_tag": "observation"}
    path = _jsonl(tmp_path / "m.jsonl", [
        {"conversations": [{"role": "human", "content": "U"}]},
        {"conversations": [{"role": "user", "content": "U"}, {"role": "observation", "content": "{}"}]},
        {"conversations": [{"role": "user", "text": "U"}]},
    ])
    with pytest.raises(DataValidationError) as info:
        _load(path=str(path), format="sharegpt", tags=tags)
    assert [str(e) for e in info.value.errors] == [
        f"{path}:1: field 'conversations[0].role': expected one of user, assistant, system, got 'human'",
        f"{path}:2: field 'conversations[1].role': expected a user, assistant or system message (tool turns are not "
        "supported), got 'observation'",
        f"{path}:3: field 'conversations[0].content': expected a non-empty string",
    ]
    with pytest.raises(ValueError, match="tags describe a conversation list"):
        DataSourceConfig(path="x", format="alpaca", tags=tags)


# --- transform ----------------------------------------------------------------------------------


@pytest.fixture()
def transform_module(tmp_path, monkeypatch):
    (tmp_path / "shape_transforms_for_test.py").write_text(
        "def qa(record):\n"
        "    if record.get('skip'):\n"
        "        return None\n"
        "    return {'instruction': record['q'].strip(), 'output': record['a']}\n"
        "def broken(record):\n"
        "    return 42\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "shape_transforms_for_test"
    sys.modules.pop("shape_transforms_for_test", None)


def test_transform_maps_and_skips_records(tmp_path, transform_module):
    path = _jsonl(tmp_path / "odd.jsonl", [{"q": " Q1 ", "a": "A1"}, {"skip": True}, {"q": "Q3", "a": "A3"}])
    items, report = load_examples([DataSourceConfig(path=str(path), transform=f"{transform_module}:qa")], "conversations")
    assert items == [_conv(f"{path}:1", ("user", "Q1"), ("assistant", "A1")),
                     _conv(f"{path}:3", ("user", "Q3"), ("assistant", "A3"))]
    assert (report.records, report.filtered, report.skipped) == (2, 1, 0)


def test_transform_errors_are_reported_per_record(tmp_path, transform_module):
    path = _jsonl(tmp_path / "odd.jsonl", [{"q": "Q1", "a": "A1"}, {"a": "no question"}, {"q": "Q", "a": ""}])
    with pytest.raises(DataValidationError) as info:
        _load(path=str(path), transform=f"{transform_module}:qa")
    assert [str(e) for e in info.value.errors] == [
        f"{path}:2: field '(transform)': expected {transform_module}:qa to return a canonical record; it raised "
        "KeyError: 'q'",
        f"{path}:3: field 'output': expected a non-empty string, got ''",
    ]
    assert str(_first_error(path=str(path), transform=f"{transform_module}:broken")) == (
        f"{path}:1: field '(transform)': expected {transform_module}:broken to return a dict with canonical field "
        "names, a string or None, got 'int'")


def test_transform_failing_on_a_wrapped_record_suggests_unwrap(tmp_path, transform_module):
    path = _write(tmp_path / "wrapped.json", [[{"q": "Q", "a": "A"}]])
    assert str(_first_error(path=str(path), transform=f"{transform_module}:qa")).endswith(
        "it raised AttributeError: 'list' object has no attribute 'get' (each record is a one-item list: set unwrap: true?)")
    assert _load(path=str(path), transform=f"{transform_module}:qa", unwrap=True)[0].messages[1].content == "A"


def test_transform_that_cannot_be_imported(tmp_path):
    path = _jsonl(tmp_path / "odd.jsonl", [{"q": "Q1"}])
    with pytest.raises(DataError, match=r"transform 'no_such_module_xyz:f': cannot import no_such_module_xyz \(ModuleNotFoundError"):
        _load(path=str(path), transform="no_such_module_xyz:f")
    with pytest.raises(ValueError, match="expected `package.module:function`"):
        DataSourceConfig(path="x", transform="module.function")
    with pytest.raises(ValueError, match="transform returns canonical records; drop prompt_template, fields"):
        DataSourceConfig(path="x", transform="m:f", fields={"output": "a"}, prompt_template="{q}")


# --- LLaMA-Factory dataset_info.json --------------------------------------------------------------


@pytest.fixture()
def registry(tmp_path):
    data = tmp_path / "lf"
    data.mkdir()
    _write(data / "med_alpaca.json", [{"q": "头痛？", "ctx": "", "a": "休息。", "sys": "医生", "hist": [["你好", "你好！"]]}])
    _jsonl(data / "med_share.jsonl", [{"msgs": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}],
                                       "sys": "S"}])
    _jsonl(data / "med_pref.jsonl", [{"instruction": "Q", "better": "good", "worse": "bad"}])
    _write(data / "dataset_info.json", {
        "med_alpaca": {"file_name": "med_alpaca.json",
                       "columns": {"prompt": "q", "query": "ctx", "response": "a", "system": "sys", "history": "hist"}},
        "med_share": {"file_name": "med_share.jsonl", "formatting": "sharegpt",
                      "columns": {"messages": "msgs", "system": "sys"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant"}},
        "med_pref": {"file_name": "med_pref.jsonl", "ranking": True, "columns": {"chosen": "better", "rejected": "worse"}},
        "hub_only": {"hf_hub_url": "someone/dataset"},
        "with_images": {"file_name": "x.json", "columns": {"images": "imgs"}},
    })
    return data


def test_dataset_info_alpaca_entry(registry):
    (conv,) = _load(path=str(registry / "dataset_info.json"), dataset="med_alpaca")
    assert conv == _conv(f"{registry}/med_alpaca.json#0", ("system", "医生"), ("user", "你好"), ("assistant", "你好！"),
                         ("user", "头痛？"), ("assistant", "休息。"))


def test_dataset_info_sharegpt_entry_with_tags_from_the_directory(registry):
    assert _load(path=str(registry), dataset="med_share") == [
        _conv(f"{registry}/med_share.jsonl:1", ("system", "S"), ("user", "U"), ("assistant", "A"))]


def test_dataset_info_preference_columns_become_fields(registry):
    resolved = resolve_dataset(DataSourceConfig(path=str(registry), dataset="med_pref"))
    assert (resolved.path, resolved.format, resolved.dataset) == (f"{registry}/med_pref.jsonl", "alpaca", None)
    assert resolved.fields == {"chosen": "better", "rejected": "worse"}


def test_dataset_info_errors(registry):
    with pytest.raises(DataError, match=r"dataset_info.json: no dataset 'med_alpca'; did you mean med_alpaca"):
        _load(path=str(registry), dataset="med_alpca")
    with pytest.raises(DataError, match=r"dataset 'hub_only' is read from hf_hub_url='someone/dataset'; only entries "
                                        r"with a file_name"):
        _load(path=str(registry), dataset="hub_only")
    with pytest.raises(DataError, match=r"dataset 'with_images': column 'images' is not supported"):
        _load(path=str(registry), dataset="with_images")
    with pytest.raises(DataError, match=r"no such file \(a source with `dataset` reads LLaMA-Factory's dataset_info.json"):
        _load(path=str(registry / "missing"), dataset="med_alpaca")
    with pytest.raises(ValueError, match="with `dataset`, format, fields and tags come from dataset_info.json"):
        DataSourceConfig(path=str(registry), dataset="med_alpaca", format="alpaca")


# --- config -------------------------------------------------------------------------------------


def test_fields_keys_must_be_canonical_names():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"tokenizer": {"path": "t"}, "sft": {"data": {"sources": [
            {"path": "x.jsonl", "fields": {"question": "问", "output": "答"}}]}}})
    assert "sft.data.sources.0.fields" in str(info.value)
    assert "unknown canonical field(s) question; the keys of `fields` are canonical names" in str(info.value)


def test_plain_sources_are_unchanged(tmp_path):
    path = _jsonl(tmp_path / "plain.jsonl", [{"text": "doc"}])
    source = DataSourceConfig(path=str(path))
    (raw,) = read_source(source)
    assert shape_record(raw, source).value == {"text": "doc"}
    assert convert_record(raw, source) == Document("doc", f"{path}:1")


def test_readme_shape_examples_are_valid_sources(repo_root):
    import yaml

    readme = (repo_root / "README.md").read_text(encoding="utf-8")
    block = readme.split("#### Dataset shapes", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    sources = yaml.safe_load(block)["sources"]
    assert len(sources) == 8
    for entry in sources:
        DataSourceConfig(**entry)


def test_the_registry_and_the_transform_module_are_recorded_with_the_files_read(registry, tmp_path, transform_module):
    _, report = load_examples([DataSourceConfig(path=str(registry), dataset="med_share")], "conversations")
    assert sorted(report.files) == [f"{registry}/dataset_info.json", f"{registry}/med_share.jsonl"]
    path = _jsonl(tmp_path / "odd.jsonl", [{"q": "Q", "a": "A"}])
    _, report = load_examples([DataSourceConfig(path=str(path), transform=f"{transform_module}:qa")], "conversations")
    assert sorted(report.files) == sorted([str(path), str(tmp_path / "shape_transforms_for_test.py")])


def test_dataset_info_absolute_file_name_and_a_ranking_entry_used_for_sft(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    data = _jsonl(tmp_path / "elsewhere" / "pref.jsonl", [
        {"conversations": [{"from": "human", "value": "Q"}], "chosen": "good", "rejected": "bad"}])
    info = _write(tmp_path / "dataset_info.json", {"pref": {"file_name": str(data), "formatting": "sharegpt",
                                                            "ranking": True, "columns": {"messages": "conversations",
                                                                                        "chosen": "chosen", "rejected": "rejected"}}})
    assert resolve_dataset(DataSourceConfig(path=str(info), dataset="pref")).path == str(data)
    assert str(_first_error(path=str(info), dataset="pref")) == (
        f"{data}:1: field 'conversations': expected a conversation ending with an assistant (gpt) message (a preference "
        "record: its answers are in 'chosen'/'rejected'; train it in a preference stage, or append the chosen answer "
        "with a transform)")
