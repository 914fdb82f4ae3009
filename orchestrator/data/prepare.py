"""One stage's data, start to finish: read → validate → canonical form → train/eval split → tokens.

Runs once on the driver, before any worker starts, so a bad record stops the run in seconds
rather than after the cluster has spun up. The result is a pair of Arrow tables (columns
`input_ids`, and `labels` for stage 2) that the trainer hands to Ray Data for sharding.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import numpy as np
import pyarrow as pa

from orchestrator.config import DataConfig
from orchestrator.data.formats import load_examples
from orchestrator.data.preference import as_pairs, as_unpaired, encode_pairs, encode_unpaired, load_preference_records
from orchestrator.data.pretrain import pack_documents
from orchestrator.data.replay import mix_replay_examples, pack_with_replay
from orchestrator.data.sft import IGNORE_INDEX, report_straddling, tokenize_conversations
from orchestrator.data.templates import select_template
from orchestrator.errors import DataError

log = logging.getLogger(__name__)

StageKind = Literal["pretrain", "sft", "preference"]


@dataclass(frozen=True)
class PreparedData:
    """Tokenized train/eval tables plus the numbers worth reporting."""

    train: pa.Table
    eval: Optional[pa.Table]
    stats: dict[str, Any]

    @property
    def train_tokens(self) -> int:
        return int(self.stats["train_tokens"])

    @property
    def train_rows(self) -> int:
        return self.train.num_rows

    @property
    def eval_rows(self) -> int:
        return 0 if self.eval is None else self.eval.num_rows

    @property
    def has_eval(self) -> bool:
        return self.eval is not None


def split_eval(items: list, eval_split: float, seed: int) -> tuple[list, list]:
    """Shuffle with `seed` and hold out round(n * eval_split) items (at least 1 when eval_split > 0)."""
    items = list(items)
    random.Random(seed).shuffle(items)
    if eval_split <= 0 or len(items) < 2:
        return items, []
    n_eval = min(len(items) - 1, max(1, round(len(items) * eval_split)))
    return items[n_eval:], items[:n_eval]


def _blocks_table(blocks: np.ndarray) -> pa.Table:
    flat = pa.array(blocks.reshape(-1), type=pa.int32())
    offsets = pa.array(np.arange(0, blocks.size + 1, blocks.shape[1], dtype=np.int32))
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, flat)})


def _ragged_table(columns: dict[str, Sequence[np.ndarray]]) -> pa.Table:
    out = {}
    for name, arrays in columns.items():
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
        out[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.int32()))
    return pa.table(out)


def prepare_pretrain(data: DataConfig, tokenizer: Any) -> PreparedData:
    """Stage 1 data: documents (SFT records flattened) → packed blocks, split by document."""
    documents, report = load_examples(
        data.sources, "documents", data.bad_records, data.conversations_as_documents, data.shuffle_seed
    )
    if data.eval_sources:
        train_docs = documents
        eval_docs, _ = load_examples(
            data.eval_sources, "documents", data.bad_records, data.conversations_as_documents, data.shuffle_seed
        )
    else:
        train_docs, eval_docs = split_eval(documents, data.eval_split, data.shuffle_seed)
    train, replay = pack_with_replay(train_docs, data, tokenizer)
    eval_table = None
    eval_blocks = 0
    if eval_docs:
        try:
            packed_eval = pack_documents(eval_docs, tokenizer, data.block_size)
            eval_table, eval_blocks = _blocks_table(packed_eval.blocks), len(packed_eval.blocks)
        except DataError:
            log.warning("held-out documents are shorter than one block; no evaluation this stage")
    stats = {
        "records": report.records,
        "skipped_records": report.skipped,
        "files": {**report.files, **replay.files},
        "train_documents": len(train_docs),
        "eval_documents": len(eval_docs),
        "train_blocks": len(train.blocks),
        "eval_blocks": eval_blocks,
        "block_size": data.block_size,
        "train_tokens": int(train.blocks.size),
        "dropped_tail_tokens": train.dropped_tokens,
        **replay.stats,
    }
    _log_stats("pretrain", stats, report.errors)
    return PreparedData(_blocks_table(train.blocks), eval_table, stats)


def prepare_sft(data: DataConfig, tokenizer: Any) -> PreparedData:
    """Stage 2 data: conversations → masked examples, split by conversation."""
    template = select_template(data.template, tokenizer)
    conversations, report = load_examples(data.sources, "conversations", data.bad_records, seed=data.shuffle_seed)
    if data.eval_sources:
        train_conv = conversations
        eval_conv, _ = load_examples(data.eval_sources, "conversations", data.bad_records, seed=data.shuffle_seed)
    else:
        train_conv, eval_conv = split_eval(conversations, data.eval_split, data.shuffle_seed)
    straddling: list[str] = []  # examples whose template and tokenizer disagree at a boundary: one warning
    train, dropped = tokenize_conversations(train_conv, tokenizer, template, data.max_length, data.train_on,
                                            straddling)
    if not train:
        raise DataError("no stage-2 example has a trainable token after truncation; raise data.max_length")
    train, replay = mix_replay_examples(train, data, tokenizer, template)
    evals, _ = tokenize_conversations(eval_conv, tokenizer, template, data.max_length, data.train_on, straddling)
    report_straddling(straddling, len(train_conv) + len(eval_conv))
    lengths = np.array([len(e.input_ids) for e in train])
    stats = {
        "records": report.records,
        "skipped_records": report.skipped,
        "files": {**report.files, **replay.files},
        "template": template.name,
        "train_examples": len(train),
        "eval_examples": len(evals),
        "dropped_untrainable": dropped,
        "boundary_straddling": len(straddling),
        "train_tokens": int(lengths.sum()),
        "trainable_tokens": int(sum(int((e.labels != IGNORE_INDEX).sum()) for e in train)),
        "mean_length": float(lengths.mean()),
        "max_length": int(lengths.max()),
        **replay.stats,
    }
    _log_stats("sft", stats, report.errors)
    train_table = _ragged_table({"input_ids": [e.input_ids for e in train], "labels": [e.labels for e in train]})
    eval_table = (
        _ragged_table({"input_ids": [e.input_ids for e in evals], "labels": [e.labels for e in evals]})
        if evals
        else None
    )
    return PreparedData(train_table, eval_table, stats)


def prepare_preference(data: DataConfig, tokenizer: Any, unpaired: bool = False) -> PreparedData:
    """Stage 3 data: preference pairs (or, for KTO, unpaired examples) → token columns, split by record.

    Example ids run over train then eval, so precomputed reference log-probs can be keyed by them.
    """
    template = select_template(data.template, tokenizer)
    records, report = load_preference_records(data.sources, data.bad_records, data.shuffle_seed)
    if data.eval_sources:
        train_records = records
        eval_records, _ = load_preference_records(data.eval_sources, data.bad_records, data.shuffle_seed)
    else:
        train_records, eval_records = split_eval(records, data.eval_split, data.shuffle_seed)
    shape, encode = (as_unpaired, encode_unpaired) if unpaired else (as_pairs, encode_pairs)
    train_examples, eval_examples = shape(train_records), shape(eval_records)
    train = encode(train_examples, tokenizer, template, data.max_length)
    evals = encode(eval_examples, tokenizer, template, data.max_length, first_id=len(train_examples))
    token_columns = ("input_ids", "kl_input_ids") if unpaired else ("chosen_input_ids", "rejected_input_ids")
    label_columns = ("labels",) if unpaired else ("chosen_labels", "rejected_labels")
    stats = {
        "records": report.records,
        "skipped_records": report.skipped,
        "files": report.files,
        "template": template.name,
        "kind": "unpaired" if unpaired else "pairs",
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "train_tokens": int(sum(len(row) for name in token_columns for row in train[name])),
        "trainable_tokens": int(sum(int((row != -100).sum()) for name in label_columns for row in train[name])),
        "max_length": data.max_length,
    }
    _log_stats("preference", stats, report.errors)
    return PreparedData(_preference_table(train), _preference_table(evals) if eval_examples else None, stats)


def _preference_table(columns: dict[str, list]) -> pa.Table:
    ragged = _ragged_table({k: v for k, v in columns.items() if k.endswith(("input_ids", "labels"))})
    for name in ("desirable", "example_id"):
        if name in columns:
            ragged = ragged.append_column(name, pa.array(columns[name], type=pa.bool_() if name == "desirable"
                                                         else pa.int64()))
    return ragged


def prepare_stage_data(stage: StageKind, data: DataConfig, tokenizer: Any, unpaired: bool = False) -> PreparedData:
    """Dispatch on the stage kind (`unpaired`: stage 3 with the KTO loss)."""
    if not data.sources:
        raise DataError(f"{stage}.data.sources is empty; list at least one file, directory, glob or URI")
    if stage == "preference":
        return prepare_preference(data, tokenizer, unpaired)
    return prepare_pretrain(data, tokenizer) if stage == "pretrain" else prepare_sft(data, tokenizer)


def _log_stats(stage: str, stats: dict, errors: list) -> None:
    log.info("%s data: %s", stage, ", ".join(f"{k}={v}" for k, v in stats.items() if k != "files"))
    for err in errors:
        log.warning("skipped bad record: %s", err)
