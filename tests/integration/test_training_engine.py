"""The training engine with real DeepSpeed on 2 Ray Train workers (CPU, gloo).

One TorchTrainer run trains every case in turn (imports and worker start paid once): ZeRO 1, 2, 3 and
3 + optimizer offload, each with full fine-tuning and LoRA, in fp32 and bf16; then AdaLoRA,
prompt-tuning, p-tuning, prefix-tuning and freeze-tuning under ZeRO-2. Each case takes a few optimizer
steps on a fixed batch, saves through the same `save_hf_model` the training loop uses, and dumps the
in-memory (ZeRO-3: gathered) tensors next to it. The tests then reload what was saved and compare.
The offload cases JIT-build DeepSpeed's CPU Adam on first use (~1.5 min, cached afterwards).
The `partitioned` cases load the same base from disk the way the stage recipe does under ZeRO-3
(`build_training_model` inside `zero3_partitioned_loading`): parameters are born partitioned.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

STEPS = 6
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 256}
MATRIX = [
    {"name": f"zero{stage}{'-offload' if offload else ''}-{method}-{precision}", "method": method,
     "precision": precision, "dist": {"zero_stage": stage, "offload_optimizer": offload}}
    for stage, offload in ((1, False), (2, False), (3, False), (3, True))
    for method in ("full", "lora")
    for precision in ("fp32", "bf16")
]
METHODS = [
    {"name": f"{method}-zero2", "method": method, "precision": "fp32", "dist": {"zero_stage": 2}}
    for method in ("adalora", "prompt_tuning", "p_tuning", "prefix_tuning", "freeze")
]
GROWN_TOKENS = 16  # the `grow` case's tokenizer has this many more tokens than the base
PARTITIONED = [
    {"name": f"zero3-partitioned-{method}-fp32", "method": method, "precision": "fp32", "partitioned": True,
     "dist": {"zero_stage": 3}} for method in ("full", "lora")
] + [{"name": "zero3-partitioned-grow-lora-fp32", "method": "lora", "precision": "fp32", "partitioned": True,
      "grow": True, "dist": {"zero_stage": 3}}]


def _partitioned_model(case: dict, train, dist, world: int, base: str, tokenizer_dir: str, tokenizer) -> tuple:
    """The base loaded from disk as the recipe loads it under ZeRO-3; what rank 0 holds of it before
    deepspeed.initialize."""
    from orchestrator.config import ModelConfig
    from orchestrator.model.loading import full_numel
    from orchestrator.train.deepspeed_config import build_deepspeed_config
    from orchestrator.train.model_setup import build_training_model, zero3_partitioned_loading

    keep_alive = zero3_partitioned_loading(build_deepspeed_config(train, dist, world, case["precision"]), False)
    model = build_training_model(ModelConfig(base=base), train, base, tokenizer, tokenizer_dir, case["precision"],
                                 STEPS)
    params = list(model.parameters())
    loaded = {
        "local": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
        "whole": sum(full_numel(p) for p in params),
        "all_partitioned": all(hasattr(p, "ds_id") for n, p in model.named_parameters() if "lora_" not in n),
        "embedding_rows": model.get_input_embeddings().weight.ds_shape[0]
        if hasattr(model.get_input_embeddings().weight, "ds_shape") else model.get_input_embeddings().weight.shape[0],
    }
    return model, keep_alive, loaded


def _train_cases(loop_config: dict) -> None:
    """Runs on every worker: each case in turn; rank 0 writes losses and in-memory tensors."""
    import contextlib

    import deepspeed
    import ray.train

    from orchestrator.config import ADAPTER_METHODS, DistributedConfig, TinyModelConfig, TrainConfig
    from orchestrator.model.loading import create_tiny_model, load_tokenizer, resolve_dtype
    from orchestrator.model.peft import apply_method
    from orchestrator.train.deepspeed_config import build_deepspeed_config
    from orchestrator.train.recipe import save_hf_model
    from orchestrator.train.model_setup import adalora_update

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(1)
    out = Path(loop_config["out"])
    tokenizer = load_tokenizer(loop_config["tokenizer"])
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own fixed batch
    ids = torch.randint(3, len(tokenizer), (2, 24), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    losses, loaded = {}, {}
    for case in loop_config["cases"]:
        prompt_style = case["method"] in ("prompt_tuning", "p_tuning", "prefix_tuning")
        train = TrainConfig(method=case["method"], micro_batch_size=2, learning_rate=0.1 if prompt_style else 1e-2,
                            adalora={"init_r": 8, "target_r": 4, "tinit": 1, "tfinal": 1},
                            prompt={"num_virtual_tokens": 4}, freeze={"trainable_layers": 1})
        dist = DistributedConfig(**case["dist"])
        if case.get("partitioned"):
            case_tokenizer_dir = loop_config["grown_tokenizer"] if case.get("grow") else loop_config["tokenizer"]
            model, keep_alive, loaded[case["name"]] = _partitioned_model(
                case, train, dist, world, loop_config["base"], case_tokenizer_dir, load_tokenizer(case_tokenizer_dir))
        else:
            model = create_tiny_model(TinyModelConfig(**TINY), tokenizer, seed=0).to(resolve_dtype("auto", case["precision"]))
            model = apply_method(model, train, STEPS, loop_config["tokenizer"])
            keep_alive = None
        is_adapter = train.method in ADAPTER_METHODS
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=build_deepspeed_config(train, dist, world, case["precision"]), dist_init_required=False)
        case_losses = []
        for step in range(STEPS):
            loss = engine(**batch).loss
            engine.backward(loss)
            if train.method == "adalora":
                adalora_update(engine.module, step, dist.zero_stage)
            engine.step()
            case_losses.append(float(loss.detach().float()))
        saved = out / case["name"]
        save_hf_model(engine, tokenizer, str(saved), dist.zero_stage, rank, is_adapter)
        params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad or not is_adapter]
        gather = (deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
                  if dist.zero_stage == 3 else contextlib.nullcontext())
        with gather:
            if rank == 0:
                torch.save({n: p.detach().float().cpu().clone() for n, p in params}, saved / "in_memory.pt")
        losses[case["name"]] = case_losses
        engine.destroy()
        del keep_alive  # transformers' ZeRO-3 loading ends with the engine
    if rank == 0:
        (out / "losses.json").write_text(json.dumps(losses))
        (out / "loaded.json").write_text(json.dumps(loaded))


@pytest.fixture(scope="module")
def trained(ray_cluster, shared_data, tmp_path_factory):
    """Every case trained once by a 2-worker TorchTrainer; returns (output dir, losses, base model dir)."""
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.config import TinyModelConfig
    from orchestrator.model.loading import create_tiny_model, load_tokenizer

    out = tmp_path_factory.mktemp("engine")
    tokenizer_dir = str(shared_data / "tokenizers" / "minimind")
    base = out / "base"  # the untrained model every case starts from (seed 0): the adapters' base
    create_tiny_model(TinyModelConfig(**TINY), load_tokenizer(tokenizer_dir), seed=0).save_pretrained(base)
    load_tokenizer(tokenizer_dir).save_pretrained(base)
    grown = load_tokenizer(tokenizer_dir)
    grown.add_tokens([f"术语{i}" for i in range(GROWN_TOKENS)])
    grown.save_pretrained(out / "grown-tokenizer")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = TorchTrainer(
        _train_cases,
        train_loop_config={"out": str(out), "tokenizer": tokenizer_dir, "cases": MATRIX + METHODS + PARTITIONED,
                           "base": str(base), "grown_tokenizer": str(out / "grown-tokenizer")},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="engine-cases", storage_path=str(out / "ray")),
        torch_config=TorchConfig(backend="gloo"),
    )
    trainer.fit()
    return out, json.loads((out / "losses.json").read_text()), base


def _adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


@pytest.mark.parametrize("case", [c["name"] for c in MATRIX + METHODS + PARTITIONED])
def test_loss_falls(trained, case):
    _, losses, _ = trained
    # Virtual tokens alone move a random batch's loss only a little in 6 steps; weights move it a lot.
    margin = 0.005 if case.split("-")[0] in ("prompt_tuning", "p_tuning", "prefix_tuning") else 0.05
    assert losses[case][-1] < losses[case][0] - margin, losses[case]


@pytest.mark.parametrize("case", [c["name"] for c in MATRIX if c["method"] == "full"]
                         + ["freeze-zero2", "zero3-partitioned-full-fp32"])
def test_saved_full_weights_equal_the_gathered_in_memory_weights(trained, case):
    from transformers import AutoModelForCausalLM

    out, _, _ = trained
    in_memory = torch.load(out / case / "in_memory.pt")
    reloaded = AutoModelForCausalLM.from_pretrained(out / case, dtype=torch.float32).state_dict()
    assert set(in_memory) <= set(reloaded)
    for name, tensor in in_memory.items():
        assert tensor.numel() > 0 and reloaded[name].shape == tensor.shape, name
        torch.testing.assert_close(reloaded[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("case", [c["name"] for c in MATRIX + PARTITIONED if c["method"] == "lora" and not c.get("grow")])
def test_saved_adapter_holds_the_real_gathered_tensors(trained, case):
    out, _, _ = trained
    saved = _adapter_tensors(out / case)
    in_memory = {name.replace(".default", ""): t for name, t in torch.load(out / case / "in_memory.pt").items()}
    assert saved and set(saved) == set(in_memory)
    for name, tensor in saved.items():
        assert tensor.numel() > 0 and tensor.shape == in_memory[name].shape, (name, tuple(tensor.shape))
        torch.testing.assert_close(tensor.float(), in_memory[name], rtol=0, atol=0, msg=name)


def test_zero3_loading_is_partitioned_and_trains_like_whole_loading(trained):
    """Under ZeRO-3 the recipe's loading gives each of 2 ranks about half the parameters before
    deepspeed.initialize (all of them DeepSpeed parameters, so the engine never moves a whole module),
    and training matches the whole-loaded model: same first loss, close after the steps."""
    out, losses, _ = trained
    loaded = json.loads((out / "loaded.json").read_text())
    for method in ("full", "lora"):
        share = loaded[f"zero3-partitioned-{method}-fp32"]
        assert share["all_partitioned"], share
        assert share["local"] <= 0.6 * share["whole"], share  # 2 ranks: ~0.5 plus padding (and the adapter)
        partitioned, whole = losses[f"zero3-partitioned-{method}-fp32"], losses[f"zero3-{method}-fp32"]
        assert abs(partitioned[0] - whole[0]) < 1e-4, (partitioned, whole)
        assert abs(partitioned[-1] - whole[-1]) < 0.05 * whole[0], (partitioned, whole)


def test_zero3_vocabulary_growth_resizes_the_partitioned_embeddings(trained):
    from transformers import AutoConfig

    out, _, base = trained
    grown = json.loads((out / "loaded.json").read_text())["zero3-partitioned-grow-lora-fp32"]
    base_rows = AutoConfig.from_pretrained(base).vocab_size
    assert grown["embedding_rows"] == base_rows + GROWN_TOKENS
    assert grown["all_partitioned"] and grown["local"] <= 0.6 * grown["whole"], grown  # grown rows partitioned too
    # peft saves the grown embeddings with the adapter: the gathered tensors, not ZeRO-3's empty placeholders
    saved = _adapter_tensors(out / "zero3-partitioned-grow-lora-fp32")
    for name in ("base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"):
        if name in saved:
            assert tuple(saved[name].shape) == (base_rows + GROWN_TOKENS, 64) and saved[name].abs().sum() > 0, name
    assert "base_model.model.model.embed_tokens.weight" in saved


def test_zero3_lora_adapter_is_not_the_empty_placeholder(trained):
    """Under ZeRO-3 every rank holds a partition; a naive save writes 0-element tensors."""
    out, _, _ = trained
    saved = _adapter_tensors(out / "zero3-lora-fp32")
    a = saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert tuple(a.shape) == (8, 64) and a.abs().sum() > 0


def test_freeze_trains_only_the_last_layer(trained):
    from transformers import AutoModelForCausalLM

    out, _, base = trained
    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "freeze-zero2").state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("model.layers.1.") for name in changed), sorted(changed)


@pytest.mark.parametrize("method", ["adalora", "prompt_tuning", "p_tuning", "prefix_tuning"])
def test_adapter_reloads_on_its_base_and_generates(trained, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _, base = trained
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / f"{method}-zero2").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                   do_sample=False)
    assert generated.shape[1] > 4


def test_adalora_merges_and_prompt_adapters_are_refused_by_merge(trained, tmp_path):
    from orchestrator.errors import ConfigError
    from orchestrator.model.export import merge_to

    out, _, base = trained
    assert merge_to(str(base), [str(out / "adalora-zero2")], str(tmp_path / "merged")) < 1e-4
    with pytest.raises(ConfigError, match="cannot be merged into the model weights"):
        merge_to(str(base), [str(out / "p_tuning-zero2")], str(tmp_path / "nope"))


def test_adalora_saves_the_reallocated_ranks_of_the_real_tensors(trained):
    """AdaLoRA pruned ranks towards its budget (init_r 8 -> target 4) and peft saved only the kept rows,
    each a row of the gathered in-memory tensor."""
    out, _, _ = trained
    saved = _adapter_tensors(out / "adalora-zero2")
    in_memory = {name.replace(".default", ""): t for name, t in torch.load(out / "adalora-zero2" / "in_memory.pt").items()}
    ranks = [t.shape[0] for n, t in saved.items() if n.endswith("lora_A")]  # AdaLoRA keys have no .weight
    assert ranks and max(ranks) <= 8 and sum(ranks) < 8 * len(ranks), ranks
    for name, tensor in saved.items():
        if name.endswith(("lora_A", "lora_E")):
            full = in_memory[name]
            for row in tensor:
                assert any(torch.equal(row, kept) for kept in full), name


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_prompt_adapters_are_served_as_adapters_on_their_base(trained, method):
    """The serving engine's adapter path (serve.adapters) generates with virtual-token adapters."""
    from orchestrator.serve.engine import AdapterEngine, HFEngine
    from orchestrator.serve.protocol import GenerationParams

    out, _, base = trained
    engine = AdapterEngine(HFEngine(str(base), device="cpu"), str(out / f"{method}-zero2"))
    params = GenerationParams(max_new_tokens=5, do_sample=False)
    [completion] = engine.generate([[5, 6, 7, 8]], params)
    assert completion.prompt_tokens == 4 and 1 <= completion.completion_tokens <= 5


def test_freeze_model_generates(trained):
    from orchestrator.model.generate import load_for_generation

    out, _, _ = trained
    model, _ = load_for_generation(str(out / "freeze-zero2"))
    ids = torch.tensor([[5, 6, 7, 8]])
    assert model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                          min_new_tokens=4, do_sample=False).shape == (1, 8)
