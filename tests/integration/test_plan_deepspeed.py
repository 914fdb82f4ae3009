"""The planner's model-state bytes against a real DeepSpeed engine (CPU, gloo, 2 processes).

Each case starts two processes that build a tiny LLaMA, wrap it with `deepspeed.initialize`
(ZeRO 0-3, fp32 or bf16), take one optimizer step and report, per rank, the bytes of the weights
(ZeRO-3: the rank's partition), the fp32 master copy the optimizer steps on and AdamW's
exp_avg/exp_avg_sq. Gradients are freed by DeepSpeed after the step; the unit tests check them
against a plain AdamW step. The first run JIT-builds DeepSpeed's CPU communication op (~1 min).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.plan.memory import model_state_bytes
from orchestrator.plan.model_shape import ModelShape

pytestmark = pytest.mark.integration

SHAPE = ModelShape("ds-tiny", 64, 160, 2, 4, 2, 256)
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = [(stage, bf16) for stage in (0, 1, 2, 3) for bf16 in (False, True)]


def _worker(rank: int, port: int, out: str) -> None:
    """One rank: every case in turn (imports and the process group paid once); writes `out`.<rank>."""
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD))
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {f"{stage}-{int(bf16)}": _measure(stage, bf16) for stage, bf16 in CASES}
    with open(f"{out}.{rank}", "w") as handle:
        json.dump(results, handle)
    dist.destroy_process_group()


def _measure(stage: int, bf16: bool) -> dict[str, int]:
    """Engine, one step, bytes of what this rank keeps."""
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=SHAPE.vocab_size, hidden_size=SHAPE.hidden_size, intermediate_size=SHAPE.intermediate_size,
        num_hidden_layers=SHAPE.num_layers, num_attention_heads=SHAPE.num_heads,
        num_key_value_heads=SHAPE.num_kv_heads,
    ))
    config = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": WORLD,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "bf16": {"enabled": bf16}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config,
                                      dist_init_required=False)
    ids = torch.randint(0, SHAPE.vocab_size, (1, 16))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)
    params = list(engine.module.parameters())
    own = {p.data_ptr() for p in params}
    weights = nbytes(p.ds_tensor for p in params) if stage == 3 else nbytes(params)
    if stage == 3:
        master = nbytes(wrapper.fp32_partitioned_groups_flat)
    else:
        master = nbytes(p for group in inner.param_groups for p in group["params"] if p.data_ptr() not in own)
    states = nbytes(t for s in inner.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq"))
    engine.destroy()
    return {"weights": weights, "master": master, "optimizer": states}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> list[dict]:
    """Per rank: case -> bytes, from one two-process run over all cases."""
    out = str(tmp_path_factory.mktemp("plan-deepspeed") / "bytes")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(
        [sys.executable, __file__, str(_free_port()), out], env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(WORLD)]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage, bf16", CASES, ids=[f"zero{z}-{'bf16' if b else 'fp32'}" for z, b in CASES])
def test_model_states_equal_deepspeed_engine(measured, stage, bf16):
    planned = model_state_bytes(
        SHAPE.total_params, largest_module_params=SHAPE.largest_module_params, zero_stage=stage,
        gpus_per_node=WORLD, precision="bf16" if bf16 else "fp32",
    )
    for per_rank in measured:
        rank = per_rank[f"{stage}-{int(bf16)}"]
        # DeepSpeed pads flat partitions to an alignment; allow that much.
        assert rank["weights"] == pytest.approx(planned.weights, rel=0.01), rank
        assert rank["master"] == pytest.approx(planned.master, rel=0.01), rank
        assert rank["optimizer"] == pytest.approx(planned.optimizer, rel=0.01), rank


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=WORLD, join=True)
