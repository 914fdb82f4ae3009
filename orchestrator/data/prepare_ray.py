"""A stage's data prepared on the cluster with Ray Data and cached as a shard set (stages 1 and 2).

The driver lists the source files (names and sizes only), computes the cache key
(orchestrator.data.fingerprint) and looks for a complete shard set under `<run>/data/<stage>/<key>/`.
On a miss it runs one Ray Data pipeline over the prepare units (orchestrator.data.units):

    from_items(units) → read tasks (read, validate, convert: units.read_unit)
                      → tokenizer actors (one tokenizer each; units.tokenize_unit writes the unit's shards)
                      → per-unit summaries (counts, bad records, shard descriptions; never rows)

and writes the manifest last, from the summaries: a prepare cut off midway leaves no manifest and is
never used. The driver never holds the corpus, only one small summary per unit.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from orchestrator import storage
from orchestrator.config import DataConfig, NodeCacheConfig, PrepareConfig
from orchestrator.data.formats import Document
from orchestrator.data.fingerprint import Fingerprint, compute_fingerprint, describe_change, file_identity, id_settings
from orchestrator.data.readers import SUPPORTED_SUFFIXES
from orchestrator.data.shapes import resolve_dataset, shape_inputs
from orchestrator.data.shards import ShardManifest, complete_sets, read_manifest, write_manifest
from orchestrator.data.templates import select_template
from orchestrator.data.units import Unit, main_amount, merge_summaries, plan_units, read_unit, replay_unit, tokenize_unit
from orchestrator.errors import DataError, OrchestratorError, StorageError

log = logging.getLogger(__name__)

SHARDED_STAGES = ("pretrain", "sft")
IDENTITIES = "file-identities.json"  # under <run>/data/<stage>/: local files' sha256 by size and mtime
READ_MEMORY_FLOOR = 256 * 2**20  # bytes a read task reserves at least (its process, pyarrow, the parsers)


@dataclass(frozen=True)
class PreparedShards:
    """A complete shard set of a stage: where it is, its manifest, and how this call got it."""

    set_uri: str
    manifest: ShardManifest
    reused: bool  # True: a complete set with this key existed, nothing was prepared
    change: str = ""  # what changed since the latest earlier set of the stage ("" if none or reused)
    nodes: dict[str, list[str]] = field(default_factory=dict)  # node ids of the read tasks and tokenizer actors
    seconds: float = 0.0
    driver_bytes: int = 0  # what the driver received from the tasks (summaries, never rows)

    @property
    def stats(self) -> dict[str, Any]:
        return self.manifest.stats

    @property
    def train_rows(self) -> int:
        return self.manifest.rows("train")

    @property
    def eval_rows(self) -> int:
        return self.manifest.rows("eval")

    @property
    def has_eval(self) -> bool:
        return self.eval_rows > 0


def expand_sources(data: DataConfig) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(source path → its files, in order) for every source and eval source (registry datasets resolved), and
    the shape inputs (dataset registries, transform modules) that are part of the cache key."""
    expanded: dict[str, list[str]] = {}
    shape_files: dict[str, str] = {}
    for source in [*data.sources, *data.eval_sources]:
        shape_files.update(shape_inputs(source))
        resolved = resolve_dataset(source)
        expanded[resolved.path] = storage.expand(resolved.path, SUPPORTED_SUFFIXES)
    return expanded, shape_files


def source_identities(uris: list[str], stage_data_uri: str) -> dict[str, str]:
    """Each file's identity (fingerprint.file_identity). A local file whose size and mtime are those recorded at the
    stage's last prepare keeps its recorded sha256 instead of being read again (as git does), so a warm rerun on a
    large corpus costs a stat per file; S3 objects cost a HEAD request (size + ETag)."""
    record_uri = storage.join(stage_data_uri, IDENTITIES)
    try:
        recorded = json.loads(storage.read_bytes(record_uri))
    except (FileNotFoundError, StorageError, ValueError):
        recorded = {}
    identities, stamps = {}, {}
    for uri in uris:
        if storage.is_remote(uri):
            identities[uri] = file_identity(uri)
            continue
        stat = os.stat(storage.local_path(uri))
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        known = recorded.get(uri) or {}
        identities[uri] = known["identity"] if known.get("stamp") == stamp else file_identity(uri)
        stamps[uri] = {"stamp": stamp, "identity": identities[uri]}
    if stamps and any(recorded.get(uri) != entry for uri, entry in stamps.items()):
        storage.write_bytes(record_uri, json.dumps({**recorded, **stamps}, indent=0, sort_keys=True).encode("utf-8"))
    return identities


def stage_fingerprint(stage: str, data: DataConfig, expanded: dict[str, list[str]], shape_files: dict[str, str],
                      tokenizer_dir: str, stage_data_uri: Optional[str] = None) -> Fingerprint:
    """The cache key of a stage's shard set: file identities (size + sha256, or S3 size + ETag), the tokenizer's
    files (weights excluded) and the settings that change ids. With `stage_data_uri`, local files' sha256 are
    remembered there by size and mtime (source_identities)."""
    uris = sorted({u for group in expanded.values() for u in group})
    files = (source_identities(uris, stage_data_uri) if stage_data_uri is not None
             else {uri: file_identity(uri) for uri in uris})
    files.update({f"shape:{name}": value for name, value in shape_files.items()})
    from orchestrator.model.loading import WEIGHT_SUFFIXES  # torch: not in the read tasks' processes
    tokenizer = {}
    for root, _, names in os.walk(tokenizer_dir):
        for name in sorted(names):
            if not name.endswith(WEIGHT_SUFFIXES):
                path = os.path.join(root, name)
                tokenizer[os.path.relpath(path, tokenizer_dir)] = file_identity(path)
    return compute_fingerprint(stage, files, tokenizer, id_settings(stage, data))


def prepare_stage_shards(stage: str, data: DataConfig, tokenizer_uri: str, tokenizer_dir: str, stage_data_uri: str,
                         node_cache: Optional[NodeCacheConfig] = None) -> PreparedShards:
    """The shard set of `stage` (pretrain or sft) under `stage_data_uri`: reused when one with the same key is
    complete, else prepared on the Ray cluster (connected already, or a local one is started).

    `tokenizer_uri`: what the actors load (local or remote); `tokenizer_dir`: a local copy of its files (the key).
    Raises DataError / DataValidationError (every task's bad records in one report) before anything is marked
    complete.
    """
    if stage not in SHARDED_STAGES:
        raise ValueError(f"prepare_stage_shards: stage {stage!r}; shard sets are made for {SHARDED_STAGES}")
    if not data.sources:
        raise DataError(f"{stage}.data.sources is empty; list at least one file, directory, glob or URI")
    started = time.perf_counter()
    expanded, shape_files = expand_sources(data)
    replayed, replay_shapes = expand_sources(DataConfig(sources=[entry.source for entry in data.replay]))
    fingerprint = stage_fingerprint(stage, data, {**expanded, **replayed}, {**shape_files, **replay_shapes},
                                    tokenizer_dir, stage_data_uri)
    set_uri = storage.join(stage_data_uri, fingerprint.key)
    manifest = read_manifest(set_uri)
    if manifest is not None:
        log.info("%s data: prepared nothing; reusing the shard set %s (%d train rows, %d eval rows)", stage, set_uri,
                 manifest.rows("train"), manifest.rows("eval"))
        return PreparedShards(set_uri, manifest, reused=True, seconds=time.perf_counter() - started)
    earlier = complete_sets(stage_data_uri)
    change = describe_change(earlier[0].inputs, fingerprint.inputs) if earlier else ""
    if change:
        log.info("%s data: preparing anew, the inputs changed since %s: %s", stage, earlier[0].fingerprint, change)
    if storage.list_files(set_uri):
        log.info("%s data: %s holds an incomplete prepare (no manifest); preparing it again", stage, set_uri)
    sizes = _file_sizes([uri for group in expanded.values() for uri in group])
    units = plan_units(data, expanded, sizes, int(data.prepare.unit_mb * 2**20))
    summaries = run_units(stage, data, units, tokenizer_uri, set_uri, node_cache or NodeCacheConfig())
    if data.replay:  # shares of what the units hold: known only now
        summaries += run_replay(stage, data, len(units), main_amount(stage, summaries), tokenizer_uri, set_uri,
                                node_cache or NodeCacheConfig())
    driver_bytes = len(json.dumps(summaries))
    nodes = {"read": sorted({s.pop("read_node") for s in summaries}),
             "tokenize": sorted({s.pop("tokenize_node") for s in summaries})}
    manifest = merge_summaries(summaries, stage, data, fingerprint.key, fingerprint.inputs)
    write_manifest(set_uri, manifest)  # last: the set is complete from here on
    manifest = read_manifest(set_uri)
    if manifest is None:
        raise DataError(f"{set_uri}: the shard set does not match the manifest just written; "
                        "is another prepare writing the same set?")
    seconds = time.perf_counter() - started
    log.info("%s data: prepared %d units on %d node(s) in %.1f s into %s: %s", stage, len(units),
             len(set(nodes["read"]) | set(nodes["tokenize"])), seconds, set_uri,
             ", ".join(f"{k}={v}" for k, v in manifest.stats.items() if k not in ("files", "bad_records_listed")))
    for listed in manifest.stats.get("bad_records_listed", []):
        log.warning("skipped bad record: %s", listed)
    return PreparedShards(set_uri, manifest, reused=False, change=change, nodes=nodes, seconds=seconds,
                          driver_bytes=driver_bytes)


def held_out_texts(data: DataConfig) -> list[Document]:
    """Stage 1's held-out documents of its split sources, by the same units and rule as its prepare (read here, in
    this process): what evaluation measures perplexity on when the config names no eval set of its own."""
    split_only = data.model_copy(update={"eval_sources": []})
    expanded, _ = expand_sources(split_only)
    sizes = _file_sizes([uri for group in expanded.values() for uri in group])
    documents = []
    for unit in plan_units(split_only, expanded, sizes, int(data.prepare.unit_mb * 2**20)):
        row = read_unit(unit, "pretrain", data)
        documents += [Document(text, unit.files[0]) for text, part in zip(row["items"], row["parts"]) if part == "eval"]
    return documents


def run_units(stage: str, data: DataConfig, units: list[Unit], tokenizer_uri: str, set_uri: str,
              node_cache: NodeCacheConfig) -> list[dict[str, Any]]:
    """Every unit through Ray Data: read tasks, then the tokenizer actor pool; the per-unit summaries come back.

    The pipeline is driven from a Ray task on this node (it only schedules: no CPU of its own), not from this
    process: Ray's notices about the actor pool (ray#53727) and Ray Data's execution lines then go to that worker's
    log rather than to the user's console. Our own errors (bad input, storage) come back as they were raised.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from orchestrator.runtime import ensure_ray

    ensure_ray()
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    initial_actors = starting_actors(data.prepare, len(units), nodes)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    task = ray.remote(_run_units_task).options(num_cpus=0, max_retries=0, scheduling_strategy=here)
    try:
        return ray.get(task.remote(storage.current_settings(), stage, data, units, tokenizer_uri, set_uri,
                                   node_cache, initial_actors))
    except ray.exceptions.RayTaskError as failure:
        if isinstance(failure.cause, OrchestratorError):
            raise failure.cause from None
        raise


def starting_actors(prepare: PrepareConfig, units: int, nodes: list[dict[str, float]]) -> int:
    """Tokenizer actors the pool starts with: as many as the data nodes' CPUs hold with room for one read task
    beside each (at most `tokenizer_actors`, one per unit, at least one); Ray Data grows the pool from there
    while CPUs are free. (Started with one, the pool can stay at one: the read tasks take every free CPU.)
    `nodes`: each live node's resources; data nodes are those with every resource `prepare.resources` names."""
    most = max(1, min(prepare.tokenizer_actors, units))
    per_actor = prepare.cpus_per_actor + prepare.cpus_per_read_task
    fits = 0
    for resources in nodes:
        if all(resources.get(name, 0) >= amount for name, amount in prepare.resources.items()):
            fits += int(resources.get("CPU", 0) / per_actor + 1e-9)  # 0.3 CPU / 0.1 is 2.9999…
    return max(1, min(most, fits))


def _run_units_task(settings: storage.S3Settings, stage: str, data: DataConfig, units: list[Unit],
                    tokenizer_uri: str, set_uri: str, node_cache: NodeCacheConfig,
                    initial_actors: int) -> list[dict[str, Any]]:
    import ray
    import ray.data

    storage.configure(settings)
    settings_ref = ray.put(settings)  # credentials through the object store, not in task specs
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    prepare = data.prepare
    unit_bytes = int(prepare.unit_mb * 2**20)
    rows = [{"unit": json.dumps(asdict(unit))} for unit in units]
    summaries = (
        ray.data.from_items(rows, override_num_blocks=len(rows))
        # Ray Data spreads tasks and actors over the nodes. A read task reserves memory for its unit (the file, its
        # text and the converted items); that also keeps Ray Data from fusing the reads into the tokenizer actors,
        # which would cap reading at the number of actors.
        .map(_read_unit_row, fn_kwargs={"stage": stage, "data": data, "settings": settings_ref},
             num_cpus=prepare.cpus_per_read_task, memory=max(READ_MEMORY_FLOOR, 4 * unit_bytes),
             resources=prepare.resources or None)
        .map(_TokenizeUnits, fn_constructor_kwargs={"stage": stage, "data": data, "tokenizer_uri": tokenizer_uri,
                                                    "set_uri": set_uri, "settings": settings_ref,
                                                    "node_cache": node_cache},
             compute=ray.data.ActorPoolStrategy(min_size=initial_actors,
                                                max_size=max(1, min(prepare.tokenizer_actors, len(units)))),
             num_cpus=prepare.cpus_per_actor, resources=prepare.resources or None)
        .take_all()
    )
    if len(summaries) != len(units):
        raise DataError(f"{set_uri}: {len(summaries)} of {len(units)} prepare units came back")
    return summaries


def run_replay(stage: str, data: DataConfig, first_index: int, main: int, tokenizer_uri: str, set_uri: str,
               node_cache: NodeCacheConfig) -> list[dict[str, Any]]:
    """Each `data.replay` source as one Ray task writing one train shard (index first_index + i); their summaries."""
    import ray

    settings = ray.put(storage.current_settings())
    task = ray.remote(_replay_task).options(num_cpus=data.prepare.cpus_per_actor,
                                            resources=data.prepare.resources or None)
    return ray.get([task.remote(first_index + i, i, stage, data, tokenizer_uri, set_uri, main, settings, node_cache)
                    for i in range(len(data.replay))])


def _replay_task(index: int, entry_index: int, stage: str, data: DataConfig, tokenizer_uri: str, set_uri: str,
                 main: int, settings: Any, node_cache: NodeCacheConfig) -> dict[str, Any]:
    import ray

    worker = _TokenizeUnits(stage, data, tokenizer_uri, set_uri, settings, node_cache)
    summary = replay_unit(index, entry_index, stage, data, worker.tokenizer, worker.template, main, set_uri)
    node = ray.get_runtime_context().get_node_id()
    return {**summary, "read_node": node, "tokenize_node": node}


def _read_unit_row(row: dict[str, Any], stage: str, data: DataConfig, settings: Any) -> dict[str, Any]:
    """Ray Data task: one unit read, validated and converted (its items travel on to a tokenizer actor)."""
    import ray

    storage.configure(ray.get(settings) if isinstance(settings, ray.ObjectRef) else settings)
    raw = json.loads(row["unit"])
    unit = Unit(raw["index"], raw["role"], raw["source"], tuple(raw["files"]))
    return {**read_unit(unit, stage, data), "read_node": ray.get_runtime_context().get_node_id()}


class _TokenizeUnits:
    """Ray Data actor: loads the tokenizer once, tokenizes and packs (stage 1) or masks (stage 2) read units and
    writes their shards; hands back each unit's summary without its rows."""

    def __init__(self, stage: str, data: DataConfig, tokenizer_uri: str, set_uri: str, settings: Any,
                 node_cache: NodeCacheConfig):
        import ray

        from orchestrator.model.loading import fetch_tokenizer, load_tokenizer

        storage.configure(ray.get(settings) if isinstance(settings, ray.ObjectRef) else settings)
        if data.prepare.cpus_per_actor <= 1:
            # The pool is the parallelism: an actor holding one CPU keeps the Rust tokenizer to one thread (else
            # every actor starts a thread per core of the node and they all contend).
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.stage, self.data, self.set_uri = stage, data, set_uri
        if storage.is_remote(tokenizer_uri):
            self._tmp = tempfile.TemporaryDirectory(prefix="prepare-tokenizer-")
            self.tokenizer = fetch_tokenizer(tokenizer_uri, self._tmp.name)
        else:
            self.tokenizer = load_tokenizer(storage.local_path(tokenizer_uri))
        self.template = select_template(data.template, self.tokenizer) if stage == "sft" else None
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        row = {**row, "items": list(row["items"]), "parts": list(row["parts"])}
        summary = tokenize_unit(row, self.stage, self.data, self.tokenizer, self.template, self.set_uri)
        return {**summary, "read_node": row["read_node"], "tokenize_node": self.node}


def _file_sizes(uris: list[str]) -> dict[str, int]:
    """Size of every file (one listing call per filesystem)."""
    import pyarrow.fs as pafs

    sizes: dict[str, int] = {}
    by_fs: dict[int, tuple[Any, list[tuple[str, str]]]] = {}
    for uri in uris:
        fs, path = storage.resolve(uri)
        by_fs.setdefault(id(type(fs)), (fs, []))[1].append((uri, path))
    for fs, pairs in by_fs.values():
        infos = fs.get_file_info([path for _, path in pairs])
        for (uri, _), info in zip(pairs, infos):
            if info.type != pafs.FileType.File:
                raise DataError(f"{uri}: no such file (it was listed a moment ago)")
            sizes[uri] = int(info.size)
    return sizes
