"""Shared fixtures for the fast unit tests (no Ray, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real data next to the project; fail in CI when it is missing, else skip."""
    if not SHARED_DATA.is_dir() or not (SHARED_DATA / "SOURCES.md").is_file():
        message = f"shared test data not found at {SHARED_DATA}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: the data is required)")
        pytest.skip(message)
    return SHARED_DATA


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
