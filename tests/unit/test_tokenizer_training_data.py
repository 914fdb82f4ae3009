"""Records are validated before `tokenizer.train` learns from them: bad records are listed, not dropped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config import DataSourceConfig, load_config
from orchestrator.data.formats import load_examples
from orchestrator.errors import DataError, DataValidationError
from orchestrator.train.stage import documents_for_tokenizer, materialize_base

REPO_ROOT = Path(__file__).resolve().parents[2]
BAD = [{"instruction": "发烧怎么办？", "output": ""}, {"instruction": 3, "output": "多喝水"}, {"question": "q"}]


def _bad_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in BAD), encoding="utf-8")
    return path


def test_tiny_config_with_an_all_bad_file_lists_every_bad_record(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # configs/tiny.yaml names examples/data relative to the checkout
    bad = _bad_file(tmp_path)
    config = load_config(REPO_ROOT / "configs" / "tiny.yaml", [
        f"checkpoint.storage_path={tmp_path / 'runs'}", f"pretrain.data.sources=[{{path: {bad}}}]"])
    assert config.tokenizer.train is not None and config.tokenizer.path is None
    with pytest.raises(DataValidationError) as info:
        materialize_base(config)
    assert str(info.value).splitlines() == [
        "3 bad record(s); fix them or set data.bad_records=skip to drop them:",
        f"  - {bad}:1: field 'output': expected a non-empty string, got ''",
        f"  - {bad}:2: field 'instruction': expected a string, got 3",
        f"  - {bad}:3: field '(record)': expected a record with 'text'/'content', 'instruction'/'output', "
        "'prompt'/'response' or 'conversations' (or set the source's `format` and `fields`), got {'question': 'q'}",
    ]
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


def test_with_bad_records_skip_the_tokenizer_learns_from_the_good_records_only(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    bad = _bad_file(tmp_path)
    config = load_config(REPO_ROOT / "configs" / "tiny.yaml", [
        f"pretrain.data.sources=[{{path: {bad}}}, {{path: examples/data/sft/medical_qa_alpaca.jsonl}}]",
        "pretrain.data.bad_records=skip"])
    documents = documents_for_tokenizer(config)
    assert documents and all(str(bad) not in d.origin for d in documents)


def test_all_records_skipped_says_which_were_bad(tmp_path):
    bad = _bad_file(tmp_path)
    with pytest.raises(DataError) as info:
        load_examples([DataSourceConfig(path=str(bad))], "documents", bad_records="skip")
    message = str(info.value)
    assert message.startswith(f"no usable records in {bad}: all 3 bad record(s) were skipped (data.bad_records=skip):")
    assert f"{bad}:1: field 'output': expected a non-empty string" in message
