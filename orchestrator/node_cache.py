"""One download per node: remote directories (base models, tokenizers, checkpoints) fetched once into a
node-local cache and shared by every process on the node.

An entry is keyed by the URI and the listing of what lies under it (relative path, size and, on S3,
the ETag), so a changed object is a new entry, never a stale read. The first process to take an
entry's lock downloads it into a temporary directory, checks every file's size against the listing
(and against the stored manifest's sizes where there is one), and renames it into place; the others
wait on the lock and read. The cache is bounded: after a download, least recently used entries are
removed until the cache fits `max_gb` (an entry another process is filling is never touched).
Local paths are returned as they are (nothing to fetch).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

from orchestrator import storage
from orchestrator.errors import StorageError

log = logging.getLogger(__name__)

COMPLETE = ".complete"  # written last inside an entry: its presence means the files were verified
DEFAULT_DIR = os.path.join(tempfile.gettempdir(), "orchestrator-node-cache")


def fetch(uri: str, cache_dir: Optional[str] = None, max_gb: Optional[float] = None) -> str:
    """A local directory holding `uri`'s files: the node's cached copy, downloaded first if needed."""
    if not storage.is_remote(uri):
        return storage.local_path(uri)
    root = Path(cache_dir or DEFAULT_DIR)
    root.mkdir(parents=True, exist_ok=True)
    versions = storage.list_file_versions(uri)
    if not versions:
        raise StorageError(f"{uri}: nothing to download (no objects under this prefix)")
    entry = root / entry_key(uri, versions)
    with _locked(entry.with_suffix(".lock")):
        if (entry / COMPLETE).exists():
            os.utime(entry / COMPLETE)  # recently used
            return str(entry)
        _download_verified(uri, versions, entry)
        if max_gb is not None:
            evict(root, int(max_gb * 1024**3), keep=entry)
    return str(entry)


def entry_key(uri: str, versions: dict[str, str]) -> str:
    """Cache entry name: readable tail of the URI + hash of the URI and every file's version."""
    digest = hashlib.sha256(json.dumps([uri.rstrip("/"), sorted(versions.items())]).encode()).hexdigest()[:16]
    tail = "".join(c if c.isalnum() or c in "-_." else "_" for c in uri.rstrip("/").rsplit("/", 1)[-1])[:40]
    return f"{tail}-{digest}"


def _download_verified(uri: str, versions: dict[str, str], entry: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        storage.download_dir(uri, str(staging))
        problem = size_problem(staging, {rel: int(v.split(":", 1)[0]) for rel, v in versions.items()})
        if problem:
            raise StorageError(f"{uri}: download incomplete, {problem}")
        (staging / COMPLETE).write_text(json.dumps({"uri": uri, "files": len(versions), "at": time.time()}))
        if entry.exists():  # a leftover without COMPLETE: an earlier process died mid-download
            shutil.rmtree(entry)
        os.replace(staging, entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("node cache: %s fetched into %s", uri, entry)


def size_problem(local_dir: Path, expected_sizes: dict[str, int]) -> Optional[str]:
    """What is wrong with a downloaded tree, against the listing and any manifest.json in it; None if sound."""
    for rel, size in expected_sizes.items():
        path = local_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, the store lists {size}"
    manifest = local_dir / "manifest.json"
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text()).get("files", {})
        except (OSError, ValueError) as exc:
            return f"manifest.json unreadable: {exc}"
        for rel, meta in files.items() if isinstance(files, dict) else ():
            size = meta.get("size") if isinstance(meta, dict) else None
            if size is not None and (not (local_dir / rel).is_file() or (local_dir / rel).stat().st_size != size):
                return f"{rel} does not match manifest.json (expected {size} bytes)"
    return None


def evict(root: Path, max_bytes: int, keep: Path) -> list[str]:
    """Remove least recently used complete entries (never `keep`) until the cache fits; returns their names."""
    entries = []
    for entry in root.iterdir():
        marker = entry / COMPLETE
        if entry.is_dir() and marker.exists():
            entries.append((marker.stat().st_mtime, entry, _tree_bytes(entry)))
    total = sum(size for _, _, size in entries)
    removed = []
    for _, entry, size in sorted(entries, key=lambda item: item[0]):
        if total <= max_bytes:
            break
        if entry == keep:
            continue
        with _locked(entry.with_suffix(".lock"), blocking=False) as held:
            if not held:  # another process is reading or refreshing it right now
                continue
            shutil.rmtree(entry, ignore_errors=True)
        total -= size
        removed.append(entry.name)
        log.info("node cache: evicted %s (%d MB) to stay under %d MB", entry.name, size >> 20, max_bytes >> 20)
    return removed


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def _locked(lock_path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive advisory lock on `lock_path` (held by one process of the node at a time)."""
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
