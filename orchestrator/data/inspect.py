"""Prepared rows back as text, with the trained (label) spans marked: what `orchestrator data inspect` shows."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from orchestrator.data.sft import IGNORE_INDEX

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
