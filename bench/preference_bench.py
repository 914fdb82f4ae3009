"""Stage 3 throughput: training tokens/s of a DPO step vs an SFT step over the same answer tokens and model.

`python bench/preference_bench.py` (no Ray: the worker recipe runs in this process on a one-process gloo
group, LocalTrainContext). Data: the first 48 pairs of ../shared/data/preference/dpo_zh_500.jsonl
(max_length 160, the minimind tokenizer's chat template). Model: a random LLaMA (hidden 256, 4 layers),
full fine-tuning, fp32, ZeRO-0, one epoch, micro-batches of 4 pairs.

* SFT baseline: every pair's chosen and rejected sequences as 2 SFT examples (micro-batch 8 rows), so both
  runs push the same sequences through forward + backward;
* DPO, live reference: + a frozen reference forward of those sequences (physical ratio ~0.75);
* DPO, precomputed reference: the reference pass runs once before the first step (timed apart; not in the
  step throughput), the steps then have no reference forward (physical ratio ~1.0).

Tokens/s is the recipe's own `tokens_per_s_run` (all sequence tokens, from the first step to the end of the
epoch). Runs alternate, REPEATS times; medians are compared. Results: bench/results/preference.json.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from orchestrator.config import (  # noqa: E402
    CheckpointConfig,
    DataSourceConfig,
    DistributedConfig,
    EvalConfig,
    ModelConfig,
    PreferenceTrainConfig,
    TinyModelConfig,
    TrainConfig,
)
from orchestrator.data.preference import as_pairs, encode_pairs, load_preference_records  # noqa: E402
from orchestrator.data.templates import select_template  # noqa: E402
from orchestrator.model.loading import create_tiny_model, load_tokenizer  # noqa: E402
from orchestrator.train.context import LocalShard, LocalTrainContext  # noqa: E402
from orchestrator.train.metrics_log import read_metrics  # noqa: E402
from orchestrator.train.recipe import WorkerPlan, run_recipe  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
PAIRS, MAX_LENGTH, PAIRS_PER_BATCH, REPEATS = 48, 160, 4, 2
GOALS = {"dpo_live": 0.65, "dpo_precomputed": 0.9}


def _process_group() -> None:
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)


def _data(tokenizer) -> tuple[list[dict], list[dict]]:
    records, _ = load_preference_records([DataSourceConfig(path=str(SHARED / "preference" / "dpo_zh_500.jsonl"),
                                                           max_records=PAIRS)])
    columns = encode_pairs(as_pairs(records), tokenizer, select_template("auto", tokenizer), MAX_LENGTH)
    pairs = [{name: columns[name][i] for name in columns} for i in range(PAIRS)]
    sft = [{"input_ids": p[f"{side}_input_ids"], "labels": p[f"{side}_labels"]}
           for p in pairs for side in ("chosen", "rejected")]
    return pairs, sft


def _run(root: Path, base: Path, name: str, train: TrainConfig, rows: list[dict], stage: str) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    plan = WorkerPlan(
        stage=stage, model=ModelConfig(base=str(base)), train=train,
        distributed=DistributedConfig(num_workers=1, zero_stage=0, cpus_per_worker=torch.get_num_threads()),
        checkpoint=CheckpointConfig(at_epoch_end=False), eval=EvalConfig(at_start=False),
        base_model=str(base), tokenizer=str(base),
        train_rows=len(rows),
        stage_uri=str(run_dir / stage), logs_dir=str(run_dir / "logs"), logs_into_checkpoints=False,
        has_eval=False, reference_logps_uri=str(run_dir / "reference.json"),
    )
    (run_dir / stage).mkdir()
    context = LocalTrainContext(storage_dir=str(run_dir / stage),
                                shards={"train": LocalShard(rows), "reference": LocalShard(rows)})
    started = time.perf_counter()
    run_recipe(plan, context)
    wall = time.perf_counter() - started
    end = [r for r in read_metrics(str(run_dir / "logs")) if "tokens_per_s_run" in r][-1]
    return {"tokens_per_s": end["tokens_per_s_run"], "wall_s": wall}


def main() -> None:
    torch.set_num_threads(2)
    _process_group()
    root = Path(tempfile.mkdtemp(prefix="preference-bench-"))
    tokenizer = load_tokenizer(str(SHARED / "tokenizers" / "minimind"))
    base = root / "base"
    create_tiny_model(TinyModelConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=4, max_position_embeddings=512), tokenizer, seed=0
                      ).save_pretrained(base)
    tokenizer.save_pretrained(base)
    pairs, sft_rows = _data(tokenizer)
    common = dict(method="full", learning_rate=1e-4, epochs=1, warmup_steps=0, log_every_n_steps=1000,
                  precision="fp32")
    runs = {
        "sft": lambda: _run(root, base, "sft", TrainConfig(micro_batch_size=2 * PAIRS_PER_BATCH, **common),
                            sft_rows, "sft"),
        "dpo_live": lambda: _run(root, base, "live", PreferenceTrainConfig(micro_batch_size=PAIRS_PER_BATCH, **common),
                                 pairs, "preference"),
        "dpo_precomputed": lambda: _run(root, base, "pre", PreferenceTrainConfig(
            micro_batch_size=PAIRS_PER_BATCH, precompute_reference=True, **common), pairs, "preference"),
    }
    measured: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(REPEATS):
        for name, run in runs.items():
            measured[name].append(run())
    medians = {name: statistics.median(m["tokens_per_s"] for m in values) for name, values in measured.items()}
    rows = []
    for name, goal in GOALS.items():
        ratio = medians[name] / medians["sft"]
        rows.append({"row": name, "tokens_per_s": medians[name], "sft_tokens_per_s": medians["sft"],
                     "ratio": ratio, "goal": f">= {goal}", "met": ratio >= goal})
    precomputed_wall = statistics.median(m["wall_s"] for m in measured["dpo_precomputed"])
    live_wall = statistics.median(m["wall_s"] for m in measured["dpo_live"])
    result = {"rows": rows, "runs": measured, "pairs": PAIRS, "max_length": MAX_LENGTH,
              "wall_s": {"dpo_live": live_wall, "dpo_precomputed_incl_pass": precomputed_wall}}
    out = ROOT / "bench" / "results" / "preference.json"
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print("| row | tokens/s | SFT tokens/s | ratio | goal | met |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['row']} | {row['tokens_per_s']:.0f} | {row['sft_tokens_per_s']:.0f} | {row['ratio']:.2f} | "
              f"{row['goal']} | {'yes' if row['met'] else 'no'} |")
    print(f"wall per run (median): live {live_wall:.1f} s, precomputed incl. its pass {precomputed_wall:.1f} s")


if __name__ == "__main__":
    main()
