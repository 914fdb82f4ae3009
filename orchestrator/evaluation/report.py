"""The evaluation report: a metrics table for base → stage 1 → stage 2, sample generations side by
side, and PNG loss curves from the run's training metrics; as Markdown (for people) and JSON (for
tools), written next to the run's artifacts (local path or s3://)."""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from orchestrator import storage
from orchestrator.evaluation.sets import EvalSets
from orchestrator.evaluation.tasks import LOWER_IS_BETTER, ModelScores

REPORT_MD, REPORT_JSON = "report.md", "report.json"
LOSS_SERIES = ("train_loss", "eval_loss")
CELL_CHARS = 200


@dataclass(frozen=True)
class Curve:
    """One plotted series: optimizer steps and values."""

    steps: tuple[int, ...]
    values: tuple[float, ...]


@dataclass
class EvalReport:
    """Everything a report shows. `models` maps a model's name to its URI, in evaluation order."""

    run_name: str
    models: dict[str, str]
    scores: dict[str, ModelScores]
    sets: dict[str, dict[str, Any]]
    samples: list[dict[str, Any]]
    curves: dict[str, dict[str, Curve]] = field(default_factory=dict)  # stage → series → curve
    settings: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def metric_names(self) -> list[str]:
        names: list[str] = []
        for scores in self.scores.values():
            names.extend(n for n in scores.metrics if n not in names)
        return names


def loss_curves(records: Sequence[dict[str, Any]]) -> dict[str, Curve]:
    """train_loss and eval_loss by optimizer step from metrics.jsonl records.

    When a step appears twice (a run resumed from a checkpoint repeats the steps after it), the
    later record wins.
    """
    curves = {}
    for series in LOSS_SERIES:
        by_step: dict[int, float] = {}
        for record in records:
            if isinstance(record.get(series), (int, float)) and isinstance(record.get("step"), int):
                by_step[record["step"]] = float(record[series])
        if by_step:
            steps = sorted(by_step)
            curves[series] = Curve(tuple(steps), tuple(by_step[s] for s in steps))
    return curves


def plot_loss_curves(stage: str, curves: dict[str, Curve]) -> bytes:
    """A PNG of a stage's loss curves. The number of points per series is stored in the PNG's
    `Description` text chunk as JSON, so a reader can check what was drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for series, curve in curves.items():
        axes.plot(curve.steps, curve.values, marker="o" if series == "eval_loss" else ".", label=series)
    axes.set_title(f"{stage}: loss by optimizer step")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats per token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    points = {series: len(curve.steps) for series, curve in curves.items()}
    figure.savefig(buffer, format="png", metadata={"Title": f"{stage} loss", "Description": json.dumps(points)})
    return buffer.getvalue()


def build_samples(sets: EvalSets, scores: dict[str, ModelScores], per_set: int) -> list[dict[str, Any]]:
    """The first `per_set` questions of every QA set and of the honesty probes, with each model's answer."""
    samples = []
    for name, items in sets.qa.items():
        for item in items[:per_set]:
            samples.append({"set": name, "key": item.key, "question": item.question, "reference": item.reference,
                            "answers": {model: s.items[item.key]["answer"] for model, s in scores.items()}})
    for probe in sets.probes[:per_set]:
        samples.append({"set": "honesty", "key": probe.key, "question": probe.question, "reference": None,
                        "answers": {model: s.items[probe.key]["answer"] for model, s in scores.items()},
                        "refused": {model: s.items[probe.key]["refused"] for model, s in scores.items()}})
    return samples


def _cell(text: Optional[str]) -> str:
    if text is None:
        return "—"
    text = text.strip()
    if len(text) > CELL_CHARS:  # keep the start and the end: a clinical case's question comes last
        half = CELL_CHARS // 2
        text = text[:half] + " … " + text[-half:]
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "(empty)"


def _number(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.4g}"


def _change(metric: str, first: Optional[float], last: Optional[float]) -> str:
    if first is None or last is None:
        return "—"
    delta = last - first
    if delta == 0:
        return "0 (same)"
    better = (delta < 0) == (metric in LOWER_IS_BETTER)
    return f"{delta:+.4g} ({'better' if better else 'worse'})"


def _metrics_section(report: EvalReport) -> list[str]:
    """The metrics table (one column per model, then the change from the first to the last) and the sets."""
    models = list(report.models)
    lines = ["## Metrics", "",
             "Text metrics over characters for Chinese (every CJK character one unit, Latin words and numbers one "
             "unit; punctuation and spaces ignored). perplexity: per token of each model's own tokenizer; "
             "bits_per_char: comparable across tokenizers.", ""]
    change_header = f" change ({models[0]} → {models[-1]}) |" if len(models) > 1 else ""
    lines.append("| metric | better |" + "".join(f" {m} |" for m in models) + change_header)
    lines.append("|---|---|" + "---|" * len(models) + ("---|" if len(models) > 1 else ""))
    for metric in report.metric_names():
        values = [report.scores[m].metrics.get(metric) for m in models]
        row = f"| {metric} | {'lower' if metric in LOWER_IS_BETTER else 'higher'} |"
        row += "".join(f" {_number(v)} |" for v in values)
        if len(models) > 1:
            row += f" {_change(metric, values[0], values[-1])} |"
        lines.append(row)
    truncated = {m: s.truncated_prompts for m, s in report.scores.items() if s.truncated_prompts}
    if truncated:
        lines += ["", "Prompts cut to fit the context (start dropped): "
                  + ", ".join(f"{m}: {n}" for m, n in truncated.items()) + "."]
    lines += ["", "## Sets", "", "| set | kind | items | source |", "|---|---|---|---|"]
    for name, info in report.sets.items():
        lines.append(f"| {name} | {info['kind']} | {info['items']} | {_cell(str(info.get('path') or 'inline'))} |")
    return lines


def render_markdown(report: EvalReport, plots: dict[str, str]) -> str:
    """The report as Markdown: metrics table, sets, sample generations, loss plots."""
    models = list(report.models)
    lines = [f"# Evaluation: {report.run_name}", "",
             f"Created {report.created}. Models, in order: "
             + ", ".join(f"**{name}** (`{uri}`)" for name, uri in report.models.items()) + ".", ""]
    if report.settings:
        lines += ["Settings: " + ", ".join(f"{k} = {v}" for k, v in report.settings.items()) + ".", ""]
    lines += _metrics_section(report) if report.metric_names() else [
        "## Metrics", "", "No evaluation sets are configured (`eval.perplexity`, `eval.qa`, `eval.multiple_choice`, "
        "`eval.honesty`): training loss only."]
    if report.samples:
        lines += ["", "## Sample generations"]
        current = None
        for sample in report.samples:
            if sample["set"] != current:
                current = sample["set"]
                header = "| question | reference |" + "".join(f" {m} |" for m in models)
                lines += ["", f"### {current}", "", header, "|---|---|" + "---|" * len(models)]
            answers = []
            for model in models:
                answer = _cell(sample["answers"].get(model))
                if "refused" in sample:
                    answer += " **(declined)**" if sample["refused"][model] else " (answered)"
                answers.append(answer)
            lines.append(f"| {_cell(sample['question'])} | {_cell(sample['reference'])} |"
                         + "".join(f" {a} |" for a in answers))
    if plots:
        lines += ["", "## Training loss", ""]
        for stage, name in plots.items():
            curves = report.curves[stage]
            counts = ", ".join(f"{series}: {len(c.steps)} points" for series, c in curves.items())
            lines += [f"### {stage}", "", f"![{stage} loss]({name})", "", counts, ""]
    return "\n".join(lines).rstrip() + "\n"


def report_data(report: EvalReport, plots: dict[str, str]) -> dict[str, Any]:
    """The report as JSON-ready data: every metric, per-item details, plotted series."""
    return {
        "run_name": report.run_name,
        "created": report.created,
        "models": [{"name": name, "uri": uri, "metrics": report.scores[name].metrics,
                    "truncated_prompts": report.scores[name].truncated_prompts} for name, uri in report.models.items()],
        "metrics": {metric: {m: report.scores[m].metrics.get(metric) for m in report.models}
                    for metric in report.metric_names()},
        "sets": report.sets,
        "settings": report.settings,
        "samples": report.samples,
        "items": {m: report.scores[m].items for m in report.models},
        "plots": [{"stage": stage, "file": name,
                   "series": {s: {"steps": list(c.steps), "values": list(c.values)}
                              for s, c in report.curves[stage].items()}} for stage, name in plots.items()],
    }


def write_report(report: EvalReport, out_uri: str) -> dict[str, str]:
    """Write report.md, report.json and loss_<stage>.png into `out_uri`; returns file name → URI.

    Files are written one by one (never replacing the directory), so other files there stay.
    """
    files: dict[str, bytes] = {}
    plots: dict[str, str] = {}
    for stage, curves in report.curves.items():
        if curves:
            plots[stage] = f"loss_{stage}.png"
            files[plots[stage]] = plot_loss_curves(stage, curves)
    files[REPORT_MD] = render_markdown(report, plots).encode("utf-8")
    files[REPORT_JSON] = json.dumps(report_data(report, plots), ensure_ascii=False, indent=1).encode("utf-8")
    written = {}
    for name, data in files.items():
        written[name] = storage.join(out_uri, name)
        storage.write_bytes(written[name], data)
    return written
