"""The benchmark suite: every measure as a ratio against a baseline run in the same script.

    make bench        # or: .venv/bin/python bench/run_all.py [--only packing,data_prep,...]

Runs, in order: packing efficiency (packing.py), stage-1 data preparation vs `datasets`
(data_prep.py), checkpoint transfer vs boto3 (storage_bench.py, run fresh), training overhead of
Ray Train + DeepSpeed vs a bare PyTorch loop (train_overhead.py), serving over HTTP vs in-process
(serve_bench.py, run fresh: HF engine, and vLLM when installed), requests lost when a replica is killed
(serve_faults.py, run fresh); then the GPU check (gpu.json) when present. Writes bench/results/latest.json
and bench/results/latest.md: one row per measure with ours, baseline, ratio, goal and whether it is
met, and for every missed goal what bounds it and what would close the gap. About 10-15 minutes on
2 CPU cores (longer when other jobs load the machine).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import data_prep  # noqa: E402
import packing  # noqa: E402
import recorded  # noqa: E402
import train_overhead  # noqa: E402
from rows import Row, met_text  # noqa: E402

RESULTS = BENCH / "results"
MEASURES: dict[str, Callable[[], list[Row]]] = {
    "packing": packing.measure,
    "data_prep": data_prep.measure,
    "storage": recorded.storage_rows,
    "training": train_overhead.measure,
    "serve": recorded.serve_rows,
    "serve_faults": recorded.fault_rows,
    "gpu": recorded.gpu_rows,
}
log = logging.getLogger("bench")


def run_measure(name: str, measure: Callable[[], list[Row]]) -> tuple[list[Row], float]:
    """Rows of one measure and its seconds; a measure that crashes becomes one FAILED row, not a lost report."""
    start = time.perf_counter()
    try:
        rows = measure()
    except Exception as exc:
        log.error("%s failed:\n%s", name, traceback.format_exc())
        rows = [Row(measure=f"{name} (FAILED)", ours=f"{type(exc).__name__}: {exc}"[:300], baseline="",
                    ratio=None, goal=">= 1")]
    seconds = time.perf_counter() - start
    log.info("%s: %.0f s", name, seconds)
    return rows, seconds


def machine() -> dict[str, object]:
    """What the numbers were measured on, including how busy the machine was."""
    import torch

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "unknown"

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "torch": torch.__version__, "git": git("rev-parse", "--short", "HEAD"),
            "uncommitted_changes": bool(git("status", "--porcelain", "--", "orchestrator")),
            "load_average_start": os.getloadavg()[0]}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[Row], facts: dict[str, object]) -> str:
    """The report: the table, then what bounds every missed goal, then notes on how to read it."""
    lines = [
        "# Benchmark results",
        "",
        f"{facts['date']}, git {facts['git']}{' + uncommitted changes' if facts['uncommitted_changes'] else ''}, "
        f"{facts['cpus']} CPUs, torch {facts['torch']}; load average {facts['load_average_start']:.1f} at start, "
        f"{facts['load_average_end']:.1f} at end (other jobs share the machine); total {facts['total_s']:.0f} s.",
        "",
        "Each side is the median of its repetitions in this run. Ratios are ours over the baseline as throughput "
        "(higher is better), except serving latency (our time over the baseline's, lower is better). Packing "
        "goals apply to our share of real tokens itself; its ratio is the gain over naive batching.",
        "",
        "| measure | ours | baseline | ratio | goal | met |",
        "|---|---|---|---:|---|---|",
    ]
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        lines.append(f"| {_cell(r.measure)} | {_cell(r.ours)} | {_cell(r.baseline)} | {ratio} | {_cell(r.goal)} "
                     f"| {met_text(r.met)} |")
    missed = [r for r in rows if r.met is False]
    if missed:
        lines += ["", "## Where a goal is missed: what bounds it, what would close the gap", ""]
        lines += [f"- **{r.measure}**: {r.bound or 'no analysis recorded.'}" for r in missed]
    notes = [n for r in rows for n in r.details.get("notes", [])]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(MEASURES)}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("bench.train").setLevel(logging.INFO)
    chosen = args.only.split(",") if args.only else list(MEASURES)
    unknown = set(chosen) - set(MEASURES)
    if unknown:
        parser.error(f"unknown measures {sorted(unknown)}; choose from {', '.join(MEASURES)}")

    started = time.perf_counter()
    facts = machine()
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    for name in chosen:
        measured, seconds[name] = run_measure(name, MEASURES[name])
        rows += measured
    facts.update(load_average_end=os.getloadavg()[0], total_s=time.perf_counter() - started, seconds=seconds)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps({"machine": facts, "rows": [r.to_json() for r in rows]},
                                                    indent=1, default=str))
    report = markdown(rows, facts)
    (RESULTS / "latest.md").write_text(report)
    print(report)
    return 1 if any(r.measure.endswith("(FAILED)") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
