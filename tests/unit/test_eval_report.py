"""The evaluation report: loss curves from metrics records, PNG plots, Markdown and JSON."""

from __future__ import annotations

import io
import json

from orchestrator.evaluation.report import (
    Curve,
    EvalReport,
    loss_curves,
    plot_loss_curves,
    render_markdown,
    write_report,
)
from orchestrator.evaluation.tasks import ModelScores

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_loss_curves_take_the_last_record_of_a_repeated_step():
    records = [
        {"step": 0, "epoch": 0, "eval_loss": 8.0},
        {"step": 5, "train_loss": 7.0, "learning_rate": 1e-3},
        {"step": 10, "train_loss": 6.0},
        {"step": 10, "event": "resumed", "resumed_from": "ckpt"},
        {"step": 10, "train_loss": 5.5},  # the resumed run logged step 10 again
        {"step": 12, "epoch": 1, "eval_loss": 5.0, "tokens_per_s_run": 100.0},
    ]
    curves = loss_curves(records)
    assert curves["train_loss"] == Curve((5, 10), (7.0, 5.5))
    assert curves["eval_loss"] == Curve((0, 12), (8.0, 5.0))
    assert loss_curves([{"step": 1, "event": "resumed"}]) == {}


def test_loss_plot_is_a_png_that_decodes_and_records_its_points():
    from matplotlib.image import imread
    from PIL import Image

    png = plot_loss_curves("pretrain", {"train_loss": Curve((1, 2, 3), (3.0, 2.0, 1.5)),
                                        "eval_loss": Curve((0, 3), (3.5, 1.8))})
    assert png.startswith(PNG_SIGNATURE)
    pixels = imread(io.BytesIO(png), format="png")
    assert pixels.shape == (400, 700, 4) and pixels.std() > 0  # 7x4 inches at 100 dpi, not blank
    assert json.loads(Image.open(io.BytesIO(png)).text["Description"]) == {"train_loss": 3, "eval_loss": 2}


def _report() -> EvalReport:
    base = ModelScores(metrics={"perplexity": 100.0, "qa/q/char_f1": 0.25, "honesty/refusal_rate": 0.5})
    tuned = ModelScores(metrics={"perplexity": 40.0, "qa/q/char_f1": 0.2, "honesty/refusal_rate": 0.5},
                        truncated_prompts=2)
    samples = [{"set": "q", "key": "q#0", "question": "发烧|怎么办？\n急", "reference": "多喝水",
                "answers": {"base": "不知道", "sft": "多喝水"}},
               {"set": "honesty", "key": "honesty#0", "question": "泽洛米塞的剂量？", "reference": None,
                "answers": {"base": "每日两次", "sft": "我不知道"}, "refused": {"base": False, "sft": True}}]
    return EvalReport(run_name="r", models={"base": "runs/r/base", "sft": "runs/r/models/sft"},
                      scores={"base": base, "sft": tuned}, sets={"q": {"kind": "qa", "items": 1, "path": "q.jsonl"}},
                      samples=samples, curves={"sft": {"train_loss": Curve((1, 2), (2.0, 1.0))}})


def test_markdown_shows_every_metric_its_direction_and_the_change():
    text = render_markdown(_report(), {"sft": "loss_sft.png"})
    assert "| metric | better | base | sft | change (base → sft) |" in text
    assert "| perplexity | lower | 100 | 40 | -60 (better) |" in text
    assert "| qa/q/char_f1 | higher | 0.25 | 0.2 | -0.05 (worse) |" in text
    assert "| honesty/refusal_rate | higher | 0.5 | 0.5 | 0 (same) |" in text
    assert "Prompts cut to fit the context (start dropped): sft: 2." in text
    assert "| 发烧\\|怎么办？<br>急 | 多喝水 | 不知道 | 多喝水 |" in text  # cells escaped for Markdown tables
    assert "| 泽洛米塞的剂量？ | — | 每日两次 (answered) | 我不知道 **(declined)** |" in text
    assert "![sft loss](loss_sft.png)" in text and "train_loss: 2 points" in text


def test_write_report_adds_its_files_and_leaves_others(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    files = write_report(_report(), str(tmp_path))
    assert sorted(files) == ["loss_sft.png", "report.json", "report.md"]
    assert (tmp_path / "keep.txt").read_text() == "mine"
    data = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert data["metrics"]["perplexity"] == {"base": 100.0, "sft": 40.0}
    assert data["plots"] == [{"stage": "sft", "file": "loss_sft.png",
                              "series": {"train_loss": {"steps": [1, 2], "values": [2.0, 1.0]}}}]
    assert [(m["name"], m["truncated_prompts"]) for m in data["models"]] == [("base", 0), ("sft", 2)]
    assert (tmp_path / "loss_sft.png").read_bytes().startswith(PNG_SIGNATURE)


def test_a_report_without_evaluation_sets_says_so_and_keeps_the_loss_plots():
    report = _report()
    report.scores = {name: ModelScores() for name in report.models}
    report.samples, report.sets = [], {}
    text = render_markdown(report, {"sft": "loss_sft.png"})
    assert "No evaluation sets are configured" in text and "| metric |" not in text
    assert "![sft loss](loss_sft.png)" in text
