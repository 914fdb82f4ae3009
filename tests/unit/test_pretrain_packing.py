"""Stage 1 packing: documents → fixed-size blocks, EOS between documents, tail dropped."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.config import DataSourceConfig
from orchestrator.data.formats import Document, load_examples
from orchestrator.data.pretrain import pack_documents, pack_token_lists, tokenize_documents
from orchestrator.errors import DataError


def test_pack_exact_blocks():
    packed = pack_token_lists([[1, 2, 3], [4, 5]], eos_id=0, block_size=3)
    assert packed.blocks.tolist() == [[1, 2, 3], [0, 4, 5]]
    assert packed.blocks.dtype == np.int32
    assert packed.total_tokens == 7
    assert packed.dropped_tokens == 1


def test_pack_exact_fit_drops_nothing():
    packed = pack_token_lists([[1, 2], [3]], eos_id=9, block_size=5)
    assert packed.blocks.tolist() == [[1, 2, 9, 3, 9]]
    assert (packed.total_tokens, packed.dropped_tokens) == (5, 0)


def test_pack_drops_the_tail():
    packed = pack_token_lists([[1, 2, 3, 4, 5, 6, 7], [8, 9]], eos_id=0, block_size=4)
    # stream: 1 2 3 4 | 5 6 7 0 | 8 9 0  (tail of 3 dropped)
    assert packed.blocks.tolist() == [[1, 2, 3, 4], [5, 6, 7, 0]]
    assert (packed.total_tokens, packed.dropped_tokens) == (11, 3)


def test_pack_less_than_one_block():
    packed = pack_token_lists([[1, 2]], eos_id=0, block_size=8)
    assert packed.blocks.shape == (0, 8)
    assert (packed.total_tokens, packed.dropped_tokens) == (3, 3)


def test_pack_empty_input():
    packed = pack_token_lists([], eos_id=0, block_size=4)
    assert packed.blocks.shape == (0, 4)
    assert (packed.total_tokens, packed.dropped_tokens) == (0, 0)


def test_pack_empty_document_still_gets_eos():
    packed = pack_token_lists([[1], [], [2]], eos_id=0, block_size=2)
    assert packed.blocks.tolist() == [[1, 0], [0, 2]]
    assert packed.dropped_tokens == 1


def test_pack_documents_less_than_one_block_is_an_error(small_tokenizer):
    docs = [Document("short text", "a.txt:1"), Document("another", "a.txt:2")]
    n_tokens = sum(len(ids) + 1 for ids in tokenize_documents(docs, small_tokenizer))
    with pytest.raises(DataError) as info:
        pack_documents(docs, small_tokenizer, block_size=512)
    assert str(info.value) == (
        f"2 document(s) hold {n_tokens} tokens, less than one block of data.block_size=512; add data or lower block_size"
    )


def test_pack_documents_needs_an_eos(small_tokenizer):
    class NoEos:
        eos_token_id = None

    with pytest.raises(DataError, match="has no eos_token"):
        pack_documents([Document("x", "o")], NoEos(), block_size=8)


def test_pack_documents_uses_eos_between_documents(small_tokenizer):
    docs = [Document("The patient has a fever.", "o:1"), Document("Drink water.", "o:2")]
    ids = tokenize_documents(docs, small_tokenizer)
    eos = small_tokenizer.eos_token_id
    stream = ids[0] + [eos] + ids[1] + [eos]
    packed = pack_documents(docs, small_tokenizer, block_size=8)
    n = len(stream) // 8
    assert packed.blocks.reshape(-1).tolist() == stream[: n * 8]
    assert packed.dropped_tokens == len(stream) % 8


def test_real_statutes_pack_without_padding(shared_data, minimind_tokenizer):
    tok = minimind_tokenizer
    legal = shared_data / "pretrain" / "legal"
    docs, report = load_examples([DataSourceConfig(path=str(legal / "*.md"))], "documents")
    assert report.records == 13 and len(docs) == 13  # one document per Markdown file
    block_size = 256
    packed = pack_documents(docs, tok, block_size)
    ids = tokenize_documents(docs, tok)
    total = sum(len(x) + 1 for x in ids)
    assert packed.total_tokens == total
    assert packed.blocks.shape == (total // block_size, block_size)
    assert packed.dropped_tokens == total % block_size
    assert 0 <= packed.dropped_tokens < block_size
    assert packed.blocks.shape[0] > 500
    # every token is real text or a document separator: no padding at all
    non_padding_share = float((packed.blocks != tok.pad_token_id).mean())
    assert non_padding_share == 1.0
    assert int((packed.blocks == tok.eos_token_id).sum()) == 13 - (1 if packed.dropped_tokens else 0)
    # blocks are the token stream in order
    assert packed.blocks[0].tolist() == ids[0][:block_size]


def test_encode_texts_ignores_truncation_and_padding_saved_in_tokenizer_json(minimind_tokenizer, tmp_path):
    """A tokenizer.json with truncation/padding enabled must not cut or pad our documents."""
    import json

    from orchestrator.data.pretrain import encode_texts
    from orchestrator.model.loading import load_tokenizer

    minimind_tokenizer.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    spec["truncation"] = {"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                       "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    texts = ["短", "发热是指体温升高超过正常范围，常见于感染、炎症等多种疾病，需要结合症状综合判断。" * 3]
    expected = minimind_tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert encode_texts(texts, load_tokenizer(str(tmp_path))) == expected
    assert encode_texts(texts, minimind_tokenizer) == expected
