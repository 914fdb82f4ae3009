"""The node cache's pure parts: entry keys, download verification, bounded eviction, lock-aware."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from orchestrator import node_cache


def _entry(root: Path, name: str, size: int, used_at: float) -> Path:
    entry = root / name
    entry.mkdir()
    (entry / "weights.bin").write_bytes(b"x" * size)
    (entry / node_cache.COMPLETE).write_text("{}")
    os.utime(entry / node_cache.COMPLETE, (used_at, used_at))
    return entry


def test_a_changed_object_is_a_new_entry_and_the_name_stays_readable():
    versions = {"model.safetensors": "100:etag-a", "config.json": "10:etag-b"}
    key = node_cache.entry_key("s3://bucket/runs/demo/base/", versions)
    assert key == node_cache.entry_key("s3://bucket/runs/demo/base", dict(reversed(list(versions.items()))))
    assert key.startswith("base-")
    assert key != node_cache.entry_key("s3://bucket/runs/demo/base", {**versions, "config.json": "10:etag-c"})
    assert key != node_cache.entry_key("s3://bucket/runs/other/base", versions)


def test_a_download_is_checked_against_the_listing_and_the_manifest(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(b"abcd")
    assert node_cache.size_problem(tmp_path, {"model/w.bin": 4}) is None
    assert node_cache.size_problem(tmp_path, {"model/w.bin": 5}) == "model/w.bin has 4 bytes, the store lists 5"
    assert node_cache.size_problem(tmp_path, {"model/w.bin": 4, "tok.json": 2}) == "tok.json is missing"
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"model/w.bin": {"size": 9, "sha256": "0"}}}))
    assert "does not match manifest.json (expected 9 bytes)" in node_cache.size_problem(
        tmp_path, {"model/w.bin": 4, "manifest.json": (tmp_path / "manifest.json").stat().st_size})


def test_eviction_removes_least_recently_used_first_and_never_the_entry_just_fetched(tmp_path):
    now = time.time()
    oldest = _entry(tmp_path, "a", 400, now - 30)
    middle = _entry(tmp_path, "b", 400, now - 20)
    newest = _entry(tmp_path, "c", 400, now - 10)
    unfinished = tmp_path / "d"  # a download in progress has no COMPLETE marker: not an entry yet
    unfinished.mkdir()
    (unfinished / "part").write_bytes(b"x" * 1000)

    assert node_cache.evict(tmp_path, max_bytes=900, keep=oldest) == ["b"]
    assert oldest.exists() and not middle.exists() and newest.exists() and unfinished.exists()


def test_an_entry_another_process_holds_is_not_evicted(tmp_path):
    now = time.time()
    held = _entry(tmp_path, "held", 400, now - 30)
    free = _entry(tmp_path, "free", 400, now - 20)
    keep = _entry(tmp_path, "keep", 400, now)
    with open(held.with_suffix(".lock"), "a+") as handle:  # as a reader in another process would hold it
        fcntl.flock(handle, fcntl.LOCK_EX)
        assert node_cache.evict(tmp_path, max_bytes=500, keep=keep) == ["free"]
    assert held.exists() and not free.exists()


def test_local_paths_are_returned_as_they_are(tmp_path):
    assert node_cache.fetch(str(tmp_path), cache_dir=str(tmp_path / "cache")) == str(tmp_path)
    assert not (tmp_path / "cache").exists()
