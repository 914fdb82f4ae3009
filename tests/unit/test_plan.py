"""The memory and throughput planner (orchestrator.plan) against DeepSpeed's formulas, real
transformers/peft modules, real tensors after an optimizer step, and published requirement tables."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from orchestrator.config import load_config
from orchestrator.errors import ConfigError
from orchestrator.plan.memory import (
    GIB,
    activation_bytes,
    estimate_memory,
    korthikanti_layer_bytes,
    model_state_bytes,
)
from orchestrator.plan.model_shape import LAYER_LINEARS, MethodSpec, ModelShape, count_parameters, preset_shape
from orchestrator.plan.command import plan_command
from orchestrator.plan.planner import (
    TrainingSetup,
    check_fits,
    estimate_setup,
    fit_summary,
    plan_stage,
    plan_training,
    requirements_table,
    setup_for_stage,
    suggest_change,
)
from orchestrator.plan.throughput import training_flops_per_token

REPO = Path(__file__).resolve().parents[2]
TINY_YAML = REPO / "configs" / "tiny.yaml"

# Tiny LLaMA shapes: MHA, GQA, tied embeddings, explicit head_dim, biases.
SHAPES = {
    "mha": ModelShape("mha", 64, 176, 2, 4, 4, 300),
    "gqa": ModelShape("gqa", 64, 160, 3, 8, 2, 257),
    "tied": ModelShape("tied", 48, 128, 2, 4, 4, 311, tie_word_embeddings=True),
    "tied_gqa_head_dim": ModelShape("tied_gqa_head_dim", 64, 96, 2, 4, 2, 200, head_dim=24, tie_word_embeddings=True),
    "biases": ModelShape("biases", 32, 80, 2, 4, 2, 128, qkv_bias=True, o_bias=True, mlp_bias=True),
}


def _hf_model(shape: ModelShape, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.dim_per_head,
        tie_word_embeddings=shape.tie_word_embeddings,
        attention_bias=shape.qkv_bias,
        mlp_bias=shape.mlp_bias,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config)


def _peft(model, method: MethodSpec):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model,
        LoraConfig(
            r=method.lora_rank,
            lora_dropout=method.lora_dropout,
            target_modules=list(method.lora_targets),
            modules_to_save=list(method.modules_to_save) or None,
        ),
    )


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------- DeepSpeed's formulas

@pytest.mark.parametrize("params", [6_738_415_616, 1_300_000_123, 125_829_121])
@pytest.mark.parametrize("gpus_per_node, nodes", [(1, 1), (8, 1), (4, 2), (8, 4)])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_equal_deepspeed(params, gpus_per_node, nodes, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(
        total_params=params, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=offload,
        additional_buffer_factor=1.5,
    )
    ours = model_state_bytes(
        params, zero_stage=2, offload_optimizer=offload, gpus_per_node=gpus_per_node, nodes=nodes,
        precision="bf16", load_bytes_per_param=4, additional_buffer_factor=1.5,
    )
    assert abs(ours.gpu - ds_gpu) < 1  # DeepSpeed truncates to int
    if offload and nodes > 1:
        # DeepSpeed's ZeRO-2 offload formula takes all GPUs of all nodes for one node's CPU; we count the node's own.
        assert ours.cpu_per_node <= ds_cpu
    else:
        assert abs(ours.cpu_per_node - ds_cpu) < 1


@pytest.mark.parametrize(
    "params, largest", [(6_738_415_616, 131_072_000), (68_976_648_192, 262_144_000), (1_000_003, 40_001)]
)
@pytest.mark.parametrize("gpus_per_node, nodes", [(1, 1), (8, 1), (8, 2)])
@pytest.mark.parametrize("offload_optimizer, offload_params", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("zero_init", [True, False])
def test_zero3_model_states_equal_deepspeed(params, largest, gpus_per_node, nodes, offload_optimizer, offload_params,
                                            zero_init):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    ds_cpu, ds_gpu, ds_largest = estimate_zero3_model_states_mem_needs(
        total_params=params, largest_layer_params=largest, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
        cpu_offload=offload_optimizer, cpu_offload_params=offload_params, zero_init=zero_init,
        additional_buffer_factor=1.5,
    )
    ours = model_state_bytes(
        params, largest_module_params=largest, zero_stage=3, offload_optimizer=offload_optimizer,
        offload_params=offload_params, gpus_per_node=gpus_per_node, nodes=nodes, precision="bf16",
        zero_init=zero_init, load_bytes_per_param=4, additional_buffer_factor=1.5,
    )
    assert ours.gathered == ds_largest
    assert abs(ours.gpu - ds_gpu) < 1
    assert abs(ours.cpu_per_node - ds_cpu) < 1


def test_model_states_partition_only_trainable_parameters():
    """LoRA: frozen weights stay whole (ZeRO-2), states exist only for the adapter."""
    states = model_state_bytes(1_000_000, 10_000, adapter_params=10_000, zero_stage=2, gpus_per_node=4)
    assert states.weights == 2 * 990_000 and states.adapter == 2 * 10_000
    assert states.optimizer == 8 * 10_000 / 4 and states.master == 4 * 10_000 / 4
    assert states.gradients == (2 + 4) * 10_000 / 4
    zero3 = model_state_bytes(1_000_000, 10_000, adapter_params=10_000, zero_stage=3, gpus_per_node=4)
    assert zero3.weights == 2 * 990_000 / 4


# ----------------------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("name", sorted(SHAPES))
def test_parameter_counts_equal_transformers(name):
    from deepspeed.runtime.zero.stage3 import model_to_params

    shape = SHAPES[name]
    model = _hf_model(shape)
    counts = count_parameters(shape, MethodSpec(kind="full"))
    assert counts.total == sum(p.numel() for p in model.parameters()) == shape.total_params
    assert model_to_params(model) == (shape.total_params, shape.largest_module_params)


@pytest.mark.parametrize(
    "name, method",
    [
        ("mha", MethodSpec(kind="lora", lora_rank=8)),
        ("gqa", MethodSpec(kind="lora", lora_rank=4, lora_targets=("q_proj", "v_proj"))),
        ("tied", MethodSpec(kind="lora", lora_rank=16, lora_targets=("q_proj", "k_proj", "down_proj", "lm_head"))),
        ("tied_gqa_head_dim", MethodSpec(kind="lora", lora_rank=8, lora_targets=LAYER_LINEARS + ("embed_tokens",))),
        ("biases", MethodSpec(kind="lora", lora_rank=2, modules_to_save=("lm_head",))),
        ("gqa", MethodSpec(kind="lora", lora_rank=8, modules_to_save=("embed_tokens", "lm_head"))),
    ],
)
def test_lora_counts_equal_peft(name, method):
    shape = SHAPES[name]
    trainable, total = _peft(_hf_model(shape), method).get_nb_trainable_parameters()
    counts = count_parameters(shape, method)
    assert (counts.trainable, counts.total) == (trainable, total)


def test_freeze_and_prompt_counts():
    shape = SHAPES["gqa"]
    freeze = count_parameters(shape, MethodSpec(kind="freeze", freeze_trainable_layers=2))
    assert freeze.trainable == 2 * shape.layer_params and freeze.recording_layers == 2
    prompt = count_parameters(shape, MethodSpec(kind="prompt", num_virtual_tokens=10))
    assert prompt.trainable == 10 * shape.hidden_size and prompt.total == shape.total_params + 10 * shape.hidden_size
    with pytest.raises(ConfigError, match="not a module"):
        count_parameters(shape, MethodSpec(kind="lora", lora_targets=("c_attn",)))


def test_preset_counts_match_published_sizes():
    assert preset_shape("7B").total_params == 6_738_415_616  # LLaMA-2-7B
    assert preset_shape("13b").total_params == 13_015_864_320
    assert preset_shape("70b").total_params == 68_976_648_192
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset_shape("8x7b")


# ----------------------------------------------------------------------------- real tensors after one step

@pytest.mark.parametrize(
    "method, precision",
    [
        (MethodSpec(kind="full"), "fp32"),
        (MethodSpec(kind="lora", lora_rank=8, lora_dropout=0.0), "fp32"),
        (MethodSpec(kind="lora", lora_rank=4, lora_targets=("q_proj", "v_proj"), modules_to_save=("lm_head",)), "fp32"),
        (MethodSpec(kind="full"), "pure_bf16"),
        (MethodSpec(kind="lora", lora_rank=8), "pure_bf16"),
    ],
    ids=["full-fp32", "lora-fp32", "lora-qv-save-head-fp32", "full-pure-bf16", "lora-pure-bf16"],
)
def test_model_states_equal_tensors_after_adamw_step(method, precision):
    """Single process, no DeepSpeed (= ZeRO-0 on one device): params, .grad and AdamW's exp_avg/exp_avg_sq."""
    shape = SHAPES["gqa"]
    model = _hf_model(shape)
    if method.kind == "lora":
        model = _peft(model, method)
    if precision == "pure_bf16":
        model = model.to(torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, shape.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()

    params = list(model.parameters())
    adapter = [p for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n]
    states = [t for s in optimizer.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    plan = estimate_memory(
        shape, method, precision=precision, zero_stage=0, offload_optimizer=False, offload_params=False,
        gpus_per_node=1, nodes=1, seq_len=16, micro_batch=2, gradient_checkpointing=False, on_gpu=False,
    )
    assert plan.weights + plan.adapter == _nbytes(params)
    assert plan.adapter == _nbytes(adapter)
    assert plan.gradients == _nbytes(p.grad for p in params if p.grad is not None)
    assert plan.optimizer == _nbytes(states)
    assert plan.master == 0


# ----------------------------------------------------------------------------- activations

def _saved_tensor_bytes(model, shape: ModelShape, seq_len: int, batch: int) -> int:
    """Bytes autograd keeps for backward (unique storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, shape.vocab_size, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize(
    "attn, dtype, method, checkpointing",
    [
        ("sdpa", torch.bfloat16, MethodSpec(kind="full"), False),
        ("sdpa", torch.float32, MethodSpec(kind="full"), False),
        ("eager", torch.bfloat16, MethodSpec(kind="full"), False),
        ("sdpa", torch.bfloat16, MethodSpec(kind="full"), True),
        ("sdpa", torch.bfloat16, MethodSpec(kind="lora", lora_dropout=0.0), False),
        ("sdpa", torch.bfloat16, MethodSpec(kind="lora", lora_dropout=0.1), False),
        ("eager", torch.float32, MethodSpec(kind="lora", lora_dropout=0.1), False),
        ("sdpa", torch.bfloat16, MethodSpec(kind="lora", lora_dropout=0.1), True),
        ("sdpa", torch.bfloat16, MethodSpec(kind="freeze", freeze_trainable_layers=1), False),
    ],
    ids=["full-sdpa-bf16", "full-sdpa-fp32", "full-eager-bf16", "full-ckpt", "lora", "lora-dropout",
         "lora-dropout-eager-fp32", "lora-ckpt", "freeze"],
)
def test_activation_estimate_equals_saved_tensors(attn, dtype, method, checkpointing):
    """The term-by-term estimate against what transformers' LLaMA really keeps for backward (on CPU)."""
    shape = SHAPES["gqa"]
    model = _hf_model(shape, attn)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if method.kind == "lora":
        if checkpointing:
            model.enable_input_require_grads()  # as the training loop does
        model = _peft(model, method)
    elif method.kind == "freeze":
        last = shape.num_layers - method.freeze_trainable_layers
        for name, param in model.named_parameters():
            param.requires_grad = any(f"layers.{i}." in name for i in range(last, shape.num_layers))
    model = model.to(dtype).train()  # DeepSpeed casts adapters to the training dtype too
    measured = _saved_tensor_bytes(model, shape, seq_len=24, batch=2)
    estimate = activation_bytes(
        shape, method, seq_len=24, micro_batch=2, activation_bytes_per_element=dtype.itemsize, attention=attn,
        gradient_checkpointing=checkpointing, on_gpu=False,
    )
    assert estimate.saved == pytest.approx(measured, rel=0.01)


def test_korthikanti_reference_formula():
    s, b, h, a = 2048, 1, 4096, 32
    assert korthikanti_layer_bytes(s, b, h, a) == 34 * s * b * h + 5 * a * s * s * b


def test_checkpointing_and_sdpa_shrink_activations():
    shape = preset_shape("7b")
    lora = MethodSpec(kind="lora")
    plain = activation_bytes(shape, lora, seq_len=2048, micro_batch=1)
    ckpt = activation_bytes(shape, lora, seq_len=2048, micro_batch=1, gradient_checkpointing=True)
    eager = activation_bytes(shape, lora, seq_len=2048, micro_batch=1, attention="eager")
    assert ckpt.peak < plain.peak / 5
    assert eager.per_layer - plain.per_layer > 6 * shape.num_heads * 2048**2 * 0.9  # the softmax's s² term


# ----------------------------------------------------------------------------- requirement table

# Published "hardware requirement" anchors (LLaMA-Factory README), GB per GPU for 7B models.
# Full fine-tuning "32-bit" is fp32 weights + mixed precision (~18 bytes/param); the freeze row
# was 20GB in older tables and is lumped with LoRA (16GB) in newer ones.
ANCHORS_7B_GB = {
    "Full (fp32 weights, 16-bit AMP)": (120, 120),
    "Full (bf16 mixed, fp32 master; DeepSpeed)": (120, 120),
    "Full (pure bf16)": (60, 60),
    "Freeze (last 2 layers, bf16 mixed)": (16, 20),
    "LoRA r=8 all linear (bf16)": (16, 16),
    "QLoRA r=8 (8-bit base)": (10, 10),
    "QLoRA r=8 (4-bit NF4 base)": (6, 6),
}


def test_7b_table_within_published_anchors():
    table = requirements_table((preset_shape("7b"),), seq_len=1024, micro_batch=1, gradient_checkpointing=True)
    print("\nLLaMA-2-7B, 1 GPU, micro-batch 1 x 1024 tokens, gradient checkpointing (GB = 1e9 bytes)")
    print(f"{'method':<44}{'ours GB':>9}{'published GB':>14}")
    for row, (value,) in zip(table.rows, table.bytes):
        low, high = ANCHORS_7B_GB[row.label]
        ours = value / 1e9
        print(f"{row.label:<44}{ours:>9.1f}{(str(low) if low == high else f'{low}-{high}'):>14}")
        assert 0.7 * low <= ours <= 1.3 * high, row.label
    # The ordering every table shows.
    totals = [row[0] for row in table.bytes]
    assert totals[1] > totals[0] > totals[2] > totals[3] > totals[4] > totals[5] > totals[6]


# ----------------------------------------------------------------------------- fit and suggestions

def _setup(**changes) -> TrainingSetup:
    base = TrainingSetup(method=MethodSpec(kind="lora"), precision="bf16", seq_len=2048, micro_batch=4)
    return replace(base, **changes)


def test_suggestion_prefers_gradient_checkpointing():
    report = plan_training(preset_shape("7b"), _setup(gpu_memory_gib=24, micro_batch=2))
    assert not report.fits
    assert report.suggestion.fits and report.suggestion.changes == ("sft.train.gradient_checkpointing=true",)


def test_suggestion_smaller_micro_batch_keeps_global_batch():
    report = plan_training(preset_shape("7b"), _setup(gpu_memory_gib=20, micro_batch=8, gradient_checkpointing=True,
                                                      seq_len=4096))
    assert not report.fits
    (change,) = report.suggestion.changes
    new = report.suggestion.setup
    assert change.startswith("sft.train.micro_batch_size=")
    assert new.micro_batch < 8 and new.micro_batch * new.gradient_accumulation >= 8


def test_suggestion_raises_zero_stage_on_many_gpus():
    setup = _setup(method=MethodSpec(kind="full"), gradient_checkpointing=True, micro_batch=1, gpus_per_node=8)
    report = plan_training(preset_shape("7b"), setup)
    assert not report.fits
    assert report.suggestion.changes == ("distributed.zero_stage=1",)


def test_suggestion_offloads_on_one_gpu():
    setup = _setup(method=MethodSpec(kind="full"), gradient_checkpointing=True, micro_batch=1)
    suggestion = plan_training(preset_shape("7b"), setup).suggestion
    assert suggestion.fits and suggestion.changes == ("distributed.offload_optimizer=true distributed.zero_stage=2",)


def test_suggestion_combines_changes_for_70b_full():
    setup = _setup(method=MethodSpec(kind="full"), gpus_per_node=8, zero_stage=2)
    suggestion = plan_training(preset_shape("70b"), setup).suggestion
    assert suggestion.fits and len(suggestion.changes) >= 2
    assert suggestion.changes[0] == "sft.train.gradient_checkpointing=true"
    assert estimate_setup(preset_shape("70b"), suggestion.setup).total <= 80 * GIB


def test_suggestion_reports_when_nothing_fits():
    suggestion = suggest_change(preset_shape("70b"), _setup(gpu_memory_gib=4, seq_len=32768))
    assert not suggestion.fits


def test_invalid_combinations_are_config_errors():
    with pytest.raises(ConfigError, match="offload_params needs"):
        estimate_setup(preset_shape("7b"), _setup(offload_params=True, zero_stage=2))
    with pytest.raises(ConfigError, match="offload_optimizer needs"):
        estimate_setup(preset_shape("7b"), _setup(offload_optimizer=True, zero_stage=0))


# ----------------------------------------------------------------------------- throughput

def test_flops_lora_is_two_thirds_of_full_and_checkpointing_adds_a_forward():
    shape = preset_shape("7b")
    full = training_flops_per_token(shape, MethodSpec(kind="full"), seq_len=1)
    lora = training_flops_per_token(shape, MethodSpec(kind="lora"), seq_len=1)
    assert full.total == pytest.approx(6 * shape.matmul_params, rel=1e-3)
    assert lora.total / full.total == pytest.approx(4 / 6, rel=0.01)
    ckpt = training_flops_per_token(shape, MethodSpec(kind="full"), seq_len=1, gradient_checkpointing=True)
    assert ckpt.recompute == pytest.approx(2 * shape.num_layers * shape.layer_linear_params, rel=1e-3)


def test_step_time_wall_time_and_gpu_hours():
    shape = preset_shape("7b")
    setup = _setup(method=MethodSpec(kind="full"), micro_batch=1, seq_len=2048, gradient_accumulation=4,
                   gpus_per_node=8, zero_stage=3, dataset_tokens=1_000_000_000, epochs=2)
    t = plan_training(shape, setup).throughput
    flops = training_flops_per_token(shape, setup.method, 2048).total
    assert t.tokens_per_step == 2048 * 4 * 8
    assert t.step_seconds == pytest.approx(flops * 2048 * 4 / (0.4 * 312e12))
    assert t.wall_seconds == pytest.approx(2e9 / t.tokens_per_second)
    assert t.gpu_hours == pytest.approx(t.wall_seconds * 8 / 3600)


# ----------------------------------------------------------------------------- config and pre-launch check

def test_setup_reads_the_config_stage():
    config = load_config(TINY_YAML, ["distributed.use_gpu=true", "plan.gpu_memory_gib=40"])
    pretrain, _ = setup_for_stage(config, "pretrain")
    sft, _ = setup_for_stage(config, "sft", tokens=1000)
    assert pretrain.seq_len == 128 and sft.seq_len == 256
    assert pretrain.method.kind == "full" and sft.method.kind == "lora" and sft.method.lora_rank == 16
    assert sft.precision == "bf16" and sft.zero_stage == 2 and sft.world_size == 2 and sft.gpu_memory_gib == 40
    assert sft.dataset_tokens == 1000


def test_world_layout_must_match_num_workers():
    config = load_config(TINY_YAML, ["plan.gpus_per_node=8"])
    with pytest.raises(ConfigError, match="num_workers"):
        setup_for_stage(config, "sft")
    ok, _ = setup_for_stage(load_config(TINY_YAML, ["distributed.num_workers=16", "plan.nodes=2"]), "sft")
    assert (ok.gpus_per_node, ok.nodes) == (8, 2)


def test_check_fits_tiny_config():
    report = check_fits(load_config(TINY_YAML), "sft")
    assert report is not None and report.fits and report.suggestion is None


def test_check_fits_warns_or_refuses(caplog):
    overrides = ["sft.train.method=full", "sft.data.max_length=4096", "plan.gpu_memory_gib=0.001"]
    with caplog.at_level(logging.WARNING, logger="orchestrator.plan.planner"):
        report = check_fits(load_config(TINY_YAML, overrides), "sft")
    assert report is not None and not report.fits
    assert "will likely not fit" in caplog.text
    with pytest.raises(ConfigError, match="plan.strict"):
        check_fits(load_config(TINY_YAML, overrides + ["plan.strict=true"]), "sft")


def test_check_fits_skips_unreadable_model_unless_strict(tmp_path):
    overrides = [f"model.base={tmp_path}", "model.tiny=null"]
    assert check_fits(load_config(TINY_YAML, overrides), "sft") is None
    with pytest.raises(ConfigError, match="config.json"):
        check_fits(load_config(TINY_YAML, overrides + ["plan.strict=true"]), "sft")


def test_model_dir_config_json(tmp_path):
    import json

    shape = SHAPES["tied_gqa_head_dim"]
    _hf_model(shape).config.save_pretrained(tmp_path)
    config = load_config(TINY_YAML, [f"model.base={tmp_path}", "model.tiny=null"])
    report = plan_stage(config, "sft")
    assert report.counts.base == shape.total_params
    (tmp_path / "config.json").write_text(json.dumps({"num_local_experts": 8, "hidden_size": 8}))
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        plan_stage(config, "sft")


def test_plan_command_text_and_markdown():
    text, ok = plan_command(load_config(TINY_YAML), stages=["sft"], tokens=10_000)
    assert ok and "memory per worker" in text and "wall time" in text and "LLaMA-2-70B" in text
    markdown, _ = plan_command(None, preset="7b", markdown=True)
    assert "| Method | Bits | LLaMA-2-7B |" in markdown and "| **total** |" in markdown


# ----------------------------------------------------------------------------- CLI

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "plan", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_plan_tiny_config():
    result = _cli("--config", str(TINY_YAML))
    assert result.returncode == 0, result.stderr
    assert "stage pretrain" in result.stdout and "stage sft" in result.stdout
    assert "memory per worker" in result.stdout and "FITS" in result.stdout


def test_cli_plan_preset_markdown():
    result = _cli("--preset", "7b", "--markdown", "--tokens", "1e9")
    assert result.returncode == 0, result.stderr
    assert "| Method | Bits | LLaMA-2-7B | LLaMA-2-13B | CodeLlama-34B | LLaMA-2-70B |" in result.stdout
    assert "GPU-hours" in result.stdout


def test_cli_plan_strict_exit_code_and_bad_preset():
    result = _cli("--config", str(TINY_YAML), "plan.gpu_memory_gib=0.001", "plan.strict=true")
    assert result.returncode == 1 and "DOES NOT FIT" in result.stdout
    preset = _cli("--preset", "70b", "--method", "full", "plan.strict=true")
    assert preset.returncode == 1 and "cheapest change" in preset.stdout
    bad = _cli("--preset", "9b")
    assert bad.returncode == 2 and "unknown model preset" in bad.stderr


def test_host_memory_per_node_is_checked_when_the_node_ram_is_given(caplog):
    """plan.host_memory_gib: the host side (every local worker loading the model, CPU-offloaded states) is part of
    the verdict; ZeRO-3's partitioned loading needs less of it than whole loading."""
    from orchestrator.plan.render import render_report

    a100 = REPO / "configs" / "cluster-a100.yaml"
    shape = preset_shape("7b")
    partitioned = plan_stage(load_config(a100, ["sft.train.method=full"]), "sft", shape=shape)
    assert partitioned.setup.host_memory_gib == 1152 and partitioned.host_fits
    whole = plan_stage(load_config(a100, ["sft.train.method=full", "distributed.zero_stage=2"]), "sft", shape=shape)
    assert whole.memory.cpu_per_node > 2 * partitioned.memory.cpu_per_node  # 8 whole copies vs one module each
    need_gib = whole.memory.cpu_per_node / 2**30
    tight = ["sft.train.method=full", "distributed.zero_stage=2", f"plan.host_memory_gib={need_gib / 2:.1f}",
             "plan.gpu_memory_gib=1000"]
    report = plan_stage(load_config(a100, tight), "sft", shape=shape)
    assert report.gpu_fits and not report.host_fits and not report.fits
    assert "DOES NOT FIT in host memory" in render_report(report)
    assert f"GiB per node, plan.host_memory_gib={need_gib / 2:.1f}" in fit_summary(report)
    # The pre-launch check refuses it under plan.strict, naming host memory.
    with pytest.raises(ConfigError, match=r"host memory .* GiB per node, plan.host_memory_gib=1e-06"):
        check_fits(load_config(TINY_YAML, ["plan.host_memory_gib=0.000001", "plan.strict=true"]), "sft")
