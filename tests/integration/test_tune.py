"""Ray Tune sweeps over full Ray Train runs, on a real local Ray cluster (dashboard on) and moto's S3.

One module cluster with 2 CPUs: trials of one worker each, two at a time. The tiny model trains on
the demo data shipped in examples/data, so these tests need nothing from ../shared.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.config import config_from_dict, load_config
from orchestrator.checkpoint import verify_checkpoint
from orchestrator.train.metrics_log import read_metrics
from orchestrator.layout import RunLayout
from orchestrator.pipeline import run_pipeline
from orchestrator.tune.results import TrialRow, config_with_best, format_table
from orchestrator.tune.sweep import run_sweep
from s3_support import ACCESS_KEY, REGION, SECRET_KEY, free_port

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples" / "data"
BUCKET = "orchestrator-test"


@pytest.fixture(scope="module")
def tune_cluster(s3_server):
    """A 2-CPU Ray cluster with the dashboard on: Ray Train frees an early-stopped trial's placement
    group through the State API (RAY_API_SERVER_ADDRESS). S3 credentials come from the environment,
    as sweeps require."""
    import ray

    port = free_port()
    env = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # before ray.init: Ray's processes inherit it
    context = ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                       _temp_dir=tempfile.mkdtemp(prefix="ray-tune-", dir="/tmp"), log_to_driver=True)
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _last_checkpoint_step(objects: dict) -> int:
    """The highest step of a complete checkpoint (one with its manifest) among a trial's object keys."""
    steps = [int(m.group(1)) for key in objects if (m := re.search(r"/checkpoint_step(\d+)/manifest\.json$", key))]
    return max(steps, default=0)


def sweep_tree(storage_path: str, **tune) -> dict:
    """Stage 1 on the demo notes, tiny model, 1 worker, ZeRO-0."""
    return {
        "run_name": "sweep",
        "model": {"tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "max_position_embeddings": 256}},
        "tokenizer": {"train": {"vocab_size": 600}},
        "distributed": {"num_workers": 1, "cpus_per_worker": 1, "zero_stage": 0},
        "checkpoint": {"storage_path": storage_path, "keep": 2},
        "eval": {"at_start": False},
        "pretrain": {
            "data": {"sources": [{"path": str(EXAMPLES / "pretrain" / "medical_notes.txt")},
                                 {"path": str(EXAMPLES / "pretrain" / "clinic_guides.jsonl")}],
                     "block_size": 64, "eval_split": 0.15},
            "train": {"method": "full", "learning_rate": 3e-3, "epochs": 2, "micro_batch_size": 4,
                      "warmup_ratio": 0.0, "log_every_n_steps": 5},
        },
        "tune": {"num_samples": 4, "max_concurrent_trials": 2, **tune},
    }


def test_random_search_with_asha_promotes_the_best_trial(tune_cluster, mlflow_server, tmp_path, capsys):
    """4 trials, random search + ASHA, run by the pipeline: one trial is stopped early, the best
    trial is the table's lowest eval loss, and its settings train to the same eval losses again."""
    space = {"learning_rate": {"distribution": "loguniform", "low": 3e-4, "high": 1e-2},
             "epochs": {"values": [2, 3]}}
    # Seed 2 samples the lowest learning rate for the third trial: it reaches ASHA's first rung
    # after two better trials, so it is stopped there whatever order the first two report in.
    tree = sweep_tree(str(tmp_path / "runs"), stages=["pretrain"], seed=2, search_space=space)
    mlflow_uri = mlflow_server  # a real tracking server (SQLite backend, artifacts over HTTP)
    tree["tracking"] = {"mlflow": {"tracking_uri": mlflow_uri, "experiment": "sweeps"}}
    config = config_from_dict(tree)
    started = time.perf_counter()
    result = run_pipeline(config)
    sweep_wall = time.perf_counter() - started
    layout = RunLayout.of(config)
    sweep = layout.sweep("pretrain")
    summary = json.loads(Path(sweep, "results.json").read_text())
    with open(Path(sweep, "results.csv"), newline="") as handle:
        table = list(csv.DictReader(handle))
    with capsys.disabled():
        print(f"\nsweep of 4 trials (pipeline, incl. data prep and export): {sweep_wall:.1f} s")
        print(format_table([TrialRow(**row) for row in summary["trials"]], "eval_loss"))

    assert len(table) == 4 and {row["status"] for row in table} == {"TERMINATED"}
    stopped = [row for row in table if row["stopped_early"] == "True"]
    assert stopped, "ASHA stopped no trial"
    assert all(int(row["epochs_run"]) < int(row["epochs"]) for row in stopped)
    finished = [row for row in table if row["stopped_early"] == "False"]
    assert all(int(row["epochs_run"]) == int(row["epochs"]) for row in finished)

    best = summary["best"]
    lowest = min(table, key=lambda row: float(row["best_eval_loss"]))
    assert best["trial_id"] == lowest["trial_id"]
    assert best["best_eval_loss"] == pytest.approx(float(lowest["best_eval_loss"]))
    manifest = verify_checkpoint(best["checkpoint"])
    assert manifest["trainer_state"]["metrics"]["eval_loss"] == pytest.approx(best["best_eval_loss"])

    # The stage's model is the best trial's best checkpoint, exported with its lineage.
    stage = result.stages[0]
    assert stage.checkpoint_uri == best["checkpoint"]
    lineage = json.loads(Path(stage.model_uri, "lineage.json").read_text())
    assert lineage["sweep"]["trial_id"] == best["trial_id"]
    assert lineage["config"]["pretrain"]["train"]["learning_rate"] == pytest.approx(best["params"]["learning_rate"])

    # MLflow: the run's own run, with each trial a child run carrying its eval losses.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    parent_id = json.loads(Path(layout.tracking).read_text())["mlflow_run_id"]
    children = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(run.info.run_name for run in children) == sorted(f"pretrain-{row['trial_id']}" for row in table)
    for run in children:
        assert run.data.metrics["pretrain/eval_loss"] > 0 and "pretrain.train.learning_rate" in run.data.params
    assert {a.path for a in client.list_artifacts(parent_id, "tune/pretrain")} >= {
        "tune/pretrain/results.csv", "tune/pretrain/best_config.yaml"}

    # best_config.yaml is the config with the best values; reuse_best trains exactly that.
    written = load_config(Path(sweep, "best_config.yaml"))
    assert written.pretrain.train.learning_rate == pytest.approx(best["params"]["learning_rate"])
    assert written.pretrain.train.epochs == best["params"]["epochs"]
    assert written.tune.stages == []
    reuse = config_from_dict({**config.model_dump(), "tune": {**config.tune.model_dump(), "stages": [],
                                                               "reuse_best": ["pretrain"]}})
    assert config_with_best(reuse, "pretrain").pretrain == written.pretrain

    trial_losses = [r["eval_loss"] for r in read_metrics(layout.trial("pretrain", best["trial_id"]).logs("pretrain")) if "eval_loss" in r]
    run_pipeline(reuse)
    rerun_losses = [r["eval_loss"] for r in read_metrics(layout.logs("pretrain"))
                    if "eval_loss" in r]
    assert len(rerun_losses) == best["params"]["epochs"]
    assert rerun_losses[:len(trial_losses)] == pytest.approx(trial_losses, rel=1e-4)
    assert min(rerun_losses) == pytest.approx(best["best_eval_loss"], rel=1e-4)


def _experiment_state_statuses(client, prefix: str) -> dict[str, str]:
    """Trial id → status in the newest Tune experiment state stored under `prefix` (S3)."""
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    states = sorted(o["Key"] for o in listing if o["Key"].rsplit("/", 1)[-1].startswith("experiment_state"))
    if not states:
        return {}
    try:
        body = json.loads(client.get_object(Bucket=BUCKET, Key=states[-1])["Body"].read())
    except json.JSONDecodeError:  # read while Tune overwrote it (moto serves the object as it is replaced)
        return {}
    trials = [json.loads(state) for state, _ in body["trial_data"]]
    return {trial["trial_id"]: trial["status"] for trial in trials}


def _objects(client, prefix: str) -> dict[str, str]:
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"]: o["ETag"] for o in listing}


def test_killed_sweep_on_s3_resumes_without_rerunning_finished_trials(tune_cluster, s3_server, tmp_path, capsys):
    """Optuna search on S3 storage: the driver (jobs/tune.py) is killed after two trials finished;
    the same sweep started again keeps those two and finishes the third."""
    tree = sweep_tree(f"s3://{BUCKET}/tune-resume", num_samples=3, search_alg="optuna", scheduler="none", seed=7,
                      search_space={"learning_rate": {"distribution": "loguniform", "low": 1e-3, "high": 1e-2}})
    tree["storage"] = {"s3": {"endpoint_url": s3_server.endpoint, "region": REGION}}
    config_path = tmp_path / "sweep.yaml"
    config_path.write_text(yaml.safe_dump(tree))
    config = config_from_dict(tree)
    client = s3_server.client()
    prefix = "tune-resume/sweep/tune/pretrain/"

    started = time.perf_counter()
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen([sys.executable, str(REPO_ROOT / "jobs" / "tune.py"), "--config", str(config_path)],
                                  # Tune saves its experiment state every second instead of every 10+ s.
                                  cwd=REPO_ROOT, env={**os.environ, "RAY_ADDRESS": tune_cluster,
                                                      "TUNE_GLOBAL_CHECKPOINT_S": "1"},
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            statuses = _experiment_state_statuses(client, prefix)
            if list(statuses.values()).count("TERMINATED") >= 2:
                break
            time.sleep(1)
        else:
            pytest.fail(f"two trials did not finish (driver exit {driver.poll()}):\n{log_path.read_text()[-3000:]}")
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    assert driver.returncode == -signal.SIGKILL, "the sweep finished before it could be interrupted"
    finished = sorted(t for t, status in statuses.items() if status == "TERMINATED")
    assert len(finished) == 2 and len(statuses) == 3, statuses
    before = {t: _objects(client, f"{prefix}trials/{t}/") for t in finished}

    killed_after = time.perf_counter() - started
    result = run_sweep(config, "pretrain")
    with capsys.disabled():
        print(f"\nkilled the driver after {killed_after:.1f} s; the resumed sweep took {result.wall_seconds:.1f} s")

    assert result.resumed
    assert sorted(row.trial_id for row in result.rows) == sorted(statuses)
    assert all(row.status == "TERMINATED" and not row.stopped_early for row in result.rows)
    # The finished trials were not rerun: their files (trial record, checkpoints, logs) are untouched.
    assert {t: _objects(client, f"{prefix}trials/{t}/") for t in finished} == before
    (interrupted,) = set(statuses) - set(finished)
    # The interrupted trial ran to the same last step (2 epochs) as the trials that finished before the kill.
    last_steps = {t: _last_checkpoint_step(before[t]) for t in finished}
    assert len(set(last_steps.values())) == 1 and min(last_steps.values()) > 0, last_steps
    final = f"{prefix}trials/{interrupted}/pretrain/checkpoint_step{last_steps[finished[0]]:08d}/manifest.json"
    assert final in _objects(client, f"{prefix}trials/{interrupted}/")
    assert result.best.checkpoint.startswith(f"s3://{BUCKET}/{prefix}trials/{result.best.trial_id}/pretrain/")
    best_yaml = client.get_object(Bucket=BUCKET, Key=f"{prefix}best_config.yaml")["Body"].read().decode()
    assert yaml.safe_load(best_yaml)["pretrain"]["train"]["learning_rate"] == pytest.approx(
        result.best.params["learning_rate"])

    # Tune persists its storage filesystem in the sweep state; the secret key must not be in it.
    for key in _objects(client, "tune-resume/"):
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert SECRET_KEY.encode() not in body, key
