"""What each rank holds right after loading the base under ZeRO-3: partitioned loading vs whole loading.

    .venv/bin/python bench/zero3_loading.py [--hidden 1024] [--layers 12] [--world 2] [--gpu]

Saves a tiny-LLaMA base of a few hundred MB (fp32 safetensors) once, then for each mode starts `--world`
processes on the gloo backend (torch.multiprocessing, 127.0.0.1) that load it exactly as the stage recipe does
(`train.model_setup.build_training_model`, inside `zero3_partitioned_loading` for the partitioned mode) and then
run `deepspeed.initialize` under ZeRO-3. Per rank, after loading and before `deepspeed.initialize`: parameter
bytes materialised on the rank (a partition's `ds_tensor`, or the whole tensor) and the process's anonymous
resident memory (RssAnon: private memory; the mapped safetensors file is file-backed and shared between ranks);
after `deepspeed.initialize`: RssAnon and the process's peak RSS. Each mode runs in fresh processes, twice:
with glibc's default allocator settings, and with MALLOC_MMAP_THRESHOLD_=131072 (a fixed threshold: freed
per-layer buffers go back to the system; by default glibc raises the threshold after the first large free and
keeps later ones in its heap, which shows as RssAnon that no tensor holds).
Goal (#18): partitioned bytes per rank <= 0.6x the whole model with 2 ranks. Writes
bench/results/zero3_loading.json.

With --gpu (bench/gpu_check.sh, one rank per GPU, NCCL, bf16) each rank also records the peak GPU memory
(torch.cuda.max_memory_allocated) of loading and of `deepspeed.initialize`; goal: partitioned <= model bytes /
GPUs + one decoder layer + buffers (whole loading moves the whole module to the GPU first). Writes
bench/results/zero3_loading_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL_RATIO = 0.6
MIB = 2**20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def make_base(out_dir: Path, hidden: int, layers: int) -> int:
    """A random tiny-LLaMA base (fp32, safetensors) and its tokenizer in `out_dir`; its parameter count."""
    from orchestrator.config import TinyModelConfig
    from orchestrator.model.loading import create_tiny_model, load_tokenizer

    tokenizer = load_tokenizer(str(ROOT.parent / "shared" / "data" / "tokenizers" / "minimind"))
    tiny = TinyModelConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                           num_attention_heads=max(hidden // 64, 1), max_position_embeddings=512)
    model = create_tiny_model(tiny, tokenizer, seed=0)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def rank_main(rank: int, world: int, port: int, base: str, partitioned: bool, out: str, gpu: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)
    import deepspeed

    from orchestrator.config import DistributedConfig, ModelConfig, TrainConfig
    from orchestrator.model.loading import full_numel, load_tokenizer
    from orchestrator.train.deepspeed_config import build_deepspeed_config
    from orchestrator.train.model_setup import build_training_model, zero3_partitioned_loading

    precision = "bf16" if gpu else "fp32"
    train = TrainConfig(method="full", micro_batch_size=1, precision=precision)
    ds_config = build_deepspeed_config(train, DistributedConfig(num_workers=world, zero_stage=3, use_gpu=gpu), world,
                                       precision)
    anon_before = proc_status_kib("RssAnon")
    keep_alive = zero3_partitioned_loading(ds_config, gpu) if partitioned else None
    tokenizer = load_tokenizer(base)
    model = build_training_model(ModelConfig(base=base), train, base, tokenizer, base, precision, 10)
    params = list(model.parameters())
    local = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size() for p in params)
    whole = sum(full_numel(p) * p.element_size() for p in params)
    row = {"rank": rank, "param_bytes_on_rank": local, "model_bytes": whole,
           "born_partitioned": all(hasattr(p, "ds_id") for p in params),
           "rss_anon_load_mib": (proc_status_kib("RssAnon") - anon_before) / 1024,
           "rss_file_after_load_mib": proc_status_kib("RssFile") / 1024}
    if gpu:
        layer = model.model.layers[0]
        row["one_layer_bytes"] = sum(full_numel(p) * p.element_size() for p in layer.parameters())
        row["gpu_peak_load_mib"] = torch.cuda.max_memory_allocated() / MIB
        torch.cuda.reset_peak_memory_stats()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in params if p.requires_grad],
                                      config=ds_config)
    row["rss_anon_after_initialize_mib"] = (proc_status_kib("RssAnon") - anon_before) / 1024
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if gpu:
        row["gpu_peak_initialize_mib"] = torch.cuda.max_memory_allocated() / MIB
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(row, handle)
    dist.barrier()
    del engine, keep_alive
    dist.destroy_process_group()


def run_mode(base: str, world: int, partitioned: bool, mmap_threshold: int | None, gpu: bool = False) -> list[dict]:
    """One mode's ranks, started fresh (spawned processes read the allocator's environment at start)."""
    import torch.multiprocessing as mp

    saved = os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap_threshold is not None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    try:
        with tempfile.TemporaryDirectory(prefix="zero3-loading-") as out:
            mp.spawn(rank_main, args=(world, free_port(), base, partitioned, out, gpu), nprocs=world, join=True)
            return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]
    finally:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        if saved is not None:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def memory_rows(rows: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Per mode, the largest rank's figure of each host-memory measure."""
    return {measure: {mode: max(r[measure] for r in rows[mode]) for mode in rows}
            for measure in ("rss_anon_load_mib", "rss_anon_after_initialize_mib", "peak_rss_mib")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="one rank per GPU (--world: the GPU count), NCCL, bf16")
    args = parser.parse_args()
    if args.gpu:
        return gpu_main(args)
    with tempfile.TemporaryDirectory(prefix="zero3-base-") as base:
        parameters = make_base(Path(base), args.hidden, args.layers)
        modes = ("whole", "partitioned")
        rows = {mode: run_mode(base, args.world, mode == "partitioned", None) for mode in modes}
        fixed = {mode: run_mode(base, args.world, mode == "partitioned", 131072) for mode in modes}
    model_bytes = rows["whole"][0]["model_bytes"]
    per_rank = {mode: max(r["param_bytes_on_rank"] for r in rows[mode]) for mode in rows}
    result = {
        "parameters": parameters, "model_mib": model_bytes / MIB, "world": args.world,
        "param_mib_per_rank": {mode: per_rank[mode] / MIB for mode in rows},
        "ratio_partitioned_to_whole_model": per_rank["partitioned"] / model_bytes,
        "goal_ratio": GOAL_RATIO,
        "meets_goal": per_rank["partitioned"] / model_bytes <= GOAL_RATIO,
        "host_memory_default_allocator": memory_rows(rows),
        "host_memory_malloc_mmap_threshold_131072": memory_rows(fixed),
        "ranks": rows,
        "ranks_malloc_mmap_threshold_131072": fixed,
    }
    out = ROOT / "bench" / "results" / "zero3_loading.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("ranks")}, indent=2))


def gpu_main(args: argparse.Namespace) -> None:
    """Peak GPU memory of loading and deepspeed.initialize under ZeRO-3, whole vs partitioned loading."""
    with tempfile.TemporaryDirectory(prefix="zero3-base-") as base:
        parameters = make_base(Path(base), args.hidden, args.layers)
        rows = {mode: run_mode(base, args.world, mode == "partitioned", None, gpu=True)
                for mode in ("whole", "partitioned")}
    first = rows["partitioned"][0]
    model_mib = first["model_bytes"] / MIB  # in the load dtype (bf16)
    peaks = {mode: {"load": max(r["gpu_peak_load_mib"] for r in rows[mode]),
                    "initialize": max(r["gpu_peak_initialize_mib"] for r in rows[mode])} for mode in rows}
    bound = model_mib / args.world + first["one_layer_bytes"] / MIB
    # deepspeed.initialize also creates the fp32 master partition and Adam's two moments: 12 bytes per parameter
    # over the ranks, whatever the loading.
    optimizer_mib = parameters * 12 / args.world / MIB
    result = {"parameters": parameters, "world": args.world, "model_mib_bf16": model_mib,
              "gpu_peak_mib": peaks, "partitioned_load_bound_mib_without_buffers": bound,
              "load_meets_bound": peaks["partitioned"]["load"] <= bound * 1.1,
              "optimizer_states_mib_per_rank": optimizer_mib, "ranks": rows}
    out = ROOT / "bench" / "results" / "zero3_loading_gpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "ranks"}, indent=2))


if __name__ == "__main__":
    main()
