"""Training stall while a checkpoint goes to S3: synchronous vs asynchronous upload (checkpoint.upload).

    .venv/bin/python bench/checkpoint_stall.py [--hidden 512] [--layers 8]

Starts moto's S3 server on 127.0.0.1 and runs the same stage-1 fit twice on a local Ray cluster (1 worker,
ZeRO-0, a model of ~30 M parameters whose checkpoints are a few hundred MB), once per upload mode, with a
checkpoint every 5 steps and a metrics row per step. A checkpoint's stall is the gap between the step before it
and the step after it, less the median step; the result is the median stall of each mode and their ratio
(goal: async <= 0.2x sync). Writes bench/results/checkpoint_stall.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.config import config_from_dict  # noqa: E402
from orchestrator.layout import RunLayout  # noqa: E402
from orchestrator.train.metrics_log import read_metrics  # noqa: E402
from orchestrator.train.stage import run_stage  # noqa: E402

BUCKET = "bench"
KEYS = {"access_key_id": "bench", "secret_access_key": "bench", "region": "us-east-1"}
SHARED = ROOT.parent / "shared" / "data"
EVERY = 5
GOAL_RATIO = 0.2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stalls(records: list[dict]) -> tuple[list[float], float]:
    """(stall of each checkpoint after step k*EVERY, median step) from the per-step metrics rows."""
    steps = {}
    for record in records:
        if "train_loss" in record:
            steps.setdefault(record["step"], record["time"])
    ordered = sorted(steps)
    gaps = {s: steps[s] - steps[p] for p, s in zip(ordered, ordered[1:])}
    median_step = statistics.median(g for s, g in gaps.items() if (s - 1) % EVERY)
    return [gaps[s] - median_step for s in gaps if (s - 1) % EVERY == 0 and s > 1], median_step


def run(mode: str, endpoint: str, hidden: int, layers: int, steps_per_epoch_hint: int) -> dict:
    tree = {
        "run_name": f"stall-{mode}",
        "model": {"tiny": {"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
                           "num_attention_heads": 8, "max_position_embeddings": 256}},
        "tokenizer": {"path": str(SHARED / "tokenizers" / "minimind")},
        "distributed": {"num_workers": 1, "cpus_per_worker": 1, "zero_stage": 0},
        "checkpoint": {"storage_path": f"s3://{BUCKET}/stall", "every_n_steps": EVERY, "at_epoch_end": False,
                       "keep": 2, "upload": mode},
        "storage": {"s3": {"endpoint_url": endpoint, **KEYS}},
        "eval": {"at_start": False, "max_batches": 1},
        "pretrain": {
            "data": {"sources": [{"path": str(SHARED / "pretrain" / "legal"), "text_unit": "line",
                                  "max_records": 2 * steps_per_epoch_hint}],
                     "block_size": 64, "eval_split": 0.0},
            "train": {"method": "full", "epochs": 1, "micro_batch_size": 2, "learning_rate": 1e-4,
                      "log_every_n_steps": 1, "warmup_ratio": 0.0},
        },
    }
    config = config_from_dict(tree)
    started = time.perf_counter()
    run_stage(config, "pretrain")
    wall = time.perf_counter() - started
    found, median_step = stalls(read_metrics(RunLayout.of(config).logs("pretrain")))
    return {"mode": mode, "stalls_s": [round(s, 3) for s in found], "median_stall_s": round(statistics.median(found), 3),
            "median_step_s": round(median_step, 4), "wall_s": round(wall, 1)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (about)")
    args = parser.parse_args()

    import ray

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name=KEYS["region"], aws_access_key_id=KEYS["access_key_id"],
                     aws_secret_access_key=KEYS["secret_access_key"]).create_bucket(Bucket=BUCKET)
        ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray-stall-", dir="/tmp"))
        results = [run(mode, endpoint, args.hidden, args.layers, args.steps) for mode in ("sync", "async")]
    finally:
        ray.shutdown()
        server.terminate()
    sync, async_ = results
    ratio = async_["median_stall_s"] / sync["median_stall_s"] if sync["median_stall_s"] > 0 else float("nan")
    summary = {"sync": sync, "async": async_, "ratio_async_to_sync": round(ratio, 3), "goal": f"<= {GOAL_RATIO}",
               "met": ratio <= GOAL_RATIO}
    out = ROOT / "bench" / "results" / "checkpoint_stall.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
