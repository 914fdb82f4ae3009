"""Multi-node Ray on one machine for the tests: a head and worker nodes started by ray.cluster_utils.Cluster."""

from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def two_node_cluster(prefix: str, num_cpus: int, log_to_driver: bool = False,
                     worker_resources: dict[str, float] | None = None, **node_args):
    """A head and a worker node on this machine (ray.cluster_utils.Cluster), `num_cpus` logical CPUs each, in a
    temp dir of their own (never `address="auto"`); this process's driver connected. Yields (cluster, temp dir).
    `node_args` go to both nodes (e.g. resources); the head's `_system_config` speeds up node-death detection.
    `worker_resources`: custom resources the worker node has on top (e.g. one that keeps a task off the head)."""
    import ray
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    # Cluster writes its address file under $RAY_TMPDIR/ray: keep it in this module's own directory.
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    node = {"num_cpus": num_cpus, "object_store_memory": 256 * 2**20, "temp_dir": temp_dir, **node_args}
    # A killed raylet (its port refuses at once) is declared dead after ~5 s instead of ~15 s: 5 failed checks,
    # 1 s apart. A live raylet on this busy machine still has 5 s to answer each check.
    system_config = {"health_check_period_ms": 1000, "health_check_timeout_ms": 5000,
                     "health_check_failure_threshold": 5}
    cluster = Cluster(initialize_head=True,
                      head_node_args={**node, "include_dashboard": False, "_system_config": system_config})
    try:
        worker = dict(node)
        if worker_resources:
            worker["resources"] = {**node.get("resources", {}), **worker_resources}
        cluster.add_node(**worker)
        ray.init(address=cluster.address, log_to_driver=log_to_driver)
        yield cluster, temp_dir
    finally:
        ray.shutdown()
        cluster.shutdown()
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
