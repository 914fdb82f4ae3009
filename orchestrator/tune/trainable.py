"""One sweep trial: a full Ray Train run of the stage with the trial's values applied.

Ray Tune calls `train_trial` once per trial. It builds and fits the stage's own `TorchTrainer`
(its workers, its DeepSpeed config) with `TuneReportCallback`, the pattern Ray 2.60 recommends for
Tune over Ray Train V2: every evaluation the workers report reaches Tune, so ASHA can stop the
trial between evaluations. The data was prepared once on the driver and arrives through the
object store.
"""

from __future__ import annotations

from typing import Any, Optional

from orchestrator import storage
from orchestrator.config import PipelineConfig
from orchestrator.data.prepare import PreparedData
from orchestrator.data.prepare_ray import PreparedShards
from orchestrator.train.trainer import fit_stage
from orchestrator.layout import RunLayout
from orchestrator.tracking import TrackingTarget, start_tracking
from orchestrator.tune.space import trial_config

# What the trial function itself holds while its Train workers do the work. Tune gives it 1 CPU by
# default, which the workers then cannot use; {"CPU": 0} alone is rejected, so it holds a token
# amount of memory, a resource every node has. Trials never oversubscribe: the sweep caps
# max_concurrent_trials at what the cluster fits (orchestrator.tune.space.concurrent_trials).
TRIAL_FUNCTION_RESOURCES = {"CPU": 0, "memory": 1}


def train_trial(params: dict[str, Any], *, config: PipelineConfig, stage: str, data: PreparedShards | PreparedData,
                base_model: str, tokenizer: str, layout: RunLayout, s3_settings: storage.S3Settings,
                tracking: Optional[TrackingTarget] = None) -> None:
    """Train `stage` with `params` applied; a rerun of the same trial (restored sweep) resumes its checkpoints.

    With tracking, the trial is a child run of the sweep's run (`tracking`), continued on a rerun.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    storage.configure(s3_settings)
    trial_id = tune.get_context().get_trial_id()
    trial = trial_config(config, stage, params)
    trial_layout = layout.trial(stage, trial_id)  # a run of its own: tune/<stage>/trials/<id>/
    child = start_tracking(trial, trial_layout, parent=tracking, name=f"{stage}-{trial_id}") if tracking else None
    fit_stage(trial, stage, data, base_model, tokenizer, trial_layout.root, trial_layout.logs(stage),
              callbacks=[TuneReportCallback()], tracking=child)
