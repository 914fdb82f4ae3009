"""The cache key of a stage's prepared data: a fingerprint of everything that determines its tokens.

Inputs: each source file's identity (size + sha256, or the S3 ETag + size), the tokenizer's files,
and the data settings that change ids (formats and shapes, template, block or max length, train_on,
eval split, seed, ...). A rerun, a resumed run, every Tune trial reuses the shard set whose key
matches; a changed input gives a new key, and `describe_change` names which input changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from orchestrator import storage
from orchestrator.config import DataConfig

# Bumped when the prepared format or the way ids are made changes: old sets stop matching.
PREPARE_VERSION = 2
# Settings that shape how rows are read, not which rows exist.
READ_TIME_SETTINGS = frozenset({"group_by_length", "prepare"})
STAGE_ONLY_SETTINGS = {"pretrain": frozenset({"max_length", "template", "train_on"}),
                       "sft": frozenset({"block_size", "conversations_as_documents"})}
HASH_CHUNK = 8 << 20


@dataclass(frozen=True)
class Fingerprint:
    key: str
    inputs: dict[str, Any]


def file_identity(uri: str) -> str:
    """`size:<n> sha256:<hex>` of a local file (streamed), `size:<n> etag:<etag>` of an S3 object."""
    if storage.is_s3(uri):
        size, etag = storage.s3_object_identity(uri)
        return f"size:{size} etag:{etag}"
    if storage.is_remote(uri):
        data = storage.read_bytes(uri)
        return f"size:{len(data)} sha256:{hashlib.sha256(data).hexdigest()}"
    digest = hashlib.sha256()
    path = storage.local_path(uri)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return f"size:{os.path.getsize(path)} sha256:{digest.hexdigest()}"


def tokenizer_identity(tokenizer_dir: str) -> dict[str, str]:
    """Identity of every file of a (local) tokenizer directory."""
    out = {}
    for root, _, names in os.walk(tokenizer_dir):
        for name in sorted(names):
            path = os.path.join(root, name)
            out[os.path.relpath(path, tokenizer_dir)] = file_identity(path)
    return dict(sorted(out.items()))


def id_settings(stage: str, data: DataConfig) -> dict[str, Any]:
    """The data settings of a stage that change its ids (everything but read-time and other-stage settings)."""
    dropped = READ_TIME_SETTINGS | STAGE_ONLY_SETTINGS.get(stage, frozenset())
    return {k: v for k, v in data.model_dump(mode="json").items() if k not in dropped}


def compute_fingerprint(stage: str, files: Mapping[str, str], tokenizer: Mapping[str, str],
                        settings: Mapping[str, Any]) -> Fingerprint:
    """The key (hex) over the stage, source file identities, tokenizer files and id settings."""
    inputs = {"version": PREPARE_VERSION, "stage": stage, "files": dict(sorted(files.items())),
              "tokenizer": dict(sorted(tokenizer.items())), "settings": dict(settings)}
    blob = json.dumps(inputs, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return Fingerprint(hashlib.sha256(blob).hexdigest()[:24], inputs)


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Which inputs differ between two fingerprints' inputs, in words (empty when none do)."""
    changes: list[str] = []
    if old.get("version") != new.get("version"):
        changes.append(f"the prepare format changed (version {old.get('version')} -> {new.get('version')})")
    changes += _dict_changes("source file", old.get("files", {}), new.get("files", {}))
    changes += _dict_changes("tokenizer file", old.get("tokenizer", {}), new.get("tokenizer", {}))
    old_settings, new_settings = old.get("settings", {}), new.get("settings", {})
    for key in sorted(set(old_settings) | set(new_settings)):
        if old_settings.get(key) != new_settings.get(key):
            changes.append(f"data.{key} changed ({_short(old_settings.get(key))} -> {_short(new_settings.get(key))})")
    return "; ".join(changes)


def _dict_changes(what: str, old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    out = []
    for name in sorted(set(old) | set(new)):
        if name not in old:
            out.append(f"{what} {name} was added")
        elif name not in new:
            out.append(f"{what} {name} was removed")
        elif old[name] != new[name]:
            out.append(f"{what} {name} changed ({old[name]} -> {new[name]})")
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."
