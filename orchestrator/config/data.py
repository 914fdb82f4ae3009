"""Config sections: what a stage reads, the shape its records arrive in, and how they become tokens."""

from __future__ import annotations

import re
import string
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from orchestrator.config.base import Section

# Canonical field names a source's `fields` may map (the record keys the converters read).
CANONICAL_FIELDS = (
    "text", "content", "instruction", "input", "output", "system", "history", "prompt", "response",
    "conversations", "chosen", "rejected", "kto_tag",
)
_TRANSFORM = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_KEY_PATH = re.compile(r"^[^.\s]+(\.[^.\s]+)*$")


def template_keys(template: str) -> list[str]:
    """The record keys a `*_template` names ({question}, {meta.title}); ValueError when it does not parse."""
    keys = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if not name or not _KEY_PATH.match(name) or "[" in name:
            raise ValueError(f"{template!r}: every {{...}} must name a record key (a.b for nested keys), got {{{name}}}")
        keys.append(name)
    return keys


class RoleTagsConfig(Section):
    """How a conversation list names roles and texts (LLaMA-Factory's `tags`): [{from: human, value: ...}]."""

    role_tag: str = Field("from", description="Key of a message's role, e.g. from or role.")
    content_tag: str = Field("value", description="Key of a message's text, e.g. value or content.")
    user_tag: str = Field("human", description="Role value of the user's messages, e.g. human or user.")
    assistant_tag: str = Field("gpt", description="Role value of the assistant's messages, e.g. gpt or assistant.")
    system_tag: str = Field("system", description="Role value of a system message (first message only).")
    observation_tag: Optional[str] = Field(None, description="Tool-result role (LLaMA-Factory); read only to say "
                                           "such turns are not supported.")
    function_tag: Optional[str] = Field(None, description="Tool-call role (LLaMA-Factory); read only to say such "
                                        "turns are not supported.")


class PrefixedTurnsConfig(Section):
    """A conversation given as a list of strings, each starting with a role prefix the user names."""

    user: str = Field(..., min_length=1, description="Prefix of the user's turns, e.g. 'User:' or '病人：'.")
    assistant: str = Field(..., min_length=1, description="Prefix of the assistant's turns, e.g. 'Assistant:'.")
    system: Optional[str] = Field(None, description="Prefix of a system message (first string only), if any.")

    @model_validator(mode="after")
    def _prefixes_differ(self) -> "PrefixedTurnsConfig":
        prefixes = [p for p in (self.user, self.assistant, self.system) if p]
        for a in prefixes:
            for b in prefixes:
                if a is not b and b.startswith(a):
                    raise ValueError(f"prefix {a!r} is the start of {b!r}; turns could not be told apart")
        return self


class RecordShape(Section):
    """Where the records of a file are and how their fields fold into the canonical record (shared by
    training sources and evaluation sets)."""

    records: Optional[str] = Field(
        None, description="Key path to the records inside each JSON document, e.g. `data.items` for "
        "{\"data\": {\"items\": [...]}}. Default: the document itself (a list), or its only list-valued key.",
    )
    keyed_by: Optional[str] = Field(
        None, description="The records are an object keyed by record id ({\"21645374\": {...}}): each record gets "
        "its key under this field name (e.g. id), in file order.",
    )
    unwrap: bool = Field(
        False, description="Each record arrives wrapped in a one-item list ([[{...}], [{...}]]): take the item.",
    )
    transform: Optional[str] = Field(
        None, description="`package.module:function` called with each raw record (after records/keyed_by/unwrap); "
        "it returns the canonical record (a dict with canonical field names, or a string for a document) or None "
        "to skip the record. Its errors are reported per record with file:line.",
    )

    @field_validator("records", "keyed_by")
    @classmethod
    def _key_path(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not _KEY_PATH.match(value):
            raise ValueError(f"expected a key path like data.items (dot-separated keys, no spaces), got {value!r}")
        return value

    @field_validator("transform")
    @classmethod
    def _transform_spec(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not _TRANSFORM.match(value):
            raise ValueError(f"expected `package.module:function`, got {value!r}")
        return value


class DataSourceConfig(RecordShape):
    """One input: a file, directory, glob or URI, in one format and shape."""

    path: str = Field(..., description="File, directory, glob (`data/*.jsonl`) or URI (`s3://bucket/prefix/`); "
                      "with `dataset`, the LLaMA-Factory dataset_info.json (or the directory holding it).")
    dataset: Optional[str] = Field(
        None, description="Name of a dataset in the LLaMA-Factory dataset_info.json at `path`: its file_name, "
        "formatting (alpaca/sharegpt), columns and tags are read as is (columns prompt, query, response, system, "
        "history, messages, chosen, rejected, kto_tag).",
    )
    format: Literal["auto", "document", "alpaca", "multiturn", "sharegpt"] = Field(
        "auto",
        description="Record format. document: {content|text} or plain text; alpaca: instruction/input/output "
        "(+system, history); multiturn: prompt/response/history; sharegpt: conversations of from/value "
        "(or role/content; see `tags`). auto: guessed from the fields of each record.",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map canonical field names to the names in your records, e.g. {instruction: 问, output: 答}. "
        "Canonical names: " + ", ".join(CANONICAL_FIELDS) + ".",
    )
    tags: Optional[RoleTagsConfig] = Field(
        None, description="Role and text keys of the conversation list (sharegpt), as LLaMA-Factory's tags. "
        "Default: from/value with the roles human, user, gpt, assistant, system (and role/content messages).",
    )
    prefixed_turns: Optional[PrefixedTurnsConfig] = Field(
        None, description="The history (alpaca, multiturn) or the conversation list (sharegpt) is a list of "
        "strings starting with these prefixes, e.g. {user: 'User:', assistant: 'Assistant:'}; the prefix and the "
        "blank after it are dropped.",
    )
    prompt_template: Optional[str] = Field(
        None, description="The last user message built from record keys, e.g. \"{question}\\n\\nContext: "
        "{context}\" (a list value is joined with newlines). Replaces instruction+input (alpaca) or prompt "
        "(multiturn).",
    )
    system_template: Optional[str] = Field(None, description="The system message built from record keys.")
    response_template: Optional[str] = Field(
        None, description="The answer built from record keys, e.g. \"{final_decision}. {long_answer}\".",
    )
    text_unit: Literal["auto", "file", "line", "paragraph"] = Field(
        "auto",
        description="For .txt/.md files: one document per file, per non-empty line, or per blank-line separated "
        "paragraph. auto: .md -> file, .txt -> line.",
    )
    weight: float = Field(
        1.0, gt=0, description="Sampling multiplier: 1 = every record once, 2 = twice, 0.5 = a random half."
    )
    max_records: Optional[int] = Field(None, gt=0, description="Read at most this many records (first N).")

    @field_validator("fields")
    @classmethod
    def _canonical_names(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(CANONICAL_FIELDS))
        if unknown:
            raise ValueError(f"unknown canonical field(s) {', '.join(unknown)}; the keys of `fields` are canonical "
                             f"names ({', '.join(CANONICAL_FIELDS)}) and the values your record's keys")
        return value

    @field_validator("prompt_template", "system_template", "response_template")
    @classmethod
    def _template_parses(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            if not template_keys(value):
                raise ValueError(f"{value!r} names no record key; write e.g. \"{{question}}\"")
        return value

    @model_validator(mode="after")
    def _shape_fits_format(self) -> "DataSourceConfig":
        declared = [name for name in ("tags", "prefixed_turns", "prompt_template", "system_template",
                                      "response_template") if getattr(self, name) is not None]
        if self.transform is not None and (declared or self.fields):
            mapping = declared + (["fields"] if self.fields else [])
            raise ValueError(f"transform returns canonical records; drop {', '.join(mapping)} "
                             "(or do that mapping inside the function)")
        if self.format == "document" and declared:
            raise ValueError(f"format=document has no turns; {', '.join(declared)} apply to conversation formats")
        if self.format == "sharegpt" and (self.prompt_template or self.response_template):
            raise ValueError("prompt_template/response_template build one turn (alpaca, multiturn); a sharegpt "
                             "conversation list already holds its turns")
        if self.tags is not None and self.format in ("alpaca", "multiturn"):
            raise ValueError(f"tags describe a conversation list (format sharegpt), not format={self.format}")
        if self.dataset is not None and (self.format != "auto" or self.fields or self.tags):
            raise ValueError("with `dataset`, format, fields and tags come from dataset_info.json "
                             "(formatting, columns, tags); drop them here")
        return self


class ReplayConfig(Section):
    """Earlier data mixed into a stage so the model does not forget it."""

    source: DataSourceConfig = Field(..., description="Where the earlier data is (any format; stage 1 flattens "
                                     "conversations into documents, stage 2 trains documents as plain text).")
    ratio: float = Field(..., gt=0, lt=1, description="Share of the stage's final training set taken from this "
                         "source (tokens in stage 1, examples in stage 2), sampled with the shuffle seed.")


class PrepareConfig(Section):
    """How a stage's data is prepared on the cluster (Ray Data): read tasks, then a pool of tokenizer actors.

    These settings change how fast the shard set is made, never its rows: they are not part of the cache key.
    """

    unit_mb: float = Field(
        64.0, gt=0, description="Source megabytes per prepare unit: one read task and one train shard each "
        "(a unit is a run of whole files; smaller units spread a small corpus over more tasks).",
    )
    tokenizer_actors: int = Field(
        2, ge=1, description="Most tokenizer actors in the pool (each loads the tokenizer once); the pool starts "
        "with as many as the data nodes' CPUs hold beside one read task each and grows while CPUs are free.",
    )
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs each tokenizer actor holds.")
    cpus_per_read_task: float = Field(0.5, gt=0, description="CPUs each read/validate/convert task holds (reading "
                                      "and parsing are light next to tokenizing).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources every prepare task and actor needs, to keep them "
        "on a labelled CPU pool, e.g. {data_cpu: 1}.",
    )


class DataConfig(Section):
    """What a stage trains on and how it is turned into tokens."""

    sources: list[DataSourceConfig] = Field(default_factory=list, description="Input sources, read in order.")
    eval_split: float = Field(
        0.05, ge=0, lt=1, description="Share of examples held out for evaluation (at least one example)."
    )
    eval_sources: list[DataSourceConfig] = Field(
        default_factory=list, description="Explicit evaluation sources; when set, `eval_split` is ignored."
    )
    bad_records: Literal["error", "skip"] = Field(
        "error", description="error: stop before training on the first bad records; skip: drop them and report."
    )
    block_size: int = Field(512, ge=8, description="Stage 1: tokens per packed block.")
    max_length: int = Field(1024, ge=16, description="Stage 2: longest tokenized conversation (truncated beyond).")
    template: Literal["auto", "tokenizer", "alpaca", "chatml"] = Field(
        "auto",
        description="Stage 2 chat template. auto: the tokenizer's own when it has one, else chatml when the "
        "tokenizer knows <|im_start|>, else alpaca.",
    )
    train_on: Literal["all_assistant_turns", "last_assistant_turn"] = Field(
        "all_assistant_turns", description="Stage 2: which assistant turns carry loss."
    )
    group_by_length: bool = Field(
        True, description="Stage 2: form micro-batches of similar length (little padding), shuffled as whole batches."
    )
    conversations_as_documents: bool = Field(
        True, description="Stage 1: SFT sources (alpaca, multiturn, sharegpt) are flattened into plain documents."
    )
    shuffle_seed: int = Field(42, description="Seed for the train/eval split and the per-epoch shuffle.")
    prepare: PrepareConfig = Field(default_factory=PrepareConfig, description="Stages 1 and 2: how the data is "
                                   "prepared on the cluster (the cached shard set is the same whatever these are).")
    replay: list[ReplayConfig] = Field(
        default_factory=list, description="Earlier data mixed into the training set (not the evaluation set), "
        "e.g. general instructions or stage-1 documents; the realised shares are logged and kept in the data stats.",
    )

    @model_validator(mode="after")
    def _replay_leaves_room(self) -> "DataConfig":
        total = sum(entry.ratio for entry in self.replay)
        if total >= 1:
            raise ValueError(f"the replay ratios add up to {total:g}; they are shares of the final training set and "
                             "must add up to less than 1")
        return self
