"""Checkpoint-directory transfer throughput: our storage layer vs plain boto3, against a local S3 server.

    .venv/bin/python bench/storage_bench.py [--mb 200] [--repeats 3]

Starts moto's S3 server on 127.0.0.1, writes a directory of safetensors-sized files, and times
`storage.upload_dir` / `storage.download_dir` against a loop of boto3 `upload_file` /
`download_file` over the same files (default transfer settings), alternating the two, median of
the repeats. Writes bench/results/storage.json and prints the ratios (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator import storage  # noqa: E402

BUCKET = "bench"
KEYS = {"access_key_id": "bench", "secret_access_key": "bench", "region": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_checkpoint(directory: Path, total_mb: int) -> int:
    """Files shaped like a sharded model checkpoint: a few large shards plus small JSON files."""
    directory.mkdir(parents=True)
    shards = 4
    for i in range(shards):
        with open(directory / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as handle:
            handle.write(os.urandom(total_mb * 2**20 // shards))
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        (directory / name).write_text(json.dumps({"name": name, "padding": "x" * 2000}))
    return sum(p.stat().st_size for p in directory.iterdir())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = Path(tempfile.mkdtemp(prefix="storage-bench-"))
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name=KEYS["region"],
                              aws_access_key_id=KEYS["access_key_id"], aws_secret_access_key=KEYS["secret_access_key"])
        client.create_bucket(Bucket=BUCKET)
        storage.configure(storage.S3Settings(endpoint_url=endpoint, **KEYS))
        source = work / "checkpoint"
        size = make_checkpoint(source, args.mb)
        files = sorted(source.iterdir())

        def clear() -> None:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
                for obj in page.get("Contents", []):
                    client.delete_object(Bucket=BUCKET, Key=obj["Key"])

        def ours_up(prefix: str) -> None:
            storage.upload_dir(str(source), f"s3://{BUCKET}/{prefix}")

        def boto_up(prefix: str) -> None:
            for path in files:
                client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")

        def ours_down(prefix: str, dest: Path) -> None:
            storage.download_dir(f"s3://{BUCKET}/{prefix}", str(dest))

        def boto_down(prefix: str, dest: Path) -> None:
            dest.mkdir(parents=True)
            for path in files:
                client.download_file(BUCKET, f"{prefix}/{path.name}", str(dest / path.name))

        times: dict[str, list[float]] = {k: [] for k in ("ours_up", "boto_up", "ours_down", "boto_down")}
        for r in range(args.repeats):
            for name, up, down in (("ours", ours_up, ours_down), ("boto", boto_up, boto_down)):
                clear()
                start = time.perf_counter()
                up(f"{name}{r}")
                times[f"{name}_up"].append(time.perf_counter() - start)
                dest = work / f"{name}-down-{r}"
                start = time.perf_counter()
                down(f"{name}{r}", dest)
                times[f"{name}_down"].append(time.perf_counter() - start)
                shutil.rmtree(dest)
        mb = size / 2**20
        medians = {k: statistics.median(v) for k, v in times.items()}
        result = {
            "bytes": size,
            "repeats": args.repeats,
            "upload_MBps": {"ours": mb / medians["ours_up"], "boto3": mb / medians["boto_up"]},
            "download_MBps": {"ours": mb / medians["ours_down"], "boto3": mb / medians["boto_down"]},
            "upload_ratio": medians["boto_up"] / medians["ours_up"],
            "download_ratio": medians["boto_down"] / medians["ours_down"],
            "goal": ">= 0.9",
        }
        out = ROOT / "bench" / "results" / "storage.json"
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
