"""Runs at a glance: what a run directory (local or s3://) holds, read through RunLayout.

`list_runs(root)` finds every run under a storage root; `read_run(layout)` says per stage what was
done: checkpoints (complete or not, eval loss), the exported model and its lineage (data
fingerprint, steps, metrics), and a sweep's best trial. `orchestrator runs list|show` prints them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from orchestrator import storage
from orchestrator.checkpoint import CheckpointInfo, list_checkpoints
from orchestrator.config import STAGES
from orchestrator.layout import RunLayout

LINEAGE_FILE = "lineage.json"
SWEEP_RESULTS = "results.json"


@dataclass
class StageView:
    """One stage of a run as found in storage."""

    stage: str
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    model: Optional[str] = None  # the exported model's URI
    steps: Optional[int] = None  # optimizer steps of the newest complete checkpoint
    metrics: dict[str, Any] = field(default_factory=dict)  # the exported model's (lineage.json)
    data_fingerprint: Optional[str] = None  # sha256 over the data files' own sha256s (lineage.json)
    lineage: dict[str, Any] = field(default_factory=dict)  # base model, tokenizer, git revision, created
    sweep_best: Optional[dict[str, Any]] = None  # the best trial of tune/<stage>/: id, params, metric

    @property
    def done(self) -> bool:
        return self.model is not None

    @property
    def latest_complete(self) -> Optional[CheckpointInfo]:
        complete = [c for c in self.checkpoints if c.complete]
        return max(complete, key=lambda c: c.step or 0) if complete else None

    @property
    def best_eval_loss(self) -> Optional[float]:
        losses = [c.eval_loss for c in self.checkpoints if c.complete and c.eval_loss is not None]
        return min(losses) if losses else None


@dataclass
class RunView:
    name: str
    root: str
    stages: list[StageView]

    def to_json(self) -> dict[str, Any]:
        stages = []
        for view in self.stages:
            latest = view.latest_complete
            stages.append({**asdict(view), "done": view.done, "best_eval_loss": view.best_eval_loss,
                           "latest_complete_checkpoint": latest.uri if latest else None})
        return {"name": self.name, "root": self.root, "stages": stages}


def list_runs(root: str) -> list[RunView]:
    """Every run directly under a storage root (a directory with stage checkpoints or models)."""
    names = sorted({rel.split("/", 1)[0] for rel in storage.list_files(root) if "/" in rel})
    runs = [read_run(RunLayout(root, name)) for name in names]
    return [run for run in runs if run.stages]


def read_run(layout: RunLayout) -> RunView:
    """What storage holds for each stage of one run (stages without anything are left out)."""
    views = []
    for stage in STAGES:
        view = StageView(stage, checkpoints=list_checkpoints(layout.stage(stage)))
        _read_model(view, layout.model(stage))
        _read_sweep(view, layout.sweep(stage))
        latest = view.latest_complete
        view.steps = latest.step if latest else view.steps
        if view.checkpoints or view.done or view.sweep_best:
            views.append(view)
    return RunView(layout.run_name, layout.root, views)


def _read_model(view: StageView, model_uri: str) -> None:
    lineage_uri = storage.join(model_uri, LINEAGE_FILE)
    if not storage.exists(lineage_uri):
        return
    lineage = json.loads(storage.read_bytes(lineage_uri))
    view.model = model_uri
    view.metrics = lineage.get("metrics", {})
    view.steps = view.metrics.get("step")
    files = lineage.get("data_files") or {}
    if files:
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        view.data_fingerprint = digest[:16]
    view.lineage = {key: lineage.get(key) for key in ("base_model", "tokenizer", "checkpoint", "git_revision",
                                                        "created") if lineage.get(key) is not None}


def _read_sweep(view: StageView, sweep_uri: str) -> None:
    results = storage.join(sweep_uri, SWEEP_RESULTS)
    if storage.exists(results):
        view.sweep_best = json.loads(storage.read_bytes(results)).get("best")


def format_runs(runs: list[RunView]) -> str:
    """`orchestrator runs list`: one line per run."""
    if not runs:
        return "no runs found"
    rows = [("run", "stages", "best eval_loss", "latest complete checkpoint", "exported models", "sweep best")]
    for run in runs:
        latest = [f"{v.stage}/{v.latest_complete.name}" for v in run.stages if v.latest_complete]
        rows.append((
            run.name,
            ",".join(v.stage for v in run.stages),
            " ".join(f"{v.stage} {v.best_eval_loss:.4f}" for v in run.stages if v.best_eval_loss is not None) or "-",
            latest[-1] if latest else "-",
            ",".join(f"models/{v.stage}" for v in run.stages if v.done) or "-",
            " ".join(f"{v.stage} {v.sweep_best.get('trial_id')}" for v in run.stages if v.sweep_best) or "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def format_run(run: RunView) -> str:
    """`orchestrator runs show`: per stage, its data, steps, metrics, checkpoints and lineage."""
    lines = [f"run {run.name}  ({run.root})"]
    for view in run.stages:
        lines.append(f"\n{view.stage}: {'done' if view.done else 'not exported'}"
                     + (f", {view.steps} steps" if view.steps is not None else ""))
        if view.model:
            lines.append(f"  model        {view.model}")
        if view.data_fingerprint:
            lines.append(f"  data         fingerprint {view.data_fingerprint}")
        shown = {k: v for k, v in view.metrics.items() if isinstance(v, (int, float))}
        if shown:
            lines.append("  metrics      " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
        for key, value in view.lineage.items():
            lines.append(f"  {key:<12} {value}")
        if view.sweep_best:
            lines.append(f"  sweep best   {view.sweep_best.get('trial_id')} {view.sweep_best.get('params')}")
        for c in view.checkpoints:
            loss = f"eval_loss {c.eval_loss:.4f}" if c.eval_loss is not None else "no eval"
            status = "complete" if c.complete else f"INCOMPLETE ({c.problem})"
            lines.append(f"  {c.name}  step {c.step}  {loss}  {c.size_bytes / 2**20:.1f} MB  {status}")
    return "\n".join(lines)
