"""Stage 2: conversations → input_ids + labels, prompts masked (-100), truncated to max_length.

Truncation keeps the answer: whole earlier turns go first, then the system prefix when keeping
it would cut the answer (or leave less than half the budget); a single remaining turn gives its prompt at least half the budget and keeps the
end of the prompt (the question and the assistant header). An example is never left without a
trainable token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import numpy as np

from orchestrator.data.formats import Conversation
from orchestrator.data.pretrain import encode_texts
from orchestrator.data.templates import ChatTemplate, RenderedConversation

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedConversation:
    input_ids: np.ndarray
    labels: np.ndarray


def truncate_turns(
    prefix: list[int], turns: list[tuple[list[int], list[int]]], max_length: int
) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """Fit prefix + turns into max_length, keeping the last answer (see module docstring)."""
    turns = list(turns)

    def total() -> int:
        return len(prefix) + sum(len(p) + len(a) for p, a in turns)

    while total() > max_length and len(turns) > 1:
        turns.pop(0)
    if total() <= max_length:
        return prefix, turns
    budget = max_length - len(prefix)
    prompt, answer = turns[0]
    answer_would_be_cut = min(len(prompt), budget // 2) > budget - len(answer)
    if budget < max(2, max_length // 2) or (answer_would_be_cut and len(prompt) + len(answer) <= max_length):
        # the system prefix goes before any answer token does
        prefix, budget = [], max_length
    if len(prompt) + len(answer) > budget:
        prompt_keep = min(len(prompt), max(budget - len(answer), budget // 2))
        answer_keep = budget - prompt_keep
        prompt = prompt[len(prompt) - prompt_keep :] if prompt_keep else []
        answer = answer[:answer_keep]
    return prefix, [(prompt, answer)]


def build_example(
    prefix: list[int],
    turns: list[tuple[list[int], list[int]]],
    max_length: int,
    train_on: Literal["all_assistant_turns", "last_assistant_turn"] = "all_assistant_turns",
) -> Optional[TokenizedConversation]:
    """Token pieces → (input_ids, labels) with prompt tokens masked; None if nothing is trainable."""
    prefix, turns = truncate_turns(prefix, turns, max_length)
    input_ids = list(prefix)
    labels = [IGNORE_INDEX] * len(prefix)
    for i, (prompt, answer) in enumerate(turns):
        trained = train_on == "all_assistant_turns" or i == len(turns) - 1
        input_ids += prompt + answer
        labels += [IGNORE_INDEX] * len(prompt) + (list(answer) if trained else [IGNORE_INDEX] * len(answer))
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return TokenizedConversation(np.asarray(input_ids, dtype=np.int32), np.asarray(labels, dtype=np.int32))


def tokenize_conversations(
    conversations: Sequence[Conversation],
    tokenizer: Any,
    template: ChatTemplate,
    max_length: int,
    train_on: Literal["all_assistant_turns", "last_assistant_turn"] = "all_assistant_turns",
) -> tuple[list[TokenizedConversation], int]:
    """Render, tokenize (one batched call for all pieces) and mask; returns (examples, dropped count)."""
    rendered: list[RenderedConversation] = [template.render(c) for c in conversations]
    texts: list[str] = []
    for r in rendered:
        texts.append(r.prefix)
        for prompt, answer in r.turns:
            texts.extend((prompt, answer))
    ids = iter(encode_texts(texts, tokenizer))
    examples, dropped = [], 0
    for r in rendered:
        prefix = next(ids)
        turns = [(next(ids), next(ids)) for _ in r.turns]
        example = build_example(prefix, turns, max_length, train_on)
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    return examples, dropped
