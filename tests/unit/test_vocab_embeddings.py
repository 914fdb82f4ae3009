"""Model side of a vocabulary extension: new embedding / LM-head rows are the mean of the base rows of
their pieces, old rows keep their values, tied embeddings stay tied, sizes are checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.config import TinyModelConfig
from orchestrator.errors import ConfigError
from orchestrator.model.embeddings import check_extends, check_tokenizer_fits, extend_embeddings
from orchestrator.model.loading import create_tiny_model, load_tokenizer
from orchestrator.vocab.merge import merge_vocabulary


@pytest.fixture(scope="module")
def extended_minimind(shared_data, tmp_path_factory) -> Path:
    """minimind + the 300 most frequent THUOCL law terms (merged as vocabulary + merges)."""
    out = tmp_path_factory.mktemp("extended-minimind")
    merge_vocabulary(str(shared_data / "tokenizers" / "minimind"), [str(shared_data / "wordlists" / "THUOCL_law.txt")],
                     str(out), max_terms=300)
    return out


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_new_rows_are_the_mean_of_their_pieces_and_old_rows_are_unchanged(minimind_tokenizer, extended_minimind, tied):
    base_tokenizer, tokenizer = minimind_tokenizer, load_tokenizer(str(extended_minimind))
    model = create_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                              tie_word_embeddings=tied), base_tokenizer, seed=0)
    old_embedding = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    extension = extend_embeddings(model, base_tokenizer, tokenizer)

    n_base, n_new = len(base_tokenizer), len(tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    assert n_new > n_base + 100
    assert rows % 64 == 0 and n_new <= rows < n_new + 64
    assert (extension.base_tokens, extension.tokens, extension.rows_after) == (n_base, n_new, rows)
    assert extension.initialised == n_new - n_base and extension.without_pieces == 0
    assert model.config.vocab_size == rows
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (head.data_ptr() == embedding.data_ptr()) == tied
    assert torch.equal(embedding[:n_base], old_embedding)
    assert torch.equal(head[:n_base], old_head)
    checked = 0
    for token_id in range(n_base, n_new):
        text = tokenizer.decode([token_id])
        if "\ufffd" in text:
            continue  # a merge step that ends inside a character: no text of its own to split
        pieces = base_tokenizer.encode(text, add_special_tokens=False)
        assert len(pieces) > 1
        torch.testing.assert_close(embedding[token_id], old_embedding[pieces].mean(dim=0))
        torch.testing.assert_close(head[token_id], old_head[pieces].mean(dim=0))
        checked += 1
    assert checked > 100
    torch.testing.assert_close(embedding[n_new:], old_embedding.mean(dim=0).expand(rows - n_new, -1))
    assert model.generation_config.suppress_tokens == list(range(n_new, rows))
    with torch.no_grad():  # the grown model runs on the new ids
        assert model(torch.tensor([[n_new - 1, 5, n_base]])).logits.shape == (1, 3, rows)


def test_a_tokenizer_that_is_not_an_extension_is_refused(minimind_tokenizer, small_tokenizer):
    # Same three chatml special tokens first (ids 0-2), then unrelated vocabularies.
    with pytest.raises(ConfigError, match="tok/: the tokenizer is not an extension of the base model's tokenizer: "
                                          "id 3 is '<|object_ref_start|>'"):
        check_extends(small_tokenizer, minimind_tokenizer, "tok/")
    with pytest.raises(ConfigError, match="fewer than the base model's tokenizer"):
        check_extends(minimind_tokenizer, small_tokenizer, "tok/")


def test_a_tokenizer_larger_than_the_model_is_a_clear_error(minimind_tokenizer, extended_minimind):
    model = create_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2),
                              minimind_tokenizer, seed=0)
    check_tokenizer_fits(model, minimind_tokenizer, "m/")
    with pytest.raises(ConfigError, match=r"m/: the tokenizer has \d+ tokens but the model's embedding has only 6400"):
        check_tokenizer_fits(model, load_tokenizer(str(extended_minimind)), "m/")
