"""Shared fixtures for the fast unit tests (no Ray, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def minimind_tokenizer(shared_data):
    """The minimind byte-level BPE tokenizer (vocab 6,400, with a Jinja chat template)."""
    from orchestrator.model.loading import load_tokenizer

    return load_tokenizer(str(shared_data / "tokenizers" / "minimind"))


@pytest.fixture(scope="session")
def small_tokenizer():
    """A tiny byte-level BPE tokenizer trained in-process (chatml special tokens, eos=<|im_end|>)."""
    from orchestrator.model.loading import train_bpe_tokenizer

    texts = [
        "The patient has a fever and a cough.",
        "Drink water, rest, and see a doctor if the fever lasts.",
        "发烧时应该多喝水，注意休息。",
        "合同是民事主体之间设立、变更、终止民事法律关系的协议。",
        "What should I do about a headache?",
    ] * 20
    return train_bpe_tokenizer(texts, vocab_size=300)
