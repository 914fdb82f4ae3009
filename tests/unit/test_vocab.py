"""Domain vocabulary: word lists, building a SentencePiece model on statutes, merging it into the minimind
byte-level BPE tokenizer and into a SentencePiece (LLaMA-style) tokenizer."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from orchestrator.config import DataSourceConfig
from orchestrator.data.formats import load_examples
from orchestrator.errors import ConfigError, DataValidationError
from orchestrator.model.loading import load_tokenizer
from orchestrator.vocab.build import DOMAIN_MODEL, VocabBuildSettings, build_domain_vocab
from orchestrator.vocab.measure import measure_fit
from orchestrator.vocab.merge import (
    MERGE_REPORT,
    DomainPieces,
    extend_bpe_tokenizer,
    merge_vocabulary,
    read_domain,
)
from orchestrator.vocab.wordlists import count_occurrences, read_wordlist

HELD_OUT_STATUTE = "tcm_law_2016-12-25.md"  # never seen by the domain model


def test_word_lists_with_and_without_frequencies(tmp_path):
    path = tmp_path / "terms.txt"
    path.write_text("合同\t120\n侵权责任\n地质灾害防治管理办法\t\n合同\t5\n\n", encoding="utf-8")
    terms = read_wordlist(str(path))
    assert [(t.text, t.frequency) for t in terms] == [("合同", 120), ("侵权责任", None), ("地质灾害防治管理办法", None)]
    assert terms[1].origin == f"{path}:2"


def test_a_bad_word_list_line_names_file_line_and_field(tmp_path):
    path = tmp_path / "terms.txt"
    path.write_text("合同\t120\n物权\tmany\n\t7\na\tb\tc\n", encoding="utf-8")
    with pytest.raises(DataValidationError) as caught:
        read_wordlist(str(path))
    text = str(caught.value)
    assert f"{path}:2: field 'frequency': expected a whole number, got 'many'" in text
    assert f"{path}:3: field 'term'" in text and f"{path}:4: field '(line)'" in text


def test_term_counting_matches_str_count():
    texts = ["当事人订立合同，合同当事人", "侵权责任法"]
    counts = count_occurrences(["合同", "当事人", "侵权责任", "物权"], texts)
    assert counts == {"合同": 2, "当事人": 2, "侵权责任": 1}


def test_new_pieces_become_merges_that_the_tokenizer_uses(shared_data):
    """A byte-level BPE grows by vocabulary + merges (not added tokens), appended after the base's."""
    from tokenizers import Tokenizer

    path = shared_data / "tokenizers" / "minimind" / "tokenizer.json"
    base = json.loads(path.read_text(encoding="utf-8"))
    extended, counts = extend_bpe_tokenizer(base, DomainPieces(pieces=["民事法律行为", "▁无效", "民事"]))
    assert extended["added_tokens"] == base["added_tokens"]
    assert extended["model"]["merges"][: len(base["model"]["merges"])] == base["model"]["merges"]
    old_vocab = base["model"]["vocab"]
    assert {k: extended["model"]["vocab"][k] for k in old_vocab} == old_vocab
    # "民事" already exists by then: it is the first merge step of "民事法律行为" (joined left to right).
    assert (counts["added"], counts["present"], counts["unreachable"]) == (2, 1, 0)
    before, after = Tokenizer.from_str(json.dumps(base)), Tokenizer.from_str(json.dumps(extended))
    assert len(before.encode("民事法律行为").ids) > 1
    assert len(after.encode("民事法律行为").ids) == 1 and len(after.encode(" 无效").ids) == 1
    # (In "...的民事..." the base's own merge of 的 with the first byte of 民 comes first, and the piece
    # cannot form there: base merges keep priority, which is what keeps everything else unchanged.)
    text = "民事法律行为无效。"
    assert len(after.encode(text).ids) < len(before.encode(text).ids)
    assert after.decode(after.encode(text).ids) == text
    # Merging the same pieces again adds nothing (no duplicates).
    again, counts = extend_bpe_tokenizer(extended, DomainPieces(pieces=["民事法律行为", "▁无效", "民事"]))
    assert again == extended and counts["present"] == 3


@pytest.fixture(scope="module")
def legal_vocab(shared_data, tmp_path_factory) -> Path:
    """A 4,000-piece BPE SentencePiece model of 12 statutes, seeded with THUOCL law terms (the 13th held out)."""
    out = tmp_path_factory.mktemp("legal-vocab")
    files = sorted((shared_data / "pretrain" / "legal").glob("*.md"))
    sources = [DataSourceConfig(path=str(f), text_unit="paragraph") for f in files if f.name != HELD_OUT_STATUTE]
    settings = VocabBuildSettings(vocab_size=4000, held_out_share=0.05,
                                  wordlists=(str(shared_data / "wordlists" / "THUOCL_law.txt"),))
    report = build_domain_vocab(sources, str(out), settings)
    assert report["seed_terms"] > 100 and report["held_out_documents"] > 0
    assert (out / DOMAIN_MODEL).is_file() and (out / "held_out.jsonl").is_file()
    return out


def test_merged_minimind_tokenizer_needs_fewer_tokens_on_held_out_statute_text(legal_vocab, shared_data, tmp_path):
    from transformers import AutoTokenizer

    held_out = DataSourceConfig(path=str(shared_data / "pretrain" / "legal" / HELD_OUT_STATUTE), text_unit="paragraph")
    out = tmp_path / "merged"
    report = merge_vocabulary(str(shared_data / "tokenizers" / "minimind"), [str(legal_vocab)], str(out), [held_out])
    sample = report["sample"]
    print("held-out statute (minimind):", json.dumps(sample))
    assert report["kind"] == "bpe" and report["base_tokens"] == 6400
    assert report["merged_tokens"] == report["base_tokens"] + report["new_tokens"] > 8000
    assert sample["characters"] > 5000
    assert sample["tokens_per_char_reduction"] > 0.2  # measured: 0.30 (1.26 -> 1.81 characters per token)
    assert sample["round_trip_failures_after"] == 0
    assert json.loads((out / MERGE_REPORT).read_text(encoding="utf-8")) == report

    base = load_tokenizer(str(shared_data / "tokenizers" / "minimind"))
    merged = AutoTokenizer.from_pretrained(str(out))
    assert len(merged) == report["merged_tokens"]
    assert merged.convert_ids_to_tokens(list(range(len(base)))) == base.convert_ids_to_tokens(list(range(len(base))))
    assert merged.all_special_tokens == base.all_special_tokens
    assert merged.convert_tokens_to_ids(merged.all_special_tokens) == base.all_special_ids
    assert len(set(merged.get_vocab())) == len(merged)
    assert merged.chat_template == base.chat_template
    # Every new token is produced by encoding its own text: none is dead weight.
    new_ids = range(len(base), len(merged))
    texts = [merged.decode([i]) for i in new_ids]
    whole = [t for t in texts if "\ufffd" not in t]  # prefixes ending inside a character are merge steps
    assert sum(merged.encode(t, add_special_tokens=False) == [i] for i, t in zip(new_ids, texts) if t in whole) \
        == len(whole)

    # Lossless on the whole corpus, every statute as one document.
    documents, _ = load_examples([DataSourceConfig(path=str(shared_data / "pretrain" / "legal"))], "documents")
    fit = measure_fit(merged, [d.text for d in documents])
    assert fit.texts == 13 and fit.characters > 200_000 and fit.round_trip_failures == 0


def test_word_list_terms_merge_most_frequent_first(shared_data, tmp_path):
    wordlist = shared_data / "wordlists" / "THUOCL_medical.txt"
    domain = read_domain(str(wordlist), max_terms=300)
    assert len(domain.pieces) == 300
    assert all(len(a) <= len(b) for a, b in zip(domain.pieces, domain.pieces[1:]))  # shortest first
    report = merge_vocabulary(str(shared_data / "tokenizers" / "minimind"), [str(wordlist)], str(tmp_path / "m"),
                              [DataSourceConfig(path=str(shared_data / "pretrain" / "medical" / "fever.txt"),
                                                max_records=200)], max_terms=300)
    assert report["pieces"]["offered"] == 300 and report["new_tokens"] > 0
    assert report["sample"]["tokens_after"] < report["sample"]["tokens_before"]
    assert report["sample"]["round_trip_failures_after"] == 0


@pytest.fixture(scope="module")
def llama_style_tokenizer(shared_data, tmp_path_factory) -> Path:
    """A SentencePiece BPE tokenizer (byte fallback, identity normalization) as LLaMA ships it: tokenizer.model."""
    import sentencepiece as spm

    lines = (shared_data / "pretrain" / "medical" / "fever.txt").read_text(encoding="utf-8").splitlines()
    lines += (shared_data / "pretrain" / "english" / "en_article_tail500.txt").read_text(encoding="utf-8").splitlines()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([l for l in lines if l.strip()]), model_writer=model,
                                   vocab_size=3000, model_type="bpe", byte_fallback=True,
                                   normalization_rule_name="identity", minloglevel=2, num_threads=2)
    out = tmp_path_factory.mktemp("llama-style")
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}), encoding="utf-8")
    return out


def test_sentencepiece_tokenizer_merge(llama_style_tokenizer, legal_vocab, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out = tmp_path / "merged-sp"
    report = merge_vocabulary(str(llama_style_tokenizer), [str(legal_vocab)], str(out))
    print("held-out statute paragraphs (SentencePiece base):", json.dumps(report["sample"]))
    assert report["kind"] == "sentencepiece" and report["base_tokens"] == 3000
    assert report["new_tokens"] > 1000
    assert report["sample"]["tokens_per_char_reduction"] > 0.3
    assert report["sample"]["round_trip_failures_after"] == 0
    merged = AutoTokenizer.from_pretrained(str(out))
    base = AutoTokenizer.from_pretrained(str(llama_style_tokenizer))
    assert len(merged) == report["merged_tokens"]
    assert merged.convert_ids_to_tokens(list(range(3000))) == base.convert_ids_to_tokens(list(range(3000)))
    assert (merged.bos_token_id, merged.eos_token_id, merged.unk_token_id) == (1, 2, 0)
    # The merged proto (saved too, for the next merge) and its transformers conversion agree.
    processor = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    text = "当事人的民事法律行为无效的，应当承担民事责任。"
    assert merged.encode(text, add_special_tokens=False) == processor.encode(text)
    assert len(processor.encode(text)) < len(spm.SentencePieceProcessor(
        model_file=str(llama_style_tokenizer / "tokenizer.model")).encode(text))


def test_a_sentencepiece_base_with_tokens_beyond_its_model_is_refused(llama_style_tokenizer, legal_vocab, tmp_path):
    from transformers import AutoTokenizer

    grown = tmp_path / "grown"
    tokenizer = AutoTokenizer.from_pretrained(str(llama_style_tokenizer))
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.save_pretrained(str(grown))
    (grown / "tokenizer.model").write_bytes((llama_style_tokenizer / "tokenizer.model").read_bytes())
    refused = r"1 token\(s\) beyond its SentencePiece model of 3000 pieces \('<pad>'=3000\)"
    with pytest.raises(ConfigError, match=refused):
        merge_vocabulary(str(grown), [str(legal_vocab)], str(tmp_path / "out"))


def test_a_directory_without_a_tokenizer_is_refused(legal_vocab, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no tokenizer.model or tokenizer.json to merge into"):
        merge_vocabulary(str(tmp_path / "empty"), [str(legal_vocab)], str(tmp_path / "out"))


def test_cli_builds_and_merges(shared_data, tmp_path, capsys):
    from orchestrator.cli.main import main

    legal = shared_data / "pretrain" / "legal"
    assert main(["vocab", "build", "--corpus", str(legal / "criminal_law.md"), "--text-unit", "paragraph",
                 "--vocab-size", "2000", "--model-type", "unigram", "--out", str(tmp_path / "domain")]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["pieces"] <= 2000 and built["held_out_documents"] > 0
    assert main(["vocab", "merge", "--base-tokenizer", str(shared_data / "tokenizers" / "minimind"),
                 "--domain", str(tmp_path / "domain"), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert merged["new_tokens"] > 0 and merged["sample"]["tokens_per_char_reduction"] > 0
    assert main(["vocab", "merge", "--base-tokenizer", str(tmp_path / "nowhere"), "--domain",
                 str(tmp_path / "domain"), "--out", str(tmp_path / "x")]) == 2
    assert "no tokenizer.model or tokenizer.json" in capsys.readouterr().err
