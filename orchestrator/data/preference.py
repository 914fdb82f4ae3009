"""Stage 3 data: preference records → canonical pairs (or unpaired KTO examples) → token columns.

Accepted record shapes (field names mappable through the source's `fields`):

* MedicalGPT / LLaMA-Factory sharegpt ranking: `conversations` (from/value or role/content messages,
  ending with the user turn) + `chosen` / `rejected` as answer strings or as one message object each;
* plain text: `prompt` + `chosen` + `rejected` (+ optional `system`);
* OpenAI / TRL conversational: `chosen` / `rejected` as whole message lists sharing the prompt (the
  prompt is their common prefix), or `prompt` as a message list + `chosen` / `rejected` lists holding
  the one assistant answer;
* LLaMA-Factory alpaca ranking: `instruction` (+ `input`) + `chosen` / `rejected`;
* unpaired (KTO): a boolean `label` (LLaMA-Factory: `kto_tag`) with `messages` (or `conversations`) ending
  in the answer, or `prompt` + `completion`.

Records go through the source's shape first (orchestrator.data.shapes: `records`, `keyed_by`, `unwrap`,
`transform`, a LLaMA-Factory `dataset` entry with its columns), as in stages 1 and 2.

The prompt goes through the same chat template as stage 2 (orchestrator.data.templates). Each answer
is encoded token-exact by stage 2's rule (orchestrator.data.sft.cut_at_boundaries): prompt text + answer
text is tokenized as ONE text, and the answer starts where that text's ids stop agreeing with the prompt's
own ids, so the ids are those the model reads at inference, never a concatenation of separately tokenized
pieces. Prompt tokens are -100; a token that straddles the boundary is trained and reported.
With the `kto` loss, paired records are unpaired (chosen → desirable, rejected → undesirable), as TRL
does; every unpaired example also gets a mismatched partner (its prompt with the next example's
answer) for KTO's KL estimate.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from orchestrator.config import DataSourceConfig
from orchestrator.data.formats import (
    MAX_ERRORS_LISTED,
    SHAREGPT_ROLES,
    Conversation,
    LoadReport,
    Message,
    _apply_weight,
)
from orchestrator.data.readers import read_source
from orchestrator.data.shapes import resolve_dataset, shape_inputs, shape_record
from orchestrator.data.pretrain import encode_texts
from orchestrator.data.sft import IGNORE_INDEX, cut_at_boundaries, report_straddling
from orchestrator.data.templates import ChatTemplate
from orchestrator.errors import DataError, DataValidationError, RecordError

PREFERENCE_SOURCE_FORMATS = ("auto", "sharegpt", "alpaca")  # LLaMA-Factory's formattings of ranking data


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (messages ending with the user turn) and two answers, the first preferred."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    origin: str


@dataclass(frozen=True)
class UnpairedExample:
    """A prompt and one answer labelled desirable or not (KTO)."""

    prompt: tuple[Message, ...]
    completion: str
    desirable: bool
    origin: str


@dataclass(frozen=True)
class EncodedAnswer:
    """prompt + answer as token ids; labels are -100 on the prompt."""

    input_ids: np.ndarray
    labels: np.ndarray


# --- records → canonical ----------------------------------------------------------------------------
def _name(mapping: dict[str, str], canonical: str) -> str:
    return mapping.get(canonical, canonical)


def parse_messages(value: Any, origin: str, key: str) -> list[Message]:
    """A list of {from, value} or {role, content} objects → messages (roles checked, not their order)."""
    if not isinstance(value, list) or not value:
        raise RecordError(origin, key, "a non-empty list of {from, value} or {role, content} messages", value)
    return [_message(item, origin, f"{key}[{i}]") for i, item in enumerate(value)]


def _message(item: Any, origin: str, where: str) -> Message:
    if not isinstance(item, dict):
        raise RecordError(origin, where, "a message object with from/value or role/content", item)
    role_key, text_key = ("from", "value") if "from" in item else ("role", "content")
    role = SHAREGPT_ROLES.get(str(item.get(role_key, "")).lower())
    if role is None:
        raise RecordError(origin, f"{where}.{role_key}", f"one of {', '.join(sorted(SHAREGPT_ROLES))}",
                          item.get(role_key))
    text = item.get(text_key)
    if not isinstance(text, str) or (role != "system" and not text.strip()):
        raise RecordError(origin, f"{where}.{text_key}", "a non-empty string", text)
    return Message(role, text)


def check_prompt(messages: Sequence[Message], origin: str, key: str) -> tuple[Message, ...]:
    """(system), user, assistant, …, user: alternating turns that end with the user."""
    body = list(messages)
    if body and body[0].role == "system":
        body = body[1:]
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            where = f"{key}[{i + len(messages) - len(body)}]"
            raise RecordError(origin, where, f"a {expected} message (turns alternate after an optional system "
                              "message)", message.role)
    if not body or body[-1].role != "user":
        raise RecordError(origin, key, "a prompt ending with a user (human) message")
    system = [m for m in messages[:1] if m.role == "system" and m.content.strip()]
    return tuple(system + body)


def _answer(value: Any, origin: str, key: str) -> str:
    """An answer: a string, one assistant message object, or a list holding one assistant message."""
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(origin, key, "a non-empty answer string", value)
        return value
    if isinstance(value, list) and len(value) == 1:
        value, key = value[0], f"{key}[0]"
    if isinstance(value, dict):
        message = _message(value, origin, key)
        if message.role != "assistant":
            raise RecordError(origin, key, "an assistant (gpt) message", message.role)
        return message.content
    raise RecordError(origin, key, "an answer string or one assistant message", value)


def _with_system(prompt: list[Message], record: dict, origin: str, mapping: dict[str, str]) -> list[Message]:
    key = _name(mapping, "system")
    system = record.get(key)
    if system is None:
        return prompt
    if not isinstance(system, str):
        raise RecordError(origin, key, "a string", system)
    if prompt and prompt[0].role == "system":
        raise RecordError(origin, key, "no separate system field when the messages start with a system message")
    return ([Message("system", system)] if system.strip() else []) + prompt


def _prompt_of(record: dict, origin: str, mapping: dict[str, str]) -> Optional[tuple[tuple[Message, ...], str]]:
    """The explicit prompt (messages, field name) of a record, or None when it has none."""
    instruction_key = _name(mapping, "instruction")
    if isinstance(record.get(instruction_key), str):
        extra = record.get(_name(mapping, "input"))
        text = record[instruction_key] + (f"\n{extra}" if isinstance(extra, str) and extra.strip() else "")
        if not text.strip():
            raise RecordError(origin, instruction_key, "a non-empty instruction", record[instruction_key])
        return check_prompt(_with_system([Message("user", text)], record, origin, mapping), origin,
                            instruction_key), instruction_key
    for canonical in ("conversations", "messages", "prompt"):
        key = _name(mapping, canonical)
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            if not value.strip():
                raise RecordError(origin, key, "a non-empty prompt", value)
            messages = [Message("user", value)]
        else:
            messages = parse_messages(value, origin, key)
        return check_prompt(_with_system(messages, record, origin, mapping), origin, key), key
    return None


def _implicit_prompt(record: dict, origin: str, mapping: dict[str, str]) -> PreferencePair:
    """chosen / rejected are whole conversations: the prompt is what they share, the answers their last turns."""
    chosen_key, rejected_key = _name(mapping, "chosen"), _name(mapping, "rejected")
    chosen = parse_messages(record[chosen_key], origin, chosen_key)
    rejected = parse_messages(record[rejected_key], origin, rejected_key)
    for key, messages in ((chosen_key, chosen), (rejected_key, rejected)):
        if messages[-1].role != "assistant":
            raise RecordError(origin, f"{key}[{len(messages) - 1}]", "the conversation to end with the assistant "
                              "answer", messages[-1].role)
    if chosen[:-1] != rejected[:-1]:
        raise RecordError(origin, rejected_key, f"the same messages as {chosen_key} up to the last answer (the "
                          "shared prompt)")
    prompt = check_prompt(_with_system(chosen[:-1], record, origin, mapping), origin, chosen_key)
    return PreferencePair(prompt, chosen[-1].content, rejected[-1].content, origin)


def record_to_preference(record: Any, origin: str, mapping: dict[str, str]) -> PreferencePair | UnpairedExample:
    """One raw record → a PreferencePair, or an UnpairedExample when it has a `label` (see module docstring)."""
    if not isinstance(record, dict):
        raise RecordError(origin, "(record)", "a JSON object", record)
    if _label_key(record, mapping) is not None:
        return _unpaired(record, origin, mapping)
    label_key = _name(mapping, "label")
    chosen_key, rejected_key = _name(mapping, "chosen"), _name(mapping, "rejected")
    for key in (chosen_key, rejected_key):
        if record.get(key) is None:
            raise RecordError(origin, key, f"an answer (field is missing; a preference record has {chosen_key} "
                              f"and {rejected_key}, or a boolean {label_key} for KTO)")
    explicit = _prompt_of(record, origin, mapping)
    if explicit is None:
        if isinstance(record[chosen_key], list) and len(record[chosen_key]) > 1:
            return _implicit_prompt(record, origin, mapping)
        raise RecordError(origin, _name(mapping, "prompt"), "a prompt: conversations, messages or prompt (or "
                          "chosen/rejected as whole conversations sharing it)")
    prompt, _ = explicit
    return PreferencePair(prompt, _answer(record[chosen_key], origin, chosen_key),
                          _answer(record[rejected_key], origin, rejected_key), origin)


def _label_key(record: dict, mapping: dict[str, str]) -> Optional[str]:
    """The key of a KTO label: `kto_tag` (LLaMA-Factory's, mappable) or `label` (TRL's)."""
    for key in (_name(mapping, "kto_tag"), "label"):
        if key in record:
            return key
    return None


def _unpaired(record: dict, origin: str, mapping: dict[str, str]) -> UnpairedExample:
    label_key = _label_key(record, mapping)
    label = record[label_key]
    if not isinstance(label, bool):
        raise RecordError(origin, label_key, "true (desirable) or false (undesirable)", label)
    completion_key = _name(mapping, "completion")
    if record.get(completion_key) is not None:
        explicit = _prompt_of(record, origin, mapping)
        if explicit is None:
            raise RecordError(origin, _name(mapping, "prompt"), f"a prompt for the {completion_key}")
        return UnpairedExample(explicit[0], _answer(record[completion_key], origin, completion_key), label, origin)
    for canonical in ("messages", "conversations"):
        key = _name(mapping, canonical)
        if record.get(key) is None:
            continue
        messages = _with_system(parse_messages(record[key], origin, key), record, origin, mapping)
        if messages[-1].role != "assistant":
            raise RecordError(origin, f"{key}[{len(messages) - 1}]", "the conversation to end with the answer "
                              "being labelled (an assistant message)", messages[-1].role)
        return UnpairedExample(check_prompt(messages[:-1], origin, key), messages[-1].content, label, origin)
    raise RecordError(origin, _name(mapping, "messages"), f"messages ending with the labelled answer, or "
                      f"prompt + {completion_key} (field is missing)")


def load_preference_records(sources: Iterable[DataSourceConfig], bad_records: str = "error", seed: int = 0,
                            ) -> tuple[list[PreferencePair | UnpairedExample], LoadReport]:
    """Read and validate every source, apply source weights; the bad-record policy as in stage 1 and 2."""
    report = LoadReport()
    examples: list = []
    rng = random.Random(seed)
    sources = list(sources)
    for source in sources:
        if source.format not in PREFERENCE_SOURCE_FORMATS:
            raise DataError(f"{source.path}: preference sources are read by their fields; format {source.format!r} "
                            f"does not apply (use {' or '.join(PREFERENCE_SOURCE_FORMATS)})")
        from_source = []
        resolved = resolve_dataset(source)
        report.files.update(shape_inputs(source))
        source = resolved
        for raw in read_source(source, report.files):
            try:
                shaped = shape_record(raw, source)
                if shaped is None:  # the source's transform skipped it
                    continue
                from_source.append(record_to_preference(shaped.value, shaped.origin, shaped.fields))
            except RecordError as err:
                report.skipped += 1
                if len(report.errors) < MAX_ERRORS_LISTED:
                    report.errors.append(err)
        report.records += len(from_source)
        examples.extend(_apply_weight(from_source, source.weight, rng))
    if report.skipped and bad_records == "error":
        raise DataValidationError(report.errors, report.skipped)
    if not examples:
        raise DataError("no usable preference records in " + ", ".join(s.path for s in sources))
    return examples, report


def as_pairs(examples: Sequence[PreferencePair | UnpairedExample]) -> list[PreferencePair]:
    """Paired losses need pairs: an unpaired (KTO) record is an error naming it."""
    unpaired = [e for e in examples if isinstance(e, UnpairedExample)]
    if unpaired:
        raise DataError(f"{unpaired[0].origin}: an unpaired (labelled) record, but the loss compares chosen and "
                        f"rejected answers ({len(unpaired)} such records); use preference.train.loss=kto")
    return list(examples)  # type: ignore[arg-type]


def as_unpaired(examples: Sequence[PreferencePair | UnpairedExample]) -> list[UnpairedExample]:
    """KTO's examples: pairs split into a desirable and an undesirable example (as TRL unpairs them)."""
    out: list[UnpairedExample] = []
    for example in examples:
        if isinstance(example, PreferencePair):
            out.append(UnpairedExample(example.prompt, example.chosen, True, example.origin))
            out.append(UnpairedExample(example.prompt, example.rejected, False, example.origin))
        else:
            out.append(example)
    return out


# --- canonical → tokens -----------------------------------------------------------------------------
def render_prompt_answer(template: ChatTemplate, prompt: Sequence[Message], answer: str, origin: str) -> tuple[str, str]:
    """(prompt text, answer text) as the chat template renders the conversation; the answer text carries the
    template's end of turn. Earlier assistant turns belong to the prompt."""
    rendered = template.render(Conversation(tuple(prompt) + (Message("assistant", answer),), origin))
    body = rendered.prefix + "".join(p + a for p, a in rendered.turns[:-1]) + rendered.turns[-1][0]
    return body, rendered.turns[-1][1]


def encode_prompt_answers(pieces: Sequence[tuple[str, str]], tokenizer: Any,
                          origins: Optional[Sequence[str]] = None) -> list[EncodedAnswer]:
    """Token-exact encoding of (prompt text, answer text) pairs, by stage 2's rule: each tokenized as one
    text, cut where its ids leave the prompt's own ids; straddling boundaries are reported once."""
    whole = encode_texts([prompt + answer for prompt, answer in pieces], tokenizer)
    heads = encode_texts([prompt for prompt, _ in pieces], tokenizer)
    out, straddling = [], []
    for i, (ids, head) in enumerate(zip(whole, heads)):
        (cut,), straddled = cut_at_boundaries(ids, [head])
        if straddled:
            straddling.append(origins[i] if origins else f"example {i}")
        ids = np.asarray(ids, dtype=np.int32)
        labels = ids.copy()
        labels[:cut] = IGNORE_INDEX
        out.append(EncodedAnswer(ids, labels))
    report_straddling(straddling, len(pieces))
    return out


def truncate_answer(encoded: EncodedAnswer, max_length: int) -> EncodedAnswer:
    """Fit max_length: the prompt keeps its end (at least half the budget when it is that long), the answer
    its beginning."""
    n = len(encoded.input_ids)
    if n <= max_length:
        return encoded
    labelled = np.flatnonzero(encoded.labels != IGNORE_INDEX)
    n_prompt = int(labelled[0]) if len(labelled) else n
    n_answer = n - n_prompt
    prompt_keep = min(n_prompt, max(max_length - n_answer, max_length // 2))
    start, stop = n_prompt - prompt_keep, n_prompt - prompt_keep + max_length
    return EncodedAnswer(encoded.input_ids[start:stop], encoded.labels[start:stop])


def _encode(template: ChatTemplate, tokenizer: Any, items: Sequence[tuple[Sequence[Message], str, str]],
            max_length: int) -> list[EncodedAnswer]:
    pieces = [render_prompt_answer(template, prompt, answer, origin) for prompt, answer, origin in items]
    encoded = encode_prompt_answers(pieces, tokenizer, [origin for _, _, origin in items])
    return [truncate_answer(e, max_length) for e in encoded]


def encode_pairs(pairs: Sequence[PreferencePair], tokenizer: Any, template: ChatTemplate, max_length: int,
                 first_id: int = 0) -> dict[str, list]:
    """Columns of a paired table: chosen_/rejected_ input_ids and labels, and example_id."""
    chosen = _encode(template, tokenizer, [(p.prompt, p.chosen, p.origin) for p in pairs], max_length)
    rejected = _encode(template, tokenizer, [(p.prompt, p.rejected, p.origin) for p in pairs], max_length)
    return {
        "chosen_input_ids": [e.input_ids for e in chosen], "chosen_labels": [e.labels for e in chosen],
        "rejected_input_ids": [e.input_ids for e in rejected], "rejected_labels": [e.labels for e in rejected],
        "example_id": list(range(first_id, first_id + len(pairs))),
    }


def encode_unpaired(examples: Sequence[UnpairedExample], tokenizer: Any, template: ChatTemplate, max_length: int,
                    first_id: int = 0) -> dict[str, list]:
    """Columns of a KTO table: input_ids/labels of the example, kl_input_ids/kl_labels of its prompt with the
    next example's answer (KTO's KL estimate), desirable, example_id."""
    n = len(examples)
    own = _encode(template, tokenizer, [(e.prompt, e.completion, e.origin) for e in examples], max_length)
    partner = _encode(template, tokenizer, [(e.prompt, examples[(i + 1) % n].completion, e.origin)
                                            for i, e in enumerate(examples)], max_length)
    return {
        "input_ids": [e.input_ids for e in own], "labels": [e.labels for e in own],
        "kl_input_ids": [e.input_ids for e in partner], "kl_labels": [e.labels for e in partner],
        "desirable": [e.desirable for e in examples],
        "example_id": list(range(first_id, first_id + n)),
    }
