"""Config section: experiment tracking in MLflow and Weights & Biases (both off by default)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from orchestrator.config.base import Section


class MlflowConfig(Section):
    """An MLflow tracking server (or a local store): one MLflow run per run of the pipeline."""

    tracking_uri: Optional[str] = Field(
        None, description="e.g. http://mlflow:5000, or file:///abs/dir for MLflow's file store (kept in "
        "maintenance mode by MLflow; allowed here when asked for); default MLFLOW_TRACKING_URI, else MLflow's own "
        "default. Credentials come from MLflow's environment variables (MLFLOW_TRACKING_TOKEN, ...).",
    )
    experiment: Optional[str] = Field(None, description="Experiment name; default the run's `run_name`.")
    run_name: Optional[str] = Field(None, description="Name of the MLflow run; default the run's `run_name`.")


class WandbConfig(Section):
    """A Weights & Biases project: one W&B run per run of the pipeline (sweep trials grouped with it)."""

    project: str = Field(..., description="W&B project.")
    entity: Optional[str] = Field(None, description="W&B team or user; default your API key's default entity.")
    mode: Literal["online", "offline"] = Field(
        "online", description="online: stream to W&B (needs WANDB_API_KEY); offline: write under `dir` for a "
        "later `wandb sync`.",
    )
    dir: Optional[str] = Field(None, description="Local directory W&B writes its files to; default ./wandb.")
    run_name: Optional[str] = Field(None, description="Name of the W&B run; default the run's `run_name`.")


class TrackingConfig(Section):
    """Where a run's parameters, per-step and per-evaluation metrics and reports are tracked.

    Params are the resolved config (secrets masked); metrics are `<stage>/<name>` (train_loss,
    learning_rate, tokens_per_s, eval_loss, ...) per step; artifacts are each stage's lineage.json
    and the evaluation report with its loss plots. Running the same run again continues its
    tracking runs; sweep trials are child runs (MLflow) or grouped runs (W&B) of it.
    """

    mlflow: Optional[MlflowConfig] = Field(None, description="Track in MLflow (off when empty).")
    wandb: Optional[WandbConfig] = Field(None, description="Track in Weights & Biases (off when empty).")
