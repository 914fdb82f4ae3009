"""The prepare's pure steps, unit by unit, without Ray: planning units, reading with the bad-record policy,
tokenizing into shards, and merging the summaries into one manifest (or one report of every problem)."""

from __future__ import annotations

import collections
import json

import pytest

from orchestrator.config import DataConfig, DataSourceConfig
from orchestrator.data.prepare import prepare_stage_data
from orchestrator.data.shards import read_shard
from orchestrator.data.templates import select_template
from orchestrator.data.units import hash_share, merge_summaries, plan_units, read_unit, tokenize_unit
from orchestrator.errors import DataError, DataValidationError


def _run(data: DataConfig, stage: str, tokenizer, out, files: dict[str, list[str]]):
    sizes = {uri: 1000 for group in files.values() for uri in group}
    units = plan_units(data, files, sizes, 1)
    template = select_template(data.template, tokenizer) if stage == "sft" else None
    summaries = [tokenize_unit(read_unit(u, stage, data), stage, data, tokenizer, template, str(out)) for u in units]
    return units, merge_summaries(summaries, stage, data, "key", {"x": 1})


def test_units_group_files_and_keep_max_records_sources_whole():
    files = {"a": ["a/1", "a/2", "a/3"], "b": ["b/1", "b/2"]}
    data = DataConfig(sources=[DataSourceConfig(path="a"), DataSourceConfig(path="b", max_records=5)])
    units = plan_units(data, files, {f: 1000 for group in files.values() for f in group}, 2000)
    assert [u.files for u in units] == [("a/1", "a/2"), ("a/3",), ("b/1", "b/2")]
    assert [u.index for u in units] == [0, 1, 2] and {u.role for u in units} == {"split"}


def test_hash_split_is_a_function_of_the_record():
    shares = [hash_share(42, f"file.jsonl:{i}") for i in range(4000)]
    assert all(0 <= s < 1 for s in shares)
    assert abs(sum(s < 0.05 for s in shares) / 4000 - 0.05) < 0.015
    assert hash_share(42, "x:1") == hash_share(42, "x:1") != hash_share(43, "x:1")


def test_a_small_unit_the_hash_holds_nothing_out_of_holds_out_its_lowest_hash_record(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("".join(f"第{i}条记录。\n" for i in range(3)), encoding="utf-8")
    data = DataConfig(sources=[DataSourceConfig(path=str(path))], eval_split=0.001, block_size=8)
    (unit,) = plan_units(data, {str(path): [str(path)]}, {str(path): 10}, 1)
    row = read_unit(unit, "pretrain", data)
    assert sorted(row["items"]) == [f"第{i}条记录。" for i in range(3)]
    shares = {f"第{i}条记录。": hash_share(data.shuffle_seed, f"notes.txt:{i + 1}") for i in range(3)}
    assert min(shares.values()) >= 0.001  # the hash alone holds nothing out here
    (held,) = [t for t, part in zip(row["items"], row["parts"]) if part == "eval"]
    assert held == min(shares, key=shares.get) and row["parts"].count("train") == 2
    # no eval_split: nothing held out
    assert read_unit(unit, "pretrain", data.model_copy(update={"eval_split": 0.0}))["parts"] == ["train"] * 3


def test_stage2_units_give_the_in_memory_examples(tmp_path, shared_data, minimind_tokenizer):
    lines = (shared_data / "sft" / "medical_alpaca.jsonl").read_text(encoding="utf-8").splitlines()[:120]
    src, paths = tmp_path / "src", []
    src.mkdir()
    for i in range(2):
        path = src / f"p{i}.jsonl"
        path.write_text("\n".join(lines[i::2]) + "\n", encoding="utf-8")
        paths.append(str(path))
    data = DataConfig(sources=[DataSourceConfig(path=str(src))], eval_split=0.2, max_length=128)
    units, manifest = _run(data, "sft", minimind_tokenizer, tmp_path / "set", {str(src): paths})
    assert len(units) == 2 and manifest.stats["records"] == 120
    rows = collections.Counter()
    for shard in manifest.shards:
        table = read_shard(str(tmp_path / "set"), shard).to_pydict()
        rows.update((tuple(i), tuple(l)) for i, l in zip(table["input_ids"], table["labels"]))
    assert 0 < manifest.stats["eval_examples"] < 60 and manifest.rows("eval") == manifest.stats["eval_examples"]
    reference = prepare_stage_data("sft", data.model_copy(update={"eval_split": 0}), minimind_tokenizer).train.to_pydict()
    assert rows == collections.Counter((tuple(i), tuple(l)) for i, l in zip(reference["input_ids"], reference["labels"]))


def test_bad_records_of_all_units_are_reported_together_or_skipped(tmp_path, minimind_tokenizer):
    good = json.dumps({"text": "一段足够长的正文，用来打包成块。" * 4}, ensure_ascii=False)
    files = []
    for name, bad_lines in (("a.jsonl", {2}), ("b.jsonl", {1, 3})):
        rows = [json.dumps({"txt": "wrong field"}) if i in bad_lines else good for i in range(1, 6)]
        (tmp_path / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
        files.append(str(tmp_path / name))
    data = DataConfig(sources=[DataSourceConfig(path=str(tmp_path), format="document")], block_size=16)
    with pytest.raises(DataValidationError) as caught:
        _run(data, "pretrain", minimind_tokenizer, tmp_path / "set", {str(tmp_path): files})
    assert caught.value.total == 3 and caught.value.per_file == {files[0]: 1, files[1]: 2}
    assert f"{files[0]}:2: field 'text'" in str(caught.value) and f"{files[1]}:3: field 'text'" in str(caught.value)
    _, manifest = _run(data.model_copy(update={"bad_records": "skip"}), "pretrain", minimind_tokenizer,
                       tmp_path / "set2", {str(tmp_path): files})
    assert manifest.stats["skipped_records"] == 3 and manifest.stats["records"] == 7
    assert manifest.stats["train_tokens"] % 16 == 0 and manifest.stats["train_blocks"] > 0


def test_a_unit_that_cannot_be_read_stops_the_stage(tmp_path, minimind_tokenizer):
    (tmp_path / "ok.txt").write_text("正文一\n正文二\n", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"line\n\xff\n")
    data = DataConfig(sources=[DataSourceConfig(path=str(tmp_path))], block_size=8)
    with pytest.raises(DataError, match="bad.txt:2: not valid UTF-8"):
        _run(data, "pretrain", minimind_tokenizer, tmp_path / "set",
             {str(tmp_path): [str(tmp_path / "bad.txt"), str(tmp_path / "ok.txt")]})


def test_replay_units_take_their_share_of_the_final_training_set(tmp_path, shared_data, minimind_tokenizer):
    from orchestrator.data.units import main_amount, replay_unit

    legal = DataSourceConfig(path=str(shared_data / "pretrain" / "legal"), text_unit="line", max_records=600)
    replay = {"source": {"path": str(shared_data / "sft" / "medical_alpaca.jsonl"), "format": "alpaca",
                         "max_records": 300}, "ratio": 0.25}
    data = DataConfig(sources=[legal], block_size=64, replay=[replay])
    files = {legal.path: sorted(str(p) for p in (shared_data / "pretrain" / "legal").glob("*.md"))}
    units = plan_units(data, files, {f: 1000 for f in files[legal.path]}, 1 << 30)
    summaries = [tokenize_unit(read_unit(u, "pretrain", data), "pretrain", data, minimind_tokenizer, None,
                               str(tmp_path)) for u in units]
    main = main_amount("pretrain", summaries)
    summaries.append(replay_unit(len(units), 0, "pretrain", data, minimind_tokenizer, None, main, str(tmp_path)))
    manifest = merge_summaries(summaries, "pretrain", data, "key", {})
    [entry] = manifest.stats["replay"]
    assert abs(entry["realised"] - 0.25) <= 0.02 and manifest.stats["replay_share"] == entry["realised"]
    replayed = read_shard(str(tmp_path), manifest.part("train")[-1])
    assert replayed.num_rows * 64 == entry["tokens"]
    assert str(shared_data / "sft" / "medical_alpaca.jsonl") in manifest.stats["files"]
    assert manifest.stats["records"] == 600  # the stage's own records; replay is counted in its entry


def test_stage2_replay_mixes_documents_as_fully_trained_examples(tmp_path, shared_data, minimind_tokenizer):
    from orchestrator.data.units import main_amount, replay_unit

    path = str(shared_data / "sft" / "medical_alpaca.jsonl")
    replay = {"source": {"path": str(shared_data / "pretrain" / "medical" / "fever.txt"), "max_records": 200},
              "ratio": 0.25}
    data = DataConfig(sources=[DataSourceConfig(path=path, max_records=150)], max_length=128, eval_split=0.0,
                      replay=[replay])
    template = select_template(data.template, minimind_tokenizer)
    [unit] = plan_units(data, {path: [path]}, {path: 1000}, 1)
    summaries = [tokenize_unit(read_unit(unit, "sft", data), "sft", data, minimind_tokenizer, template, str(tmp_path))]
    assert main_amount("sft", summaries) == 150
    summaries.append(replay_unit(1, 0, "sft", data, minimind_tokenizer, template, 150, str(tmp_path)))
    manifest = merge_summaries(summaries, "sft", data, "key", {})
    [entry] = manifest.stats["replay"]
    assert entry["examples"] == 50 and entry["realised"] == 50 / 200 and manifest.stats["train_examples"] == 200
    replayed = read_shard(str(tmp_path), manifest.part("train")[-1]).to_pydict()
    assert all(labels == ids for ids, labels in zip(replayed["input_ids"], replayed["labels"]))  # every token


def test_held_out_documents_keep_their_last_short_block(tmp_path, shared_data, minimind_tokenizer):
    """A unit's few held-out documents are less than a block: they still make one (shorter) eval row."""
    legal = DataSourceConfig(path=str(shared_data / "pretrain" / "legal"), text_unit="line", max_records=300)
    data = DataConfig(sources=[legal], block_size=512, eval_split=0.02)
    files = {legal.path: sorted(str(p) for p in (shared_data / "pretrain" / "legal").glob("*.md"))}
    [unit] = plan_units(data, files, {f: 1000 for f in files[legal.path]}, 1 << 30)
    row = read_unit(unit, "pretrain", data)
    summary = tokenize_unit(row, "pretrain", data, minimind_tokenizer, None, str(tmp_path))
    manifest = merge_summaries([summary], "pretrain", data, "key", {})
    eval_texts = [text for text, part in zip(row["items"], row["parts"]) if part == "eval"]
    expected = sum(len(ids) + 1 for ids in minimind_tokenizer(eval_texts, add_special_tokens=False)["input_ids"])
    assert 0 < expected < 2 * 512 and manifest.tokens("eval") == expected  # every held-out token, none dropped
    lengths = [len(r) for r in read_shard(str(tmp_path), manifest.part("eval")[0]).column("input_ids").to_pylist()]
    assert all(n == 512 for n in lengths[:-1]) and 0 < lengths[-1] <= 512
    assert manifest.stats["train_tokens"] % 512 == 0  # training blocks stay full


def test_the_tokenizer_pool_starts_with_what_the_data_nodes_hold_beside_a_read_task_each():
    from orchestrator.config import PrepareConfig
    from orchestrator.data.prepare_ray import starting_actors

    prepare = PrepareConfig(tokenizer_actors=4, cpus_per_actor=0.5, cpus_per_read_task=0.5)
    head, one_core = {"CPU": 0.0}, {"CPU": 1.0}
    assert starting_actors(prepare, 12, [head, one_core]) == 1
    assert starting_actors(prepare, 12, [head, one_core, one_core]) == 2  # one per node, not one in all
    assert starting_actors(prepare, 12, [{"CPU": 16.0}]) == 4  # at most tokenizer_actors
    assert starting_actors(prepare, 3, [{"CPU": 16.0}]) == 3  # at most one per unit
    assert starting_actors(prepare, 12, [head]) == 1  # at least one (Ray Data waits for a CPU)
    labelled = prepare.model_copy(update={"resources": {"data": 1.0}})
    assert starting_actors(labelled, 12, [{"CPU": 8.0}, {"CPU": 2.0, "data": 1.0}]) == 2  # the labelled pool only
    small = PrepareConfig(tokenizer_actors=4, cpus_per_actor=0.05, cpus_per_read_task=0.05)
    assert starting_actors(small, 12, [{"CPU": 0.3}]) == 3  # 0.3 / 0.1 in floats is 2.9999…
