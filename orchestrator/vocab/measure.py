"""How well a tokenizer fits a text sample: characters per token, and lossless encode → decode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from orchestrator.data.pretrain import encode_texts


@dataclass(frozen=True)
class SampleFit:
    texts: int
    characters: int
    tokens: int
    round_trip_failures: int
    first_failure: Optional[int]  # index of the first text that does not decode back to itself

    @property
    def chars_per_token(self) -> float:
        return self.characters / max(self.tokens, 1)

    @property
    def tokens_per_char(self) -> float:
        return self.tokens / max(self.characters, 1)


def measure_fit(tokenizer: Any, texts: Sequence[str]) -> SampleFit:
    """Encode every text (no special tokens), count tokens, and check decode(encode(text)) == text."""
    ids = encode_texts(list(texts), tokenizer)
    failures = [i for i, (text, row) in enumerate(zip(texts, ids))
                if tokenizer.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False) != text]
    return SampleFit(len(texts), sum(len(t) for t in texts), sum(len(row) for row in ids), len(failures),
                     failures[0] if failures else None)


def compare_fit(before: SampleFit, after: SampleFit) -> dict[str, Any]:
    """The before/after numbers a merge reports."""
    return {
        "texts": before.texts,
        "characters": before.characters,
        "tokens_before": before.tokens,
        "tokens_after": after.tokens,
        "chars_per_token_before": round(before.chars_per_token, 4),
        "chars_per_token_after": round(after.chars_per_token, 4),
        "tokens_per_char_before": round(before.tokens_per_char, 4),
        "tokens_per_char_after": round(after.tokens_per_char, 4),
        "tokens_per_char_reduction": round(1 - after.tokens_per_char / max(before.tokens_per_char, 1e-12), 4),
        "round_trip_failures_before": before.round_trip_failures,
        "round_trip_failures_after": after.round_trip_failures,
    }
