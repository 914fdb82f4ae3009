"""Shared fixtures for the fast unit tests (no Ray, no network)."""

from __future__ import annotations

import os
import socket
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def process_group():
    """A gloo group of one process (DeepSpeed needs torch.distributed), torch threads restored after.

    One per session: DeepSpeed keeps the first group it saw, so a second group in the same process breaks it.
    """
    import torch
    import torch.distributed as dist

    saved_env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    threads = torch.get_num_threads()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    torch.set_num_threads(threads)
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
