"""Prepared shard sets without Ray: manifest last, fingerprints naming what changed, the epoch order and the
worker's reader (every row once per epoch, equal shares, exact resume by position, length grouping)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.config import DataConfig, DataSourceConfig
from orchestrator.data.batching import padding_efficiency
from orchestrator.data.epoch_order import worker_row_ids, worker_share
from orchestrator.data.fingerprint import compute_fingerprint, describe_change, file_identity, id_settings
from orchestrator.data.shard_reader import ShardReader
from orchestrator.data.shards import (
    MANIFEST,
    ShardManifest,
    complete_sets,
    read_manifest,
    shard_name,
    token_table,
    write_manifest,
    write_shard,
)


def _write_set(root, counts, fingerprint="abc", lengths=None, with_labels=False):
    """A shard set whose row r of shard s holds tokens [s*1000 + r] * length."""
    rng = np.random.default_rng(0)
    shards = []
    for s, count in enumerate(counts):
        ids = [np.full(int(lengths(rng)) if lengths else 4, s * 1000 + r, dtype=np.int32) for r in range(count)]
        table = token_table(ids, ids if with_labels else None)
        shards.append(write_shard(str(root), shard_name("train", s), "train", table))
    manifest = ShardManifest(fingerprint, "pretrain", tuple(shards), {"train_rows": sum(counts)})
    write_manifest(str(root), manifest)
    return read_manifest(str(root))


def test_manifest_round_trip_and_cut_off_set_is_not_used(tmp_path):
    manifest = _write_set(tmp_path / "set", [3, 5])
    assert manifest is not None and manifest.rows("train") == 8 and manifest.tokens("train") == 32
    assert [s.name for s in manifest.shards] == ["train-00000.parquet", "train-00001.parquet"]
    # a prepare cut off before its manifest: shards only
    partial = tmp_path / "partial"
    write_shard(str(partial), shard_name("train", 0), "train", token_table([np.arange(4, dtype=np.int32)]))
    assert read_manifest(str(partial)) is None
    # a shard lost or truncated after the manifest: not complete either
    (tmp_path / "set" / "train-00001.parquet").write_bytes(b"truncated")
    assert read_manifest(str(tmp_path / "set")) is None


def test_complete_sets_newest_first(tmp_path):
    _write_set(tmp_path / "a", [2], fingerprint="a")
    _write_set(tmp_path / "b", [2], fingerprint="b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train-00000.parquet").write_bytes(b"x")
    assert [m.fingerprint for m in complete_sets(str(tmp_path))] == ["b", "a"]


def test_fingerprint_names_the_changed_input(tmp_path):
    source = tmp_path / "docs.txt"
    source.write_text("one\ntwo\n", encoding="utf-8")
    data = DataConfig(sources=[DataSourceConfig(path=str(source))], block_size=64)
    tokenizer = {"tokenizer.json": "size:10 sha256:aa"}
    first = compute_fingerprint("pretrain", {str(source): file_identity(str(source))}, tokenizer,
                                id_settings("pretrain", data))
    assert first.key == compute_fingerprint("pretrain", {str(source): file_identity(str(source))}, tokenizer,
                                            id_settings("pretrain", data)).key
    # read-time and other-stage settings do not change the key
    assert id_settings("pretrain", data) == id_settings("pretrain", data.model_copy(update={"max_length": 99,
                                                                                         "group_by_length": False}))
    source.write_text("one\nthree\n", encoding="utf-8")
    edited = compute_fingerprint("pretrain", {str(source): file_identity(str(source))}, tokenizer,
                                 id_settings("pretrain", data.model_copy(update={"block_size": 32})))
    assert edited.key != first.key
    change = describe_change(first.inputs, edited.inputs)
    assert f"source file {source} changed" in change and "data.block_size changed (64 -> 32)" in change
    retok = compute_fingerprint("pretrain", first.inputs["files"], {"tokenizer.json": "size:11 sha256:bb"},
                                first.inputs["settings"])
    assert describe_change(first.inputs, retok.inputs).startswith("tokenizer file tokenizer.json changed")
    json.dumps(first.inputs)  # stored in the manifest


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_order_covers_every_row_once_in_equal_shares(world):
    counts = [7, 3, 11, 5]
    total = sum(counts)
    shares = [worker_row_ids(counts, seed=5, epoch=1, world_size=world, rank=r) for r in range(world)]
    assert all(len(s) == worker_share(total, world) for s in shares)
    everything = np.concatenate(shares)
    assert len(set(everything.tolist())) == len(everything)  # no row twice
    assert set(everything.tolist()) <= set(range(total))
    # a function of (seed, epoch): the same again, another epoch differs
    assert np.array_equal(everything, np.concatenate(
        [worker_row_ids(counts, 5, 1, world, r) for r in range(world)]))
    assert not np.array_equal(worker_row_ids(counts, 5, 1, 1, 0), worker_row_ids(counts, 5, 2, 1, 0))
    # any stretch of positions is the same stretch of the whole sequence
    whole = worker_row_ids(counts, 5, 1, world, 0)
    assert np.array_equal(worker_row_ids(counts, 5, 1, world, 0, 3, 9), whole[3:9])


def test_reader_resumes_at_the_exact_micro_batch(tmp_path):
    manifest = _write_set(tmp_path / "set", [9, 4, 13])
    reader = ShardReader(str(tmp_path / "set"), manifest)
    assert reader.micro_batches_per_epoch(2, 3) == 4  # 26 rows // 2 workers = 13 // 3
    full = list(reader.epoch_micro_batches(epoch=0, seed=1, world_size=2, rank=1, micro_batch_size=3))
    ids = np.concatenate([b.row_ids for b in full])
    assert np.array_equal(ids, worker_row_ids(manifest_counts(manifest), 1, 0, 2, 1, 0, 12))
    for batch in full:  # each row's tokens are the ones stored for that id
        offsets = reader.offsets
        for row_id, tokens in zip(batch.row_ids, batch.columns["input_ids"]):
            shard = int(np.searchsorted(offsets, row_id, side="right") - 1)
            assert tokens[0] == shard * 1000 + (row_id - offsets[shard])
    resumed = list(ShardReader(str(tmp_path / "set"), manifest).epoch_micro_batches(0, 1, 2, 1, 3, skip=2))
    assert [b.row_ids.tolist() for b in resumed] == [b.row_ids.tolist() for b in full[2:]]


def manifest_counts(manifest: ShardManifest) -> list[int]:
    return [s.rows for s in manifest.part("train")]


def test_length_grouping_is_exact_on_resume_and_pads_little(tmp_path, monkeypatch):
    import orchestrator.data.shard_reader as shard_reader

    monkeypatch.setattr(shard_reader, "WINDOW_MICRO_BATCHES", 8)  # several windows on little data
    manifest = _write_set(tmp_path / "set", [60, 41, 77], lengths=lambda rng: rng.integers(5, 300),
                          with_labels=True)
    reader = ShardReader(str(tmp_path / "set"), manifest)
    full = list(reader.epoch_micro_batches(3, 7, 2, 0, 4, group_lengths=True))
    assert len(full) == reader.micro_batches_per_epoch(2, 4) == 22
    ids = np.concatenate([b.row_ids for b in full])
    assert sorted(ids.tolist()) == sorted(worker_row_ids(manifest_counts(manifest), 7, 3, 2, 0, 0, 88).tolist())
    lengths = {int(i): len(t) for b in full for i, t in zip(b.row_ids, b.columns["input_ids"])}
    batches = [[int(i) for i in b.row_ids] for b in full]
    assert padding_efficiency(lengths, batches) > 0.9
    for skip in (5, 8, 13):  # inside a window, on a window boundary, in a later window
        again = list(reader.epoch_micro_batches(3, 7, 2, 0, 4, group_lengths=True, skip=skip))
        assert [b.row_ids.tolist() for b in again] == [b.row_ids.tolist() for b in full[skip:]]
    assert all(np.array_equal(i, l) for b in full for i, l in zip(b.columns["input_ids"], b.columns["labels"]))


def test_eval_reading_sees_every_row_in_order(tmp_path):
    manifest = _write_set(tmp_path / "set", [3, 2])
    batches = list(ShardReader(str(tmp_path / "set"), manifest).iter_batches(batch_size=2))
    assert [len(b["input_ids"]) for b in batches] == [2, 1, 2]
    assert (tmp_path / "set" / MANIFEST).exists()


def test_source_identities_rehash_only_files_whose_size_or_mtime_changed(tmp_path, monkeypatch):
    import os

    from orchestrator.data import prepare_ray

    files = []
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"{name}\n", encoding="utf-8")
        files.append(str(tmp_path / name))
    first = prepare_ray.source_identities(files, str(tmp_path / "data"))
    assert first == {f: file_identity(f) for f in files} and (tmp_path / "data" / prepare_ray.IDENTITIES).exists()

    read = []
    monkeypatch.setattr(prepare_ray, "file_identity", lambda uri: read.append(uri) or file_identity(uri))
    assert prepare_ray.source_identities(files, str(tmp_path / "data")) == first and read == []  # stat only
    (tmp_path / "b.txt").write_text("b, edited\n", encoding="utf-8")
    stat = os.stat(files[1])
    os.utime(files[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    again = prepare_ray.source_identities(files, str(tmp_path / "data"))
    assert read == [files[1]] and again[files[0]] == first[files[0]] and again[files[1]] != first[files[1]]
