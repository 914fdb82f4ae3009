"""Checkpoints, data and artifacts on S3 (moto's server over HTTP on 127.0.0.1), failures and resume, on a
two-node local Ray cluster (one node is lost mid-run; the run continues on the other)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import ray
import pyarrow as pa
import pytest

from orchestrator import storage
from orchestrator.config import DataConfig, DataSourceConfig, config_from_dict
from orchestrator.data.prepare_ray import prepare_stage_shards
from orchestrator.data.shards import read_shard
from orchestrator.checkpoint import latest_complete_checkpoint, list_checkpoints
from orchestrator.layout import RunLayout
from orchestrator.train.metrics_log import read_stage_metrics
from orchestrator.train.stage import run_stage
from ray_nodes import two_node_cluster
from s3_support import ACCESS_KEY, REGION, SECRET_KEY, FaultyProxy

pytestmark = pytest.mark.integration
BUCKET = "orchestrator-test"
NODE = {"resources": {"train_slot": 1}}  # one slot per node: a run asking for it puts one worker on each node
WORKER_NODE = {"worker_node": 1}  # only the worker node: model tasks asking for it stay off the head


@pytest.fixture(scope="module")
def two_nodes():
    """(cluster, temp dir): a head and a worker node, 4 logical CPUs each; worker log lines reach this process's
    output (the credentials test reads it)."""
    with two_node_cluster("ray-s3-", num_cpus=4, log_to_driver=True, worker_resources=WORKER_NODE, **NODE) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def ray_cluster(two_nodes):
    """This module's Ray cluster is the two-node one; its temp dir."""
    return two_nodes[1]


def s3_config(shared: Path, endpoint: str, prefix: str, method: str = "full", zero_stage: int = 2,
              data_path: str | None = None, **overrides) -> dict:
    """A small stage-1 run whose storage (and optionally data) is on S3; credentials in the config."""
    train = {"method": method, "learning_rate": 3e-3, "epochs": 2, "micro_batch_size": 8, "log_every_n_steps": 1,
             "seed": 7}
    train.update(overrides.pop("train", {}))
    tree = {
        "run_name": "s3run",
        "model": {"tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "max_position_embeddings": 512}},
        "tokenizer": {"path": str(shared / "tokenizers" / "minimind")},
        "distributed": {"num_workers": 2, "cpus_per_worker": 1, "zero_stage": zero_stage},
        "checkpoint": {"storage_path": f"s3://{BUCKET}/{prefix}", "every_n_steps": 4, "keep": 3},
        "storage": {"s3": {"endpoint_url": endpoint, "region": REGION, "access_key_id": ACCESS_KEY,
                           "secret_access_key": SECRET_KEY, "max_attempts": 3}},
        "eval": {"max_batches": 2},
        "pretrain": {
            "data": {"sources": [{"path": data_path or str(shared / "pretrain" / "legal"), "text_unit": "line",
                                  "max_records": 300}],
                     "block_size": 128, "eval_split": 0.05},
            "train": train,
        },
    }
    tree.update(overrides)
    return tree


def upload_legal_data(s3_server, shared: Path) -> str:
    client = s3_server.client()
    for path in sorted((shared / "pretrain" / "legal").glob("*.md")):
        client.upload_file(str(path), BUCKET, f"data/legal/{path.name}")
    return f"s3://{BUCKET}/data/legal"


def final_eval_loss(config) -> float:
    records = read_stage_metrics(RunLayout.of(config), "pretrain")
    return [r["eval_loss"] for r in records if "eval_loss" in r][-1]


def test_data_from_s3_gives_the_same_tokens_as_local(ray_cluster, s3_server, shared_data):
    """The distributed prepare reads sources from S3 and writes its shard set to S3: the same rows as from local
    files; a second prepare finds the set complete on S3 and prepares nothing."""
    s3_uri = upload_legal_data(s3_server, shared_data)
    storage.configure(storage.S3Settings(endpoint_url=s3_server.endpoint, region=REGION,
                                         access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY))
    tokenizer_dir = str(shared_data / "tokenizers" / "minimind")
    prepared = {}
    for name, path in (("local", str(shared_data / "pretrain" / "legal")), ("s3", s3_uri)):
        data = DataConfig(sources=[DataSourceConfig(path=path, text_unit="line")], block_size=128,
                          prepare={"unit_mb": 0.2})
        prepared[name] = prepare_stage_shards("pretrain", data, tokenizer_dir, tokenizer_dir,
                                              f"s3://{BUCKET}/prepared-{name}/data/pretrain")
    local, remote = prepared["local"], prepared["s3"]
    assert remote.set_uri.startswith(f"s3://{BUCKET}/prepared-s3/") and len(remote.manifest.shards) > 2
    assert [s.sha256 for s in remote.manifest.shards] == [s.sha256 for s in local.manifest.shards]
    for part in ("train", "eval"):
        tables = [read_shard(p.set_uri, s) for p in (local, remote) for s in p.manifest.part(part)]
        assert pa.concat_tables(tables[:len(tables) // 2]).equals(pa.concat_tables(tables[len(tables) // 2:]))
    assert sorted(local.stats["files"].values()) == sorted(remote.stats["files"].values())  # sha256 of each file
    assert all(identity.split()[1].startswith("etag:") for identity in remote.manifest.inputs["files"].values())
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=BUCKET, Prefix="prepared-s3/")["Contents"]}
    assert f"prepared-s3/data/pretrain/{remote.manifest.fingerprint}/manifest.json" in keys
    again = prepare_stage_shards("pretrain", data, tokenizer_dir, tokenizer_dir, f"s3://{BUCKET}/prepared-s3/data/pretrain")
    assert again.reused and again.set_uri == remote.set_uri


# LoRA under ZeRO-3, the case with the most state to restore (partitioned base, adapter, optimizer shards), 3 epochs
# on data read from S3: one uninterrupted run, checked for what it stores and, in the killed-worker test, the
# reference an interrupted run must match. Full fine-tuning under ZeRO-2 checkpoints to S3 and resumes from it in
# test_interrupted_checkpoint_upload_is_never_taken_as_latest.
S3_RUN = {"method": "lora", "zero_stage": 3, "train": {"epochs": 3}}


@contextlib.contextmanager
def captured_output(path: Path):
    """What this process prints (Ray's worker log lines included) and writes to fds 1 and 2, into `path`."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w", buffering=1, errors="replace") as sink, \
            contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        os.dup2(sink.fileno(), 1), os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sink.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, s3_server, shared_data):
    """(config, result, the data URI, everything the run printed)."""
    data_uri = upload_legal_data(s3_server, shared_data)
    tree = s3_config(shared_data, s3_server.endpoint, "runs-a", data_path=data_uri, **json.loads(json.dumps(S3_RUN)))
    tree["distributed"]["model_tasks"] = {"resources": {"worker_node": 0.01}}  # the export: on the worker node
    config = config_from_dict(tree)
    output = Path(ray_cluster) / "uninterrupted-output.txt"
    with captured_output(output):
        print("output captured from here", flush=True)
        result = run_stage(config, "pretrain")
    return config, result, data_uri, output.read_text(errors="replace")


def test_checkpoints_and_models_on_s3_without_leaking_credentials(ray_cluster, s3_server, shared_data, uninterrupted):
    config, result, data_uri, output = uninterrupted

    stage_uri = f"s3://{BUCKET}/runs-a/s3run/pretrain"
    infos = list_checkpoints(stage_uri)
    assert infos and all(i.complete for i in infos), infos
    assert [i.step for i in infos] == sorted(i.step for i in infos)
    assert all(i.eval_loss is not None for i in infos)
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=BUCKET, Prefix="runs-a/")["Contents"]}
    assert {f"runs-a/s3run/pretrain/{i.name}/manifest.json" for i in infos} <= keys
    assert result.checkpoint_uri == latest_complete_checkpoint(stage_uri)

    # The CLI lists them too, with credentials from the standard AWS environment variables.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": s3_server.endpoint}
    listed = subprocess.run([sys.executable, "-m", "orchestrator", "checkpoints", "list", stage_uri],
                            env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    for info in infos:
        assert re.search(rf"{info.name}\s+{info.step}\s+{info.epoch}\s+{info.eval_loss:.4f}\s+[\d.]+\s+complete",
                         listed.stdout), listed.stdout

    # The final model loads from S3, with a lineage manifest naming the S3 data it was trained on.
    from transformers import AutoModelForCausalLM

    local = storage.download_dir(result.model_uri, str(Path(ray_cluster) / "model-from-s3"))
    AutoModelForCausalLM.from_pretrained(local)
    lineage = json.loads(Path(local, "lineage.json").read_text())
    assert lineage["data_files"] and lineage["packages"]["ray"] and lineage["base_model"].startswith("s3://")
    # The export (the LoRA merge) ran as a Ray task on the worker node, not in the driver or on the head.
    [worker_node] = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "worker_node" in n["Resources"]]
    assert lineage["exported_on"]["pid"] != os.getpid()
    assert lineage["exported_on"]["node_id"] == worker_node != ray.get_runtime_context().get_node_id()
    for uri, digest in lineage["data_files"].items():
        assert uri.startswith(data_uri + "/")
        local_file = shared_data / "pretrain" / "legal" / uri.rsplit("/", 1)[1]
        assert digest == hashlib.sha256(local_file.read_bytes()).hexdigest()

    # Credentials never appear in saved configs, manifests or logs (bucket, Ray's log files, our output).
    client = s3_server.client()
    leaks = []
    for key in sorted(keys):
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        if SECRET_KEY.encode() in body or ACCESS_KEY.encode() in body:
            leaks.append(key)
    for path in Path(ray_cluster).rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            data = path.read_bytes()
            if SECRET_KEY.encode() in data or ACCESS_KEY.encode() in data:
                leaks.append(str(path))
    assert "output captured from here" in output
    assert SECRET_KEY not in output and ACCESS_KEY not in output
    assert not leaks, leaks


def _lose_a_node_after_first_checkpoint(cluster, stage_uri: str, run: threading.Thread) -> tuple[str, int] | None:
    """Once `run` has a complete checkpoint: SIGKILL the worker node's raylet (its train worker dies with it);
    (lost node id, last complete step at the loss), or None if the run ended first. Called on the main thread:
    Ray starts and reaps a node's processes from there only."""
    from ray._private import ray_constants

    complete_steps: list[int] = []
    while run.is_alive() and not complete_steps:
        try:
            complete_steps = [i.step for i in list_checkpoints(stage_uri) if i.complete]
        except Exception:  # the stage directory may not exist yet
            pass
        time.sleep(0.3)
    if not complete_steps:
        return None
    [node] = cluster.worker_nodes
    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
    os.kill(raylet.pid, signal.SIGKILL)
    cluster.remove_node(node, allow_graceful=False)  # reaps the rest of its processes
    return node.node_id, max(complete_steps)


def test_a_lost_node_is_survived_from_the_last_checkpoint_on_s3(two_nodes, s3_server, shared_data, uninterrupted,
                                                                monkeypatch):
    """Elastic training (distributed.min_workers=1), one worker per node; after the first checkpoint the worker
    node's raylet is SIGKILLed and no node replaces it: Ray Train restarts the group on the capacity that remains
    (one worker), which continues from the last complete checkpoint in S3 through the world-size-change path (its
    weights, a fresh optimizer, the step counter at checkpoint + 1) and finishes; the loss ends near the
    uninterrupted run's."""
    cluster, temp_dir = two_nodes
    reference, _, data_uri, _ = uninterrupted
    prefix = "runs-kill"
    # Ray Train first tries the old size again until the worker group's start times out (60 s by default).
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
    # Through a counting proxy: how often the base model is downloaded, by 2 workers and after the restart.
    proxy = FaultyProxy(s3_server.port).start()
    tree = s3_config(shared_data, proxy.endpoint, prefix, data_path=data_uri, **json.loads(json.dumps(S3_RUN)))
    tree["distributed"].update(min_workers=1, max_failures=1, resources_per_worker={"train_slot": 1})
    tree["storage"]["node_cache"] = {"dir": str(Path(temp_dir) / "node-cache")}
    config = config_from_dict(tree)
    stage_uri = f"s3://{BUCKET}/{prefix}/s3run/pretrain"
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = run_stage(config, "pretrain")
        except BaseException as error:  # noqa: BLE001 - raised below, on the test's thread
            outcome["error"] = error

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        lost = _lose_a_node_after_first_checkpoint(cluster, stage_uri, runner)
        runner.join(timeout=600)
        alive_after_run = sum(n["Alive"] for n in ray.nodes())
    finally:
        proxy.stop()
        if len(cluster.list_all_nodes()) < 2:  # the module's later tests run on two nodes again
            cluster.add_node(num_cpus=4, object_store_memory=256 * 2**20,
                             temp_dir=cluster.head_node.get_temp_dir_path(),
                             resources={**NODE["resources"], **WORKER_NODE})
    assert not runner.is_alive(), "the run did not finish within 10 minutes of the node loss"
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    assert lost, "the run ended before a node was lost"
    lost_node, complete_at_loss = lost
    assert any(n["NodeID"] == lost_node and not n["Alive"] for n in ray.nodes())
    assert alive_after_run == 1  # it finished on the head alone
    base_objects = s3_server.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/s3run/base/")["Contents"]
    weights = {f"/{BUCKET}/{o['Key']}": o["Size"] for o in base_objects if o["Key"].endswith(".safetensors")}
    # Both nodes run on this machine and share the cache directory: the base weights cross the wire once for
    # every worker, and not again after the restart (the driver reads only the tokenizer's small files).
    assert weights and {path: proxy.bytes_served.get(path, 0) for path in weights} == weights
    records = read_stage_metrics(RunLayout.of(config), "pretrain")
    resumed = [r for r in records if r.get("event") == "resumed"]
    # Lost work is at most one checkpoint interval: it resumes from the checkpoint that was complete at the loss,
    # with the one worker that remains.
    assert len(resumed) == 1 and resumed[0]["step"] >= max(4, complete_at_loss)
    assert resumed[0]["world_size"] == 1
    steps_after = [r["step"] for r in records[records.index(resumed[0]):] if "train_loss" in r]
    assert steps_after[0] == resumed[0]["step"] + 1
    assert steps_after == sorted(set(steps_after))
    # One worker reads the whole epoch: more optimizer steps per epoch than two, so more steps in all.
    # (An upload cut off by the loss stays in storage without its manifest: listed, never complete, never resumed.)
    final_step = max(i.step for i in list_checkpoints(stage_uri) if i.complete)
    assert final_step > max(i.step for i in list_checkpoints(f"s3://{BUCKET}/runs-a/s3run/pretrain") if i.complete)
    assert abs(final_eval_loss(config) - final_eval_loss(reference)) < 0.15
    assert result.model_uri.startswith("s3://")


def test_interrupted_checkpoint_upload_is_never_taken_as_latest(ray_cluster, s3_server, shared_data):
    """Writes of checkpoint_step00000008/deepspeed/* fail (S3 'down'): the run fails, a complete one stays latest."""
    proxy = FaultyProxy(s3_server.port, fail_writes=r"checkpoint_step00000008/deepspeed/").start()
    try:
        tree = s3_config(shared_data, proxy.endpoint, "runs-cut", train={"epochs": 3})
        tree["storage"]["s3"]["max_attempts"] = 2
        with pytest.raises(Exception) as failure:
            run_stage(config_from_dict(tree), "pretrain")
    finally:
        proxy.stop()
    assert proxy.failed, "the proxy never saw the checkpoint upload"
    stage_uri = f"s3://{BUCKET}/runs-cut/s3run/pretrain"
    infos = {i.name: i for i in list_checkpoints(stage_uri)}
    if "checkpoint_step00000008" in infos:  # partly uploaded: listed, but never complete
        assert not infos["checkpoint_step00000008"].complete
    latest = latest_complete_checkpoint(stage_uri)
    latest_step = infos[latest.rsplit("/", 1)[1]].step
    # Step 4 (every_n_steps) or the end of epoch 1, or (uploads are asynchronous by default, so training went on
    # while step 8's upload failed) a later one that was stored whole; never the cut-off step 8.
    assert latest_step >= 4 and latest_step != 8 and infos[latest.rsplit("/", 1)[1]].complete
    assert f"resumes from {latest}" in str(failure.value)  # the error says where a rerun resumes

    # S3 is back: the same command resumes from step 4 and finishes.
    tree["checkpoint"]["storage_path"] = f"s3://{BUCKET}/runs-cut"
    tree["storage"]["s3"]["endpoint_url"] = s3_server.endpoint
    config = config_from_dict(tree)
    run_stage(config, "pretrain")
    resumed = [r for r in read_stage_metrics(RunLayout.of(config), "pretrain") if r.get("event") == "resumed"]
    assert resumed and resumed[-1]["step"] == latest_step


_FETCH_SCRIPT = """
import sys
from orchestrator import node_cache, storage
storage.configure(storage.S3Settings(endpoint_url=sys.argv[1], region=sys.argv[2], access_key_id=sys.argv[3],
                                     secret_access_key=sys.argv[4]))
print(node_cache.fetch(sys.argv[5], sys.argv[6], max_gb=float(sys.argv[7])))
"""


def test_node_cache_downloads_once_per_node_and_refetches_a_changed_object(s3_server, tmp_path):
    """Two processes fetch the same S3 directory at once: the bytes cross the wire once; a changed object
    is a new entry; the bound evicts the least recently used entry."""
    client = s3_server.client()
    payload = os.urandom(3_000_000)
    client.put_object(Bucket=BUCKET, Key="cache/model/model.safetensors", Body=payload)
    client.put_object(Bucket=BUCKET, Key="cache/model/config.json", Body=b'{"a": 1}')
    proxy = FaultyProxy(s3_server.port).start()
    cache = tmp_path / "node-cache"

    def fetch_in_processes(n: int, max_gb: float = 1.0) -> list[str]:
        args = [sys.executable, "-c", _FETCH_SCRIPT, proxy.endpoint, REGION, ACCESS_KEY, SECRET_KEY,
                f"s3://{BUCKET}/cache/model", str(cache), str(max_gb)]
        procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
        return [out.strip() for out, _ in outs]

    try:
        first = fetch_in_processes(2)
        assert first[0] == first[1] and Path(first[0], "model.safetensors").read_bytes() == payload
        assert proxy.served_under(f"/{BUCKET}/cache/model/") == len(payload) + 8  # once, not twice
        assert fetch_in_processes(1) == first[:1] and proxy.served_under(f"/{BUCKET}/cache/model/") == len(payload) + 8

        client.put_object(Bucket=BUCKET, Key="cache/model/config.json", Body=b'{"a": 2}')
        changed = fetch_in_processes(1, max_gb=len(payload) * 1.5 / 1024**3)
        assert changed[0] != first[0] and Path(changed[0], "config.json").read_bytes() == b'{"a": 2}'
        assert not Path(first[0]).exists()  # two copies do not fit the bound: the older one went
    finally:
        proxy.stop()
