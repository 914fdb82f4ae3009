"""DeepSpeed config dict and precision resolution (orchestrator.train.deepspeed_config)."""

from __future__ import annotations

import pytest

from orchestrator.config import DistributedConfig, TrainConfig
from orchestrator.errors import ConfigError
from orchestrator.config import resolve_precision
from orchestrator.train.deepspeed_config import build_deepspeed_config


def _ds(world_size=1, precision="fp32", train=None, **dist):
    return build_deepspeed_config(train or TrainConfig(), DistributedConfig(**dist), world_size, precision)


@pytest.mark.parametrize("micro, accum, world", [(1, 1, 1), (4, 1, 2), (2, 8, 4), (3, 5, 7)])
def test_batch_arithmetic(micro, accum, world):
    cfg = _ds(world, train=TrainConfig(micro_batch_size=micro, gradient_accumulation_steps=accum))
    assert cfg["train_micro_batch_size_per_gpu"] == micro
    assert cfg["gradient_accumulation_steps"] == accum
    assert cfg["train_batch_size"] == micro * accum * world


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage(stage):
    zero = _ds(zero_stage=stage)["zero_optimization"]
    assert zero["stage"] == stage
    assert ("contiguous_gradients" in zero) == (stage >= 2)
    assert ("stage3_gather_16bit_weights_on_model_save" in zero) == (stage == 3)
    assert "offload_optimizer" not in zero and "offload_param" not in zero


def test_stage2_bucket_settings():
    zero = _ds(zero_stage=2)["zero_optimization"]
    assert zero == {
        "stage": 2,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e7,
        "allgather_bucket_size": 5e7,
    }


def test_offload_optimizer_switches_to_deepspeed_adam():
    cfg = _ds(zero_stage=2, offload_optimizer=True)
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert cfg["optimizer"]["params"]["torch_adam"] is False
    assert _ds(zero_stage=2)["optimizer"]["params"]["torch_adam"] is True


def test_offload_params_with_stage3_on_gpu_pins_memory():
    zero = _ds(zero_stage=3, offload_optimizer=True, offload_params=True, use_gpu=True)["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_offload_params_needs_stage3(stage):
    with pytest.raises(ConfigError) as info:
        _ds(zero_stage=stage, offload_params=True)
    assert str(info.value) == "distributed.offload_params needs distributed.zero_stage=3"


def test_offload_optimizer_needs_zero():
    with pytest.raises(ConfigError, match="offload_optimizer needs distributed.zero_stage 1, 2 or 3"):
        _ds(zero_stage=0, offload_optimizer=True)


@pytest.mark.parametrize("precision, bf16, fp16", [("bf16", True, False), ("fp16", False, True), ("fp32", False, False)])
def test_precision_flags(precision, bf16, fp16):
    cfg = _ds(precision=precision)
    assert cfg["bf16"] == {"enabled": bf16}
    assert cfg["fp16"]["enabled"] is fp16


def test_optimizer_params_follow_train_config():
    train = TrainConfig(method="full", weight_decay=0.1, adam_betas=(0.8, 0.95), adam_epsilon=1e-6, max_grad_norm=0.5)
    cfg = _ds(train=train)
    assert cfg["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 2e-5, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.1, "torch_adam": True},
    }
    assert cfg["gradient_clipping"] == 0.5
    assert _ds(train=TrainConfig(method="lora"))["optimizer"]["params"]["lr"] == 2e-4


@pytest.mark.parametrize(
    "requested, use_gpu, bf16_supported, expected",
    [
        ("auto", False, False, "fp32"),
        ("auto", False, True, "fp32"),
        ("auto", True, True, "bf16"),
        ("auto", True, False, "fp16"),
        ("fp32", True, True, "fp32"),
        ("bf16", False, False, "bf16"),
        ("bf16", True, True, "bf16"),
        ("fp16", True, False, "fp16"),
    ],
)
def test_resolve_precision(requested, use_gpu, bf16_supported, expected):
    assert resolve_precision(requested, use_gpu, bf16_supported) == expected


def test_fp16_on_cpu_is_an_error():
    with pytest.raises(ConfigError) as info:
        resolve_precision("fp16", use_gpu=False, bf16_supported=False)
    assert "train.precision=fp16 needs GPUs" in str(info.value)


def test_bf16_on_a_gpu_without_bf16_is_an_error():
    with pytest.raises(ConfigError, match="no bf16 support"):
        resolve_precision("bf16", use_gpu=True, bf16_supported=False)


def test_user_deepspeed_json_overrides_any_key_by_deep_merge():
    user = {"zero_optimization": {"reduce_bucket_size": 1000, "overlap_comm": True}, "gradient_clipping": 0.3,
            "activation_checkpointing": {"partition_activations": True}}
    cfg = build_deepspeed_config(TrainConfig(), DistributedConfig(zero_stage=2), 2, "fp32", user)
    assert cfg["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000, "allgather_bucket_size": 50_000_000,
                                        "overlap_comm": True, "contiguous_gradients": True}
    assert cfg["gradient_clipping"] == 0.3 and cfg["activation_checkpointing"] == {"partition_activations": True}
    assert cfg["train_batch_size"] == 8  # untouched keys stay


@pytest.mark.parametrize("key, value", [("train_batch_size", 64), ("train_micro_batch_size_per_gpu", 2),
                                        ("gradient_accumulation_steps", 4)])
def test_user_batch_sizes_must_agree_with_the_config(key, value):
    with pytest.raises(ConfigError) as info:
        build_deepspeed_config(TrainConfig(micro_batch_size=4), DistributedConfig(), 2, "fp32", {key: value})
    message = str(info.value)
    assert f"{key}={value} disagrees" in message
    assert "micro_batch_size 4 x gradient_accumulation_steps 1 x 2 workers = 8" in message


def test_user_config_matching_batch_sizes_is_accepted():
    cfg = build_deepspeed_config(TrainConfig(micro_batch_size=4), DistributedConfig(), 2, "fp32",
                                 {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4})
    assert cfg["train_batch_size"] == 8


@pytest.mark.parametrize("user, expected", [
    ({"train_batch_size": "auto"}, 'train_batch_size = "auto"'),
    ({"zero_optimization": {"reduce_bucket_size": "auto"}}, 'zero_optimization.reduce_bucket_size = "auto"'),
    ({"scheduler": {"type": "WarmupLR"}}, "'scheduler' is not allowed"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "bf16 and fp16 are both enabled"),
])
def test_user_config_rejections_name_the_key(user, expected):
    with pytest.raises(ConfigError) as info:
        build_deepspeed_config(TrainConfig(), DistributedConfig(), 1, "bf16", user)
    assert expected in str(info.value)


def test_global_batch_derives_accumulation():
    train = TrainConfig(micro_batch_size=4, global_batch_size=64)
    cfg = build_deepspeed_config(train, DistributedConfig(), 8, "bf16")
    assert (cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (2, 64)


def test_global_batch_not_divisible_is_rejected_with_the_numbers():
    train = TrainConfig(micro_batch_size=4, global_batch_size=100)
    with pytest.raises(ConfigError) as info:
        build_deepspeed_config(train, DistributedConfig(), 8, "fp32")
    assert str(info.value) == ("train.global_batch_size=100 is not divisible by micro_batch_size 4 x 8 workers = 32; "
                               "use a multiple of 32 (e.g. 96)")


def test_nvme_offload_needs_a_path_and_uses_it():
    with pytest.raises(ConfigError, match="offload_device=nvme needs distributed.nvme_path"):
        _ds(zero_stage=3, offload_optimizer=True, offload_device="nvme")
    zero = _ds(zero_stage=3, offload_optimizer=True, offload_params=True, offload_device="nvme",
               nvme_path="/local_nvme", use_gpu=True)["zero_optimization"]
    assert zero["offload_param"] == zero["offload_optimizer"] == {"device": "nvme", "nvme_path": "/local_nvme",
                                                                  "pin_memory": True}


def test_overlap_comm_defaults_to_on_with_gpus_only():
    assert _ds(zero_stage=2, use_gpu=True)["zero_optimization"]["overlap_comm"] is True
    assert _ds(zero_stage=3)["zero_optimization"]["overlap_comm"] is False
    assert _ds(zero_stage=2, overlap_comm=True)["zero_optimization"]["overlap_comm"] is True


def test_fp16_uses_dynamic_loss_scaling():
    fp16 = _ds(precision="fp16", use_gpu=True)["fp16"]
    assert fp16["enabled"] is True and fp16["loss_scale"] == 0 and fp16["initial_scale_power"] == 16


def test_deepspeed_json_file_is_read_and_bad_json_names_the_line(tmp_path):
    from orchestrator.train.deepspeed_config import load_user_deepspeed_config

    good = tmp_path / "ds.json"
    good.write_text('{"zero_optimization": {"overlap_comm": true}}')
    assert load_user_deepspeed_config(str(good)) == {"zero_optimization": {"overlap_comm": True}}
    assert load_user_deepspeed_config({"a": 1}) == {"a": 1} and load_user_deepspeed_config(None) is None
    bad = tmp_path / "bad.json"
    bad.write_text('{\n "zero_optimization": {,}\n}')
    with pytest.raises(ConfigError, match=rf"{bad}:2: not valid JSON"):
        load_user_deepspeed_config(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        load_user_deepspeed_config(str(tmp_path / "missing.json"))


def test_elastic_training_checks_the_batch_at_every_size_it_may_run_at():
    from orchestrator.config import config_from_dict
    from orchestrator.train.trainer import check_batch_plan

    tree = {"run_name": "elastic", "model": {"tiny": {}}, "tokenizer": {"train": {"vocab_size": 300}},
            "distributed": {"num_workers": 4, "min_workers": 2},
            "pretrain": {"data": {"sources": [{"path": "x.txt"}]},
                         "train": {"micro_batch_size": 2, "global_batch_size": 24}}}
    schedule, _ = check_batch_plan(config_from_dict(tree), "pretrain", 96)  # 24 = 2 x (2, 3, 4) x (6, 4, 3)
    assert schedule.steps_per_epoch == 4  # 24 rows per optimizer step at 4 workers
    tree["pretrain"]["train"]["global_batch_size"] = 16
    tree["distributed"]["min_workers"] = None
    check_batch_plan(config_from_dict(tree), "pretrain", 96)  # a fixed 4 workers: 16 = 2 x 4 x 2
    tree["distributed"]["min_workers"] = 2  # ... but elastic, it may run at 3 workers
    with pytest.raises(ConfigError, match=r"global_batch_size=16 is not divisible by micro_batch_size 2 x 3 workers"):
        check_batch_plan(config_from_dict(tree), "pretrain", 96)
