"""Stage 1: documents → fixed-length token blocks (labels = inputs).

Each document is tokenized, gets an EOS token appended, all are concatenated and cut into
`block_size` blocks. The incomplete tail block is dropped (never padded), so every training
token is real text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from orchestrator.data.formats import Document
from orchestrator.errors import DataError

ENCODE_BATCH = 2048


@dataclass(frozen=True)
class PackedBlocks:
    """`blocks` is an int32 array [n_blocks, block_size]; `dropped_tokens` is the discarded tail."""

    blocks: np.ndarray
    total_tokens: int
    dropped_tokens: int


def encode_texts(texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of each text, no special tokens added.

    Fast tokenizers go straight to the Rust `encode_batch_fast` (the same ids as `tokenizer(...)`
    without transformers' per-text Python bookkeeping, ~2x faster on large corpora); others
    through the ordinary call.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # The Rust call applies truncation/padding saved in tokenizer.json, which tokenizer(...) turns off:
    # take the fast path only when neither is set.
    fast = (backend is not None and hasattr(backend, "encode_batch_fast")
            and backend.truncation is None and backend.padding is None)
    ids: list[list[int]] = []
    for start in range(0, len(texts), ENCODE_BATCH):
        batch = list(texts[start : start + ENCODE_BATCH])
        if fast:
            ids.extend(encoding.ids for encoding in backend.encode_batch_fast(batch, add_special_tokens=False))
        else:
            ids.extend(tokenizer(batch, add_special_tokens=False)["input_ids"])
    return ids


def tokenize_documents(documents: Sequence[Document], tokenizer: Any) -> list[list[int]]:
    """Token ids of each document (no special tokens)."""
    return encode_texts([d.text for d in documents], tokenizer)


def pack_token_lists(token_lists: Iterable[Sequence[int]], eos_id: int, block_size: int) -> PackedBlocks:
    """Concatenate token lists, each followed by `eos_id`, and cut into `block_size` blocks."""
    pieces = []
    for ids in token_lists:
        pieces.append(np.asarray(ids, dtype=np.int32))
        pieces.append(np.asarray([eos_id], dtype=np.int32))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    n_blocks = len(stream) // block_size
    used = n_blocks * block_size
    return PackedBlocks(stream[:used].reshape(n_blocks, block_size), len(stream), len(stream) - used)


def pack_documents(documents: Sequence[Document], tokenizer: Any, block_size: int) -> PackedBlocks:
    """Documents → packed blocks; raises DataError when there is not even one block of text."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; stage 1 needs one to separate documents")
    packed = pack_token_lists(tokenize_documents(documents, tokenizer), tokenizer.eos_token_id, block_size)
    if len(packed.blocks) == 0:
        raise DataError(
            f"{len(documents)} document(s) hold {packed.total_tokens} tokens, less than one block of "
            f"data.block_size={block_size}; add data or lower block_size"
        )
    return packed
