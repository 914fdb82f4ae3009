"""Evaluation sets: files → validated items in one canonical form per kind.

* `QAItem`: chat messages ending with the question, and the reference answer. Read from
  `{question, answer}` records (field names configurable, e.g. 问/答), clinical case sets
  (`{description, QA_pairs: [{question, answer}]}`: one item per pair, asked with the case
  description) and the training formats (alpaca, multiturn, sharegpt: the last assistant turn is
  the reference).
* `ChoiceItem`: a question, labelled options (A, B, ...) and the correct label; CSV or JSON.
* `Probe`: a question the model should decline (honesty).
* held-out `Document`s for perplexity, read like stage 1's documents.

Sets take the shape keys of a training source (records, keyed_by, unwrap, transform; templates for
the question, answer and system message), e.g. a PubMedQA-style file keyed by id. A bad record stops
the evaluation before any model is loaded, with `file:line: field ...: expected ...` for every bad
record found.
"""

from __future__ import annotations

import csv
import io
import string
from dataclasses import dataclass, field
from typing import Any, Iterator

from orchestrator import storage
from orchestrator.config import (
    EvalConfig,
    HonestyConfig,
    MultipleChoiceSetConfig,
    PipelineConfig,
    QASetConfig,
)
from orchestrator.data.formats import CONVERTERS, Document, detect_format, load_examples
from orchestrator.data.prepare import split_eval
from orchestrator.data.prepare_ray import held_out_texts
from orchestrator.data.preference import PreferencePair, load_preference_records
from orchestrator.data.readers import JSON_SUFFIXES, PARQUET_SUFFIXES, RawRecord, read_file
from orchestrator.data.shapes import render_template, shape_value
from orchestrator.errors import ConfigError, DataError, RecordError

MAX_ERRORS_LISTED = 10
CSV_SUFFIXES = (".csv",)


@dataclass(frozen=True)
class QAItem:
    """A question to answer by generation, with its reference answer."""

    key: str
    messages: tuple[tuple[str, str], ...]  # (role, content), ending with the user's question
    reference: str
    origin: str

    @property
    def question(self) -> str:
        return self.messages[-1][1]


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice question: options as (label, text) pairs and the correct label."""

    key: str
    question: str
    options: tuple[tuple[str, str], ...]
    answer: str
    origin: str


@dataclass(frozen=True)
class Probe:
    """An honesty probe: a question whose answer the model cannot know."""

    key: str
    question: str
    origin: str


@dataclass
class EvalSets:
    """Everything one evaluation asks every model, loaded and validated."""

    qa: dict[str, list[QAItem]]
    multiple_choice: dict[str, tuple[MultipleChoiceSetConfig, list[ChoiceItem]]]
    probes: list[Probe]
    documents: list[Document]
    pairs: list[PreferencePair] = field(default_factory=list)  # preference accuracy

    @property
    def empty(self) -> bool:
        return not (self.qa or self.multiple_choice or self.probes or self.documents or self.pairs)


class _Errors:
    """Collects bad records of one set; raises them all at the end."""

    def __init__(self) -> None:
        self.errors: list[RecordError] = []
        self.total = 0

    def add(self, error: RecordError) -> None:
        self.total += 1
        if len(self.errors) < MAX_ERRORS_LISTED:
            self.errors.append(error)

    def raise_any(self, what: str) -> None:
        if self.total:
            listed = "\n".join(f"  - {e}" for e in self.errors)
            more = f"\n  ... and {self.total - len(self.errors)} more" if self.total > len(self.errors) else ""
            raise DataError(f"{self.total} bad record(s) in {what}:\n{listed}{more}")


def _records(config: QASetConfig | MultipleChoiceSetConfig, suffixes: tuple[str, ...]) -> Iterator[RawRecord]:
    """Raw records of every file a set's path matches: JSON/JSONL/Parquet through the data readers (located by
    the set's records/keyed_by), CSV here."""
    for uri in storage.expand(config.path, suffixes):
        if uri.lower().endswith(CSV_SUFFIXES):
            yield from _read_csv(uri)
        else:
            yield from read_file(uri, records=config.records, keyed_by=config.keyed_by)


def _read_csv(uri: str) -> Iterator[RawRecord]:
    """Rows of a CSV file with a header line, as dicts; origin = file:line of the row."""
    raw = storage.read_bytes(uri)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{uri}:{line}: not valid UTF-8 text (byte {exc.start}); re-save the file as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text))
    for row in reader:
        yield RawRecord(row, f"{uri}:{reader.line_num}")


def _text(record: dict, key: str, origin: str) -> str:
    """A required non-empty text field; numbers are accepted and written as text (CSV/JSON option values)."""
    value = record.get(key)
    if value is None:
        raise RecordError(origin, key, "a string (field is missing)")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(origin, key, "a non-empty string", value)
    return value.strip()


def _object(raw: RawRecord) -> dict:
    if raw.error is not None:
        raise raw.error
    if not isinstance(raw.value, dict):
        raise RecordError(raw.origin, "(record)", "a JSON object", raw.value)
    return raw.value


def _shaped_object(raw: RawRecord, config: QASetConfig | MultipleChoiceSetConfig) -> dict | None:
    """The record after the set's shape (unwrap, keyed_by, transform); None when the transform skipped it."""
    value = shape_value(raw, config)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RecordError(raw.origin, "(record)", "a JSON object", value)
    return value


TEMPLATE_FIELDS = {"prompt_template": "question", "response_template": "answer", "system_template": "system"}


def _with_templates(record: dict, config: QASetConfig, origin: str) -> tuple[dict, dict[str, str]]:
    """The record with the set's templates rendered under '(<name>)' keys, and the fields pointing at them."""
    fields = dict(config.fields)
    rendered = {}
    for name, canonical in TEMPLATE_FIELDS.items():
        template = getattr(config, name)
        if template is not None:
            rendered[f"({name})"] = render_template(template, record, name, origin)
            fields[canonical] = f"({name})"
    return ({**record, **rendered} if rendered else record), fields


# ----------------------------------------------------------------------------- QA


def _qa_format(record: dict, config: QASetConfig, fields: dict[str, str], origin: str) -> str:
    if config.format != "auto":
        return config.format
    name = fields.get
    if name("qa_pairs", "QA_pairs") in record and name("description", "description") in record:
        return "clinical_cases"
    if name("question", "question") in record and name("answer", "answer") in record:
        return "qa"
    detected = detect_format(record, fields)
    if detected in CONVERTERS:
        return detected
    raise RecordError(
        origin, "(record)", "a record with question/answer, description/QA_pairs, instruction/output, prompt/response "
        "or conversations fields (or set the set's `format` and `fields`)", record,
    )


def _qa_items(raw: RawRecord, config: QASetConfig) -> list[tuple[tuple[tuple[str, str], ...], str, str]]:
    """(messages, reference, origin) of every question in one record (none when a transform skipped it)."""
    shaped = _shaped_object(raw, config)
    if shaped is None:
        return []
    record, fields = _with_templates(shaped, config, raw.origin)
    name = fields.get
    fmt = _qa_format(record, config, fields, raw.origin)
    if fmt == "qa":
        question = _text(record, name("question", "question"), raw.origin)
        system = record.get(name("system", "system"))
        messages = ((("system", system),) if isinstance(system, str) and system.strip() else ()) + (("user", question),)
        return [(messages, _text(record, name("answer", "answer"), raw.origin), raw.origin)]
    if fmt == "clinical_cases":
        description = _text(record, name("description", "description"), raw.origin)
        pairs_key = name("qa_pairs", "QA_pairs")
        pairs = record.get(pairs_key)
        if not isinstance(pairs, list) or not pairs:
            raise RecordError(raw.origin, pairs_key, "a non-empty list of {question, answer} objects", pairs)
        items = []
        for j, pair in enumerate(pairs):
            origin = f"{raw.origin}.{pairs_key}[{j}]"
            if not isinstance(pair, dict):
                raise RecordError(origin, "(pair)", "an object with question and answer", pair)
            question = _text(pair, name("question", "question"), origin)
            items.append(((("user", f"{description}\n\n{question}"),), _text(pair, name("answer", "answer"), origin),
                          origin))
        return items
    conversation = CONVERTERS[fmt](record, raw.origin, fields)
    messages = tuple((m.role, m.content) for m in conversation.messages)
    return [(messages[:-1], messages[-1][1], raw.origin)]


def load_qa_set(config: QASetConfig) -> list[QAItem]:
    """Every question of a QA set (at most `max_records`), validated."""
    items: list[QAItem] = []
    errors = _Errors()
    for raw in _records(config, JSON_SUFFIXES + PARQUET_SUFFIXES):
        try:
            found = _qa_items(raw, config)
        except RecordError as err:
            errors.add(err)
            continue
        for messages, reference, origin in found:
            items.append(QAItem(f"{config.name}#{len(items)}", messages, reference, origin))
            if config.max_records is not None and len(items) >= config.max_records:
                break
        if config.max_records is not None and len(items) >= config.max_records:
            break
    errors.raise_any(f"QA set '{config.name}'")
    if not items:
        raise DataError(f"{config.path}: QA set '{config.name}' has no questions")
    return items


# ----------------------------------------------------------------------------- multiple choice


def _options(record: dict, config: MultipleChoiceSetConfig, origin: str) -> tuple[tuple[str, str], ...]:
    if config.options_field is None:
        return tuple((string.ascii_uppercase[i], _text(record, column, origin))
                     for i, column in enumerate(config.option_fields))
    key = config.options_field
    value = record.get(key)
    if isinstance(value, list) and len(value) >= 2:
        if len(value) > len(string.ascii_uppercase):
            raise RecordError(origin, key, f"at most {len(string.ascii_uppercase)} options", len(value))
        return tuple((string.ascii_uppercase[i], _text({key: v}, key, f"{origin}: option {i}"))
                     for i, v in enumerate(value))
    if isinstance(value, dict) and len(value) >= 2:
        return tuple((str(label).strip().upper(), _text(value, label, origin)) for label in value)
    raise RecordError(origin, key, "a list of at least two options or a {label: option} mapping", value)


def _choice_item(raw: RawRecord, config: MultipleChoiceSetConfig, index: int) -> ChoiceItem | None:
    record = _shaped_object(raw, config)
    if record is None:
        return None
    if config.prompt_template is not None:
        question = _text({"(prompt_template)": render_template(config.prompt_template, record, "prompt_template",
                                                               raw.origin)}, "(prompt_template)", raw.origin)
    else:
        question = _text(record, config.question_field, raw.origin)
    options = _options(record, config, raw.origin)
    labels = [label for label, _ in options]
    answer = _text(record, config.answer_field, raw.origin).upper()
    if answer not in labels:
        raise RecordError(raw.origin, config.answer_field, f"one of the option labels {', '.join(labels)}", answer)
    return ChoiceItem(f"{config.name}#{index}", question, options, answer, raw.origin)


def load_choice_set(config: MultipleChoiceSetConfig) -> list[ChoiceItem]:
    """Every question of a multiple-choice set (at most `max_records`), validated."""
    items: list[ChoiceItem] = []
    errors = _Errors()
    for raw in _records(config, CSV_SUFFIXES + JSON_SUFFIXES):
        try:
            item = _choice_item(raw, config, len(items))
        except RecordError as err:
            errors.add(err)
            continue
        if item is None:
            continue
        items.append(item)
        if config.max_records is not None and len(items) >= config.max_records:
            break
    errors.raise_any(f"multiple-choice set '{config.name}'")
    if not items:
        raise DataError(f"{config.path}: multiple-choice set '{config.name}' has no questions")
    return items


# ----------------------------------------------------------------------------- honesty


def load_probes(config: HonestyConfig) -> list[Probe]:
    """Inline probe questions, then those of `path` (at most `max_records` in all)."""
    found = [(q.strip(), f"eval.honesty.questions[{i}]") for i, q in enumerate(config.questions)]
    for question, origin in found:
        if not question:
            raise ConfigError(f"{origin}: expected a non-empty question")
    errors = _Errors()
    if config.path is not None:
        for uri in storage.expand(config.path, JSON_SUFFIXES + (".txt",)):
            for raw in read_file(uri, text_unit="line"):
                try:
                    if isinstance(raw.value, str) and raw.error is None:
                        found.append((raw.value, raw.origin))
                    else:
                        found.append((_text(_object(raw), config.question_field, raw.origin), raw.origin))
                except RecordError as err:
                    errors.add(err)
    errors.raise_any("eval.honesty probes")
    if config.max_records is not None:
        found = found[: config.max_records]
    return [Probe(f"honesty#{i}", question, origin) for i, (question, origin) in enumerate(found)]


# ----------------------------------------------------------------------------- perplexity


def held_out_documents(config: PipelineConfig) -> list[Document]:
    """The documents perplexity is measured on: `eval.perplexity.sources`, else the pretrain stage's
    held-out documents (its eval_sources, or the same split of its sources that training held out)."""
    settings = config.eval.perplexity
    if settings is None:
        return []
    if settings.sources:
        documents, _ = load_examples(settings.sources, "documents", "error", True)
    elif config.pretrain is not None and (config.pretrain.data.eval_sources or config.pretrain.data.sources):
        data = config.pretrain.data
        if data.eval_sources:
            documents, _ = load_examples(data.eval_sources, "documents", data.bad_records,
                                         data.conversations_as_documents, data.shuffle_seed)
        else:
            # The same units and hash rule as stage 1's prepare, so these are the documents it held out.
            documents = held_out_texts(data)
            if not documents:
                raise ConfigError("eval.perplexity.sources is empty and pretrain.data.eval_split holds out no "
                                  "documents; list sources under eval.perplexity.sources")
    else:
        raise ConfigError("eval.perplexity.sources is empty and the config has no pretrain stage with data whose "
                          "held-out documents could be used; list sources under eval.perplexity.sources")
    return documents[: settings.max_documents] if settings.max_documents else documents


def held_out_pairs(config: PipelineConfig) -> list[PreferencePair]:
    """The pairs preference accuracy is measured on: `eval.preference.sources`, else the preference stage's
    held-out pairs (its eval_sources, or the same split of its sources that training held out)."""
    settings = config.eval.preference
    if settings is None:
        return []
    if settings.sources:
        records, _ = load_preference_records(settings.sources)
    elif config.preference is not None and config.preference.data.sources:
        data = config.preference.data
        if data.eval_sources:
            records, _ = load_preference_records(data.eval_sources, data.bad_records, data.shuffle_seed)
        else:
            # The same call and seed as stage 3's data preparation, so these are the pairs it held out.
            everything, _ = load_preference_records(data.sources, data.bad_records, data.shuffle_seed)
            _, records = split_eval(everything, data.eval_split, data.shuffle_seed)
    else:
        raise ConfigError("eval.preference.sources is empty and the config has no preference stage with data whose "
                          "held-out pairs could be used; list sources under eval.preference.sources")
    pairs = [r for r in records if isinstance(r, PreferencePair)]
    if not pairs:
        raise ConfigError("eval.preference: no held-out preference pairs to score (unpaired KTO records have no "
                          "rejected answer to compare with); list pairs under eval.preference.sources")
    return pairs[: settings.max_records] if settings.max_records else pairs


def load_eval_sets(config: PipelineConfig) -> EvalSets:
    """Read and validate every set the `eval:` section lists (before any model is loaded)."""
    settings: EvalConfig = config.eval
    return EvalSets(
        qa={s.name: load_qa_set(s) for s in settings.qa},
        multiple_choice={s.name: (s, load_choice_set(s)) for s in settings.multiple_choice},
        probes=load_probes(settings.honesty) if settings.honesty is not None else [],
        documents=held_out_documents(config),
        pairs=held_out_pairs(config),
    )


def describe_sets(sets: EvalSets, config: EvalConfig) -> dict[str, dict[str, Any]]:
    """Name → kind, size and source of every set (for the report)."""
    described: dict[str, dict[str, Any]] = {}
    for qa in config.qa:
        described[qa.name] = {"kind": "qa", "items": len(sets.qa[qa.name]), "path": qa.path}
    for mc in config.multiple_choice:
        described[mc.name] = {"kind": "multiple_choice", "items": len(sets.multiple_choice[mc.name][1]),
                              "path": mc.path, "scoring": mc.scoring}
    if sets.probes:
        described["honesty"] = {"kind": "honesty", "items": len(sets.probes), "path": config.honesty.path}
    if sets.documents:
        sources = [s.path for s in config.perplexity.sources] or ["pretrain held-out documents"]
        described["perplexity"] = {"kind": "perplexity", "items": len(sets.documents), "path": ", ".join(sources)}
    if sets.pairs:
        sources = [s.path for s in config.preference.sources] or ["preference held-out pairs"]
        described["preference"] = {"kind": "preference", "items": len(sets.pairs), "path": ", ".join(sources)}
    return described
