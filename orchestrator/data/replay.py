"""Replay: a share of earlier data (general instructions, stage-1 documents, ...) mixed into a stage's
training set so the model keeps what it knew.

A ratio is a share of the *final* training set: stage 1 counts tokens (the last replayed document
is cut to hit the share), stage 2 counts examples. Replay sources are drawn in an order shuffled
with the stage's seed and cycled when the share needs more than one pass; replayed data goes into
the training set only, never into evaluation.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

from orchestrator.config import DataConfig, DataSourceConfig
from orchestrator.data.formats import Conversation, Document, LoadReport, converted_records, load_examples
from orchestrator.data.pretrain import PackedBlocks, encode_texts, pack_documents, pack_token_lists, tokenize_documents
from orchestrator.data.sft import TokenizedConversation, tokenize_conversations
from orchestrator.data.templates import ChatTemplate
from orchestrator.errors import DataError, DataValidationError

log = logging.getLogger(__name__)


@dataclass
class ReplayMix:
    """Per-source numbers of a replay mix, for the stage's data stats."""

    stats: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


def replay_amounts(main: int, ratios: Sequence[float]) -> list[int]:
    """How much each replay source adds (tokens or examples) so that it is `ratio` of main + all replay."""
    total = main / (1 - sum(ratios))
    return [round(ratio * total) for ratio in ratios]


def load_replay(source: DataSourceConfig, stage: Literal["pretrain", "sft"], bad_records: str,
                seed: int) -> tuple[list, LoadReport]:
    """The records of one replay source. Stage 1: documents (conversations flattened, as for mixed SFT
    sources). Stage 2: conversations and documents, as they come."""
    if stage == "pretrain":
        return load_examples([source], "documents", bad_records, True, seed)
    report = LoadReport()
    items = list(converted_records(source, report))
    report.records = len(items)
    if report.skipped and bad_records == "error":
        raise DataValidationError(report.errors, report.skipped)
    if not items:
        raise DataError(f"replay source {source.path}: no usable records")
    return items, report


def take_tokens(pool: Sequence[Sequence[int]], target: int, seed: int) -> list[list[int]]:
    """Token lists from `pool` (seeded order, cycled) holding `target` tokens counting one EOS each;
    the last one is cut short to hit the target exactly."""
    usable = [list(ids) for ids in pool if len(ids)]
    if not usable:
        raise DataError("a replay source has no tokens")
    random.Random(seed).shuffle(usable)
    taken: list[list[int]] = []
    remaining = target
    while remaining >= 2:  # a piece needs at least one token plus its EOS
        taken.append(usable[len(taken) % len(usable)][: remaining - 1])
        remaining -= len(taken[-1]) + 1
    return taken


def take_examples(pool: Sequence[Any], count: int, seed: int) -> list:
    """`count` items of `pool` in a seeded order, cycled when `count` exceeds the pool."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return [pool[order[i % len(order)]] for i in range(count)] if order else []


def pack_with_replay(train_docs: Sequence[Document], data: DataConfig,
                     tokenizer: Any) -> tuple[PackedBlocks, ReplayMix]:
    """Stage 1: the training documents plus `data.replay` shares of tokens, shuffled together and packed."""
    if not data.replay:
        return pack_documents(train_docs, tokenizer, data.block_size), ReplayMix()
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; stage 1 needs one to separate documents")
    segments = [(ids, -1) for ids in tokenize_documents(train_docs, tokenizer)]
    main_tokens = sum(len(ids) + 1 for ids, _ in segments)
    mix = ReplayMix()
    targets = replay_amounts(main_tokens, [entry.ratio for entry in data.replay])
    pools = []
    for index, (entry, target) in enumerate(zip(data.replay, targets)):
        documents, report = load_replay(entry.source, "pretrain", data.bad_records, data.shuffle_seed)
        mix.files.update(report.files)
        pool = tokenize_documents(documents, tokenizer)
        pools.append(sum(len(ids) + 1 for ids in pool))
        segments += [(ids, index) for ids in take_tokens(pool, target, data.shuffle_seed + index)]
    random.Random(data.shuffle_seed).shuffle(segments)
    packed = pack_token_lists([ids for ids, _ in segments], tokenizer.eos_token_id, data.block_size)
    if len(packed.blocks) == 0:
        raise DataError(f"{packed.total_tokens} tokens with replay are less than one block of "
                        f"data.block_size={data.block_size}; add data or lower block_size")
    # The realised share counts what is in the packed blocks (the incomplete tail block is dropped).
    used = packed.blocks.size
    lengths = np.array([len(ids) + 1 for ids, _ in segments])
    ends = np.cumsum(lengths)
    kept = np.clip(np.minimum(ends, used) - (ends - lengths), 0, None)
    owners = np.array([owner for _, owner in segments])
    entries = [{"source": entry.source.path, "ratio": entry.ratio, "tokens": int(kept[owners == i].sum()),
                "realised": float(kept[owners == i].sum() / used), "pool_tokens": pools[i],
                "passes": round(targets[i] / max(pools[i], 1), 3)} for i, entry in enumerate(data.replay)]
    _record(mix, "pretrain", entries, "tokens")
    return packed, mix


def document_examples(documents: Sequence[Document], tokenizer: Any, max_length: int) -> list[TokenizedConversation]:
    """Stage 2 replay of plain documents: text + EOS cut into `max_length` chunks, every token trained."""
    examples = []
    for ids in encode_texts([d.text for d in documents], tokenizer):
        stream = np.asarray([*ids, tokenizer.eos_token_id], dtype=np.int32)
        for start in range(0, len(stream), max_length):
            chunk = stream[start : start + max_length]
            if len(chunk) >= 2:  # one token alone predicts nothing
                examples.append(TokenizedConversation(chunk, chunk.copy()))
    return examples


def mix_replay_examples(train: list[TokenizedConversation], data: DataConfig, tokenizer: Any,
                        template: ChatTemplate) -> tuple[list[TokenizedConversation], ReplayMix]:
    """Stage 2: the training examples plus `data.replay` shares of examples, shuffled together."""
    mix = ReplayMix()
    if not data.replay:
        return train, mix
    counts = replay_amounts(len(train), [entry.ratio for entry in data.replay])
    mixed = list(train)
    entries = []
    for index, (entry, count) in enumerate(zip(data.replay, counts)):
        records, report = load_replay(entry.source, "sft", data.bad_records, data.shuffle_seed)
        mix.files.update(report.files)
        conversations = [r for r in records if isinstance(r, Conversation)]
        pool, _ = tokenize_conversations(conversations, tokenizer, template, data.max_length, data.train_on)
        pool += document_examples([r for r in records if isinstance(r, Document)], tokenizer, data.max_length)
        if not pool:
            raise DataError(f"replay source {entry.source.path}: no example has a trainable token")
        mixed += take_examples(pool, count, data.shuffle_seed + index)
        entries.append({"source": entry.source.path, "ratio": entry.ratio, "examples": count,
                        "pool_examples": len(pool), "passes": round(count / len(pool), 3)})
    for item in entries:
        item["realised"] = item["examples"] / len(mixed)
    random.Random(data.shuffle_seed).shuffle(mixed)
    _record(mix, "sft", entries, "examples")
    return mixed, mix


def _record(mix: ReplayMix, stage: str, entries: list[dict[str, Any]], unit: str) -> None:
    mix.stats = {"replay": entries, "replay_share": sum(e["realised"] for e in entries)}
    for e in entries:
        log.info("%s replay: %s configured %.3f, realised %.4f of the training %s (%d %s, %.2f passes over the source)",
                 stage, e["source"], e["ratio"], e["realised"], unit, e[unit], unit, e["passes"])

