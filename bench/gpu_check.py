"""GPU check (run on a lent GPU machine, never in CI): our training path on one GPU vs the planner.

    python bench/gpu_check.py            # or: bash bench/gpu_check.sh

Trains a ~1B-parameter LLaMA-shaped model (random init) for a few steps through the real path
(Ray Train, 1 worker, DeepSpeed ZeRO-2 and ZeRO-3, bf16), full fine-tuning and LoRA, on the demo
data in examples/data, and records tokens/s, MFU (6·N·tokens/s over the peak bf16 throughput
measured here with a large matmul; also the planner's FLOPs-per-token MFU against that peak) and
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

def measured_peak_tflops(size: int = 8192, repeats: int = 50) -> float:
    """The GPU's bf16 matmul throughput, measured: the denominator of MFU."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def main() -> int:
    import ray
    import torch

    from orchestrator.config import config_from_dict
    from orchestrator.plan.planner import plan_stage
    from orchestrator.train.metrics_log import read_metrics
    from orchestrator.layout import RunLayout
    from orchestrator.train.stage import run_stage

    if not torch.cuda.is_available():
        print("no GPU: this check runs on a GPU machine only")
        return 1
    out = Path(os.environ.get("OUT", tempfile.mkdtemp(prefix="gpu-check-")))
    peak_tflops = measured_peak_tflops()
    print(json.dumps({"device": torch.cuda.get_device_name(0), "measured_bf16_matmul_tflops": peak_tflops}), flush=True)
    ray.init(num_gpus=1, num_cpus=8, include_dashboard=False, log_to_driver=True)
    rows = []
    for zero_stage, method in ((2, "full"), (2, "lora"), (3, "full"), (3, "lora")):
        tree = {
            "run_name": f"gpu-zero{zero_stage}-{method}",
            "model": {"tiny": {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 16,
                               "num_attention_heads": 16, "max_position_embeddings": 1024}},
            "tokenizer": {"train": {"vocab_size": 8000}},
            "distributed": {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 4, "zero_stage": zero_stage},
            "checkpoint": {"storage_path": str(out / "runs"), "at_epoch_end": False},
            "eval": {"at_start": False},
            "plan": {"gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
                     "gpus_per_node": 1, "peak_tflops": peak_tflops},
            "pretrain": {
                "data": {"sources": [{"path": str(ROOT / "examples" / "data")}], "block_size": 1024,
                         "eval_split": 0},
                "train": {"method": method, "precision": "bf16", "epochs": 3, "micro_batch_size": 2,
                          "gradient_checkpointing": True, "log_every_n_steps": 1, "learning_rate": 1e-4},
            },
        }
        config = config_from_dict(tree)
        plan = plan_stage(config, "pretrain")
        run_stage(config, "pretrain")
        windows = [r for r in read_metrics(RunLayout.of(config).logs("pretrain")) if "tokens_per_s" in r][2:]
        tokens_per_s = sorted(r["tokens_per_s"] for r in windows)[len(windows) // 2]
        measured = max(r.get("gpu_max_memory_gib", 0) for r in windows)
        flops = plan.throughput.flops_per_token
        flops_per_token = flops.forward + flops.backward + flops.recompute
        rows.append({
            "zero_stage": zero_stage,
            "method": method,
            "parameters": plan.counts.total,
            "tokens_per_s": tokens_per_s,
            "mfu_6n": 6 * plan.counts.total * tokens_per_s / (peak_tflops * 1e12),
            "mfu": tokens_per_s * flops_per_token / (peak_tflops * 1e12),
            "max_memory_allocated_gib": measured,
            "planned_gib": plan.memory.total / 2**30,
            "plan_error": (plan.memory.total / 2**30 - measured) / measured if measured else None,
        })
        print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "gpu.json").write_text(json.dumps({"device": torch.cuda.get_device_name(0),
                                                                      "peak_tflops": peak_tflops, "rows": rows},
                                                                     indent=1))
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
