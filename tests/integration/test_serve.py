"""serve.engine=hf over real HTTP on 127.0.0.1: the conformance suite (tests/integration/serve_conformance.py), every
generation parameter, multiplexed adapters, merge, autoscaling, batching, a replica killed under load."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from orchestrator.config import config_from_dict
from orchestrator.train.stage import run_stage
from s3_support import free_port
from serve_conformance import (API_KEYS, MAX_TOKENS_LIMIT, OpenAIConformance, assert_no_request_lost, load_with_a_replica_kill,
                               offline_greedy, post, replica_pid)

pytestmark = pytest.mark.integration
# Replicas report load every 0.5 s instead of 10 s, so the autoscaling test runs in seconds.
# (Set before this module's Ray cluster starts; its processes inherit the environment.)
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
REPO = Path(__file__).resolve().parents[2]


def tiny_tree(tmp: Path) -> dict:
    return {
        "run_name": "serve-it",
        "model": {"tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "max_position_embeddings": 256}},
        "tokenizer": {"train": {"vocab_size": 600}},
        "distributed": {"num_workers": 2, "zero_stage": 2},
        "checkpoint": {"storage_path": str(tmp / "runs")},
        "sft": {"data": {"sources": [{"path": str(REPO / "examples" / "data" / "sft")}], "max_length": 128},
                "train": {"method": "lora", "learning_rate": 5e-3, "epochs": 1, "micro_batch_size": 4}},
    }


def make_adapter(model_dir: str, out: Path, seed: int) -> str:
    """A real peft LoRA adapter on the served model, with non-zero (seeded) weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    from ray import serve

    from orchestrator.serve.app import run_server

    tmp = tmp_path_factory.mktemp("serve")
    tree = tiny_tree(tmp)
    result = run_stage(config_from_dict(tree), "sft")  # a merged tiny model from a real training run
    adapters = {"medical-a": make_adapter(result.model_uri, tmp / "a1", 1),
                "medical-b": make_adapter(result.model_uri, tmp / "a2", 2)}
    os.environ["ORCH_TEST_API_KEYS"] = API_KEYS
    tree["serve"] = {"port": free_port(), "max_batch_size": 8, "max_tokens_limit": MAX_TOKENS_LIMIT,
                     "api_keys_env": "ORCH_TEST_API_KEYS", "adapters": adapters,
                     "defaults": {"max_tokens": 16}}
    config = config_from_dict(tree)
    url = run_server(config, blocking=False)
    try:
        yield {"url": url, "model_dir": result.model_uri, "adapters": adapters, "name": "serve-it", "config": config}
    finally:
        serve.shutdown()


def model_replicas(app_name: str) -> int:
    """RUNNING replicas of an application's model deployment (its ingress not counted)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    deployment = app.deployments.get("ModelServer") if app is not None else None
    return deployment.replica_states.get("RUNNING", 0) if deployment is not None else 0


class TestConformance(OpenAIConformance):
    """Routes, streaming, seeds, stop strings, every invalid request, keys: the suite both engines pass."""


def test_every_generation_parameter_the_hf_engine_has(served):
    body = {"prompt": "糖尿病的饮食", "max_tokens": 20, "temperature": 0.8, "top_p": 0.9, "top_k": 20,
            "do_sample": True, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "seed": 11, "stop": ["。"]}
    first, second = post(served, "/v1/completions", body), post(served, "/v1/completions", body)
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]  # same seed, same text
    assert "。" not in first.json()["choices"][0]["text"]
    beams = post(served, "/v1/completions", {"prompt": "发烧", "max_tokens": 8, "num_beams": 3, "temperature": 0})
    assert beams.status_code == 200, beams.text


def test_adapters_are_multiplexed_per_request(served):
    answers = {}
    for name, adapter in served["adapters"].items():
        response = post(served, "/v1/completions", {"model": name, "prompt": "发烧", "max_tokens": 10,
                                                    "temperature": 0})
        assert response.status_code == 200, response.text
        answers[name] = response.json()["choices"][0]["text"]
        assert answers[name] == offline_greedy(served["model_dir"], "发烧", 10, adapter)
    assert answers["medical-a"] != answers["medical-b"]
    prefixed = post(served, "/v1/completions", {"model": "serve-it:medical-a", "prompt": "发烧", "max_tokens": 10,
                                                "temperature": 0})
    assert prefixed.json()["choices"][0]["text"] == answers["medical-a"]


def test_merge_cli_checks_logits_and_rejects_bad_adapters(served, tmp_path):
    import subprocess
    import sys

    adapter = served["adapters"]["medical-a"]
    out = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "orchestrator", "merge", "--base", served["model_dir"],
                           "--adapter", adapter, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["max_abs_logit_diff"] < 1e-4
    assert offline_greedy(str(out), "发烧", 10) == offline_greedy(served["model_dir"], "发烧", 10, adapter)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(adapter, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    failed = subprocess.run([sys.executable, "-m", "orchestrator", "merge", "--base", served["model_dir"],
                             "--adapter", str(corrupt), "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2 and "cannot read adapter weights" in failed.stderr


def test_autoscaling_goes_up_under_load_and_back_down(served):
    """A bounded loopback load (8 clients, at most 90 s) scales 1 -> 2 replicas; quiet scales back to 1."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from orchestrator.serve.app import build_app

    tree = served["config"].model_dump(mode="json")
    tree["storage"] = {}
    tree["serve"].update(api_keys_env=None, adapters={}, max_batch_size=1, max_ongoing_requests=8, autoscaling={
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
        "downscale_delay_s": 2, "metrics_interval_s": 0.5, "look_back_period_s": 1})
    serve.run(build_app(config_from_dict(tree)), name="autoscale", route_prefix="/as", blocking=False)

    def running() -> int:
        return model_replicas("autoscale")

    stop, seen = threading.Event(), []

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                http.post(served["url"] + "/as/v1/completions", json={"prompt": "发烧", "max_tokens": 48})

    try:
        deadline = time.monotonic() + 60
        while running() < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert running() == 1
        with ThreadPoolExecutor(8) as pool:
            for _ in range(8):
                pool.submit(client)
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and running() < 2:
                time.sleep(0.5)
            seen.append(running())
            stop.set()
        assert seen[-1] == 2, "did not scale up to 2 replicas under load"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and running() > 1:
            time.sleep(0.5)
        assert running() == 1, "did not scale back down to 1 replica"
    finally:
        stop.set()
        serve.delete("autoscale")


def test_serve_yaml_builder_builds_the_application(served):
    """configs/serve.yaml's import path and args build a bound application (what `serve run` deploys)."""
    import yaml
    from ray.serve import Application

    from orchestrator.serve.app import app_builder

    spec = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())["applications"][0]
    assert spec["import_path"] == "orchestrator.serve.app:app_builder"
    args = {**spec["args"], "config": str(REPO / spec["args"]["config"]),
            "overrides": f"serve.model={served['model_dir']},serve.max_batch_size=4"}
    assert isinstance(app_builder(args), Application)


def test_concurrent_requests_are_batched_without_changing_answers(served):
    """Eight different prompts at once (left-padded into shared batches) answer as they do one by one."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["发烧", "头疼怎么办", "高血压患者应该注意什么饮食", "感冒", "糖尿病", "失眠多梦怎么调理", "咳嗽", "胃痛"]
    body = lambda p: {"prompt": p, "max_tokens": 12, "temperature": 0}  # noqa: E731
    alone = [post(served, "/v1/completions", body(p)).json()["choices"][0]["text"] for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: post(served, "/v1/completions", body(p)).json(), prompts))
    assert [r["choices"][0]["text"] for r in together] == alone


def test_a_replica_killed_under_load_loses_no_request(served):
    """400 requests at concurrency 16 (10% invalid) while one of two model replicas is SIGKILLed: every valid
    request is answered 200 (retried on the other replica), every invalid one 400; no body is plain text."""
    import time

    import ray
    from ray import serve

    from orchestrator.serve.app import build_app

    tree = served["config"].model_dump(mode="json")
    tree["storage"] = {}
    tree["serve"].update(api_keys_env=None, adapters={}, num_replicas=2)
    serve.run(build_app(config_from_dict(tree)), name="faults", route_prefix="/faults", blocking=False)
    deadline = time.monotonic() + 90
    while model_replicas("faults") < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert model_replicas("faults") == 2
    replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::faults#ModelServer#")]
    try:
        results = load_with_a_replica_kill(served["url"] + "/faults", replica_pid(replicas[0]), requests=400,
                                           concurrency=16, kill_after=100)
    finally:
        serve.delete("faults")
    assert_no_request_lost(results, "replica kill")
