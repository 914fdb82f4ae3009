"""Evaluation of a run's base → stage 1 → stage 2 models through Ray Data on a real local cluster, on the
shared medical QA and clinical-case sets; the report (Markdown, JSON, PNG loss curves) on local disk and
on a real S3 server."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from orchestrator import storage
from orchestrator.config import TinyModelConfig, config_from_dict, load_config_for_models
from orchestrator.model.loading import create_tiny_model, load_tokenizer
from orchestrator.train.metrics_log import MetricsLog, read_metrics
from orchestrator.layout import RunLayout

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED_METRICS = [
    "perplexity", "bits_per_char",
    "qa/medical_qa/char_f1", "qa/medical_qa/rouge_l", "qa/medical_qa/exact_match",
    "qa/clinical/char_f1", "qa/clinical/rouge_l", "qa/clinical/exact_match",
    "mc/choice/accuracy", "mc/choice_text/accuracy", "honesty/refusal_rate",
]


def eval_tree(tmp_path: Path, shared: Path) -> dict:
    return {
        "run_name": "evalrun",
        "model": {"tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "max_position_embeddings": 256}},
        "tokenizer": {"path": str(shared / "tokenizers" / "minimind")},
        "checkpoint": {"storage_path": str(tmp_path / "runs")},
        "pretrain": {"data": {"sources": [{"path": str(shared / "pretrain" / "medical" / "fever.txt")}]}},
        "sft": {"data": {"sources": [{"path": str(shared / "sft" / "medical_alpaca.jsonl")}]}},
        "eval": {
            "qa": [{"name": "medical_qa", "path": str(shared / "eval" / "medical_qa.jsonl"),
                    "fields": {"question": "问", "answer": "答"}, "max_records": 4},
                   {"name": "clinical", "path": str(shared / "eval" / "medical_clinical_cases.json"),
                    "format": "clinical_cases", "max_records": 4}],
            "multiple_choice": [{"name": "choice", "path": str(EXAMPLES / "eval" / "medical_choice.csv"),
                                 "max_records": 4},
                                {"name": "choice_text", "path": str(EXAMPLES / "eval" / "medical_choice.csv"),
                                 "scoring": "option_text", "max_records": 3}],
            "honesty": {"path": str(EXAMPLES / "eval" / "honesty_probes.jsonl"), "max_records": 2},
            "perplexity": {"sources": [{"path": str(shared / "pretrain" / "medical" / "fever.txt"),
                                        "max_records": 6}], "block_size": 128},
            "generation": {"max_tokens": 12, "repetition_penalty": 1.3},
            "samples": 2,
            "replicas": 2,
            "batch_size": 4,
        },
    }


def write_stage_logs(config, stage: str, steps: int) -> list[dict]:
    """metrics.jsonl as the training loop writes it: eval before training, train loss every 2 steps,
    eval at each of two epoch ends."""
    logs = MetricsLog(RunLayout.of(config).logs(stage), stage)
    logs.write(0, {"epoch": 0, "eval_loss": 8.8, "eval_perplexity": 6600.0, "eval_tokens": 512})
    for step in range(2, steps + 1, 2):
        epoch = 1 if step <= steps // 2 else 2
        logs.write(step, {"train_loss": 8.8 - 0.3 * step, "learning_rate": 1e-3, "tokens_per_s": 900.0,
                          "epoch": epoch, "step": step})
        if step in (steps // 2, steps):
            logs.write(step, {"epoch": epoch, "step": step, "tokens_per_s_run": 900.0, "eval_loss": 8.0 - 0.2 * step,
                              "eval_perplexity": 100.0, "eval_tokens": 512})
    logs.close()
    return read_metrics(RunLayout.of(config).logs(stage))


def save_model(tokenizer, directory: str, seed: int) -> None:
    tiny = TinyModelConfig(hidden_size=64, intermediate_size=128, max_position_embeddings=256)
    model = create_tiny_model(tiny, tokenizer, seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shared_data):
    """A run directory as the pipeline leaves it: base/, models/{pretrain,sft}/, logs/<stage>/metrics.jsonl."""
    tmp_path = tmp_path_factory.mktemp("evalrun")
    config = config_from_dict(eval_tree(tmp_path, shared_data))
    tokenizer = load_tokenizer(str(shared_data / "tokenizers" / "minimind"))
    root = RunLayout.of(config).root
    for seed, sub in enumerate(["base", "models/pretrain", "models/sft"]):
        save_model(tokenizer, storage.join(root, sub), seed)
    records = {"pretrain": write_stage_logs(config, "pretrain", 12), "sft": write_stage_logs(config, "sft", 8)}
    return tmp_path, config, records


def test_run_report_has_every_metric_for_every_model_and_valid_loss_plots(ray_cluster, run_dir):
    from matplotlib.image import imread
    from PIL import Image

    from orchestrator.evaluation.runner import evaluate_run

    tmp_path, config, records = run_dir
    outcome = evaluate_run(config)
    out = Path(RunLayout.of(config).root) / "eval"
    assert outcome.out_uri == str(out)
    assert list(outcome.metrics) == ["base", "pretrain", "sft"]
    for model, metrics in outcome.metrics.items():
        assert list(metrics) == EXPECTED_METRICS, model
        assert 1.0 < metrics["perplexity"] < 2 * 6400  # an untrained model: about the vocabulary size
        assert all(0.0 <= metrics[m] <= 1.0 for m in EXPECTED_METRICS[2:])
    # different weights, different scores: each model really was the one scored
    assert len({m["perplexity"] for m in outcome.metrics.values()}) == 3

    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "| metric | better | base | pretrain | sft | change (base → sft) |" in markdown
    for metric in EXPECTED_METRICS:
        row = re.search(rf"^\| {re.escape(metric)} \| (lower|higher) \|(.*)\|$", markdown, re.MULTILINE)
        assert row is not None, metric
        assert len(row.group(2).split("|")) == 4  # base, pretrain, sft, change
    assert "### medical_qa" in markdown and "### clinical" in markdown and "### honesty" in markdown
    assert "肛门病变可能是什么疾病的症状?" in markdown  # a sample question, side by side

    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [m["name"] for m in report["models"]] == ["base", "pretrain", "sft"]
    assert report["sets"]["clinical"] == {"kind": "qa", "items": 4,
                                          "path": str(Path(config.eval.qa[1].path))}
    assert len(report["items"]["sft"]) == 4 + 4 + 4 + 3 + 2  # every QA, choice and probe item

    for stage, stage_records in records.items():
        expected = {"train_loss": sum(1 for r in stage_records if "train_loss" in r),
                    "eval_loss": sum(1 for r in stage_records if "eval_loss" in r)}
        assert expected == ({"train_loss": 6, "eval_loss": 3} if stage == "pretrain"
                            else {"train_loss": 4, "eval_loss": 3})
        png = (out / f"loss_{stage}.png").read_bytes()
        assert png.startswith(PNG_SIGNATURE)
        assert imread(io.BytesIO(png), format="png").shape[2] == 4
        assert json.loads(Image.open(io.BytesIO(png)).text["Description"]) == expected
        plotted = next(p for p in report["plots"] if p["stage"] == stage)
        assert {s: len(v["steps"]) for s, v in plotted["series"].items()} == expected
        assert f"![{stage} loss](loss_{stage}.png)" in markdown


def test_cli_evaluates_a_model_from_s3_and_writes_the_report_to_s3(ray_cluster, run_dir, s3_server, tmp_path):
    from s3_support import ACCESS_KEY, REGION, SECRET_KEY

    from orchestrator.cli.main import main

    _, config, _ = run_dir
    # A bare evaluation config: no model or tokenizer section, the model directory carries its tokenizer.
    tree = {"storage": {"s3": {"endpoint_url": s3_server.endpoint, "region": REGION, "access_key_id": ACCESS_KEY,
                               "secret_access_key": SECRET_KEY}},
            "eval": {"qa": [config.eval.qa[0].model_dump(mode="json") | {"max_records": 2}],
                     "generation": {"max_tokens": 4}}}
    config_file = tmp_path / "eval.yaml"
    config_file.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    client = s3_server.client()
    sft_dir = Path(RunLayout.of(config).root) / "models" / "sft"
    for path in sft_dir.iterdir():
        client.upload_file(str(path), "orchestrator-test", f"models/sft/{path.name}")

    code = main(["eval", "--config", str(config_file), "--model", "tuned=s3://orchestrator-test/models/sft",
                 "--out", "s3://orchestrator-test/reports/tuned", "eval.samples=1"])
    assert code == 0
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="orchestrator-test", Prefix="reports/")["Contents"]}
    assert keys == {"reports/tuned/report.md", "reports/tuned/report.json"}  # no run curves for given models
    body = client.get_object(Bucket="orchestrator-test", Key="reports/tuned/report.json")["Body"].read()
    report = json.loads(body)
    assert [m["name"] for m in report["models"]] == ["tuned"]
    assert report["models"][0]["uri"] == "s3://orchestrator-test/models/sft"
    assert set(report["models"][0]["metrics"]) == {"qa/medical_qa/char_f1", "qa/medical_qa/rouge_l",
                                                   "qa/medical_qa/exact_match"}
    assert SECRET_KEY.encode() not in body
    # the model scored from S3 answers exactly like the local copy of it (greedy): S3 served that model
    from orchestrator.evaluation.scoring import ModelScorer, ScorerSettings, generation_params
    from orchestrator.evaluation.sets import load_qa_set

    loaded = load_config_for_models(config_file, [], str(sft_dir))
    scorer = ModelScorer.load(str(sft_dir), ScorerSettings(generation_params(loaded.eval.generation)))
    items = load_qa_set(loaded.eval.qa[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the replica (num_cpus_per_replica=1): the same float reductions
    try:
        expected = scorer.generate([[list(m) for m in item.messages] for item in items])
    finally:
        torch.set_num_threads(threads)
    assert [report["items"]["tuned"][item.key]["answer"] for item in items] == [e["text"] for e in expected]
