"""Files, directories and globs → RawRecords with exact origins (orchestrator.data.readers)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.config import DataSourceConfig
from orchestrator.data.readers import RawRecord, read_file, read_source
from orchestrator.errors import DataError, RecordError


def _records(path, **kwargs) -> list[RawRecord]:
    return list(read_source(DataSourceConfig(path=str(path), **kwargs)))


def test_jsonl_origins_are_real_line_numbers_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n\n{"text": "c"}\n', encoding="utf-8")
    records = _records(path)
    assert [r.value for r in records] == [{"text": "a"}, {"text": "b"}, {"text": "c"}]
    assert [r.origin for r in records] == [f"{path}:1", f"{path}:4", f"{path}:6"]
    assert all(r.error is None for r in records)


def test_jsonl_with_crlf_and_bom(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n{"text": "b"}\r\n')
    records = _records(path)
    assert [r.value for r in records] == [{"text": "a"}, {"text": "b"}]
    assert [r.origin for r in records] == [f"{path}:1", f"{path}:3"]


def test_json_list_origins_are_indexes(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}, {"text": "c"}], indent=2), encoding="utf-8")
    records = _records(path)
    assert [r.value["text"] for r in records] == ["a", "b", "c"]
    assert [r.origin for r in records] == [f"{path}#0", f"{path}#1", f"{path}#2"]


def test_json_object_holding_one_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"version": 1, "data": [{"text": "a"}, {"text": "b"}]}), encoding="utf-8")
    assert [r.origin for r in _records(path)] == [f"{path}#0", f"{path}#1"]


def test_json_object_without_a_single_list_is_an_error(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"a": [1], "b": [2]}), encoding="utf-8")
    with pytest.raises(DataError) as info:
        _records(path)
    assert str(path) in str(info.value)
    assert "expected a JSON list of records" in str(info.value)


def test_jsonl_saved_as_json(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n\n{"text": "c"}\n', encoding="utf-8")
    records = _records(path)
    assert [r.value["text"] for r in records] == ["a", "b", "c"]
    assert [r.origin for r in records] == [f"{path}:1", f"{path}:2", f"{path}:4"]


def test_invalid_json_file_names_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n{"text": "a"},\n{"text": }\n]', encoding="utf-8")
    with pytest.raises(DataError) as info:
        _records(path)
    assert f"{path}:3: invalid JSON" in str(info.value)


def test_parquet_rows(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"instruction": ["q1", "q2", "q3"], "output": ["a1", "a2", "a3"]}), path)
    records = _records(path)
    assert [r.value for r in records] == [
        {"instruction": "q1", "output": "a1"},
        {"instruction": "q2", "output": "a2"},
        {"instruction": "q3", "output": "a3"},
    ]
    assert [r.origin for r in records] == [f"{path}#0", f"{path}#1", f"{path}#2"]


def test_txt_line_mode_is_the_default(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first line\n\n  second line  \n   \nthird\n", encoding="utf-8")
    records = _records(path)
    assert [r.value for r in records] == ["first line", "second line", "third"]
    assert [r.origin for r in records] == [f"{path}:1", f"{path}:3", f"{path}:5"]


def test_txt_line_numbers_match_the_file_with_form_feeds_and_unicode_separators(tmp_path):
    # pdftotext writes \f between pages; scraped text often holds U+2028. Neither ends a line
    # in the file (the file has 3 '\n'-terminated lines), so origins must still be file lines.
    path = tmp_path / "pages.txt"
    path.write_text("page one end\fpage two start\nmiddle\u2028still middle\nlast\n", encoding="utf-8")
    records = _records(path)
    assert [r.origin for r in records] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert records[-1].value == "last"


def test_md_file_mode_is_the_default(tmp_path):
    path = tmp_path / "law.md"
    text = "# Title\n\n## Chapter 1\n\nArticle 1. Text.\n"
    path.write_text("\n" + text + "\n\n", encoding="utf-8")
    records = _records(path)
    assert records == [RawRecord(text.strip(), f"{path}:1")]


def test_md_can_be_read_per_line(tmp_path):
    path = tmp_path / "law.md"
    path.write_text("# Title\n\nArticle 1.\nArticle 2.\n", encoding="utf-8")
    records = _records(path, text_unit="line")
    assert [(r.value, r.origin) for r in records] == [
        ("# Title", f"{path}:1"),
        ("Article 1.", f"{path}:3"),
        ("Article 2.", f"{path}:4"),
    ]


def test_txt_file_mode_and_empty_file(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("a\nb\n", encoding="utf-8")
    assert [(r.value, r.origin) for r in _records(path, text_unit="file")] == [("a\nb", f"{path}:1")]
    empty = tmp_path / "empty.md"
    empty.write_text("  \n\n", encoding="utf-8")
    assert list(read_file(str(empty))) == []


def test_paragraph_mode_origin_is_first_line_of_each_paragraph(tmp_path):
    path = tmp_path / "paras.txt"
    path.write_text("\n\npara one\nline two\n\n\n  para two\n   \npara three\nend", encoding="utf-8")
    records = _records(path, text_unit="paragraph")
    assert [(r.value, r.origin) for r in records] == [
        ("para one\nline two", f"{path}:3"),
        ("para two", f"{path}:7"),
        ("para three\nend", f"{path}:9"),
    ]


def test_paragraph_mode_repeated_paragraphs_get_their_own_lines(tmp_path):
    path = tmp_path / "paras.txt"
    path.write_text("same\n\nsame\n\nother\n\nsame\n", encoding="utf-8")
    records = _records(path, text_unit="paragraph")
    assert [(r.value, r.origin) for r in records] == [
        ("same", f"{path}:1"),
        ("same", f"{path}:3"),
        ("other", f"{path}:5"),
        ("same", f"{path}:7"),
    ]


def _tree(tmp_path: Path, hidden: bool = False) -> Path:
    root = tmp_path / "data"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "b.jsonl").write_text('{"text": "b"}\n', encoding="utf-8")
    (root / "a.txt").write_text("a1\na2\n", encoding="utf-8")
    (root / "sub" / "c.jsonl").write_text('{"text": "c"}\n', encoding="utf-8")
    (root / "sub" / "deeper" / "d.md").write_text("# d\n", encoding="utf-8")
    (root / "sub" / "ignored.csv").write_text("x,y\n", encoding="utf-8")
    if hidden:
        (root / ".hidden.jsonl").write_text('{"text": "hidden"}\n', encoding="utf-8")
    return root


def test_directory_is_read_recursively_in_sorted_order_without_dotfiles(tmp_path):
    root = _tree(tmp_path, hidden=True)
    records = _records(root)
    assert [r.origin for r in records] == [
        f"{root}/a.txt:1",
        f"{root}/a.txt:2",
        f"{root}/b.jsonl:1",
        f"{root}/sub/c.jsonl:1",
        f"{root}/sub/deeper/d.md:1",
    ]
    assert [r.value for r in records] == ["a1", "a2", {"text": "b"}, {"text": "c"}, "# d"]


def test_recursive_glob(tmp_path):
    root = _tree(tmp_path)
    records = _records(f"{root}/**/*.jsonl")
    assert [r.origin for r in records] == [f"{root}/b.jsonl:1", f"{root}/sub/c.jsonl:1"]


def test_glob_star_does_not_cross_directories(tmp_path):
    # `data/*.jsonl` means the .jsonl files directly in data/ (shell and pathlib semantics, which the
    # storage module's `**/` handling says it follows); `**/` is what reaches into subdirectories.
    root = _tree(tmp_path)
    records = _records(f"{root}/*.jsonl")
    assert [r.origin for r in records] == [f"{root}/b.jsonl:1"]


def test_glob_in_a_directory_name(tmp_path):
    root = _tree(tmp_path)
    records = _records(f"{root}/s?b/c.jsonl")
    assert [r.origin for r in records] == [f"{root}/sub/c.jsonl:1"]


def test_file_uri(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n', encoding="utf-8")
    records = _records(f"file://{path}")
    assert [r.origin for r in records] == [f"{path}:1"]


def test_max_records_counts_across_files(tmp_path):
    root = _tree(tmp_path)
    assert [r.value for r in _records(root, max_records=3)] == ["a1", "a2", {"text": "b"}]
    assert len(_records(root, max_records=1)) == 1
    assert len(_records(root, max_records=100)) == 5


def test_invalid_json_line_yields_an_error_record(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n{"text": oops}\n{"text": "c"}\n', encoding="utf-8")
    records = _records(path)
    assert [r.origin for r in records] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    bad = records[1]
    assert bad.value is None
    assert isinstance(bad.error, RecordError)
    assert bad.error.origin == f"{path}:2"
    assert bad.error.field == "(line)"
    assert str(bad.error).startswith(f"{path}:2: field '(line)': expected a JSON object, got 'invalid JSON: ")
    assert "at column 10" in str(bad.error)
    assert records[0].error is None and records[2].error is None


def test_missing_path_is_a_data_error(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        _records(path)
    assert str(path) in str(info.value)
    assert "no such file or directory" in str(info.value)


def test_glob_matching_nothing_is_a_data_error(tmp_path):
    pattern = f"{tmp_path}/*.jsonl"
    with pytest.raises(DataError) as info:
        _records(pattern)
    assert pattern in str(info.value)
    assert "matched no files ending in .jsonl" in str(info.value)


def test_unsupported_file_type_is_a_data_error(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        _records(path)
    assert str(path) in str(info.value)
    assert "unsupported file type" in str(info.value)
    assert ".jsonl" in str(info.value) and ".parquet" in str(info.value)


def test_directory_without_supported_files_is_a_data_error(tmp_path):
    (tmp_path / "x.csv").write_text("a\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        _records(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "matched no files" in str(info.value)


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("line one\nline two\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError) as info:
        _records(path)
    assert f"{path}:3: not valid UTF-8 text" in str(info.value)
    assert "(byte 21)" in str(info.value)
