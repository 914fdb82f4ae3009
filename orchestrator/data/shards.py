"""A prepared shard set: Parquet shards of token rows plus a manifest written last.

Layout under `RunLayout.data(stage)/<fingerprint>/`:

    train-00000.parquet ...   token rows (input_ids, and labels for stage 2), one shard per prepare unit
    eval-00000.parquet  ...   held-out rows
    manifest.json             shard list (rows, tokens, bytes, sha256), stats, the fingerprint's inputs

The manifest is written after every shard; a prepare cut off midway leaves no manifest, and a shard
set without one (or whose files do not match it) is never used.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator import storage
from orchestrator.errors import DataError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
PARTS = ("train", "eval")


@dataclass(frozen=True)
class ShardInfo:
    """One Parquet file of the set."""

    name: str  # file name inside the set's directory
    part: str  # train | eval
    rows: int
    tokens: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardManifest:
    """What a complete shard set holds; `inputs` are the fingerprint's inputs (to name what changed)."""

    fingerprint: str
    stage: str
    shards: tuple[ShardInfo, ...]
    stats: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    format_version: int = FORMAT_VERSION

    def part(self, name: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.part == name]

    def rows(self, part: str) -> int:
        return sum(s.rows for s in self.part(part))

    def tokens(self, part: str) -> int:
        return sum(s.tokens for s in self.part(part))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "ShardManifest":
        raw = json.loads(text)
        raw["shards"] = tuple(ShardInfo(**s) for s in raw["shards"])
        return cls(**raw)


def shard_name(part: str, index: int) -> str:
    return f"{part}-{index:05d}.parquet"


def token_table(input_ids: list[np.ndarray], labels: Optional[list[np.ndarray]] = None) -> pa.Table:
    """Rows of token ids (and labels) as list<int32> columns."""
    columns = {"input_ids": input_ids} if labels is None else {"input_ids": input_ids, "labels": labels}
    out = {}
    for name, arrays in columns.items():
        offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        flat = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, dtype=np.int32)
        out[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.int32()))
    return pa.table(out)


def blocks_table(blocks: np.ndarray) -> pa.Table:
    """Stage 1 blocks ([n, block_size] int32) as the list<int32> `input_ids` column, without copying row by row."""
    flat = pa.array(blocks.reshape(-1).astype(np.int32, copy=False))
    offsets = pa.array(np.arange(0, blocks.size + 1, max(blocks.shape[1], 1), dtype=np.int32)[: len(blocks) + 1])
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, flat)})


def write_shard(set_uri: str, name: str, part: str, table: pa.Table) -> ShardInfo:
    """Write one shard (Parquet) and describe it; the bytes are hashed as written."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    storage.write_bytes(storage.join(set_uri, name), data)
    tokens = int(pc.list_value_length(table.column("input_ids")).to_numpy().sum()) if table.num_rows else 0
    return ShardInfo(name, part, table.num_rows, tokens, len(data), hashlib.sha256(data).hexdigest())


def read_shard(set_uri: str, shard: ShardInfo) -> pa.Table:
    """A shard's rows, checked against the manifest's row count."""
    table = pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(set_uri, shard.name))))
    if table.num_rows != shard.rows:
        raise DataError(f"{storage.join(set_uri, shard.name)}: {table.num_rows} rows, the manifest says {shard.rows}")
    return table


def write_manifest(set_uri: str, manifest: ShardManifest) -> None:
    """Write the manifest: call only after every shard is written (it marks the set complete)."""
    stamped = ShardManifest(**{**asdict(manifest), "shards": manifest.shards, "created": time.time()})
    storage.write_bytes(storage.join(set_uri, MANIFEST), stamped.to_json().encode("utf-8"))


def read_manifest(set_uri: str) -> Optional[ShardManifest]:
    """The set's manifest, or None when the set is incomplete (no manifest, or files missing or resized)."""
    listing = storage.list_files(set_uri)
    if MANIFEST not in listing:
        return None
    manifest = ShardManifest.from_json(storage.read_bytes(storage.join(set_uri, MANIFEST)).decode("utf-8"))
    if manifest.format_version != FORMAT_VERSION or listing_problem(manifest, listing) is not None:
        return None
    return manifest


def listing_problem(manifest: ShardManifest, listing: dict[str, int]) -> Optional[str]:
    """Why the stored files do not match the manifest, or None."""
    for shard in manifest.shards:
        if shard.name not in listing:
            return f"{shard.name} is missing"
        if listing[shard.name] != shard.bytes:
            return f"{shard.name} has {listing[shard.name]} bytes, the manifest says {shard.bytes}"
    return None


def complete_sets(stage_data_uri: str) -> list[ShardManifest]:
    """Every complete shard set of a stage, newest first (to say what changed since the last one)."""
    names = {rel.split("/", 1)[0] for rel in storage.list_files(stage_data_uri) if rel.endswith("/" + MANIFEST)}
    manifests = [m for m in (read_manifest(storage.join(stage_data_uri, n)) for n in sorted(names)) if m]
    return sorted(manifests, key=lambda m: m.created, reverse=True)
