"""Measures 4 and 5: rows from the other benchmark scripts' result files.

* Storage: `bench/storage_bench.py` is run fresh (about 15 s) and its storage.json read back.
* Serving: `bench/serve_bench.py` takes minutes, so serve.json is included as recorded, with the
  date the file was written.
* GPU: `bench/gpu_check.sh` runs only on a lent GPU machine; its gpu.json is included when present.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rows import Row

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"

# From profiling the current serve path on this machine (2026-11-28): a serve_bench-like load with the
# engine's generate calls logged (batch size, duration) inside the replica, py-spy on replica and proxy,
# per-process CPU over each load phase.
SERVE_P50_BOUND = (
    "At concurrency 1 the replica's own `generate` took a median 41 ms against 50 ms end to end, so each "
    "request carries a fixed ~10 ms of HTTP proxy, proxy-to-replica RPC and FastAPI (FIELD-NOTES: ~13 ms, "
    "half proxy, half RPC); during the load the replica used ~67% of a core, the proxy ~11%, the client "
    "~20%: not CPU-bound. On a 64-token answer of a tiny model (~37-45 ms in process) that fixed cost "
    "alone is 1.2-1.35x; it does not grow with the answer, so longer answers or a bigger model meet the goal. "
    "Here only a shorter request path would (a DeploymentHandle instead of HTTP for in-cluster callers)."
)
SERVE_THROUGHPUT_BOUND = (
    "Logged inside the replica at concurrency 8, generate calls alternate a batch of 7 and a batch of 1, back "
    "to back (1-2 ms between them: the engine is never idle). The 8 closed-loop clients split into 7 in step "
    "and 1 out of phase and stay split, because each group's requests come back while the other group's "
    "generate holds the engine lock. A lone 64-token decode costs about as much as a batch of 7 (each decode "
    "step is latency-bound on this model), so every round of 8 answers costs two generates (65-90 ms each "
    "there, slower than in process as the replica's event loop, the proxy and the clients share the 2 cores) "
    "against one in-process batch of 8 (54 ms). Closing it needs batches that re-merge: form the batch when "
    "the engine frees up rather than 50 ms after the first arrival, waiting for stragglers at most about one "
    "HTTP round trip, or iteration-level (continuous) batching as vLLM does; on 2 cores more replicas would "
    "not help."
)


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


def _shorten(text: str, limit: int = 70) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def _serve_code_changed_since(path: Path) -> list[str]:
    """Commits (and uncommitted edits) to the serving code newer than the recorded serve.json."""
    recorded_at = int(path.stat().st_mtime)
    done = subprocess.run(["git", "log", f"--since={recorded_at}", "--format=%h %s", "--",
                           "orchestrator/serve", "bench/serve_bench.py"],
                          cwd=BENCH.parent, capture_output=True, text=True)
    changes = [_shorten(line) for line in done.stdout.splitlines()] if done.returncode == 0 else []
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "orchestrator/serve"], cwd=BENCH.parent,
                           capture_output=True, text=True).stdout.strip()
    return changes + (["uncommitted changes in orchestrator/serve"] if dirty else [])


def serve_rows() -> list[Row]:
    """Serve vs in-process generate: p50 latency at concurrency 1 and throughput at concurrency 8."""
    path = RESULTS / "serve.json"
    if not path.exists():
        return [Row(measure="Serving (serve_bench.py)", ours="not measured (no serve.json)", baseline="",
                    ratio=None, goal="")]
    result = json.loads(path.read_text())
    recorded = f"serve_bench.py, recorded {_mtime(path)}"
    changed = _serve_code_changed_since(path)
    notes = [f"serve.json was recorded {_mtime(path)}, before these changes to the serving code: "
             f"{'; '.join(changed)}. Re-run `.venv/bin/python bench/serve_bench.py` (a few minutes) to refresh it."
             ] if changed else []
    ratios, inproc, served = result["ratios"], result["in_process"]["64"], result["serve"]
    c1, c8 = served["batching=on tokens=64 c=1"], served["batching=on tokens=64 c=8"]
    return [
        Row(measure=f"Serving p50 latency, 64 tokens, concurrency 1: Ray Serve HTTP vs in-process generate ({recorded})",
            ours=f"{c1['p50_ms']:.1f} ms", baseline=f"{inproc['p50_ms_single']:.1f} ms",
            ratio=ratios["p50_c1_64tok_serve_over_inprocess"], goal=ratios["goal_p50"], bound=SERVE_P50_BOUND,
            details={"notes": notes}),
        Row(measure=f"Serving throughput, 64 tokens, concurrency 8 (batching on) vs in-process batch of 8 ({recorded})",
            ours=f"{c8['tokens_per_s']:.0f} tok/s", baseline=f"{inproc['tokens_per_s_batch8']:.0f} tok/s",
            ratio=ratios["throughput_c8_64tok_serve_over_inprocess_batch8"], goal=ratios["goal_throughput"],
            bound=SERVE_THROUGHPUT_BOUND,
            details={"batching_off_tokens_per_s": served["batching=off tokens=64 c=8"]["tokens_per_s"]}),
    ]


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
