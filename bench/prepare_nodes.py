"""Prepare throughput with one data node and with two (#17's scaling goal), each data node on a core of its own.

    python bench/prepare_nodes.py [SIZE_MB]     # default 200; results in bench/results/prepare_nodes.json

A local multi-node cluster (ray.cluster_utils.Cluster): a head node with no CPUs (the driver, Ray's control
processes and the zero-CPU task that drives Ray Data) and N data nodes of 1 CPU each. Each data node's raylet is
started pinned to one core (`os.sched_setaffinity` before `add_node`; its worker processes inherit it), so "one
data CPU" is one core and the second node adds the other core. Without the pinning, one logical CPU on a 2-core
machine still reads on the second core, and the comparison says little. The same stage-1 corpus (bench/
prepare_scale.py's generator, minimind tokenizer, blocks of 1024) is prepared cold on 1 and then on 2 data nodes;
the shard sets must be identical. Goal: 2 data nodes >= 1.7x the tokens/s of 1.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from orchestrator.config import DataConfig, DataSourceConfig, PrepareConfig  # noqa: E402
from orchestrator.data.prepare_ray import prepare_stage_shards  # noqa: E402
from prepare_scale import BLOCK_SIZE, TOKENIZER, make_corpus  # noqa: E402

UNIT_MB = 4  # units small enough that two nodes finish together (the last unit is the tail)
GOAL = 1.7


def prepare_on(data_nodes: int, data: DataConfig, out: str, work: Path) -> dict:
    """A cold prepare on a fresh cluster of `data_nodes` one-core data nodes."""
    import ray
    from ray.cluster_utils import Cluster

    cores = sorted(os.sched_getaffinity(0))
    temp_dir = tempfile.mkdtemp(prefix=f"ray-{data_nodes}n-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = temp_dir  # Cluster writes its address file under $RAY_TMPDIR/ray
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    node = {"object_store_memory": 512 * 2**20, "temp_dir": temp_dir}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": 0, "include_dashboard": False})
    try:
        for index in range(data_nodes):
            os.sched_setaffinity(0, {cores[index % len(cores)]})
            try:
                cluster.add_node(**node, num_cpus=1)
            finally:
                os.sched_setaffinity(0, set(cores))
        ray.init(address=cluster.address, log_to_driver=False)
        started = time.perf_counter()
        prepared = prepare_stage_shards("pretrain", data, str(TOKENIZER), str(TOKENIZER), out)
        seconds = time.perf_counter() - started
        tokens = prepared.stats["train_tokens"] + prepared.stats["dropped_tail_tokens"]
        return {"data_nodes": data_nodes, "seconds": round(seconds, 2), "tokens": tokens,
                "tokens_per_s": round(tokens / seconds), "units": len(prepared.manifest.part("train")),
                "tokenize_nodes": len(prepared.nodes["tokenize"]), "read_nodes": len(prepared.nodes["read"]),
                "shards": sorted(info.sha256 for info in prepared.manifest.part("train")),
                "load_average": os.getloadavg()}
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def main(size_mb: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-nodes-"))
    try:
        corpus = work / "corpus"
        files = make_corpus(size_mb, corpus)
        # Per data node: one tokenizer actor and one read task share its CPU (the read is the lighter step).
        data = DataConfig(sources=[DataSourceConfig(path=str(corpus), text_unit="line")], block_size=BLOCK_SIZE,
                          eval_split=0.0,
                          prepare=PrepareConfig(unit_mb=UNIT_MB, tokenizer_actors=2, cpus_per_actor=0.5,
                                                cpus_per_read_task=0.5))
        runs = []
        for data_nodes in (1, 2):
            out = work / f"data-{data_nodes}"
            runs.append(prepare_on(data_nodes, data.model_copy(update={"prepare": data.prepare.model_copy(
                update={"tokenizer_actors": data_nodes})}), str(out), work))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "shards"}), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one, two = runs
    assert one["shards"] == two["shards"], "1 and 2 data nodes wrote different shard sets"
    speedup = two["tokens_per_s"] / one["tokens_per_s"]
    result = {"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "size_mb": size_mb,
              "files": len(files), "unit_mb": UNIT_MB, "cores": len(os.sched_getaffinity(0)),
              "runs": [{k: v for k, v in run.items() if k != "shards"} for run in runs],
              "same_shards": True, "speedup_2_over_1": round(speedup, 2), "goal": GOAL, "met": speedup >= GOAL}
    path = ROOT / "bench" / "results" / "prepare_nodes.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
