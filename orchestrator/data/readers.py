"""Files, directories, globs and URIs → raw records, each tagged with where it came from.

Supported: JSONL, JSON (a list of records, or JSONL saved as .json), Parquet, plain text and
Markdown. A raw record is a dict (structured formats) or a string (text files); its origin is
``file:line`` for line-based files and ``file#index`` for JSON lists and Parquet rows (``file#<id>``
for an object keyed by id). Where the records sit inside a JSON document (`records`, `keyed_by`)
is the source's shape, located by `orchestrator.data.shapes`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import storage
from orchestrator.config import DataSourceConfig
from orchestrator.data.shapes import RawRecord, locate_records, resolve_dataset, shape_inputs
from orchestrator.errors import DataError, RecordError

JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = JSON_SUFFIXES + TEXT_SUFFIXES + PARQUET_SUFFIXES


def read_source(source: DataSourceConfig, digests: Optional[dict[str, str]] = None) -> Iterator[RawRecord]:
    """Every raw record of a source, files in sorted order, at most `source.max_records`.

    When `digests` is given, the sha256 of every file read is recorded in it (for lineage). A source
    naming a LLaMA-Factory dataset reads the file its dataset_info.json entry names (the registry and a
    transform's module are recorded in `digests` too).
    """
    resolved = resolve_dataset(source)
    if digests is not None:
        digests.update(shape_inputs(source))
    source = resolved
    count = 0
    for uri in storage.expand(source.path, SUPPORTED_SUFFIXES):
        for record in read_file(uri, source.text_unit, digests, source.records, source.keyed_by):
            yield record
            count += 1
            if source.max_records is not None and count >= source.max_records:
                return


def read_file(uri: str, text_unit: str = "auto", digests: Optional[dict[str, str]] = None,
              records: Optional[str] = None, keyed_by: Optional[str] = None) -> Iterator[RawRecord]:
    """Raw records of one file, chosen by its suffix; `records`/`keyed_by` locate them in JSON documents."""
    lower = uri.lower()
    raw = storage.read_bytes(uri)
    if digests is not None:
        digests[uri] = hashlib.sha256(raw).hexdigest()
    if lower.endswith(PARQUET_SUFFIXES):
        yield from _read_parquet(uri, raw)
        return
    text = _decode(uri, raw)
    if lower.endswith(".jsonl"):
        yield from _read_jsonl(uri, text, records, keyed_by)
    elif lower.endswith(".json"):
        yield from _read_json(uri, text, records, keyed_by)
    elif lower.endswith(TEXT_SUFFIXES):
        yield from _read_text(uri, text, text_unit)
    else:
        raise DataError(f"{uri}: unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")


def _decode(uri: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{uri}:{line}: not valid UTF-8 text (byte {exc.start}); re-save the file as UTF-8") from None


def _read_jsonl(uri: str, text: str, records: Optional[str] = None,
                keyed_by: Optional[str] = None) -> Iterator[RawRecord]:
    """One record per line; with `records`/`keyed_by`, each line is a document holding records."""
    for number, line in enumerate(io.StringIO(text), start=1):
        if not line.strip():
            continue
        origin = f"{uri}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield RawRecord(None, origin, RecordError(origin, "(line)", "a JSON object", f"invalid JSON: {exc.msg} at column {exc.colno}"))
            continue
        if records or keyed_by:
            yield from locate_records(value, origin, records, keyed_by)
        else:
            yield RawRecord(value, origin)


def _read_json(uri: str, text: str, records: Optional[str] = None,
               keyed_by: Optional[str] = None) -> Iterator[RawRecord]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            # Many datasets are JSON Lines saved with a .json suffix.
            yield from _read_jsonl(uri, text, records, keyed_by)
            return
        raise DataError(f"{uri}:{exc.lineno}: invalid JSON: {exc.msg} at column {exc.colno}") from None
    yield from locate_records(data, uri, records, keyed_by)


def _read_parquet(uri: str, raw: bytes) -> Iterator[RawRecord]:
    table = pq.read_table(pa.BufferReader(raw))
    for index, row in enumerate(table.to_pylist()):
        yield RawRecord(row, f"{uri}#{index}")


_BLANK_LINES = re.compile(r"\n\s*\n")


def _read_text(uri: str, text: str, text_unit: str) -> Iterator[RawRecord]:
    unit = text_unit
    if unit == "auto":
        unit = "file" if uri.lower().endswith((".md", ".markdown")) else "line"
    if unit == "file":
        if text.strip():
            yield RawRecord(text.strip(), f"{uri}:1")
        return
    if unit == "line":
        # split on "\n" only: str.splitlines() also splits on \f, \u2028, ... and would shift line numbers
        for number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                yield RawRecord(line.strip(), f"{uri}:{number}")
        return
    # paragraph: blank-line separated blocks, origin = first line of the block
    position = 0
    for block in _BLANK_LINES.split(text):
        start = text.find(block, position)
        position = start + len(block)
        if block.strip():
            first_char = start + len(block) - len(block.lstrip())
            line = text.count("\n", 0, first_char) + 1
            yield RawRecord(block.strip(), f"{uri}:{line}")
