"""How close the planner is: activations against a real model, the 7B table against published tables.

    .venv/bin/python bench/plan_accuracy.py [--hidden 512] [--layers 4] [--seq 512] [--batch 2]

1. Builds a LLaMA of the given size on CPU and counts the bytes autograd keeps for backward
   (a saved-tensors hook, unique storages, parameters excluded) for full fine-tuning, LoRA (with
   and without dropout), freeze tuning and gradient checkpointing, in bf16 and fp32, SDPA and
   eager attention; prints them beside the planner's estimate and Korthikanti et al.'s GPT-layer
   formula sbh(34 + 5as/h) for reference.
2. Regenerates the 7B row set of the requirements table (1 GPU, micro-batch 1 x 1024 tokens,
   gradient checkpointing) and prints it beside the published LLaMA-Factory numbers.
Writes bench/results/plan.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from orchestrator.plan.memory import activation_bytes, korthikanti_layer_bytes  # noqa: E402
from orchestrator.plan.model_shape import MethodSpec, ModelShape, preset_shape  # noqa: E402
from orchestrator.plan.planner import requirements_table  # noqa: E402

PUBLISHED_7B_GB = {  # LLaMA-Factory README "Hardware Requirement" (freeze: 20GB in older versions)
    "Full (fp32 weights, 16-bit AMP)": "120",
    "Full (bf16 mixed, fp32 master; DeepSpeed)": "120",
    "Full (pure bf16)": "60",
    "Freeze (last 2 layers, bf16 mixed)": "16-20",
    "LoRA r=8 all linear (bf16)": "16",
    "QLoRA r=8 (8-bit base)": "10",
    "QLoRA r=8 (4-bit NF4 base)": "6",
}


def saved_bytes(shape: ModelShape, method: MethodSpec, dtype: torch.dtype, attn: str, checkpointing: bool,
                seq: int, batch: int) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, attn_implementation=attn,
    ))
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if method.kind == "lora":
        from peft import LoraConfig, get_peft_model

        if checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=method.lora_rank, lora_dropout=method.lora_dropout,
                                                 target_modules=list(method.lora_targets)))
    elif method.kind == "freeze":
        first = shape.num_layers - method.freeze_trainable_layers
        for name, param in model.named_parameters():
            param.requires_grad = any(f"layers.{i}." in name for i in range(first, shape.num_layers))
    model = model.to(dtype).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, shape.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    heads = max(1, args.hidden // 64)
    shape = ModelShape("bench", args.hidden, int(args.hidden * 2.6875), args.layers, heads, max(1, heads // 4), 32000)
    cases = [
        ("full", MethodSpec(kind="full"), torch.bfloat16, "sdpa", False),
        ("full fp32", MethodSpec(kind="full"), torch.float32, "sdpa", False),
        ("full eager", MethodSpec(kind="full"), torch.bfloat16, "eager", False),
        ("full ckpt", MethodSpec(kind="full"), torch.bfloat16, "sdpa", True),
        ("lora r16", MethodSpec(kind="lora", lora_rank=16, lora_dropout=0.0), torch.bfloat16, "sdpa", False),
        ("lora r16 dropout", MethodSpec(kind="lora", lora_rank=16, lora_dropout=0.05), torch.bfloat16, "sdpa", False),
        ("lora ckpt", MethodSpec(kind="lora", lora_rank=16), torch.bfloat16, "sdpa", True),
        ("freeze 1", MethodSpec(kind="freeze", freeze_trainable_layers=1), torch.bfloat16, "sdpa", False),
    ]
    rows = []
    print(f"LLaMA h={shape.hidden_size} I={shape.intermediate_size} L={shape.num_layers} a={heads} "
          f"kv={shape.num_kv_heads} V={shape.vocab_size}, {args.batch} x {args.seq} tokens (CPU, saved tensors)")
    print(f"{'case':<20}{'measured MiB':>14}{'planned MiB':>13}{'ratio':>8}")
    for name, method, dtype, attn, ckpt in cases:
        start = time.perf_counter()
        real = saved_bytes(shape, method, dtype, attn, ckpt, args.seq, args.batch)
        plan = activation_bytes(shape, method, seq_len=args.seq, micro_batch=args.batch,
                                activation_bytes_per_element=dtype.itemsize, attention=attn,
                                gradient_checkpointing=ckpt, on_gpu=False).saved
        rows.append({"case": name, "measured_bytes": real, "planned_bytes": plan, "ratio": plan / real,
                     "seconds": round(time.perf_counter() - start, 2)})
        print(f"{name:<20}{real / 2**20:>14.1f}{plan / 2**20:>13.1f}{plan / real:>8.3f}")
    reference = korthikanti_layer_bytes(args.seq, args.batch, shape.hidden_size, heads) * shape.num_layers
    print(f"Korthikanti GPT-layer formula x {shape.num_layers} layers (16-bit, with dropout, eager softmax): "
          f"{reference / 2**20:.1f} MiB")

    table = requirements_table((preset_shape("7b"),), seq_len=1024, micro_batch=1, gradient_checkpointing=True)
    anchors = []
    print("\nLLaMA-2-7B, 1 GPU, micro-batch 1 x 1024 tokens, gradient checkpointing")
    print(f"{'method':<44}{'ours GB':>9}{'published GB':>14}")
    for row, (value,) in zip(table.rows, table.bytes):
        published = PUBLISHED_7B_GB[row.label]
        anchors.append({"method": row.label, "ours_gb": round(value / 1e9, 1), "published_gb": published})
        print(f"{row.label:<44}{value / 1e9:>9.1f}{published:>14}")
    out = ROOT / "bench" / "results" / "plan.json"
    out.write_text(json.dumps({"shape": shape.__dict__, "seq": args.seq, "batch": args.batch,
                               "activations": rows, "table_7b": anchors}, indent=1) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
