"""`orchestrator vocab build`: a domain SentencePiece model (BPE or unigram) trained on documents,
optionally seeded with word-list terms that occur in them.

Output directory (local or URI):

    domain.model      the SentencePiece model (`vocab merge --domain` takes the directory or this file)
    domain.vocab      piece<TAB>score, one a line, for reading
    held_out.jsonl    the held-out documents ({"text": ...}); `vocab merge` measures on them
    build.json        what was built from what (settings, sources with sha256, counts)
"""

from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence

from orchestrator import storage
from orchestrator.config import DataSourceConfig
from orchestrator.data.formats import load_examples
from orchestrator.data.prepare import split_eval
from orchestrator.errors import ConfigError, DataError
from orchestrator.vocab.wordlists import by_frequency, count_occurrences, read_wordlist

log = logging.getLogger(__name__)

DOMAIN_MODEL = "domain.model"
DOMAIN_VOCAB = "domain.vocab"
HELD_OUT = "held_out.jsonl"
BUILD_REPORT = "build.json"
MAX_SENTENCE_CHARS = 4096  # longer lines are cut into pieces: SentencePiece skips over-long sentences


@dataclass(frozen=True)
class VocabBuildSettings:
    """How the domain SentencePiece model is trained."""

    model_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = 8000
    character_coverage: float = 0.9995
    held_out_share: float = 0.05
    seed: int = 42
    wordlists: tuple[str, ...] = ()
    min_term_count: int = 2
    max_seed_terms: int = 2000
    max_sentences: int = 2_000_000
    bad_records: Literal["error", "skip"] = "error"

    def check(self) -> None:
        if self.vocab_size < 100:
            raise ConfigError(f"vocab build: --vocab-size {self.vocab_size} is too small (at least 100)")
        if not 0 <= self.held_out_share < 1:
            raise ConfigError(f"vocab build: --held-out {self.held_out_share} must be in [0, 1)")
        if not 0.9 <= self.character_coverage <= 1:
            raise ConfigError(f"vocab build: --character-coverage {self.character_coverage} must be in [0.9, 1]")


def training_sentences(texts: Sequence[str]) -> list[str]:
    """Documents → SentencePiece training sentences: non-empty lines, cut to MAX_SENTENCE_CHARS."""
    sentences = []
    for text in texts:
        for line in text.split("\n"):
            line = line.strip()
            for start in range(0, len(line), MAX_SENTENCE_CHARS):
                sentences.append(line[start : start + MAX_SENTENCE_CHARS])
    return sentences


def select_seed_terms(wordlists: Sequence[str], sentences: Sequence[str], min_count: int, max_terms: int) -> list[str]:
    """Word-list terms found at least `min_count` times in the training text, most frequent (by the list's
    frequency) first, at most `max_terms`. Terms with whitespace are left out (a piece never spans a space)."""
    terms = [t for uri in wordlists for t in read_wordlist(uri)]
    candidates = [t.text for t in by_frequency(terms) if len(t.text) >= 2 and not any(c.isspace() for c in t.text)]
    counts = count_occurrences(candidates, sentences)
    seeds = list(dict.fromkeys(t for t in candidates if counts[t] >= min_count))
    return seeds[:max_terms]


def train_sentencepiece(sentences: Sequence[str], settings: VocabBuildSettings,
                        seed_terms: Sequence[str] = ()) -> bytes:
    """A serialized SentencePiece model trained on `sentences`.

    Identity normalization (no NFKC: the pieces must match raw text the way the base tokenizer sees
    it), digits split, no byte fallback; `seed_terms` become user-defined symbols (always whole pieces).
    """
    import sentencepiece as spm

    if len(seed_terms) >= settings.vocab_size // 2:
        raise ConfigError(f"vocab build: {len(seed_terms)} seed terms leave too little of --vocab-size "
                          f"{settings.vocab_size} for learned pieces; lower --max-seed-terms or raise --vocab-size")
    model = io.BytesIO()
    options = dict(
        model_type=settings.model_type,
        vocab_size=settings.vocab_size,
        character_coverage=settings.character_coverage,
        normalization_rule_name="identity",
        split_digits=True,
        byte_fallback=False,
        hard_vocab_limit=False,  # a small corpus yields fewer pieces instead of an error
        max_sentence_length=MAX_SENTENCE_CHARS * 4,  # bytes
        user_defined_symbols=list(seed_terms),
        num_threads=2,
        minloglevel=2,
    )
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **options)
    except RuntimeError as exc:
        raise ConfigError(f"vocab build: SentencePiece training failed: {exc}") from exc
    return model.getvalue()


def build_domain_vocab(sources: Sequence[DataSourceConfig], out_uri: str,
                       settings: VocabBuildSettings) -> dict[str, Any]:
    """Read the documents (any supported format, local or URI; conversations flattened), hold out a share,
    train the domain model on the rest and write it with the held-out sample to `out_uri`. Returns the report."""
    import sentencepiece as spm

    settings.check()
    if not sources:
        raise DataError("vocab build: no corpus given (--corpus PATH, repeatable)")
    documents, report = load_examples(list(sources), "documents", settings.bad_records, True, settings.seed)
    train_docs, held_docs = split_eval(documents, settings.held_out_share, settings.seed)
    sentences = training_sentences([d.text for d in train_docs])
    if len(sentences) > settings.max_sentences:
        sentences = random.Random(settings.seed).sample(sentences, settings.max_sentences)
    seeds = (select_seed_terms(settings.wordlists, sentences, settings.min_term_count, settings.max_seed_terms)
             if settings.wordlists else [])
    log.info("vocab build: %d documents (%d held out), %d sentences, %d seed terms", len(documents), len(held_docs),
             len(sentences), len(seeds))
    proto = train_sentencepiece(sentences, settings, seeds)
    processor = spm.SentencePieceProcessor(model_proto=proto)
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    result = {
        "model": storage.join(out_uri, DOMAIN_MODEL),
        "held_out": storage.join(out_uri, HELD_OUT) if held_docs else None,
        "pieces": len(pieces),
        "seed_terms": len(seeds),
        "documents": len(documents),
        "train_documents": len(train_docs),
        "held_out_documents": len(held_docs),
        "train_characters": sum(len(d.text) for d in train_docs),
        "held_out_characters": sum(len(d.text) for d in held_docs),
        "sentences": len(sentences),
        "settings": asdict(settings),
        "files": report.files,
    }
    storage.write_bytes(storage.join(out_uri, DOMAIN_MODEL), proto)
    storage.write_bytes(storage.join(out_uri, DOMAIN_VOCAB),
                        "".join(f"{piece}\t{score:g}\n" for piece, score in pieces).encode("utf-8"))
    if held_docs:
        storage.write_bytes(storage.join(out_uri, HELD_OUT), "".join(
            json.dumps({"text": d.text, "origin": d.origin}, ensure_ascii=False) + "\n" for d in held_docs
        ).encode("utf-8"))
    storage.write_bytes(storage.join(out_uri, BUILD_REPORT),
                        json.dumps(result, indent=1, ensure_ascii=False).encode("utf-8"))
    log.info("vocab build: %d pieces written to %s", len(pieces), out_uri)
    return result
