"""The distributed prepare on a real two-node local Ray cluster (ray.cluster_utils.Cluster), real shared files:
the same rows as the in-memory path, every task's bad records in one report, the cache (hit, and a miss that
names the change), a cut-off prepare never used, and the exact-resume order read back from a real shard set."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import DataConfig, DataSourceConfig, PrepareConfig
from orchestrator.data import prepare_ray, shards
from orchestrator.data.epoch_order import worker_row_ids
from orchestrator.data.prepare import prepare_stage_data
from orchestrator.data.prepare_ray import prepare_stage_shards
from orchestrator.data.shard_reader import ShardReader
from orchestrator.errors import DataError, DataValidationError
from ray_nodes import two_node_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a worker node, 2 logical CPUs each."""
    with two_node_cluster("ray-dp-", num_cpus=2) as (cluster, _):
        yield cluster


@pytest.fixture(scope="module")
def tokenizer_dir(shared_data) -> str:
    return str(shared_data / "tokenizers" / "minimind")


@pytest.fixture(scope="module")
def minimind_tokenizer(tokenizer_dir):
    from orchestrator.model.loading import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def _prepare(stage: str, data: DataConfig, tokenizer_dir: str, root: Path) -> prepare_ray.PreparedShards:
    return prepare_stage_shards(stage, data, tokenizer_dir, tokenizer_dir, str(root / "data" / stage))


def _rows(prepared, part: str = "train") -> list[dict]:
    out = []
    for info in prepared.manifest.part(part):
        out.extend(shards.read_shard(prepared.set_uri, info).to_pylist())
    return out


def _segments(blocks: list[list[int]], eos: int) -> list[tuple[int, ...]]:
    """The whole documents in a run of packed blocks (split at EOS; the cut last one dropped)."""
    stream = [t for block in blocks for t in block]
    pieces, current = [], []
    for token in stream:
        if token == eos:
            pieces.append(tuple(current))
            current = []
        else:
            current.append(token)
    return pieces


@pytest.fixture(scope="module")
def stage1(two_nodes, shared_data, tokenizer_dir, tmp_path_factory):
    """Legal + medical documents in several units (~1 MB of text), no eval split."""
    data = DataConfig(sources=[DataSourceConfig(path=str(shared_data / "pretrain" / name), text_unit="line")
                               for name in ("legal", "medical")], block_size=128, eval_split=0.0,
                      prepare=PrepareConfig(unit_mb=0.15))
    root = tmp_path_factory.mktemp("stage1")
    return data, root, _prepare("pretrain", data, tokenizer_dir, root)


def test_stage1_spreads_over_both_nodes_and_gives_the_in_memory_documents(stage1, two_nodes, minimind_tokenizer):
    data, _, prepared = stage1
    assert not prepared.reused and len(prepared.manifest.part("train")) >= 4
    node_ids = {n.node_id for n in [two_nodes.head_node, *two_nodes.worker_nodes]}
    assert set(prepared.nodes["read"]) == node_ids, prepared.nodes  # read tasks ran on both nodes
    assert set(prepared.nodes["tokenize"]) <= node_ids
    # The driver got summaries back, never rows.
    corpus = sum(int(identity.split()[0][len("size:"):]) for identity in prepared.manifest.inputs["files"].values())
    assert 0 < prepared.driver_bytes < corpus / 20, (prepared.driver_bytes, corpus)

    eos = minimind_tokenizer.eos_token_id
    reference = prepare_stage_data("pretrain", data, minimind_tokenizer)
    ours = collections.Counter()
    for info in prepared.manifest.part("train"):  # each shard packs its own unit's documents
        ours.update(_segments(shards.read_shard(prepared.set_uri, info).column("input_ids").to_pylist(), eos))
    theirs = collections.Counter(_segments(reference.train.column("input_ids").to_pylist(), eos))
    units = len(prepared.manifest.part("train"))

    def tokens(counter: collections.Counter) -> int:
        return sum((len(doc) + 1) * n for doc, n in counter.items())

    # The documents differ only by the packing tails: each unit's incomplete last block (ours), the one
    # incomplete last block of the whole corpus (theirs), each with the document cut at its start.
    longest = max(len(doc) + 1 for doc in theirs)
    assert tokens(ours - theirs) < data.block_size + longest
    assert tokens(theirs - ours) < units * (data.block_size + longest)
    assert sum(ours.values()) > 0.99 * sum(theirs.values())
    total = prepared.stats["train_tokens"] + prepared.stats["dropped_tail_tokens"]
    assert total == reference.stats["train_tokens"] + reference.stats["dropped_tail_tokens"]
    assert prepared.stats["dropped_tail_tokens"] < units * data.block_size  # the per-unit packing tail
    assert prepared.stats["packed_share"] >= 0.99


def test_stage2_gives_the_in_memory_examples(two_nodes, shared_data, tokenizer_dir, minimind_tokenizer, tmp_path):
    data = DataConfig(sources=[DataSourceConfig(path=str(shared_data / "sft" / "medical_alpaca.jsonl"),
                                                format="alpaca", max_records=300)],
                      max_length=192, eval_split=0.1)
    prepared = _prepare("sft", data, tokenizer_dir, tmp_path)
    assert prepared.has_eval and 10 < prepared.eval_rows < 60
    rows = collections.Counter((tuple(r["input_ids"]), tuple(r["labels"]))
                               for r in _rows(prepared, "train") + _rows(prepared, "eval"))
    reference = prepare_stage_data("sft", data.model_copy(update={"eval_split": 0}), minimind_tokenizer).train
    assert rows == collections.Counter(zip(map(tuple, reference.column("input_ids").to_pylist()),
                                           map(tuple, reference.column("labels").to_pylist())))


def _write_jsonl(path: Path, good: int, bad_lines: set[int]) -> None:
    rows = [json.dumps({"txt": "wrong field"}) if i in bad_lines else
            json.dumps({"text": f"第{i}条：合同当事人应当遵循公平原则确定各方的权利和义务。" * 3}, ensure_ascii=False)
            for i in range(1, good + len(bad_lines) + 1)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_bad_records_of_every_task_in_one_report_or_skipped(two_nodes, tokenizer_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    bad = {"a.jsonl": {2}, "b.jsonl": {1, 4}, "c.jsonl": set(), "d.jsonl": {3}}
    for name, lines in bad.items():
        _write_jsonl(src / name, 30, lines)
    # one file per unit: four read tasks
    data = DataConfig(sources=[DataSourceConfig(path=str(src), format="document")], block_size=32,
                      prepare=PrepareConfig(unit_mb=0.000001))
    with pytest.raises(DataValidationError) as caught:
        _prepare("pretrain", data, tokenizer_dir, tmp_path)
    error = caught.value
    assert error.total == 4
    assert error.per_file == {str(src / "a.jsonl"): 1, str(src / "b.jsonl"): 2, str(src / "d.jsonl"): 1}
    for name, line in (("a", 2), ("b", 1), ("b", 4), ("d", 3)):
        assert f"{src / name}.jsonl:{line}: field 'text'" in str(error)
    assert not shards.complete_sets(str(tmp_path / "data" / "pretrain"))  # nothing marked complete

    skipped = _prepare("pretrain", data.model_copy(update={"bad_records": "skip"}), tokenizer_dir, tmp_path)
    assert skipped.stats["skipped_records"] == 4 and skipped.stats["records"] == 120
    assert skipped.stats["bad_records_per_file"] == error.per_file
    assert len(skipped.manifest.part("train")) == 4

    # A file a read task cannot decode stops the prepare with our own error, as raised in the task (the pipeline
    # runs in a Ray task of its own: no RayTaskError wrapping, no traceback of Ray's in the message).
    (src / "e.jsonl").write_bytes(b'{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError) as caught:
        _prepare("pretrain", data, tokenizer_dir, tmp_path)
    assert type(caught.value) is DataError, type(caught.value).__mro__
    assert str(caught.value).startswith(f"{src / 'e.jsonl'}:1: not valid UTF-8"), str(caught.value)


def test_cache_hit_prepares_nothing_and_a_miss_names_the_change(two_nodes, shared_data, tokenizer_dir, tmp_path,
                                                                caplog):
    src = tmp_path / "src"
    src.mkdir()
    for path in sorted((shared_data / "pretrain" / "legal").glob("*.md"), key=lambda p: p.stat().st_size)[:2]:
        shutil.copy(path, src / path.name)  # two small statutes
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, tokenizer)
    data = DataConfig(sources=[DataSourceConfig(path=str(src), text_unit="line")], block_size=64)

    def prepare(config: DataConfig) -> prepare_ray.PreparedShards:
        return prepare_stage_shards("pretrain", config, str(tokenizer), str(tokenizer), str(tmp_path / "data"))

    first = prepare(data)
    caplog.set_level("INFO", logger="orchestrator.data.prepare_ray")
    again = prepare(data.model_copy(update={"prepare": PrepareConfig(unit_mb=1.0, tokenizer_actors=1)}))
    assert again.reused and again.set_uri == first.set_uri and again.nodes == {}
    assert "prepared nothing" in caplog.text

    edited = sorted(src.glob("*"))[0]
    edited.write_text(edited.read_text(encoding="utf-8") + "\n新增的一行正文。\n", encoding="utf-8")
    changed_file = prepare(data)
    assert not changed_file.reused and changed_file.set_uri != first.set_uri
    assert changed_file.change.startswith(f"source file {edited} changed (size:")

    config_file = tokenizer / "tokenizer_config.json"
    config_file.write_text(config_file.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    changed_tokenizer = prepare(data)
    assert changed_tokenizer.change.startswith("tokenizer file tokenizer_config.json changed")

    changed_block = prepare(data.model_copy(update={"block_size": 32}))
    assert changed_block.change == "data.block_size changed (64 -> 32)"
    assert changed_block.stats["block_size"] == 32
    assert len(shards.complete_sets(str(tmp_path / "data"))) == 4


def test_a_prepare_cut_off_before_its_manifest_is_never_used(two_nodes, shared_data, tokenizer_dir, tmp_path,
                                                             monkeypatch, caplog):
    """Also: replay (medical documents, 20% of the final training tokens) as a shard of its own, from a Ray task."""
    replay = {"source": {"path": str(shared_data / "pretrain" / "medical" / "fever.txt")}, "ratio": 0.2}
    data = DataConfig(sources=[DataSourceConfig(path=str(shared_data / "pretrain" / "legal"), text_unit="line",
                                                max_records=400)], block_size=64, replay=[replay])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("the driver died after the shards, before the manifest")

    with monkeypatch.context() as patch:
        patch.setattr(prepare_ray, "write_manifest", killed)
        with pytest.raises(KeyboardInterrupt):
            _prepare("pretrain", data, tokenizer_dir, tmp_path)
    [partial] = [p for p in (tmp_path / "data" / "pretrain").iterdir() if p.is_dir()]
    assert sorted(p.name for p in partial.iterdir()) == ["eval-00000.parquet", "train-00000.parquet",
                                                          "train-00001.parquet"]
    assert shards.read_manifest(str(partial)) is None and not shards.complete_sets(str(partial.parent))

    caplog.set_level("INFO", logger="orchestrator.data.prepare_ray")
    rerun = _prepare("pretrain", data, tokenizer_dir, tmp_path)
    assert not rerun.reused and rerun.set_uri == str(partial)
    assert "incomplete prepare (no manifest); preparing it again" in caplog.text
    assert shards.read_manifest(str(partial)) is not None
    [entry] = rerun.stats["replay"]
    replayed = [s for s in rerun.manifest.part("train") if s.name == "train-00001.parquet"]
    assert abs(entry["realised"] - 0.2) <= 0.02 and entry["tokens"] == replayed[0].tokens
    assert rerun.stats["replay_share"] == entry["realised"]
    assert str(shared_data / "pretrain" / "medical" / "fever.txt") in rerun.stats["files"]
    assert rerun.manifest.rows("eval") > 0 and all(s.name != "eval-00001.parquet" for s in rerun.manifest.shards)


def test_a_resumed_reader_trains_exactly_the_rows_after_its_position(stage1, two_nodes, shared_data, tokenizer_dir,
                                                                     tmp_path):
    """Stage 1 (consecutive) and stage 2 (length-grouped): for every worker, reading from micro-batch k gives the
    rows an uninterrupted reading gives after k, the same ids in the same order, with the stored tokens."""
    _, _, prepared = stage1
    src = tmp_path / "sft"
    src.mkdir()
    lines = (shared_data / "sft" / "medical_alpaca.jsonl").read_text(encoding="utf-8").splitlines()[:360]
    for part in range(3):
        (src / f"part{part}.jsonl").write_text("\n".join(lines[part::3]) + "\n", encoding="utf-8")
    sft = _prepare("sft", DataConfig(sources=[DataSourceConfig(path=str(src))], max_length=128, eval_split=0.0,
                                     prepare=PrepareConfig(unit_mb=0.01)), tokenizer_dir, tmp_path)
    assert len(sft.manifest.part("train")) == 3
    for shard_set, grouped in ((prepared, False), (sft, True)):
        reader = ShardReader(shard_set.set_uri, shard_set.manifest)
        counts = [s.rows for s in shard_set.manifest.part("train")]
        for rank in (0, 1):
            full = list(reader.epoch_micro_batches(epoch=1, seed=3, world_size=2, rank=rank, micro_batch_size=4,
                                                   group_lengths=grouped))
            ids = np.concatenate([b.row_ids for b in full])
            per_worker = len(full) * 4
            if grouped:
                assert sorted(ids.tolist()) == sorted(worker_row_ids(counts, 3, 1, 2, rank, 0, per_worker).tolist())
            else:
                assert np.array_equal(ids, worker_row_ids(counts, 3, 1, 2, rank, 0, per_worker))
            for skip in (1, len(full) // 2, len(full) - 1):
                resumed = ShardReader(shard_set.set_uri, shard_set.manifest).epoch_micro_batches(
                    1, 3, 2, rank, 4, group_lengths=grouped, skip=skip)
                again = list(resumed)
                assert [b.row_ids.tolist() for b in again] == [b.row_ids.tolist() for b in full[skip:]]
                assert all(np.array_equal(x, y) for a, b in zip(again, full[skip:])
                           for x, y in zip(a.columns["input_ids"], b.columns["input_ids"]))
        # the two workers' rows of an epoch never overlap
        both = [np.concatenate([b.row_ids for b in reader.epoch_micro_batches(1, 3, 2, r, 4, grouped)])
                for r in (0, 1)]
        assert not set(both[0].tolist()) & set(both[1].tolist())
