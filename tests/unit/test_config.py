"""Config loading, dotted overrides, error messages and defaults (orchestrator.config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.config import (
    DEFAULT_LR_FULL,
    DEFAULT_LR_LORA,
    ModelConfig,
    TinyModelConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    describe_schema,
    load_config,
    load_config_for_models,
    parse_override,
)
from orchestrator.errors import ConfigError

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _tiny_tree() -> dict:
    return yaml.safe_load(TINY.read_text(encoding="utf-8"))


def _write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    return path


def test_tiny_yaml_validates_with_its_values():
    cfg = load_config(TINY)
    assert cfg.run_name == "tiny-demo"
    assert cfg.model.base is None
    assert cfg.model.tiny == TinyModelConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512
    )
    assert cfg.tokenizer.train is not None and cfg.tokenizer.train.vocab_size == 1200
    assert cfg.distributed.num_workers == 2
    assert cfg.distributed.zero_stage == 2
    assert cfg.checkpoint.keep == 2
    assert [s.path for s in cfg.pretrain.data.sources] == [
        "examples/data/pretrain",
        "examples/data/sft/medical_qa_alpaca.jsonl",
    ]
    assert cfg.pretrain.data.block_size == 128
    assert cfg.pretrain.train.method == "full"
    assert cfg.pretrain.train.learning_rate == pytest.approx(3.0e-3)
    assert [s.format for s in cfg.sft.data.sources] == ["alpaca", "multiturn", "sharegpt"]
    assert cfg.sft.data.max_length == 256
    assert cfg.sft.train.lora.r == 16 and cfg.sft.train.lora.alpha == 32 and cfg.sft.train.lora.dropout == 0.0
    assert cfg.stage("sft") is cfg.sft


def test_override_learning_rate_sets_a_float():
    cfg = load_config(TINY, ["sft.train.learning_rate=1e-4"])
    assert isinstance(cfg.sft.train.learning_rate, float)
    assert cfg.sft.train.learning_rate == 1e-4
    assert cfg.sft.train.resolved_learning_rate == 1e-4
    # the other stage is untouched
    assert cfg.pretrain.train.learning_rate == pytest.approx(3.0e-3)


def test_override_int_and_bool():
    cfg = load_config(TINY, ["distributed.num_workers=4", "distributed.use_gpu=true"])
    assert cfg.distributed.num_workers == 4
    assert cfg.distributed.use_gpu is True


def test_override_list_index():
    cfg = load_config(TINY, ["pretrain.data.sources.0.path=x"])
    assert cfg.pretrain.data.sources[0].path == "x"
    assert cfg.pretrain.data.sources[1].path == "examples/data/sft/medical_qa_alpaca.jsonl"


def test_override_list_index_out_of_range_is_an_error():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["pretrain.data.sources.5.path=x"])
    assert "`pretrain.data.sources.5`" in str(info.value)
    assert "expected a list index below 2" in str(info.value)


def test_override_creates_missing_sections():
    tree = apply_overrides({"a": 1}, ["b.c.d=[x, y]", "e=null"])
    assert tree == {"a": 1, "b": {"c": {"d": ["x", "y"]}}, "e": None}


def test_apply_overrides_does_not_mutate_its_input():
    tree = {"distributed": {"num_workers": 1}}
    apply_overrides(tree, ["distributed.num_workers=3"])
    assert tree == {"distributed": {"num_workers": 1}}


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["distributed.num_workers"])
    assert "'distributed.num_workers' is not of the form key.path=value" in str(info.value)


def test_override_with_empty_key_part_is_an_error():
    with pytest.raises(ConfigError, match="has an empty key"):
        parse_override("sft..train=1")


def test_parse_override_parses_yaml_values():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=[q_proj, v_proj]") == (["a"], ["q_proj", "v_proj"])
    assert parse_override("a=x=y") == (["a"], "x=y")
    assert parse_override("a=") == (["a"], "")


def test_unknown_key_in_yaml_names_key_and_allowed_keys(tmp_path):
    tree = _tiny_tree()
    tree["pretrain"]["train"]["lerning_rate"] = 1e-3
    path = _write(tmp_path, tree)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "pretrain.train.lerning_rate: unknown key" in message
    line = next(l for l in message.splitlines() if "lerning_rate" in l)
    allowed = line.split("allowed keys here: ", 1)[1].split(", ")
    assert "learning_rate" in allowed
    assert "micro_batch_size" in allowed
    assert allowed == sorted(TrainConfig.model_fields)


def test_unknown_key_inside_a_list_item_lists_source_keys():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["pretrain.data.sources.0.wieght=2"])
    message = str(info.value)
    assert "pretrain.data.sources.0.wieght: unknown key" in message
    assert ("allowed keys here: dataset, fields, format, keyed_by, max_records, path, prefixed_turns, prompt_template, "
            "records, response_template, system_template, tags, text_unit, transform, unwrap, weight") in message


def test_bad_zero_stage_names_the_key():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["distributed.zero_stage=5"])
    message = str(info.value)
    assert "distributed.zero_stage" in message
    assert "less than or equal to 3" in message
    assert "(got 5)" in message


def test_bad_literal_names_allowed_values():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["pretrain.train.method=qlora"])
    message = str(info.value)
    assert "pretrain.train.method" in message
    assert "'full', 'freeze', 'lora', 'adalora', 'prompt_tuning', 'p_tuning' or 'prefix_tuning'" in message
    assert "(got 'qlora')" in message


def test_default_learning_rates():
    assert DEFAULT_LR_FULL == 2e-5 and DEFAULT_LR_LORA == 2e-4
    assert TrainConfig(method="full").resolved_learning_rate == 2e-5
    assert TrainConfig(method="lora").resolved_learning_rate == 2e-4
    assert TrainConfig().resolved_learning_rate == 2e-4  # lora is the default method
    assert TrainConfig(method="full", learning_rate=0.5).resolved_learning_rate == 0.5


def test_defaults_through_load_config():
    cfg = load_config(TINY, ["pretrain.train.learning_rate=null", "sft.train.learning_rate=null"])
    assert cfg.pretrain.train.resolved_learning_rate == 2e-5  # method: full
    assert cfg.sft.train.resolved_learning_rate == 2e-4  # method: lora


def test_both_base_and_tiny_is_an_error():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["model.base=/models/llama"])
    assert "set exactly one of `model.base`" in str(info.value)
    assert "`model.tiny`" in str(info.value)


def test_neither_base_nor_tiny_is_an_error():
    with pytest.raises(ConfigError, match="set exactly one of `model.base`"):
        load_config(TINY, ["model.tiny=null"])
    with pytest.raises(ValueError):
        ModelConfig()


def test_missing_tokenizer_is_an_error():
    with pytest.raises(ConfigError, match="no tokenizer"):
        config_from_dict({"model": {"tiny": {}}})
    cfg = config_from_dict({"model": {"base": "/m"}})
    assert cfg.tokenizer.path is None


def test_missing_stage_section():
    cfg = config_from_dict({"model": {"base": "/m"}})
    with pytest.raises(ConfigError, match="no `pretrain:` section"):
        cfg.stage("pretrain")


def test_assignment_is_validated():
    cfg = load_config(TINY)
    with pytest.raises(Exception):
        cfg.distributed.zero_stage = 7
    assert cfg.distributed.zero_stage == 2


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping of sections at the top level, got list"):
        load_config(bad)


def test_bad_run_name():
    with pytest.raises(ConfigError, match="run_name"):
        load_config(TINY, ["run_name=../escape"])


def test_describe_schema_documents_every_key():
    lines = describe_schema()
    lr = [l for l in lines if l.startswith("sft.train.learning_rate ")]
    assert lr == ["sft.train.learning_rate (default None): Peak learning rate. Default: 2e-05 for full and freeze, "
                  "0.0002 for lora and adalora, 0.01 for the prompt methods."]
    assert any(l.startswith("pretrain.data.sources[].path (default required):") for l in lines)
    assert any(l.startswith("distributed.zero_stage (default 2):") for l in lines)
    assert "model.tiny: Initialise a small LLaMA-architecture model from this config (when `base` is empty)." in lines


def test_unknown_key_suggests_the_closest_spelling(tmp_path):
    tree = _tiny_tree()
    tree["pretrain"]["train"]["lerning_rate"] = 1e-3
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, tree))
    assert "pretrain.train.lerning_rate: unknown key; did you mean 'learning_rate'?; allowed keys here: " in str(
        info.value)
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["distributed.xyzzy=1"])
    assert "did you mean" not in str(info.value)  # nothing close: only the allowed keys


def test_list_items_override_with_brackets_or_dots():
    dotted = load_config(TINY, ["pretrain.data.sources.1.format=alpaca"])
    bracketed = load_config(TINY, ["pretrain.data.sources[1].format=alpaca"])
    assert dotted.pretrain.data.sources[1].format == "alpaca" == bracketed.pretrain.data.sources[1].format
    assert parse_override("a.b[0][2].c=1") == (["a", "b", "0", "2", "c"], 1)
    with pytest.raises(ConfigError, match=r"expected a list index below 2, got '5'"):
        load_config(TINY, ["pretrain.data.sources[5].format=alpaca"])
    with pytest.raises(ConfigError, match="sources.1.wieght: unknown key; did you mean 'weight'"):
        load_config(TINY, ["pretrain.data.sources[1].wieght=2"])


def test_a_bare_eval_config_loads_for_given_models(tmp_path):
    path = _write(tmp_path, {"eval": {"qa": [{"name": "qa", "path": "qa.jsonl"}]}})
    with pytest.raises(ConfigError, match="model: Field required"):
        load_config(path)
    config = load_config_for_models(path, ["eval.samples=1"], "runs/x/models/sft")
    assert config.model.base == "runs/x/models/sft" and config.eval.samples == 1
    config = load_config_for_models(TINY, [], "runs/x/models/sft")
    assert config.model.tiny is not None and config.model.base is None  # a config's own model is kept


def test_elastic_workers_are_a_range_that_resumes_at_any_size():
    cfg = load_config(TINY, ["distributed.num_workers=4", "distributed.min_workers=2"])
    assert cfg.distributed.elastic and cfg.distributed.ray_num_workers() == (2, 4)
    fixed = load_config(TINY, ["distributed.min_workers=2"])  # min = num: not elastic
    assert not fixed.distributed.elastic and fixed.distributed.ray_num_workers() == 2
    with pytest.raises(ConfigError, match=r"distributed.min_workers=3 is more than distributed.num_workers=2"):
        load_config(TINY, ["distributed.min_workers=3"])
    with pytest.raises(ConfigError, match=r"checkpoint.on_world_size_change=fail refuses; set it to reload_weights"):
        load_config(TINY, ["distributed.num_workers=4", "distributed.min_workers=2",
                           "checkpoint.on_world_size_change=fail"])
