"""The distributed prepare at scale (#17): driver and worker memory, cold and warm time, against `datasets.map`.

Generates stage-1 corpora from ../shared/data text (every non-empty line of the shared pretrain files,
shuffled with a seed and written repeatedly into 8 MB .txt files) at the sizes asked for, then on a local
Ray cluster of this machine's cores:

* cold prepare (`prepare_stage_shards`, minimind tokenizer, blocks of 1024, no held-out split): wall time,
  tokens/s, the driver's peak RSS and the peak RSS of the largest Ray worker (sampled every 0.2 s);
* warm prepare (the same call again: the cached set is found, nothing is prepared);
* `datasets.map(num_proc=2, batched=True)` on the same files (tokenize + EOS, then concatenate and chunk).

    python bench/prepare_scale.py 50 200 1000     # sizes in MB; results in bench/results/prepare_scale.json
    (BENCH_HF_UP_TO_MB=200: the baseline runs up to that size; BENCH_TOKENIZER_ACTORS=1: one tokenizer actor)
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from orchestrator.config import DataConfig, DataSourceConfig, PrepareConfig  # noqa: E402
from orchestrator.data.prepare_ray import prepare_stage_shards  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
TOKENIZER = SHARED / "tokenizers" / "minimind"
BLOCK_SIZE = 1024
FILE_MB = 8
NUM_PROC = 2


def make_corpus(size_mb: int, into: Path, seed: int = 0) -> list[str]:
    """Shuffled shared lines written into FILE_MB files until `size_mb` MB."""
    lines = [line.strip() for path in sorted((SHARED / "pretrain").rglob("*")) if path.is_file()
             for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    into.mkdir(parents=True, exist_ok=True)
    files, written, pending = [], 0, []
    while written < size_mb * 2**20:
        rng.shuffle(lines)
        pending.append("\n".join(lines) + "\n")
        data = "".join(pending).encode("utf-8")
        if len(data) >= FILE_MB * 2**20 or written + len(data) >= size_mb * 2**20:
            path = into / f"part-{len(files):04d}.txt"
            path.write_bytes(data)
            files.append(str(path))
            written += len(data)
            pending = []
    return files


class WorkerMemory:
    """Peak RSS of every Ray worker process (descendants of this driver named ray::...), sampled."""

    def __init__(self) -> None:
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "WorkerMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        me = psutil.Process(os.getpid())
        while not self._stop.is_set():
            for proc in me.children(recursive=True):
                try:
                    name = (proc.cmdline() or [""])[0]
                    if name.startswith("ray::"):
                        key = f"{name} {proc.pid}"
                        self.peak[key] = max(self.peak.get(key, 0), proc.memory_info().rss)
                except psutil.Error:
                    continue
            time.sleep(0.2)

    def largest(self) -> tuple[str, int]:
        return max(self.peak.items(), key=lambda kv: kv[1]) if self.peak else ("", 0)


def hf_map(files: list[str]) -> tuple[float, int]:
    """Seconds and tokens of the usual `datasets` recipe (bench/data_prep.py's), from a fresh cache directory (run
    in a child process, so the driver's peak RSS is the prepare's alone)."""
    import datasets

    from data_prep import hf_datasets
    from orchestrator.model.loading import load_tokenizer

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    seconds, _, tokens = hf_datasets(load_tokenizer(str(TOKENIZER)), files, block_size=BLOCK_SIZE, num_proc=NUM_PROC)
    return seconds, tokens


def measure(size_mb: int, work: Path, prepare: PrepareConfig) -> dict:
    corpus = work / f"corpus-{size_mb}"
    files = make_corpus(size_mb, corpus)
    data = DataConfig(sources=[DataSourceConfig(path=str(corpus), text_unit="line")], block_size=BLOCK_SIZE,
                      eval_split=0.0, prepare=prepare)
    out = str(work / f"data-{size_mb}")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with WorkerMemory() as workers:
        started = time.perf_counter()
        cold = prepare_stage_shards("pretrain", data, str(TOKENIZER), str(TOKENIZER), out)
        cold_s = time.perf_counter() - started
    driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    warm = prepare_stage_shards("pretrain", data, str(TOKENIZER), str(TOKENIZER), out)
    warm_s = time.perf_counter() - started
    assert warm.reused and not cold.reused
    tokens = cold.stats["train_tokens"] + cold.stats["dropped_tail_tokens"]
    hf_s, hf_tokens = float("nan"), 0
    if size_mb <= int(os.environ.get("BENCH_HF_UP_TO_MB", 200)):
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(1) as pool:
            hf_s, hf_tokens = pool.apply(hf_map, (files,))
    name, worker_peak = workers.largest()
    row = {"size_mb": size_mb, "files": len(files), "units": len(cold.manifest.part("train")),
           "tokens": tokens, "hf_tokens": hf_tokens, "cold_s": round(cold_s, 2),
           "cold_tokens_per_s": round(tokens / cold_s), "warm_s": round(warm_s, 3),
           "warm_speedup": round(cold_s / warm_s, 1), "hf_map_s": round(hf_s, 2) if hf_tokens else None,
           "hf_tokens_per_s": round(hf_tokens / hf_s) if hf_tokens else None,
           "cold_vs_hf": round(hf_s / cold_s, 2) if hf_tokens else None,
           "driver_peak_rss_gb": round(driver_peak / 2**30, 3), "driver_rss_before_gb": round(rss_before / 2**30, 3),
           "driver_received_bytes": cold.driver_bytes, "largest_worker_rss_gb": round(worker_peak / 2**30, 3),
           "largest_worker": name.split(" ")[0], "packed_share": cold.stats["packed_share"],
           "load_average": os.getloadavg()}
    print(json.dumps(row), flush=True)
    shutil.rmtree(corpus, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return row


def main(sizes: list[int]) -> None:
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    cpus = os.cpu_count() or 2
    env = {"TOKENIZERS_PARALLELISM": os.environ["BENCH_TOKENIZERS_PARALLELISM"]} if "BENCH_TOKENIZERS_PARALLELISM" in os.environ else {}
    ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=str(work / "ray"), log_to_driver=False,
             runtime_env={"env_vars": env})
    actors = int(os.environ.get("BENCH_TOKENIZER_ACTORS", cpus))
    # The actors and one read task together hold this machine's CPUs (a read task alone is light).
    prepare = PrepareConfig(unit_mb=FILE_MB, tokenizer_actors=actors,
                            cpus_per_actor=float(os.environ.get("BENCH_ACTOR_CPUS", (cpus - 0.5) / actors)),
                            cpus_per_read_task=float(os.environ.get("BENCH_READ_CPUS", 0.5)))
    try:
        rows = [measure(size, work, prepare) for size in sizes]
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    results = ROOT / "bench" / "results" / os.environ.get("BENCH_OUT", "prepare_scale.json")
    results.write_text(json.dumps({"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": cpus,
                                   "prepare": prepare.model_dump(), "rows": rows}, indent=1) + "\n")
    print(f"written {results}")


if __name__ == "__main__":
    main([int(size) for size in sys.argv[1:]] or [50, 200])
