"""Measure 3: stage-1 data preparation throughput, ours vs Hugging Face `datasets.map`.

Ours: `prepare_stage_data("pretrain", ...)` on all of ../shared/data/pretrain (legal, medical,
english; one document per non-empty line), block_size 256, no held-out split: read, validate,
tokenize, append EOS, concatenate, cut blocks. Baseline: the usual `datasets` recipe on the same
files with the same tokenizer — `load_dataset("text")`, then `map(batched=True, num_proc=2)` to
tokenize (stripping and dropping empty lines, appending EOS) and again to concatenate and chunk
(one batch per process, so at most one block is lost to the extra tail). Both run from cold
caches of their own (a fresh `datasets` cache directory each repetition), alternating, 5 times.
Both must produce the same number of blocks (±1).

A second row repeats the comparison on the corpus copied 10 times (5 repetitions): at 1 MB the
baseline's fixed cost (worker processes, Arrow cache files) is much of its time, at 10 MB much less.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rows import Row, median

from orchestrator.config import DataConfig, DataSourceConfig
from orchestrator.data.prepare import prepare_stage_data
from orchestrator.data.readers import SUPPORTED_SUFFIXES
from orchestrator.model.loading import load_tokenizer
from orchestrator.storage import expand

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOKENIZER = SHARED / "tokenizers" / "minimind"
CORPUS = SHARED / "pretrain"
BLOCK_SIZE = 256
REPEATS = 5
SCALE, SCALED_REPEATS = 10, 5
NUM_PROC = 2
GOAL = ">= 1.5"


BOUND = (
    "Since 995221c our path tokenizes through the Rust `encode_batch_fast` in batches of 2048. Timing its steps "
    "on the x10 corpus (least-loaded repetition): reading and validating 0.15 s, tokenizing 1.55 s, packing "
    "0.13 s; tokenizing is ~2.1 CPU-seconds however busy the machine, spread over both cores by the Rust "
    "tokenizer, i.e. the same tokenizer work the baseline does in its 2 processes. So at scale both paths are "
    "bound by that work and the ratio tends to 1-1.4 (and swings with other jobs' load); the large ratio on "
    "the 1 MB corpus is the baseline's fixed cost (process start, Arrow cache files). Passing 1.5x on large "
    "corpora needs less tokenizer work, not a faster loop: cache the tokenized blocks keyed by the files' "
    "sha256 (already computed for lineage), the tokenizer and block_size, so resumed runs, Tune trials and "
    "repeated stages skip tokenizing."
)


def corpus_config(corpus: Path) -> DataConfig:
    return DataConfig(sources=[DataSourceConfig(path=str(corpus), text_unit="line")], block_size=BLOCK_SIZE,
                      eval_split=0)


def ours(tokenizer: Any, corpus: Path) -> tuple[float, int, int]:
    """Seconds, blocks and tokens (before dropping the tail) of our stage-1 data path."""
    start = time.perf_counter()
    data = prepare_stage_data("pretrain", corpus_config(corpus), tokenizer)
    seconds = time.perf_counter() - start
    return seconds, data.stats["train_blocks"], data.train_tokens + data.stats["dropped_tail_tokens"]


@contextmanager
def _no_tokenizer_threads_in_children() -> Iterator[None]:
    """Forked `datasets` workers switch the Rust tokenizer's threads off anyway (with a warning each)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def hf_datasets(tokenizer: Any, files: list[str], block_size: int = BLOCK_SIZE,
                num_proc: int = NUM_PROC) -> tuple[float, int, int]:
    """Seconds, blocks and tokens of the usual `datasets` recipe (load, tokenize, chunk into blocks), from a fresh
    cache directory."""
    import datasets

    eos = tokenizer.eos_token_id

    def tokenize(batch: dict) -> dict:
        texts = [line.strip() for line in batch["text"] if line.strip()]
        return {"input_ids": [ids + [eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]}

    def chunk(batch: dict) -> dict:
        stream = list(itertools.chain.from_iterable(batch["input_ids"]))
        usable = len(stream) // block_size * block_size
        return {"input_ids": [stream[i: i + block_size] for i in range(0, usable, block_size)]}

    cache = tempfile.mkdtemp(prefix="bench-hf-")
    try:
        with _no_tokenizer_threads_in_children():
            start = time.perf_counter()
            raw = datasets.load_dataset("text", data_files=files, split="train", cache_dir=cache)
            tokenized = raw.map(tokenize, batched=True, num_proc=num_proc, remove_columns=["text"],
                                load_from_cache_file=False)
            blocks = tokenized.map(chunk, batched=True, batch_size=None, num_proc=num_proc,
                                   load_from_cache_file=False)
            seconds = time.perf_counter() - start
        return seconds, blocks.num_rows, sum(len(ids) for ids in tokenized["input_ids"])
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def scaled_copy(files: list[str], copies: int, into: Path) -> None:
    """`copies` copies of every file under distinct names (a bigger corpus of the same text)."""
    for i in range(copies):
        for path in files:
            shutil.copyfile(path, into / f"{i:02d}-{Path(path).parent.name}-{Path(path).name}")


def compare(tokenizer: Any, corpus: Path, repeats: int) -> Row:
    """Alternating repetitions on one corpus; the ratio is the baseline's median time over ours."""
    files = list(expand(str(corpus), SUPPORTED_SUFFIXES))
    ours_runs, hf_runs = [], []
    for _ in range(repeats):
        ours_runs.append(ours(tokenizer, corpus))
        hf_runs.append(hf_datasets(tokenizer, files))
    ours_s, hf_s = median([r[0] for r in ours_runs]), median([r[0] for r in hf_runs])
    (_, blocks, tokens), (_, hf_blocks, hf_tokens) = ours_runs[0], hf_runs[0]
    same = abs(blocks - hf_blocks) <= 1
    size_mb = sum(os.path.getsize(f) for f in files) / 2**20
    return Row(
        measure=f"Stage-1 data prep, {len(files)} files / {size_mb:.1f} MB / {tokens:,} tokens, blocks of "
                f"{BLOCK_SIZE}: prepare_stage_data vs datasets.map(num_proc={NUM_PROC}, batched=True)",
        ours=f"{ours_s:.2f} s = {tokens / ours_s:,.0f} tok/s ({blocks} blocks)",
        baseline=f"{hf_s:.2f} s = {hf_tokens / hf_s:,.0f} tok/s ({hf_blocks} blocks)",
        ratio=hf_s / ours_s,
        goal=GOAL,
        value=hf_s / ours_s if same else 0.0,  # a different block count fails the row whatever the speed
        bound=BOUND if same else f"block counts differ by more than 1 ({blocks} vs {hf_blocks}): the two paths "
                                 "do not prepare the same data; fix that before comparing speed.",
        details={"ours_s": [r[0] for r in ours_runs], "hf_s": [r[0] for r in hf_runs], "blocks": blocks,
                 "hf_blocks": hf_blocks, "tokens": tokens, "hf_tokens": hf_tokens},
    )


def measure() -> list[Row]:
    """The shared corpus as it is, then copied SCALE times."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    tokenizer = load_tokenizer(str(TOKENIZER))
    rows = [compare(tokenizer, CORPUS, REPEATS)]
    scaled = Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    try:
        scaled_copy(list(expand(str(CORPUS), SUPPORTED_SUFFIXES)), SCALE, scaled)
        rows.append(compare(tokenizer, scaled, SCALED_REPEATS))
        rows[-1].measure = f"(same, corpus x{SCALE}) " + rows[-1].measure
    finally:
        shutil.rmtree(scaled, ignore_errors=True)
    return rows
