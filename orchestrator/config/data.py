"""Config sections: what a stage reads and how it becomes tokens."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from orchestrator.config.base import Section


class DataSourceConfig(Section):
    """One input: a file, directory, glob or URI, in one format."""

    path: str = Field(..., description="File, directory, glob (`data/*.jsonl`) or URI (`s3://bucket/prefix/`).")
    format: Literal["auto", "document", "alpaca", "multiturn", "sharegpt"] = Field(
        "auto",
        description="Record format. document: {content|text} or plain text; alpaca: instruction/input/output "
        "(+system, history); multiturn: prompt/response/history; sharegpt: conversations of from/value. "
        "auto: guessed from the fields of each record.",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map canonical field names to the names in your records, e.g. {instruction: 问, output: 答}. "
        "Canonical names: text, instruction, input, output, system, history, prompt, response, conversations.",
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


class ReplayConfig(Section):
    """Earlier data mixed into a stage so the model does not forget it."""

    source: DataSourceConfig = Field(..., description="Where the earlier data is (any format; stage 1 flattens "
                                     "conversations into documents, stage 2 trains documents as plain text).")
    ratio: float = Field(..., gt=0, lt=1, description="Share of the stage's final training set taken from this "
                         "source (tokens in stage 1, examples in stage 2), sampled with the shuffle seed.")


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
