"""The checkpoint format, shared by resume, export, merge and serving.

    checkpoint_step00000040/
      model/              Hugging Face directory: full weights (safetensors) or the LoRA adapter,
                          plus config and tokenizer (written by rank 0)
      deepspeed/state/    DeepSpeed engine state: module, optimizer shards (one per rank), scheduler
      rng/rank{r}.pt      RNG states per rank
      trainer_state.json  epoch, step within epoch, global step, metrics
      deepspeed_config.json  the DeepSpeed config the run used (after user overrides)
      manifest.json       written LAST: every file with size and sha256 (all ranks)

A checkpoint without a manifest, or whose files do not match it, is incomplete and never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from orchestrator import storage
from orchestrator.errors import CheckpointError

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
MODEL_DIR = "model"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
DEEPSPEED_CONFIG = "deepspeed_config.json"  # the merged DeepSpeed config the run used
FORMAT_VERSION = 1


@dataclass
class TrainerState:
    """Where training stands: `micro_step_in_epoch` micro-batches of `epoch` are done."""

    epoch: int = 0
    micro_step_in_epoch: int = 0
    global_step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    micro_batches_per_epoch: int = 0  # per worker, at the world size that wrote the checkpoint


def checkpoint_dir_name(global_step: int) -> str:
    return f"checkpoint_step{global_step:08d}"


def file_entries(root: str) -> dict[str, dict[str, Any]]:
    """Every file under `root` (except the manifest) → size and sha256."""
    entries = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            entries[str(path.relative_to(root))] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    return entries


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(root: str, files: dict[str, dict[str, Any]], state: TrainerState, extra: dict[str, Any]) -> None:
    """Write manifest.json last, atomically (temp file + rename)."""
    manifest = {"format_version": FORMAT_VERSION, "files": files, "trainer_state": asdict(state), **extra}
    tmp = os.path.join(root, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(root, MANIFEST))


def listing_problem(manifest: dict[str, Any], listing: dict[str, int]) -> Optional[str]:
    """Why a checkpoint's files (relative path → size) do not match its manifest, or None if they do."""
    for rel, entry in manifest["files"].items():
        if rel not in listing:
            return f"{rel} is listed in the manifest but missing"
        if listing[rel] != entry["size"]:
            return f"{rel} has {listing[rel]} bytes, manifest says {entry['size']}"
    return None


def verify_checkpoint(root: str, check_hashes: bool = False) -> dict[str, Any]:
    """The manifest of a complete local checkpoint; CheckpointError naming what is missing otherwise."""
    manifest_path = os.path.join(root, MANIFEST)
    if not os.path.exists(manifest_path):
        raise CheckpointError(f"{root}: incomplete checkpoint (no {MANIFEST}; it is written last)")
    with open(manifest_path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    listing = {str(p.relative_to(root)): p.stat().st_size for p in Path(root).rglob("*") if p.is_file()}
    problem = listing_problem(manifest, listing)
    if problem:
        raise CheckpointError(f"{root}: incomplete checkpoint: {problem}")
    if check_hashes:
        for rel, entry in manifest["files"].items():
            if sha256_of(os.path.join(root, rel)) != entry["sha256"]:
                raise CheckpointError(f"{root}: {rel} does not match its sha256 in the manifest")
    return manifest


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint directory as found in storage."""

    uri: str
    name: str
    step: Optional[int]
    epoch: Optional[int]
    eval_loss: Optional[float]
    size_bytes: int
    complete: bool
    problem: Optional[str] = None


def list_checkpoints(stage_uri: str) -> list[CheckpointInfo]:
    """Every `checkpoint_step*` directory under a stage's run path or URI, oldest first, complete or not."""

    groups: dict[str, dict[str, int]] = {}
    for rel, size in storage.list_files(stage_uri).items():
        top, _, inner = rel.partition("/")
        if top.startswith("checkpoint_step") and inner:
            groups.setdefault(top, {})[inner] = size
    infos = []
    for name in sorted(groups):
        files, uri = groups[name], storage.join(stage_uri, name)
        manifest, problem = check_stored_checkpoint(uri, files)
        state = (manifest or {}).get("trainer_state", {})
        infos.append(CheckpointInfo(uri, name, state.get("global_step"), state.get("epoch"),
                                    state.get("metrics", {}).get("eval_loss"), sum(files.values()),
                                    problem is None, problem))
    return infos


def check_stored_checkpoint(uri: str, files: Optional[dict[str, int]] = None
                            ) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """(manifest, problem) of a checkpoint in storage; problem is None when it is complete.

    `files` is its listing (relative path -> size), fetched when not given.
    """

    files = storage.list_files(uri) if files is None else files
    if MANIFEST not in files:
        return None, f"no {MANIFEST} (written last): the checkpoint was not finished"
    try:
        manifest = json.loads(storage.read_bytes(storage.join(uri, MANIFEST)))
    except (ValueError, OSError) as exc:
        return None, f"{MANIFEST} unreadable: {exc}"
    return manifest, listing_problem(manifest, files)


def latest_complete_checkpoint(stage_uri: str) -> Optional[str]:
    """URI of the newest complete checkpoint of a stage, or None. Incomplete ones are never returned."""
    complete = [c for c in list_checkpoints(stage_uri) if c.complete]
    return max(complete, key=lambda c: c.step or 0).uri if complete else None


def world_size_change_refused(source: str, written_by: int, world: int) -> CheckpointError:
    """The error of `checkpoint.on_world_size_change: fail` for a checkpoint written by another number of workers."""
    return CheckpointError(
        f"{source} was written by {written_by} workers and this run has {world}; "
        "set checkpoint.on_world_size_change=reload_weights to continue from its weights with a fresh "
        f"optimizer, or run with distributed.num_workers={written_by}"
    )


def check_resume_world_size(stage_uri: str, world: int, on_change: str) -> None:
    """Before any worker starts: refuse (on_change "fail") to resume from the stage's latest complete checkpoint
    when another number of workers wrote it. The workers check again against the checkpoint they load."""
    if on_change != "fail":
        return
    latest = latest_complete_checkpoint(stage_uri)
    if latest is None:
        return
    manifest, _ = check_stored_checkpoint(latest)
    written_by = int((manifest or {}).get("world_size") or world)
    if written_by != world:
        raise world_size_change_refused(latest, written_by, world)


def read_trainer_state(root: str) -> TrainerState:
    with open(os.path.join(root, TRAINER_STATE), encoding="utf-8") as handle:
        return TrainerState(**json.load(handle))


def write_trainer_state(root: str, state: TrainerState) -> None:
    with open(os.path.join(root, TRAINER_STATE), "w", encoding="utf-8") as handle:
        json.dump(asdict(state), handle, indent=1)


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(root: str, rank: int) -> None:
    os.makedirs(os.path.join(root, "rng"), exist_ok=True)
    torch.save(capture_rng(), os.path.join(root, "rng", f"rank{rank}.pt"))


def load_rng(root: str, rank: int) -> bool:
    path = os.path.join(root, "rng", f"rank{rank}.pt")
    if not os.path.exists(path):
        return False
    restore_rng(torch.load(path, weights_only=False))
    return True
