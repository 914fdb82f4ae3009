"""Raw records → the two canonical forms: Document (stage 1) and Conversation (stage 2).

A raw record is first shaped (`orchestrator.data.shapes`: unwrapping, ids, prefixed turns,
templates, a transform), then converted. Each converter validates as it goes and raises
RecordError naming the record's origin (file:line or file#index), the field and what was
expected. `load_examples` applies the bad-record policy for a whole source list.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal, Optional

from orchestrator.config import DataSourceConfig, RoleTagsConfig
from orchestrator.data.readers import RawRecord, read_source
from orchestrator.data.shapes import resolve_dataset, shape_inputs, shape_record
from orchestrator.errors import DataError, DataValidationError, RecordError

Role = Literal["system", "user", "assistant"]
MAX_ERRORS_LISTED = 10


@dataclass(frozen=True)
class Document:
    """Plain text for continued pretraining."""

    text: str
    origin: str


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Conversation:
    """Alternating user/assistant messages (after an optional system prompt), ending with the assistant."""

    messages: tuple[Message, ...]
    origin: str

    @property
    def system(self) -> Optional[str]:
        return self.messages[0].content if self.messages and self.messages[0].role == "system" else None

    @property
    def turns(self) -> list[tuple[str, str]]:
        """(user, assistant) pairs, in order."""
        body = [m for m in self.messages if m.role != "system"]
        return [(body[i].content, body[i + 1].content) for i in range(0, len(body), 2)]


CONVERSATION_FORMATS = ("alpaca", "multiturn", "sharegpt")
SHAREGPT_ROLES: dict[str, Role] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}


class _Fields:
    """Reads canonical fields from a record through the source's field mapping."""

    def __init__(self, record: Any, origin: str, mapping: dict[str, str]):
        if not isinstance(record, dict):
            raise RecordError(origin, "(record)", "a JSON object", record)
        self.record = record
        self.origin = origin
        self.mapping = mapping

    def name(self, canonical: str) -> str:
        return self.mapping.get(canonical, canonical)

    def has(self, canonical: str) -> bool:
        return self.record.get(self.name(canonical)) is not None

    def text(self, canonical: str, required: bool = True, allow_empty: bool = False) -> Optional[str]:
        key = self.name(canonical)
        value = self.record.get(key)
        if value is None:
            if required:
                raise RecordError(self.origin, key, "a string (field is missing)")
            return None
        if not isinstance(value, str):
            raise RecordError(self.origin, key, "a string", value)
        if required and not allow_empty and not value.strip():
            raise RecordError(self.origin, key, "a non-empty string", value)
        return value

    def history(self) -> list[tuple[str, str]]:
        key = self.name("history")
        value = self.record.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise RecordError(self.origin, key, "a list of [user, assistant] pairs", value)
        pairs = []
        for i, pair in enumerate(value):
            where = f"{key}[{i}]"
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise RecordError(self.origin, where, "a [user, assistant] pair", pair)
            user, assistant = pair
            for part, text in (("0", user), ("1", assistant)):
                if not isinstance(text, str) or not text.strip():
                    raise RecordError(self.origin, f"{where}[{part}]", "a non-empty string", text)
            pairs.append((user, assistant))
        return pairs


def detect_format(record: Any, mapping: dict[str, str]) -> str:
    """Guess a record's format from its fields ('document' for plain strings)."""
    if isinstance(record, str):
        return "document"
    if not isinstance(record, dict):
        return "unknown"
    keys = {mapping.get(k, k) for k in ("conversations", "instruction", "prompt", "text", "content")}
    present = keys & set(record)
    if mapping.get("conversations", "conversations") in present:
        return "sharegpt"
    if mapping.get("instruction", "instruction") in present:
        return "alpaca"
    if mapping.get("prompt", "prompt") in present:
        return "multiturn"
    if present & {mapping.get("text", "text"), mapping.get("content", "content")}:
        return "document"
    return "unknown"


def to_document(record: Any, origin: str, mapping: dict[str, str]) -> Document:
    """A document record: a string, or an object with `content` or `text` (mappable)."""
    if isinstance(record, str):
        if not record.strip():
            raise RecordError(origin, "(text)", "non-empty text")
        return Document(record, origin)
    fields = _Fields(record, origin, mapping)
    for name in ("text", "content"):
        if fields.has(name):
            return Document(fields.text(name), origin)
    wanted = " or ".join(f"'{fields.name(n)}'" for n in ("content", "text"))
    raise RecordError(origin, fields.name("text"), f"a document field {wanted} (field is missing)")


def _conversation(system: Optional[str], turns: list[tuple[str, str]], origin: str) -> Conversation:
    messages: list[Message] = []
    if system and system.strip():
        messages.append(Message("system", system))
    for user, assistant in turns:
        messages.append(Message("user", user))
        messages.append(Message("assistant", assistant))
    return Conversation(tuple(messages), origin)


def alpaca_to_conversation(record: Any, origin: str, mapping: dict[str, str]) -> Conversation:
    """instruction (+ input) → user; output → assistant; optional system and history pairs before it."""
    fields = _Fields(record, origin, mapping)
    instruction = fields.text("instruction")
    extra = fields.text("input", required=False)
    output = fields.text("output")
    user = f"{instruction}\n{extra}" if extra and extra.strip() else instruction
    return _conversation(fields.text("system", required=False), [*fields.history(), (user, output)], origin)


def multiturn_to_conversation(record: Any, origin: str, mapping: dict[str, str]) -> Conversation:
    """prompt → user; response → assistant; history = earlier [user, assistant] pairs."""
    fields = _Fields(record, origin, mapping)
    prompt = fields.text("prompt")
    response = fields.text("response")
    return _conversation(fields.text("system", required=False), [*fields.history(), (prompt, response)], origin)


def sharegpt_to_conversation(record: Any, origin: str, mapping: dict[str, str],
                             tags: Optional[RoleTagsConfig] = None) -> Conversation:
    """conversations: [{from, value}] (or {role, content}), alternating, ending with the assistant; an optional
    system message first or in a `system` field. `tags` (LLaMA-Factory's) name the keys and role values."""
    fields = _Fields(record, origin, mapping)
    key = fields.name("conversations")
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise RecordError(origin, key, "a non-empty list of {from, value} messages", turns)
    messages: list[Message] = []
    system = fields.text("system", required=False)
    if system and system.strip():
        messages.append(Message("system", system))
    for i, turn in enumerate(turns):
        role, value = _message(turn, f"{key}[{i}]", origin, tags)
        where = f"{key}[{i}]"
        if role == "system":
            if messages:
                raise RecordError(origin, f"{where}.{_role_key(turn, tags)}", "'system' only as the first message", "system")
            if value.strip():
                messages.append(Message("system", value))
            continue
        body_index = sum(1 for m in messages if m.role != "system")
        expected: Role = "user" if body_index % 2 == 0 else "assistant"
        if role != expected:
            raise RecordError(origin, f"{where}.{_role_key(turn, tags)}", f"{'an' if expected == 'assistant' else 'a'} "
                              f"{expected} message (turns must alternate)", turn.get(_role_key(turn, tags)))
        messages.append(Message(role, value))
    if not messages or messages[-1].role != "assistant":
        hint = ""
        if record.get(fields.name("chosen")) is not None:
            hint = (f" (a preference record: its answers are in '{fields.name('chosen')}'/'{fields.name('rejected')}';"
                    " train it in a preference stage, or append the chosen answer with a transform)")
        raise RecordError(origin, key, "a conversation ending with an assistant (gpt) message" + hint)
    return Conversation(tuple(messages), origin)


def _role_key(turn: dict, tags: Optional[RoleTagsConfig]) -> str:
    if tags is not None:
        return tags.role_tag
    return "role" if "from" not in turn and "role" in turn else "from"


def _message(turn: Any, where: str, origin: str, tags: Optional[RoleTagsConfig]) -> tuple[Role, str]:
    """(role, text) of one message of a conversation list."""
    if tags is None:
        if not isinstance(turn, dict):
            raise RecordError(origin, where, "an object with 'from' and 'value'", turn)
        role_key = _role_key(turn, None)
        content_key = "content" if role_key == "role" else "value"
        role = SHAREGPT_ROLES.get(str(turn.get(role_key, "")).lower())
        allowed = ", ".join(sorted(SHAREGPT_ROLES))
    else:
        role_key, content_key = tags.role_tag, tags.content_tag
        if not isinstance(turn, dict):
            raise RecordError(origin, where, f"an object with {role_key!r} and {content_key!r}", turn)
        roles: dict[str, Role] = {tags.user_tag: "user", tags.assistant_tag: "assistant", tags.system_tag: "system"}
        role = roles.get(str(turn.get(role_key, "")))
        if role is None and turn.get(role_key) in (tags.observation_tag, tags.function_tag) and turn.get(role_key):
            raise RecordError(origin, f"{where}.{role_key}", "a user, assistant or system message (tool turns are "
                              "not supported)", turn.get(role_key))
        allowed = ", ".join(roles)
    if role is None:
        raise RecordError(origin, f"{where}.{role_key}", f"one of {allowed}", turn.get(role_key))
    value = turn.get(content_key)
    if not isinstance(value, str) or (role != "system" and not value.strip()):
        raise RecordError(origin, f"{where}.{content_key}", "a non-empty string", value)
    return role, value


CONVERTERS = {
    "alpaca": alpaca_to_conversation,
    "multiturn": multiturn_to_conversation,
    "sharegpt": sharegpt_to_conversation,
}


def conversation_to_document(conversation: Conversation) -> Document:
    """Flatten a conversation into plain text (to mix SFT data into stage 1)."""
    return Document("\n".join(m.content for m in conversation.messages), conversation.origin)


def convert_record(raw: RawRecord, source: DataSourceConfig) -> Optional[Document | Conversation]:
    """One raw record → Document or Conversation, by the source's shape and format (or detected);
    None when the source's `transform` skips the record."""
    source = resolve_dataset(source)
    shaped = shape_record(raw, source)
    if shaped is None:
        return None
    # a transform's canonical record is read without the source's mapping (it has canonical names)
    fmt = source.format if source.transform is None else "auto"
    value, origin, mapping = shaped.value, shaped.origin, shaped.fields
    if fmt == "auto":
        fmt = detect_format(value, mapping)
        if fmt == "unknown":
            raise RecordError(
                origin,
                "(record)",
                "a record with 'text'/'content', 'instruction'/'output', 'prompt'/'response' or 'conversations' "
                "(or set the source's `format` and `fields`)",
                value,
            )
    if fmt == "document":
        return to_document(value, origin, mapping)
    if fmt == "sharegpt":
        return sharegpt_to_conversation(value, origin, mapping, shaped.tags)
    return CONVERTERS[fmt](value, origin, mapping)


@dataclass
class LoadReport:
    """What loading a list of sources found."""

    records: int = 0
    skipped: int = 0  # bad records
    filtered: int = 0  # records a source's transform skipped (returned None)
    errors: list[RecordError] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # uri -> sha256 of every file read


def converted_records(source: DataSourceConfig, report: LoadReport) -> Iterator[Document | Conversation]:
    """Every record of `source` converted (a shape already resolved); bad records are counted in `report` (the
    first few kept) and records the source's transform skips are counted as filtered."""
    for raw in read_source(source, report.files):
        try:
            item = convert_record(raw, source)
        except RecordError as err:
            report.skipped += 1
            if len(report.errors) < MAX_ERRORS_LISTED:
                report.errors.append(err)
            continue
        if item is None:
            report.filtered += 1
            continue
        yield item


def load_examples(
    sources: Iterable[DataSourceConfig],
    kind: Literal["documents", "conversations"],
    bad_records: Literal["error", "skip"] = "error",
    conversations_as_documents: bool = True,
    seed: int = 0,
) -> tuple[list[Document] | list[Conversation], LoadReport]:
    """Read, validate and convert every source; apply source weights.

    With bad_records='error', raises DataValidationError listing the first bad records after
    reading everything (so one run shows all problems); with 'skip', drops them and counts.
    """
    report = LoadReport()
    examples: list = []
    rng = random.Random(seed)
    for source in sources:
        from_source = []
        resolved = resolve_dataset(source)
        report.files.update(shape_inputs(source))
        source = resolved
        for item in converted_records(source, report):
            if kind == "conversations" and isinstance(item, Document):
                raise DataError(
                    f"{source.path}: stage 2 needs conversations (alpaca, multiturn or sharegpt records); "
                    f"{item.origin} is a plain document"
                )
            if kind == "documents" and isinstance(item, Conversation):
                if not conversations_as_documents:
                    raise DataError(
                        f"{source.path}: stage 1 got conversation records; set data.conversations_as_documents=true "
                        "to mix them in as documents"
                    )
                item = conversation_to_document(item)
            from_source.append(item)
        report.records += len(from_source)
        examples.extend(_apply_weight(from_source, source.weight, rng))
    if report.skipped and bad_records == "error":
        raise DataValidationError(report.errors, report.skipped)
    if not examples:
        raise DataError("no usable records in " + ", ".join(s.path for s in sources) + _why_empty(report))
    return examples, report


def _why_empty(report: LoadReport) -> str:
    """The bad records behind an empty result (bad_records=skip dropped them all), or the filtered count."""
    if report.skipped:
        listed = "".join(f"\n  - {e}" for e in report.errors)
        more = f"\n  ... and {report.skipped - len(report.errors)} more" if report.skipped > len(report.errors) else ""
        return f": all {report.skipped} bad record(s) were skipped (data.bad_records=skip):{listed}{more}"
    if report.filtered:
        return f": the transform skipped all {report.filtered} record(s)"
    return ""


def _apply_weight(items: list, weight: float, rng: random.Random) -> Iterator:
    whole, fraction = int(weight), weight - int(weight)
    for _ in range(whole):
        yield from items
    if fraction > 0:
        yield from rng.sample(items, round(len(items) * fraction))
