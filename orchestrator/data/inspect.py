"""Prepared rows back as text, with the trained (label) spans marked: what `orchestrator data inspect` shows."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from orchestrator.data.sft import IGNORE_INDEX
from orchestrator.data.shards import ShardManifest, read_shard

TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


def mark_trained_spans(input_ids: Sequence[int], labels: Optional[Sequence[int]], tokenizer: Any) -> str:
    """Decode a row; every stretch of tokens that carries loss is wrapped in ⟦ ⟧ (stage 1: the whole block)."""
    if labels is None:
        labels = input_ids
    pieces: list[str] = []
    start = 0
    for end in range(1, len(input_ids) + 1):
        if end == len(input_ids) or (labels[end] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            text = tokenizer.decode(list(input_ids[start:end]), skip_special_tokens=False)
            pieces.append(text if labels[start] == IGNORE_INDEX else f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}")
            start = end
    return "".join(pieces)


def decoded_rows(set_uri: str, manifest: ShardManifest, tokenizer: Any, n: int,
                 part: str = "train") -> list[tuple[int, str]]:
    """The first `n` rows of a shard set's part (global row id, text with the trained spans marked)."""
    out: list[tuple[int, str]] = []
    offset = 0
    for shard in manifest.part(part):
        if len(out) >= n:
            break
        rows = read_shard(set_uri, shard).slice(0, n - len(out)).to_pylist()
        out += [(offset + i, mark_trained_spans(row["input_ids"], row.get("labels"), tokenizer))
                for i, row in enumerate(rows)]
        offset += shard.rows
    return out
