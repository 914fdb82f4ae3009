"""What a finished sweep leaves behind, and how later runs read it back.

Under `<storage_path>/<run_name>/tune/<stage>/`:

    results.csv, results.json   one row per trial: params, best metric, epochs, stopped early, wall time
    best_config.yaml            the full config with the best trial's values: ready to run
    sweep.json                  what was swept (a restored sweep must match it)
    trials/<trial_id>/          each trial's Ray Train run: <stage>/checkpoint_*, logs/
    experiment_state-*.json …   Ray Tune's own state, used to resume an interrupted sweep
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from typing import Any, Optional

import yaml

from orchestrator import storage
from orchestrator.config import PipelineConfig, apply_overrides, config_from_dict
from orchestrator.errors import ConfigError
from orchestrator.layout import RunLayout
from orchestrator.tune.space import trial_config, trial_overrides

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
BEST_CONFIG = "best_config.yaml"
SWEEP_RECORD = "sweep.json"


@dataclass
class TrialRow:
    """One trial in the results table."""

    trial_id: str
    status: str  # Ray Tune's: TERMINATED, ERROR, ...
    params: dict[str, Any]
    best_metric: Optional[float]  # best value of tune.metric over all its evaluations
    epochs_run: int  # the last epoch it reported
    stopped_early: bool  # stopped by the scheduler before its last epoch's checkpoint
    wall_s: float
    checkpoint: Optional[str]  # its best complete checkpoint
    error: Optional[str] = None


def pick_best(rows: list[TrialRow], mode: str) -> TrialRow:
    """The trial with the best metric (lowest for mode min)."""
    scored = [row for row in rows if row.best_metric is not None]
    if not scored:
        raise ConfigError("no trial of the sweep reported the metric; see the trials' errors in the results table")
    pick = min if mode == "min" else max
    return pick(scored, key=lambda row: row.best_metric)


def format_table(rows: list[TrialRow], metric: str) -> str:
    """The results table as aligned text."""
    names = sorted({name for row in rows for name in row.params})
    header = ["trial", "status", *names, f"best {metric}", "epochs run", "stopped early", "wall s"]
    lines = [header]
    for row in rows:
        lines.append([row.trial_id, row.status, *[_show(row.params.get(name)) for name in names],
                      _show(row.best_metric), str(row.epochs_run), "yes" if row.stopped_early else "no",
                      f"{row.wall_s:.1f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def results_csv(rows: list[TrialRow], metric: str) -> str:
    names = sorted({name for row in rows for name in row.params})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial_id", "status", *names, f"best_{metric}", "epochs_run", "stopped_early", "wall_s",
                     "checkpoint", "error"])
    for row in rows:
        writer.writerow([row.trial_id, row.status, *[row.params.get(name, "") for name in names],
                         "" if row.best_metric is None else row.best_metric, row.epochs_run, row.stopped_early,
                         round(row.wall_s, 2), row.checkpoint or "", row.error or ""])
    return out.getvalue()


def best_config_tree(config: PipelineConfig, stage: str, params: dict[str, Any]) -> dict[str, Any]:
    """The full config with the best trial's values, as a plain tree for YAML.

    The stage no longer counts as swept (`tune.stages`), so `orchestrator pipeline` trains it
    directly; S3 secrets are left out (they come from the AWS default chain, see check_sweep).
    """
    tree = trial_config(config, stage, params).model_dump(mode="json")
    tree["tune"]["stages"] = [name for name in tree["tune"]["stages"] if name != stage]
    for secret in ("access_key_id", "secret_access_key", "session_token"):
        tree["storage"]["s3"][secret] = None
    return tree


def write_results(config: PipelineConfig, stage: str, rows: list[TrialRow], best: TrialRow,
                  sweep_wall_s: float) -> dict[str, str]:
    """Write results.csv, results.json and best_config.yaml into the sweep directory; their URIs by name."""
    sweep = RunLayout.of(config).sweep(stage)
    metric = config.tune.metric
    summary = {
        "stage": stage,
        "metric": metric,
        "mode": config.tune.mode,
        "sweep_wall_s": round(sweep_wall_s, 2),
        "best": {"trial_id": best.trial_id, "params": best.params, f"best_{metric}": best.best_metric,
                 "overrides": trial_overrides(stage, best.params), "checkpoint": best.checkpoint,
                 "config": storage.join(sweep, BEST_CONFIG)},
        "trials": [asdict(row) for row in rows],
    }
    header = (f"# Best trial {best.trial_id} of the {stage} sweep ({metric} {best.best_metric:.6g}).\n"
              f"# Run it: orchestrator {stage} --config best_config.yaml\n")
    body = yaml.safe_dump(best_config_tree(config, stage, best.params), allow_unicode=True, sort_keys=False)
    written = {
        "csv": storage.join(sweep, RESULTS_CSV),
        "json": storage.join(sweep, RESULTS_JSON),
        "best_config": storage.join(sweep, BEST_CONFIG),
    }
    storage.write_bytes(written["csv"], results_csv(rows, metric).encode("utf-8"))
    storage.write_bytes(written["json"], json.dumps(summary, indent=1, ensure_ascii=False).encode("utf-8"))
    storage.write_bytes(written["best_config"], (header + body).encode("utf-8"))
    return written


def read_results(config: PipelineConfig, stage: str) -> dict[str, Any]:
    """results.json of `stage`'s finished sweep; a ConfigError saying what to run when there is none."""
    uri = storage.join(RunLayout.of(config).sweep(stage), RESULTS_JSON)
    if not storage.exists(uri):
        raise ConfigError(f"tune.reuse_best names {stage}, but no finished sweep is at {RunLayout.of(config).sweep(stage)}; "
                          f"run `orchestrator tune --stage {stage}` with this run_name and storage first")
    return json.loads(storage.read_bytes(uri).decode("utf-8"))


def config_with_best(config: PipelineConfig, stage: str) -> PipelineConfig:
    """`config` with the best values of `stage`'s finished sweep applied (tune.reuse_best)."""
    best = read_results(config, stage)["best"]
    return config_from_dict(apply_overrides(config.model_dump(), best["overrides"]), f"best of the {stage} sweep")


def sweep_identity(config: PipelineConfig, stage: str) -> dict[str, Any]:
    """What defines a sweep: its search settings and everything its trials train with (secrets masked)."""
    tree = config.model_dump(mode="json")
    tune = {k: v for k, v in tree["tune"].items()
            if k not in ("stages", "reuse_best", "search_space", "stage_search_space")}
    tune["search_space"] = config.tune.space_for(stage).model_dump(mode="json", exclude_none=True)
    trained = {k: v for k, v in tree.items() if k in ("model", "tokenizer", "distributed", "checkpoint", stage)}
    return {"stage": stage, "tune": tune, "trained": trained}


def changed_keys(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two trees. Keys only one side has are not changes:
    a newer orchestrator adds settings (with defaults) that an older sweep's record lacks."""
    keys = []
    for key in sorted(set(saved) & set(current)):
        a, b = saved.get(key), current.get(key)
        where = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            keys.extend(changed_keys(a, b, where + "."))
        elif a != b:
            keys.append(where)
    return keys

