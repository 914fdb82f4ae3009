"""The pure steps of the distributed prepare, one prepare unit at a time (run by the Ray Data tasks and
tokenizer actors of orchestrator.data.prepare_ray).

A unit is a run of consecutive files of one source (at least `unit_bytes`), read by one
task and written as one train shard (+ one eval shard). Every decision is made inside one unit, so units
are independent: a record is held out when a hash of (seed, its origin inside the source) falls below
`eval_split` (a unit of two or more records the hash held nothing out of holds out its lowest-hash record
instead, so small data still has a held-out set), and a fractional source weight keeps a record by the same
kind of hash. Stage 1 packs each unit's documents on their own (the incomplete tail block of a unit is dropped
and counted); stage 2 masks and truncates each conversation as the in-memory path does.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

from orchestrator import storage
from orchestrator.config import DataConfig, DataSourceConfig
from orchestrator.data.formats import MAX_ERRORS_LISTED, Conversation, Document, Message, conversation_to_document, convert_record
from orchestrator.data.pretrain import encode_texts, pack_token_lists, tokenize_documents
from orchestrator.data.readers import read_file
from orchestrator.data.replay import document_examples, load_replay, replay_amounts, take_examples, take_tokens
from orchestrator.data.sft import IGNORE_INDEX, tokenize_conversations
from orchestrator.data.shapes import resolve_dataset
from orchestrator.data.shards import ShardInfo, ShardManifest, blocks_table, shard_name, token_table, write_shard
from orchestrator.data.templates import ChatTemplate
from orchestrator.errors import DataError, DataValidationError, RecordError


@dataclass(frozen=True)
class Unit:
    """Files one task reads. role: `split` (held out by eval_split) or `eval` (an eval source: all held out)."""

    index: int
    role: str
    source: dict[str, Any]
    files: tuple[str, ...]


def plan_units(data: DataConfig, expanded: dict[str, list[str]], sizes: dict[str, int], unit_bytes: int) -> list[Unit]:
    """Group each source's files (`expanded`: path of the source, registry datasets resolved -> files) into
    units of >= unit_bytes.

    A source with `max_records` is one unit (its first N records are counted across its files in order).
    """
    units: list[Unit] = []
    for role, sources in (("split", data.sources), ("eval", data.eval_sources)):
        for source in map(resolve_dataset, sources):
            files = expanded[source.path]
            groups: list[list[str]] = [[]]
            for uri in files:
                if groups[-1] and source.max_records is None and sum(sizes[f] for f in groups[-1]) >= unit_bytes:
                    groups.append([])
                groups[-1].append(uri)
            for group in groups:
                units.append(Unit(len(units), role, source.model_dump(mode="json"), tuple(group)))
    return units


def hash_share(seed: int, origin: str, salt: str = "") -> float:
    """A number in [0, 1) from (seed, origin): the same for a record wherever it is read."""
    digest = hashlib.sha256(f"{seed}\x00{salt}\x00{origin}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_key(origin: str, source_path: str) -> str:
    """A record's origin relative to its source (`file:line` inside it): the same files split and weigh the same
    way wherever they are stored (a local copy, S3)."""
    base = storage.join(source_path).rstrip("/")
    if origin.startswith(base + "/"):
        return origin[len(base) + 1:]
    return origin.rsplit("/", 1)[-1]  # a single file, or a glob: the file's name


def _encode(item: Document | Conversation) -> str:
    if isinstance(item, Document):
        return json.dumps({"t": item.text, "o": item.origin}, ensure_ascii=False)
    return json.dumps({"m": [[m.role, m.content] for m in item.messages], "o": item.origin}, ensure_ascii=False)


def decode_item(text: str) -> Document | Conversation:
    raw = json.loads(text)
    if "t" in raw:
        return Document(raw["t"], raw["o"])
    return Conversation(tuple(Message(role, content) for role, content in raw["m"]), raw["o"])


def _stage_item(item: Document | Conversation, stage: str, data: DataConfig, source: DataSourceConfig) -> Document | Conversation:
    """The canonical form the stage trains on (stage 1 flattens conversations); DataError when it cannot."""
    if stage == "sft" and isinstance(item, Document):
        raise DataError(f"{source.path}: stage 2 needs conversations (alpaca, multiturn or sharegpt records); "
                        f"{item.origin} is a plain document")
    if stage == "pretrain" and isinstance(item, Conversation):
        if not data.conversations_as_documents:
            raise DataError(f"{source.path}: stage 1 got conversation records; set data.conversations_as_documents=true "
                            "to mix them in as documents")
        return conversation_to_document(item)
    return item


def _unit_item(item: Document | Conversation, stage: str) -> str:
    return item.text if stage == "pretrain" else _encode(item)


def _copies(weight: float, seed: int, origin: str) -> int:
    whole, fraction = int(weight), weight - int(weight)
    return whole + (1 if fraction > 0 and hash_share(seed, origin, "weight") < fraction else 0)


def read_unit(unit: Unit, stage: str, data: DataConfig) -> dict[str, Any]:
    """Read, validate and convert one unit: its items (stage 1 document texts, stage 2 conversations as JSON) with
    their part, and what went wrong where (scalar and JSON-text columns only, so every unit's row has the same
    Arrow schema).

    Never raises for data problems: bad records are counted per file (the first few listed), and a
    problem that stops the whole stage is returned as `fatal`, so the driver reports every unit's findings.
    """
    source = DataSourceConfig(**unit.source)
    items, parts, errors, digests = [], [], [], {}
    per_file: Counter = Counter()
    records = count = filtered = 0
    held_out_any, lowest = False, None  # lowest: (hash share, index in items, copies, item) of the lowest-hash trained record
    try:
        for uri in unit.files:
            for raw in read_file(uri, source.text_unit, digests, source.records, source.keyed_by):
                if source.max_records is not None and count >= source.max_records:
                    break
                count += 1
                try:
                    item = convert_record(raw, source)
                except RecordError as err:
                    per_file[uri] += 1
                    if len(errors) < MAX_ERRORS_LISTED:
                        errors.append(str(err))
                    continue
                if item is None:  # the source's transform skips this record on purpose
                    filtered += 1
                    continue
                records += 1
                item = _stage_item(item, stage, data, source)
                key = split_key(item.origin, source.path)
                share = hash_share(data.shuffle_seed, key)
                held_out = unit.role == "eval" or share < data.eval_split
                copies = 1 if held_out else _copies(source.weight, data.shuffle_seed, key)
                if not held_out and (lowest is None or share < lowest[0]):
                    lowest = (share, len(items), copies, item)
                held_out_any = held_out_any or held_out
                items.extend([_unit_item(item, stage)] * copies)
                parts.extend(["eval" if held_out else "train"] * copies)
        fatal = ""
    except DataError as exc:
        fatal = str(exc)
    if not fatal and data.eval_split > 0 and not held_out_any and records >= 2 and lowest is not None:
        # A small unit the hash held nothing out of (likely below ~1/eval_split records): its lowest-hash
        # record is held out instead, so every unit of two or more records contributes to the held-out set.
        _, start, copies, item = lowest
        del items[start:start + copies], parts[start:start + copies]
        items.append(_unit_item(item, stage))
        parts.append("eval")
    return {"unit": unit.index, "items": items, "parts": parts, "records": records, "filtered": filtered,
            "errors": json.dumps(errors), "bad_per_file": json.dumps(dict(per_file)), "files": json.dumps(digests),
            "fatal": fatal}


def tokenize_unit(row: dict[str, Any], stage: str, data: DataConfig, tokenizer: Any,
                  template: Optional[ChatTemplate], set_uri: str) -> dict[str, Any]:
    """One read unit → its shards written under `set_uri`; returns the unit's summary (no tokens)."""
    summary = {k: row[k] for k in ("unit", "records", "filtered", "errors", "bad_per_file", "files", "fatal")}
    shards: list[ShardInfo] = []
    stats: dict[str, int] = {}
    if not row["fatal"]:
        for part in ("train", "eval"):
            items = [text for text, p in zip(row["items"], row["parts"]) if p == part]
            if not items:
                continue
            table, part_stats = (_pack(items, tokenizer, data.block_size, keep_tail=part == "eval") if stage == "pretrain"
                                 else _mask([decode_item(text) for text in items], tokenizer, template, data))
            for key, value in part_stats.items():
                stats[f"{part}_{key}"] = stats.get(f"{part}_{key}", 0) + value
            if table.num_rows:
                shards.append(write_shard(set_uri, shard_name(part, row["unit"]), part, table))
    return {**summary, "shards": json.dumps([asdict(s) for s in shards]), "stats": json.dumps(stats)}


def _pack(texts: Sequence[str], tokenizer: Any, block_size: int, keep_tail: bool = False) -> tuple[Any, dict[str, int]]:
    """Stage-1 blocks of a unit's texts. `keep_tail` (held-out texts): the incomplete last block stays as a shorter
    row, so a unit's few held-out documents still evaluate (training drops it: every trained token is real text,
    every block full)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; stage 1 needs one to separate documents")
    ids = encode_texts(texts, tokenizer)
    packed = pack_token_lists(ids, tokenizer.eos_token_id, block_size)
    stats = {"documents": len(texts), "blocks": len(packed.blocks), "tokens": int(packed.blocks.size),
             "tail_tokens": packed.dropped_tokens}
    if not (keep_tail and packed.dropped_tokens):
        return blocks_table(packed.blocks), stats
    tail = pack_token_lists(ids, tokenizer.eos_token_id, 1).blocks.reshape(-1)[-packed.dropped_tokens:]
    rows = [*packed.blocks, tail]
    return token_table(rows), {**stats, "blocks": len(rows), "tokens": stats["tokens"] + len(tail), "tail_tokens": 0}


def _mask(conversations: Sequence[Conversation], tokenizer: Any, template: ChatTemplate,
          data: DataConfig) -> tuple[Any, dict[str, int]]:
    examples, dropped = tokenize_conversations(conversations, tokenizer, template, data.max_length, data.train_on)
    lengths = [len(e.input_ids) for e in examples]
    return (token_table([e.input_ids for e in examples], [e.labels for e in examples]),
            {"examples": len(examples), "tokens": int(sum(lengths)), "dropped_untrainable": dropped,
             "trainable_tokens": int(sum(int((e.labels != IGNORE_INDEX).sum()) for e in examples)),
             "max_length": max(lengths, default=0)})


def main_amount(stage: str, summaries: Sequence[dict[str, Any]]) -> int:
    """What replay ratios are shares of, from the units' summaries: stage 1 training tokens (each document's EOS
    counted, packing tails included), stage 2 training examples."""
    stats = [json.loads(s["stats"]) for s in summaries]
    if stage == "pretrain":
        return sum(st.get("train_tokens", 0) + st.get("train_tail_tokens", 0) for st in stats)
    return sum(st.get("train_examples", 0) for st in stats)


def replay_unit(index: int, entry_index: int, stage: str, data: DataConfig, tokenizer: Any,
                template: Optional[ChatTemplate], main: int, set_uri: str) -> dict[str, Any]:
    """Replay source `entry_index` of `data.replay`, its share of `main` (see main_amount), as a train shard of its
    own (shard `index`): stage 1 token pieces packed into blocks, stage 2 examples; a summary like tokenize_unit's.

    The reader shuffles rows across shards every epoch, so replayed blocks and examples mix with the stage's own;
    the realised share is computed over all shards when the summaries are merged.
    """
    entry = data.replay[entry_index]
    target = replay_amounts(main, [e.ratio for e in data.replay])[entry_index]
    summary = {"unit": index, "records": 0, "filtered": 0, "errors": "[]", "bad_per_file": "{}", "files": "{}",
               "fatal": "", "shards": "[]", "stats": "{}", "replay": "{}"}
    try:
        records, report = load_replay(entry.source, stage, data.bad_records, data.shuffle_seed)
        seed = data.shuffle_seed + entry_index
        if stage == "pretrain":
            if tokenizer.eos_token_id is None:
                raise DataError("the tokenizer has no eos_token; stage 1 needs one to separate documents")
            pool = tokenize_documents(records, tokenizer)
            pool_tokens = sum(len(ids) + 1 for ids in pool)
            packed = pack_token_lists(take_tokens(pool, target, seed), tokenizer.eos_token_id, data.block_size)
            table = blocks_table(packed.blocks)
            stats = {"train_tokens": int(packed.blocks.size), "train_blocks": len(packed.blocks),
                     "train_tail_tokens": packed.dropped_tokens}
            info = {"source": entry.source.path, "ratio": entry.ratio, "tokens": int(packed.blocks.size),
                    "pool_tokens": pool_tokens, "passes": round(target / max(pool_tokens, 1), 3)}
        else:
            conversations = [r for r in records if isinstance(r, Conversation)]
            pool, _ = tokenize_conversations(conversations, tokenizer, template, data.max_length, data.train_on)
            pool += document_examples([r for r in records if isinstance(r, Document)], tokenizer, data.max_length)
            if not pool:
                raise DataError("no example has a trainable token")
            examples = take_examples(pool, target, seed)
            lengths = [len(e.input_ids) for e in examples]
            table = token_table([e.input_ids for e in examples], [e.labels for e in examples])
            stats = {"train_examples": len(examples), "train_tokens": int(sum(lengths)),
                     "train_trainable_tokens": int(sum(int((e.labels != IGNORE_INDEX).sum()) for e in examples)),
                     "train_max_length": max(lengths, default=0)}
            info = {"source": entry.source.path, "ratio": entry.ratio, "examples": len(examples),
                    "pool_examples": len(pool), "passes": round(target / len(pool), 3)}
    except DataError as exc:
        return {**summary, "fatal": f"replay source {entry.source.path}: {exc}"}
    shards = [write_shard(set_uri, shard_name("train", index), "train", table)] if table.num_rows else []
    return {**summary, "files": json.dumps(report.files), "shards": json.dumps([asdict(s) for s in shards]),
            "stats": json.dumps(stats), "replay": json.dumps(info)}


def merge_summaries(summaries: Sequence[dict[str, Any]], stage: str, data: DataConfig, key: str,
                    inputs: dict[str, Any]) -> ShardManifest:
    """Every unit's summary → the manifest; raises the stage's data problems (all units' findings at once)."""
    summaries = sorted(summaries, key=lambda s: s["unit"])
    fatal = [s["fatal"] for s in summaries if s["fatal"]]
    if fatal:
        raise DataError(fatal[0] if len(fatal) == 1 else f"{len(fatal)} problems; the first: {fatal[0]}")
    per_file: Counter = Counter()
    for s in summaries:
        per_file.update(json.loads(s["bad_per_file"]))
    skipped = sum(per_file.values())
    listed = [e for s in summaries for e in json.loads(s["errors"])][:MAX_ERRORS_LISTED]
    if skipped and data.bad_records == "error":
        raise DataValidationError([_Listed(e) for e in listed], skipped, dict(per_file))
    totals: Counter = Counter()
    for s in summaries:
        for name, value in json.loads(s["stats"]).items():
            totals[name] = max(totals[name], value) if name.endswith("max_length") else totals[name] + value
    shards = tuple(ShardInfo(**info) for s in summaries for info in json.loads(s["shards"]))
    shards = tuple(sorted(shards, key=lambda info: (info.part != "train", info.name)))
    stats = _stage_stats(stage, data, totals, shards)
    replayed = [json.loads(s["replay"]) for s in summaries if s.get("replay", "{}") != "{}"]
    if replayed:  # realised shares of the final training set (tokens in blocks, or examples)
        whole = totals["train_tokens"] if stage == "pretrain" else totals["train_examples"]
        for entry in replayed:
            entry["realised"] = (entry["tokens"] if stage == "pretrain" else entry["examples"]) / max(whole, 1)
        stats.update({"replay": replayed, "replay_share": sum(e["realised"] for e in replayed)})
    stats.update({"records": sum(s["records"] for s in summaries), "skipped_records": skipped,
                  "filtered_records": sum(s["filtered"] for s in summaries),
                  "bad_records_per_file": dict(per_file), "bad_records_listed": listed,
                  "files": {uri: digest for s in summaries for uri, digest in json.loads(s["files"]).items()}})
    if not any(info.part == "train" for info in shards):
        raise DataError(_nothing_to_train(stage, data, stats))
    return ShardManifest(key, stage, shards, stats, inputs)


class _Listed(str):
    """A bad record as a task reported it (already formatted: file:line: field, expected/got)."""


def _stage_stats(stage: str, data: DataConfig, totals: Counter, shards: Sequence[ShardInfo]) -> dict[str, Any]:
    if stage == "pretrain":
        real, tail = totals["train_tokens"], totals["train_tail_tokens"]
        return {"train_documents": totals["train_documents"], "eval_documents": totals["eval_documents"],
                "train_blocks": totals["train_blocks"], "eval_blocks": totals["eval_blocks"],
                "block_size": data.block_size, "train_tokens": real, "dropped_tail_tokens": tail,
                "packed_share": real / (real + tail) if real + tail else 0.0, "shards": len(shards)}
    examples = totals["train_examples"]
    return {"train_examples": examples, "eval_examples": totals["eval_examples"],
            "dropped_untrainable": totals["train_dropped_untrainable"] + totals["eval_dropped_untrainable"],
            "train_tokens": totals["train_tokens"], "trainable_tokens": totals["train_trainable_tokens"],
            "mean_length": totals["train_tokens"] / examples if examples else 0.0,
            "max_length": totals["train_max_length"], "shards": len(shards)}


def _nothing_to_train(stage: str, data: DataConfig, stats: dict[str, Any]) -> str:
    if stage == "pretrain":
        return (f"{stats['train_documents']} document(s) hold {stats['dropped_tail_tokens']} tokens, less than one block "
                f"of data.block_size={data.block_size} per unit; add data or lower block_size")
    return "no stage-2 example has a trainable token after truncation; raise data.max_length"

