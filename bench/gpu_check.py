"""GPU check (run on a lent GPU machine, never in CI): our training path on one GPU vs the planner.

    python bench/gpu_check.py            # or: bash bench/gpu_check.sh

Trains a ~1B-parameter LLaMA-shaped model (random init) for a few steps through the real path
(Ray Train, 1 worker, DeepSpeed ZeRO-0, bf16), full fine-tuning and LoRA, on the demo data in
examples/data, and records tokens/s, MFU against the H100/H200 bf16 dense peak and
torch.cuda.max_memory_allocated next to `orchestrator plan`'s estimate. Writes
bench/results/gpu.json (read by bench/run_all.py).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = float(os.environ.get("PEAK_TFLOPS", "989"))  # H100/H200 SXM dense bf16


def main() -> int:
    import ray
    import torch

    from orchestrator.config import config_from_dict
    from orchestrator.plan.planner import plan_stage
    from orchestrator.train.metrics_log import read_metrics
    from orchestrator.train.pipeline import logs_dir, run_stage

    if not torch.cuda.is_available():
        print("no GPU: this check runs on a GPU machine only")
        return 1
    out = Path(os.environ.get("OUT", tempfile.mkdtemp(prefix="gpu-check-")))
    ray.init(num_gpus=1, num_cpus=8, include_dashboard=False, log_to_driver=True)
    rows = []
    for method in ("full", "lora"):
        tree = {
            "run_name": f"gpu-{method}",
            "model": {"tiny": {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 16,
                               "num_attention_heads": 16, "max_position_embeddings": 1024}},
            "tokenizer": {"train": {"vocab_size": 8000}},
            "distributed": {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 4, "zero_stage": 0},
            "checkpoint": {"storage_path": str(out / "runs"), "at_epoch_end": False},
            "eval": {"at_start": False},
            "plan": {"gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
                     "gpus_per_node": 1, "peak_tflops": PEAK_TFLOPS},
            "pretrain": {
                "data": {"sources": [{"path": str(ROOT / "examples" / "data")}], "block_size": 1024,
                         "eval_split": 0},
                "train": {"method": method, "precision": "bf16", "epochs": 4, "micro_batch_size": 2,
                          "gradient_checkpointing": True, "log_every_n_steps": 1, "learning_rate": 1e-4},
            },
        }
        config = config_from_dict(tree)
        plan = plan_stage(config, "pretrain")
        run_stage(config, "pretrain")
        windows = [r for r in read_metrics(logs_dir(config, "pretrain")) if "tokens_per_s" in r][2:]
        tokens_per_s = sorted(r["tokens_per_s"] for r in windows)[len(windows) // 2]
        measured = max(r.get("gpu_max_memory_gib", 0) for r in windows)
        flops = plan.throughput.flops_per_token
        flops_per_token = flops.forward + flops.backward + flops.recompute
        rows.append({
            "method": method,
            "parameters": plan.counts.total,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops_per_token / (PEAK_TFLOPS * 1e12),
            "max_memory_allocated_gib": measured,
            "planned_gib": plan.memory.total / 2**30,
            "plan_error": (plan.memory.total / 2**30 - measured) / measured if measured else None,
        })
        print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "gpu.json").write_text(json.dumps({"device": torch.cuda.get_device_name(0),
                                                                      "rows": rows}, indent=1))
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
