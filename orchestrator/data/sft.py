"""Stage 2: conversations → input_ids + labels, prompts masked (-100), truncated to max_length.

Token-exact: a conversation is rendered and tokenized as ONE text, the ids generation and serving see
(`templates.encode_text`); the ids are then cut at the character boundaries of the template's pieces
(prefix, each prompt, each answer). A cut is verified, not assumed: the text up to the boundary is
tokenized alone (what inference tokenizes as the prompt) and must be the start of the whole text's
ids. This holds for byte-level BPE, SentencePiece with a dummy prefix (where tokenizing an answer on
its own would start it with a lone '▁') and chat templates that add BOS or a default system prompt.
Where a token straddles a boundary (the template and tokenizer cannot agree), the cut falls before it,
the example keeps the whole text's ids, and it is counted and reported once.

Truncation keeps the answer: whole earlier turns go first, then the system prefix when keeping
it would cut the answer (or leave less than half the budget); a single remaining turn gives its prompt at least half the budget and keeps the
end of the prompt (the question and the assistant header). An example is never left without a
trainable token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import numpy as np

from orchestrator.data.formats import Conversation
from orchestrator.data.pretrain import encode_texts
from orchestrator.data.templates import ChatTemplate, RenderedConversation, common_prefix_length

log = logging.getLogger(__name__)

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


def piece_boundaries(rendered: RenderedConversation) -> list[int]:
    """Character offsets where the prefix, each prompt and each answer end (the last is len(text))."""
    ends, position = [len(rendered.prefix)], len(rendered.prefix)
    for prompt, answer in rendered.turns:
        position += len(prompt)
        ends.append(position)
        position += len(answer)
        ends.append(position)
    return ends


def cut_at_boundaries(ids: Sequence[int], heads: Sequence[Sequence[int]]) -> tuple[list[int], int]:
    """Token cut points of the whole text's `ids`, one per boundary: `heads[k]` is the text up to boundary k
    tokenized alone. Returns (cuts, boundaries where the head is not a prefix of `ids`)."""
    cuts, straddled = [], 0
    for head in heads:
        n = common_prefix_length(ids, head)
        straddled += n != len(head)
        cuts.append(max(n, cuts[-1] if cuts else 0))
    return cuts, straddled


def tokenize_conversations(
    conversations: Sequence[Conversation],
    tokenizer: Any,
    template: ChatTemplate,
    max_length: int,
    train_on: Literal["all_assistant_turns", "last_assistant_turn"] = "all_assistant_turns",
    mismatched: Optional[list[str]] = None,
) -> tuple[list[TokenizedConversation], int]:
    """Render, tokenize each conversation as one text, cut at verified piece boundaries and mask; returns
    (examples, dropped count). Origins of examples with a straddling boundary token are appended to
    `mismatched` (the caller reports them); without it they are logged here."""
    rendered: list[RenderedConversation] = [template.render(c) for c in conversations]
    texts = [r.text for r in rendered]
    boundaries = [piece_boundaries(r) for r in rendered]
    # the text up to every inner boundary, tokenized alone (empty heads and the whole text need no call)
    heads = [text[:b] for text, ends in zip(texts, boundaries) for b in ends if 0 < b < len(text)]
    whole = encode_texts(texts, tokenizer)
    head_ids = iter(encode_texts(heads, tokenizer))
    examples, dropped, straddling = [], 0, []
    for conversation, text, ends, ids in zip(conversations, texts, boundaries, whole):
        heads_of = [[] if b == 0 else ids if b >= len(text) else next(head_ids) for b in ends]
        cuts, straddled = cut_at_boundaries(ids, heads_of)
        if straddled:
            straddling.append(conversation.origin)
        prefix = list(ids[: cuts[0]])
        turns = [(list(ids[cuts[k]:cuts[k + 1]]), list(ids[cuts[k + 1]:cuts[k + 2]])) for k in range(0, len(cuts) - 1, 2)]
        example = build_example(prefix, turns, max_length, train_on)
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    if mismatched is not None:
        mismatched.extend(straddling)
    else:
        report_straddling(straddling, len(conversations))
    return examples, dropped


def report_straddling(origins: Sequence[str], total: int) -> None:
    """One warning for the examples whose template and tokenizer disagree at a prompt/answer boundary."""
    if origins:
        log.warning(
            "%d of %d stage-2 example(s) have a token straddling a prompt/answer boundary (the text before the "
            "boundary tokenizes differently alone, as at inference), e.g. %s; their ids are the whole text's and "
            "the straddling token goes with the piece after the boundary. A template whose prompt ends in a special "
            "token or a newline avoids this.", len(origins), total, ", ".join(origins[:3]),
        )
