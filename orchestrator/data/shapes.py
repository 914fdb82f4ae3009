"""Record shapes: where a file's records are, and how their fields fold into the canonical record.

Pure functions between the readers (bytes → parsed values) and the converters (canonical record →
Document / Conversation), driven by a source's shape keys (`orchestrator.config.data`):

* `locate_records`: a parsed JSON document → its records (`records: data.items`, `keyed_by: id`, or the
  document itself / its only list).
* `resolve_dataset`: a source naming a LLaMA-Factory `dataset_info.json` entry → the plain source it
  describes (file, format, fields, tags).
* `shape_value`: one raw record unwrapped, its id added, through a user `transform` (training sources
  and evaluation sets alike).
* `shape_record`: one raw record → a `ShapedRecord` (`shape_value`, then prefixed-string turns split
  and templates rendered), or None when a transform skips it.

Every mistake raises `RecordError` (origin, the key expected, what was found) or, for a whole file,
`DataError` naming the file and the key path.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from orchestrator import storage
from orchestrator.config import DataSourceConfig, PrefixedTurnsConfig, RecordShape, RoleTagsConfig, template_keys
from orchestrator.errors import DataError, RecordError

DATASET_INFO = "dataset_info.json"
FOLDED = "(folded into prompt_template)"  # a key no record has: the canonical field reads as absent


@dataclass(frozen=True)
class RawRecord:
    """One record as read, before validation. `error` is set when the record could not even be parsed;
    `key` is the record's id when it came from an object keyed by id."""

    value: Any
    origin: str
    error: Optional[RecordError] = None
    key: Optional[str] = None


@dataclass(frozen=True)
class ShapedRecord:
    """A record ready for the converters: `fields` maps canonical names to keys of `value`."""

    value: Any
    origin: str
    fields: dict[str, str] = field(default_factory=dict)
    tags: Optional[RoleTagsConfig] = None


# ----------------------------------------------------------------------------- locating records


def locate_records(document: Any, origin: str, records: Optional[str] = None,
                   keyed_by: Optional[str] = None) -> Iterator[RawRecord]:
    """The records of one parsed JSON document; origins `<origin>#<index>` (or `#<id>` when keyed by id)."""
    node = _follow(document, records, origin) if records else document
    if isinstance(node, dict) and keyed_by is None and not records:
        node = _only_list(node, origin)
    where = f"records={records!r}" if records else "the top level"
    if keyed_by is not None:
        if not isinstance(node, dict):
            raise DataError(f"{origin}: keyed_by={keyed_by!r} expects an object of id → record at {where}, "
                            f"got {_kind(node)}")
        for key, value in node.items():
            yield RawRecord(value, f"{origin}#{key}", key=str(key))
        return
    if not isinstance(node, list):
        hint = "; for an object keyed by record id set keyed_by" if isinstance(node, dict) else ""
        raise DataError(f"{origin}: expected a list of records at {where}, got {_kind(node)}{hint}")
    for index, value in enumerate(node):
        yield RawRecord(value, f"{origin}#{index}")


def _follow(document: Any, path: str, origin: str) -> Any:
    node, walked = document, []
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            at = ".".join(walked) or "the top level"
            keys = f" (keys there: {', '.join(map(str, list(node)[:12]))})" if isinstance(node, dict) else ""
            raise DataError(f"{origin}: records={path!r}: no key {part!r} at {at}, which is {_kind(node)}{keys}")
        walked.append(part)
    return node


def _only_list(node: dict, origin: str) -> Any:
    lists = [k for k, v in node.items() if isinstance(v, list)]
    if len(lists) == 1:
        return node[lists[0]]
    if node and all(isinstance(v, dict) for v in node.values()):
        raise DataError(f"{origin}: an object of {len(node)} objects (first key {next(iter(node))!r}); if it is keyed "
                        "by record id, set keyed_by (e.g. keyed_by: id); if the records are under a key, set records")
    found = f"list-valued keys {', '.join(lists)}" if lists else "no list-valued key"
    raise DataError(f"{origin}: expected a JSON list of records, got an object with {found}; "
                    "set records (e.g. records: data.items) or keyed_by")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------- LLaMA-Factory registries

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                  "history": "history"}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system"}
PREFERENCE_COLUMNS = {"chosen": "chosen", "rejected": "rejected", "kto_tag": "kto_tag"}
UNSUPPORTED_COLUMNS = ("tools", "images", "videos", "audios")
REMOTE_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


def resolve_dataset(source: DataSourceConfig) -> DataSourceConfig:
    """A source naming a `dataset_info.json` entry → the plain source it describes; others unchanged."""
    if source.dataset is None:
        return source
    info_uri = registry_uri(source)
    registry = _read_registry(info_uri)
    name = source.dataset
    if name not in registry:
        close = difflib.get_close_matches(name, list(registry), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; registered: {', '.join(list(registry)[:20])}"
        raise DataError(f"{info_uri}: no dataset {name!r}{hint}")
    entry = registry[name]
    where = f"{info_uri}: dataset {name!r}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object with file_name, formatting, columns, got {_kind(entry)}")
    if "file_name" not in entry:
        remote = [k for k in REMOTE_KEYS if k in entry]
        how = f"is read from {remote[0]}={entry[remote[0]]!r}" if remote else "has no file_name"
        raise DataError(f"{where} {how}; only entries with a file_name (a file or directory beside "
                        "dataset_info.json) can be read: download the data and set file_name")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise DataError(f"{where}: formatting {formatting!r} is not supported; expected alpaca or sharegpt")
    base = info_uri.rsplit("/", 1)[0] if "/" in info_uri else "."
    file_name = str(entry["file_name"])
    # as LLaMA-Factory's os.path.join(dataset_dir, file_name): an absolute path or a URI is used as is
    data_uri = file_name if file_name.startswith("/") or "://" in file_name else storage.join(base, file_name)
    update = {
        "path": data_uri,
        "dataset": None,
        "format": formatting,
        "fields": _columns(entry.get("columns") or {}, formatting, where),
        "tags": _tags(entry.get("tags"), where) if formatting == "sharegpt" else None,
    }
    return source.model_copy(update=update)


def registry_uri(source: DataSourceConfig) -> str:
    """The dataset_info.json a source with `dataset` reads (`path` itself, or the file in that directory)."""
    return source.path if source.path.lower().endswith(".json") else storage.join(source.path, DATASET_INFO)


def shape_inputs(source: DataSourceConfig) -> dict[str, str]:
    """Files besides the data that decide what a source's records become (uri → sha256): its dataset_info.json
    and its transform's module, so that a cache keyed on the files read notices when they change."""
    found = {}
    if source.dataset is not None:
        found[registry_uri(source)] = hashlib.sha256(storage.read_bytes(registry_uri(source))).hexdigest()
    if source.transform is not None:
        code = getattr(load_transform(source.transform), "__code__", None)
        module_file = code.co_filename if code is not None else None
        if module_file and Path(module_file).is_file():
            found[module_file] = hashlib.sha256(Path(module_file).read_bytes()).hexdigest()
    return found


@functools.lru_cache(maxsize=16)
def _read_registry(info_uri: str) -> dict:
    try:
        registry = json.loads(storage.read_bytes(info_uri).decode("utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"{info_uri}: no such file (a source with `dataset` reads LLaMA-Factory's "
                        "dataset_info.json at `path`, or in the directory `path` names)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{info_uri}: not a valid JSON dataset registry ({exc})") from None
    if not isinstance(registry, dict):
        raise DataError(f"{info_uri}: expected an object of dataset name → entry, got {_kind(registry)}")
    return registry


def _columns(columns: dict, formatting: str, where: str) -> dict[str, str]:
    known = {**(ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS), **PREFERENCE_COLUMNS}
    fields: dict[str, str] = {}
    for column, key in columns.items():
        if column in UNSUPPORTED_COLUMNS:
            raise DataError(f"{where}: column {column!r} is not supported (text-only training); drop it from columns")
        if column not in known:
            raise DataError(f"{where}: unknown column {column!r} for formatting {formatting}; "
                            f"expected one of {', '.join(known)}")
        fields[known[column]] = str(key)
    return fields


def _tags(tags: Optional[dict], where: str) -> Optional[RoleTagsConfig]:
    if tags is None:
        return None
    unknown = sorted(set(tags) - set(RoleTagsConfig.model_fields))
    if unknown:
        raise DataError(f"{where}: unknown tags {', '.join(unknown)}; expected {', '.join(RoleTagsConfig.model_fields)}")
    return RoleTagsConfig(**{k: str(v) for k, v in tags.items()})


# ----------------------------------------------------------------------------- one record


def shape_value(raw: RawRecord, shape: RecordShape) -> Any:
    """A raw record unwrapped, with its id added (keyed_by) and through the transform: what the readers of
    records (training converters, evaluation sets) see; None when the transform skipped it."""
    if raw.error is not None:
        raise raw.error
    value = _unwrap(raw.value, raw.origin) if shape.unwrap else raw.value
    if shape.keyed_by is not None and raw.key is not None:
        value = _with_key(value, raw.key, shape.keyed_by, raw.origin)
    if shape.transform is not None:
        return _transformed(value, raw.origin, shape.transform)
    return value


def shape_record(raw: RawRecord, source: DataSourceConfig) -> Optional[ShapedRecord]:
    """One raw record → the record the converters read (None: the source's transform skipped it)."""
    value = shape_value(raw, source)
    if value is None:
        return None
    if source.transform is not None:
        return ShapedRecord(value, raw.origin)
    if not isinstance(value, dict):
        return ShapedRecord(value, raw.origin, dict(source.fields), source.tags)
    record, fields = dict(value), dict(source.fields)
    if source.prefixed_turns is not None:
        _split_prefixed(record, fields, source, raw.origin)
    _render_templates(record, fields, value, source, raw.origin)
    return ShapedRecord(record, raw.origin, fields, source.tags)


def _unwrap(value: Any, origin: str) -> Any:
    if not (isinstance(value, list) and len(value) == 1):
        got = f"a list of {len(value)} items" if isinstance(value, list) else value
        raise RecordError(origin, "(record)", "a one-item list [ {...} ] (unwrap: true)", got)
    return value[0]


def _with_key(value: Any, key: str, name: str, origin: str) -> Any:
    if not isinstance(value, dict):
        raise RecordError(origin, "(record)", f"an object (keyed_by: {name} adds the id {key!r} to it)", value)
    if name in value and str(value[name]) != key:
        raise RecordError(origin, name, f"the record's id {key!r} (keyed_by: {name}) or no such field", value[name])
    return {**value, name: key}


# -- transform


def load_transform(spec: str) -> Callable[[Any], Any]:
    """The function `package.module:function` names; DataError when it cannot be imported."""
    module_name, function_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time error of user code is reported the same way
        raise DataError(f"transform {spec!r}: cannot import {module_name} ({type(exc).__name__}: {exc}); "
                        "is it on PYTHONPATH?") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise DataError(f"transform {spec!r}: {module_name} has no function {function_name}")
    return function


def _transformed(value: Any, origin: str, spec: str) -> Any:
    function = load_transform(spec)
    try:
        result = function(value)
    except Exception as exc:  # the user's function failing on one record is that record's error
        hint = " (each record is a one-item list: set unwrap: true?)" if isinstance(value, list) and len(value) == 1 else ""
        raise RecordError(origin, "(transform)", f"{spec} to return a canonical record; it raised "
                          f"{type(exc).__name__}: {str(exc)[:200]}{hint}") from None
    if result is None:
        return None
    if not isinstance(result, (dict, str)):
        raise RecordError(origin, "(transform)", f"{spec} to return a dict with canonical field names, a string or "
                          "None", type(result).__name__)
    return result


# -- prefixed turns


def _split_prefixed(record: dict, fields: dict[str, str], source: DataSourceConfig, origin: str) -> None:
    """Lists of prefixed strings under history (→ [user, assistant] pairs) or conversations (→ messages)."""
    prefixes = source.prefixed_turns
    assert prefixes is not None
    history_key = fields.get("history", "history")
    if source.format != "sharegpt" and isinstance(record.get(history_key), list):
        turns = _parse_prefixed(record[history_key], prefixes, history_key, origin, allow_system=False)
        if len(turns) % 2:
            raise RecordError(origin, history_key, "user/assistant pairs: the history ends with a user turn",
                              f"{len(turns)} turns")
        record[history_key] = [[turns[i][1], turns[i + 1][1]] for i in range(0, len(turns), 2)]
    conversations_key = fields.get("conversations", "conversations")
    if source.format in ("sharegpt", "auto") and isinstance(record.get(conversations_key), list):
        tags = source.tags or RoleTagsConfig()
        roles = {"user": tags.user_tag, "assistant": tags.assistant_tag, "system": tags.system_tag}
        record[conversations_key] = [
            {tags.role_tag: roles[role], tags.content_tag: text}
            for role, text in _parse_prefixed(record[conversations_key], prefixes, conversations_key, origin, True)
        ]


def _parse_prefixed(items: list, prefixes: PrefixedTurnsConfig, key: str, origin: str,
                    allow_system: bool) -> list[tuple[str, str]]:
    """[(role, text)] of prefixed strings, alternating user/assistant from the user (after an optional system)."""
    turns: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        expected = "user" if len([r for r, _ in turns if r != "system"]) % 2 == 0 else "assistant"
        wanted = getattr(prefixes, expected)
        if not isinstance(item, str):
            raise RecordError(origin, where, f"a string starting with {wanted!r} (prefixed_turns)", item)
        text = item.lstrip()
        if allow_system and i == 0 and prefixes.system and text.startswith(prefixes.system):
            turns.append(("system", text[len(prefixes.system):].strip()))
            continue
        if not text.startswith(wanted):
            other = prefixes.assistant if expected == "user" else prefixes.user
            why = " (turns must alternate)" if text.startswith(other) else ""
            article = "an" if expected == "assistant" else "a"
            raise RecordError(origin, where, f"{article} {expected} turn starting with {wanted!r}{why}", item)
        body = text[len(wanted):].strip()
        if not body:
            raise RecordError(origin, where, f"text after the prefix {wanted!r}", item)
        turns.append((expected, body))
    return turns


# -- templates


def _render_templates(record: dict, fields: dict[str, str], original: dict, source: DataSourceConfig,
                      origin: str) -> None:
    """Render prompt/system/response templates into the record under '(<name>)' keys the fields point at."""
    prompt_field, response_field = _turn_fields(source.format, original, fields)
    targets = {"prompt_template": prompt_field, "system_template": "system", "response_template": response_field}
    for name, canonical in targets.items():
        template = getattr(source, name)
        if template is None:
            continue
        key = f"({name})"
        record[key] = render_template(template, original, name, origin)
        fields[canonical] = key
        if name == "prompt_template" and canonical == "instruction":
            fields["input"] = FOLDED


def _turn_fields(fmt: str, record: dict, fields: dict[str, str]) -> tuple[str, str]:
    """Canonical names of the last turn's prompt and answer: prompt/response (multiturn) or instruction/output."""
    multiturn = fmt == "multiturn" or (
        fmt == "auto" and fields.get("prompt", "prompt") in record and fields.get("instruction", "instruction")
        not in record
    )
    return ("prompt", "response") if multiturn else ("instruction", "output")


def render_template(template: str, record: dict, name: str, origin: str) -> str:
    """`template` with each {key} (or {a.b}) replaced by the record's value; lists are joined with newlines."""
    values = {}
    for key in template_keys(template):
        values[key] = _template_value(record, key, name, origin)
    out = []
    for literal, key, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if key is not None:
            out.append(values[key])
    return "".join(out)


def _template_value(record: dict, key: str, name: str, origin: str) -> str:
    node: Any = record
    for part in key.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            there = f"; the record has {', '.join(map(str, list(node)[:12]))}" if isinstance(node, dict) else ""
            raise RecordError(origin, key, f"a field for {{{key}}} in {name} (field is missing{there})")
        node = node[part]
    if isinstance(node, str):
        return node
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return str(node)
    if isinstance(node, list) and all(isinstance(v, str) for v in node):
        return "\n".join(node)
    raise RecordError(origin, key, f"a string, number or list of strings for {{{key}}} in {name}", node)
