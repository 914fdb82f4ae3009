"""Grow a model's vocabulary for an extended tokenizer: new embedding and LM-head rows start as the
mean of the base rows of the pieces the base tokenizer splits the new token into, not random."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from orchestrator.errors import ConfigError

log = logging.getLogger(__name__)

PAD_TO_MULTIPLE_OF = 64  # tensor-core friendly row counts


@dataclass(frozen=True)
class VocabExtension:
    """What `extend_embeddings` did."""

    base_tokens: int  # tokens of the base tokenizer (rows that keep their weights)
    tokens: int  # tokens of the extended tokenizer
    rows_before: int
    rows_after: int
    initialised: int  # new tokens set to the mean of their base pieces
    without_pieces: int  # new tokens the base tokenizer could not split (set to the mean of all base rows)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def padded_rows(tokens: int, multiple: int = PAD_TO_MULTIPLE_OF) -> int:
    return -(-tokens // multiple) * multiple


def check_extends(base_tokenizer: Any, tokenizer: Any, where: str) -> None:
    """`tokenizer` must keep every id of `base_tokenizer` (an extension, as `vocab merge` writes)."""
    n = len(base_tokenizer)
    if len(tokenizer) < n:
        raise ConfigError(f"{where}: the tokenizer has {len(tokenizer)} tokens, fewer than the base model's "
                          f"tokenizer ({n}); it is not an extension of it")
    old, new = base_tokenizer.convert_ids_to_tokens(list(range(n))), tokenizer.convert_ids_to_tokens(list(range(n)))
    moved = [i for i in range(n) if old[i] != new[i]]
    if moved:
        i = moved[0]
        raise ConfigError(f"{where}: the tokenizer is not an extension of the base model's tokenizer: id {i} is "
                          f"{new[i]!r}, the base has {old[i]!r} ({len(moved)} ids differ); build it with "
                          "`orchestrator vocab merge --base-tokenizer <the base model's tokenizer>`")


def base_piece_ids(base_tokenizer: Any, tokenizer: Any, token_id: int) -> list[int]:
    """Ids of the pieces the base tokenizer splits new token `token_id` into.

    Model tokens are split at the model level (the byte-level or ▁-marked string goes through the
    base's BPE directly, so a token that is not valid UTF-8 on its own still splits); added tokens
    by their text.
    """
    added = tokenizer.added_tokens_decoder.get(token_id)
    if added is not None:
        return base_tokenizer.encode(added.content, add_special_tokens=False)
    token = tokenizer.convert_ids_to_tokens(token_id)
    backend = getattr(base_tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [piece.id for piece in backend.model.tokenize(token)]
    return base_tokenizer.encode(tokenizer.decode([token_id]), add_special_tokens=False)


def extend_embeddings(model: Any, base_tokenizer: Any, tokenizer: Any, first_new: Optional[int] = None,
                      pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF) -> VocabExtension:
    """Resize input embeddings and LM head to `len(tokenizer)` rounded up to `pad_to_multiple_of` rows.

    Tokens from `first_new` (default: the base tokenizer's size) on get the mean of their base pieces'
    rows, in the embedding and (when untied) the LM head alike; new padding rows get the mean of all
    base rows; rows below `first_new` are left exactly as they were. Tied embeddings stay tied.
    Padding ids are suppressed in the model's generation config (they are never trained as targets).
    """
    first_new = len(base_tokenizer) if first_new is None else first_new
    embedding = model.get_input_embeddings().weight
    rows_before = embedding.shape[0]
    rows = max(padded_rows(len(tokenizer), pad_to_multiple_of), rows_before)
    model.resize_token_embeddings(rows, mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    base_rows = len(base_tokenizer)
    initialised = without = 0
    with torch.no_grad():
        means = [m[:base_rows].mean(dim=0) for m in matrices]
        for token_id in range(first_new, len(tokenizer)):
            pieces = [i for i in base_piece_ids(base_tokenizer, tokenizer, token_id) if i < base_rows]
            for matrix, mean in zip(matrices, means):
                matrix[token_id] = matrix[pieces].mean(dim=0) if pieces else mean
            initialised += bool(pieces)
            without += not pieces
        for matrix, mean in zip(matrices, means):
            matrix[max(len(tokenizer), rows_before):] = mean
    if rows > len(tokenizer):
        suppressed = set(model.generation_config.suppress_tokens or []) | set(range(len(tokenizer), rows))
        model.generation_config.suppress_tokens = sorted(suppressed)
    extension = VocabExtension(base_rows, len(tokenizer), rows_before, rows, initialised, without)
    log.info("vocabulary %d -> %d tokens, embedding rows %d -> %d; %d new rows = mean of their base pieces, "
             "%d without pieces = mean of all rows", base_rows, len(tokenizer), rows_before, rows, initialised, without)
    return extension


def check_tokenizer_fits(model: Any, tokenizer: Any, where: str) -> None:
    """Every token id of `tokenizer` must have an embedding row in `model`."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ConfigError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
                          f"{rows} rows; use the tokenizer the model was trained with (an extended vocabulary needs "
                          "a model trained on it)")
