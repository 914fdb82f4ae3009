"""Every RayJob entrypoint of the `dev` overlay, exactly as kustomize builds it, run locally against a Ray head.

The pipeline job's output is also what the CLI shows by default (quiet: progress and summaries; the
`--verbose` side is checked by tests/integration/test_job_submit.py).

On Kubernetes the command runs in the image's working directory (/app, the project) with RAY_ADDRESS set by
Ray's job supervisor; here it runs in a scratch directory laid out like /app (the project's jobs/, configs/,
examples/ and orchestrator/), so its relative paths and outputs (runs/) resolve the same way, against a head
node this test starts. The commands are not edited: same entrypoint, same tiny config.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.deploy.validate import kustomize_build
from ray_head import running_ray_head

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
RUN = Path("runs") / "cluster-dev"  # configs/cluster-dev.yaml: storage_path runs, run_name cluster-dev


@pytest.fixture(scope="module")
def entrypoints(kuberay_crds) -> dict[str, str]:
    built = yaml.safe_load_all(kustomize_build(REPO_ROOT / "k8s" / "overlays" / "dev"))
    return {d["metadata"]["name"]: d["spec"]["entrypoint"] for d in built if d["kind"] == "RayJob"}


def app_dir(root: Path) -> Path:
    """A directory laid out like the image's /app."""
    root.mkdir()
    for name in ("jobs", "configs", "examples", "orchestrator"):
        (root / name).symlink_to(REPO_ROOT / name)
    return root


def start(entrypoint: str, cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, float]:
    # A Ray job runs its entrypoint through a shell, as here.
    return subprocess.Popen(entrypoint, shell=True, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True), time.monotonic()


def finish(name: str, running: tuple[subprocess.Popen, float]) -> str:
    process, started = running
    try:
        output, _ = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        output, _ = process.communicate()
    print(f"{name}: exit {process.returncode} after {time.monotonic() - started:.0f} s")
    assert process.returncode == 0, f"{name} failed:\n{output[-6000:]}"
    return output


def stage_models(output: str) -> dict[str, str]:
    """Each stage's model as the job's closing summary names it: `<stage>: 12 s; …` then `  model  <uri>`."""
    lines, models = output.splitlines(), {}
    for head, following in zip(lines, lines[1:]):
        stage = head.split(":", 1)[0]
        if stage in ("pretrain", "sft", "preference") and following.split()[:1] == ["model"]:
            models[stage] = following.split(None, 1)[1]
    return models


def test_every_rayjob_entrypoint_of_the_dev_overlay_runs(entrypoints, tmp_path):
    assert sorted(entrypoints) == ["llm-pipeline", "llm-pretrain", "llm-sft", "llm-tune"]
    # llm-sft and llm-tune start from llm-pretrain's model (same directory, as on the dev overlay's shared
    # volume); llm-pipeline runs both stages itself, in a directory of its own so the jobs can overlap.
    jobs_dir, pipeline_dir = app_dir(tmp_path / "app"), app_dir(tmp_path / "app-pipeline")
    with running_ray_head(num_cpus=8) as head:
        env = {**head.env, "RAY_ADDRESS": head.gcs_address}
        pipeline = start(entrypoints["llm-pipeline"], pipeline_dir, env)
        pretrain = finish("llm-pretrain", start(entrypoints["llm-pretrain"], jobs_dir, env))
        sft, tune = start(entrypoints["llm-sft"], jobs_dir, env), start(entrypoints["llm-tune"], jobs_dir, env)
        sft, tune, pipeline = finish("llm-sft", sft), finish("llm-tune", tune), finish("llm-pipeline", pipeline)

    assert stage_models(pretrain)["pretrain"] == str(jobs_dir / RUN / "models" / "pretrain")
    assert (jobs_dir / RUN / "models" / "pretrain" / "model.safetensors").is_file()

    sft_model = jobs_dir / RUN / "models" / "sft"
    assert stage_models(sft)["sft"] == str(sft_model)
    lineage = json.loads((sft_model / "lineage.json").read_text())
    assert lineage["config"]["model"]["base"] == "runs/cluster-dev/models/pretrain"  # stage 2 on stage 1's model

    assert "sft sweep: 2 trials" in tune and "best trial:" in tune
    results = next(line.split()[1:] for line in tune.splitlines() if line.startswith("results: "))
    assert all(Path(path).is_file() for path in results), results

    # The pipeline job runs all three stages: stage 3 (DPO) starts from stage 2's model.
    assert sorted(stage_models(pipeline)) == ["preference", "pretrain", "sft"]
    assert (pipeline_dir / RUN / "models" / "sft" / "config.json").is_file()
    preference = json.loads((pipeline_dir / RUN / "models" / "preference" / "lineage.json").read_text())
    assert preference["stage"] == "preference" and preference["base_model"].rstrip("/").endswith("models/sft")
    check_quiet_output(pipeline, pipeline_dir / RUN)


def check_quiet_output(output: str, run: Path) -> None:
    """What a job prints by default: a progress line per long step, each stage's summary, where the outputs
    went; no Ray worker lines, no library warnings or info lines. The run's log files keep all of it."""
    lines = output.splitlines()
    for stage in ("pretrain", "sft"):
        assert any(line.startswith(f"✓ {stage}: prepare data") and "tokens=" in line for line in lines), output
        # the last checkpoint on the finished line, stored (fit() has waited for its upload)
        assert any(line.startswith(f"✓ {stage}: train ") and "loss=" in line and "eval_loss=" in line
                   and re.search(r"ckpt=step \d+, [\d.]+ MiB in [\d.]+ s$", line) for line in lines), output
        assert any(line.startswith(f"✓ {stage}: export model") for line in lines), output
    assert f"run         {run}" in lines, output
    assert "RayTrainWorker" not in output and "pid=" not in output, output  # no worker log lines
    # No library warnings (FutureWarning: …) and no info log lines. Ray's own notices to the driver may show
    # (e.g. "(autoscaler …) Warning: … cannot be scheduled right now" while the other jobs hold the CPUs).
    assert not re.search(r"\w+Warning\b", output) and " INFO " not in output, output
    # Ray's cluster-wide notices reach every driver and their number grows with the machine's load (on a slow
    # machine: "WARNING: 26 PYTHON worker processes have been started…" every few workers); the budget is ours.
    ours = [line for line in lines if not re.match(r"(\x1b\[\d+m)?\((raylet|autoscaler)", line)]
    assert len(ours) < 30, output
    assert "core_worker" not in output, output  # the driver's own Ray core prints nothing (ray#53727 notices)
    assert "pretrain: fitting with 1 workers" in (run / "logs" / "driver.log").read_text()
    assert "epoch 1/1 done" in (run / "logs" / "pretrain" / "worker-0.log").read_text()
