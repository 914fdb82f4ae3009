"""RunLayout: every path of a run, in one place.

Layout under `<checkpoint.storage_path>/<run_name>/` (a local path or an `s3://` URI):

    base/              the tiny base model + tokenizer (only when model.tiny is used)
    <stage>-base/      a stage's derived base: init_adapters merged, vocabulary grown (reused on reruns)
    <stage>/           the stage's Ray Train run: checkpoint_step*/ (see orchestrator.checkpoint)
    data/<stage>/      prepared data of a stage: <fingerprint>/ shard sets (shards + manifest), file-identities.json
                       (local sources' sha256 by size + mtime); stage 3: reference-logps-<key>.json
    logs/<stage>/      metrics.jsonl, TensorBoard events, worker-<rank>.log (local storage; see `logs`)
    logs/driver.log    every log line of the commands run against the run
    models/<stage>/    the stage's final model, LoRA merged: loads with from_pretrained
    tune/<stage>/      a sweep: Ray Tune's state, trials/<id>/ (each a run of its own), results, best config
    eval/              the evaluation report after training (eval-<models>/ for an explicit model list)
    tracking.json      the run's MLflow / W&B run ids (continued when the run is run again)

Nothing else in the library spells these names; it asks a RunLayout.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from dataclasses import dataclass

from orchestrator import storage

TRIALS_DIR = "trials"
# One scratch directory per process for logs of runs on remote storage (see RunLayout.logs).
_SCRATCH_ID = uuid.uuid4().hex[:12]


def stage_data_dir(run_root: str, stage: str) -> str:
    """`<run>/data/<stage>`: a stage's prepared data (and stage 3's precomputed reference log-probs)."""
    return storage.join(run_root, "data", stage)


def reference_logps_file(run_root: str, stage: str, fingerprint: str) -> str:
    """Precomputed reference log-probs of a stage's prepared examples, keyed by what they depend on."""
    return storage.join(stage_data_dir(run_root, stage), f"reference-logps-{fingerprint}.json")


@dataclass(frozen=True)
class RunLayout:
    """The directories of one run, rooted at `<storage_path>/<run_name>`."""

    storage_path: str
    run_name: str

    @classmethod
    def of(cls, config) -> "RunLayout":
        """The layout of the run a PipelineConfig describes (reads checkpoint.storage_path and run_name)."""
        return cls(config.checkpoint.storage_path, config.run_name)

    @property
    def root(self) -> str:
        return storage.join(self.storage_path, self.run_name)

    @property
    def is_remote(self) -> bool:
        return storage.is_remote(self.root)

    @property
    def tiny_base(self) -> str:
        """The tiny base model created for `model.tiny` runs."""
        return storage.join(self.root, "base")

    def stage(self, stage: str) -> str:
        """The stage's Ray Train run directory (its checkpoints)."""
        return storage.join(self.root, stage)

    def stage_base(self, stage: str) -> str:
        """The stage's derived base model (init_adapters merged, vocabulary grown)."""
        return storage.join(self.root, f"{stage}-base")

    def data(self, stage: str) -> str:
        """Prepared data of the stage."""
        return stage_data_dir(self.root, stage)

    @property
    def models(self) -> str:
        return storage.join(self.root, "models")

    def model(self, stage: str) -> str:
        """The stage's exported final model."""
        return storage.join(self.models, stage)

    @property
    def tune(self) -> str:
        """Ray Tune's storage root of every sweep of the run."""
        return storage.join(self.root, "tune")

    def sweep(self, stage: str) -> str:
        """A stage's sweep: results, best config, trials."""
        return storage.join(self.tune, stage)

    def trial(self, stage: str, trial_id: str) -> "RunLayout":
        """The layout of one trial of a stage's sweep: a run of its own under tune/<stage>/trials/<id>."""
        return RunLayout(storage.join(self.sweep(stage), TRIALS_DIR), trial_id)

    def eval(self, model_names: tuple[str, ...] = ()) -> str:
        """The evaluation report: eval/ after training, eval-<names>/ for an explicit list of models."""
        return storage.join(self.root, "eval-" + "-".join(model_names) if model_names else "eval")

    @property
    def tracking(self) -> str:
        """The ids of the run's experiment-tracking runs (orchestrator.tracking)."""
        return storage.join(self.root, "tracking.json")

    def logs(self, stage: str) -> str:
        """Where rank 0 writes a stage's metrics.jsonl and TensorBoard events.

        Local storage: `<run>/logs/<stage>`. Remote storage: a fresh local scratch directory per
        process; the logs travel inside every checkpoint, and a resumed run restores them from the
        checkpoint it resumes from.
        """
        return storage.join(self.logs_root, stage)

    @property
    def logs_root(self) -> str:
        """`<run>/logs` (local storage) or this process's scratch directory for them (remote; see `logs`)."""
        if self.is_remote:
            run_key = hashlib.sha1(self.root.encode()).hexdigest()[:10]
            return os.path.join(tempfile.gettempdir(), "orchestrator-logs", f"{self.run_name}-{run_key}-{_SCRATCH_ID}")
        return storage.join(self.root, "logs")

    @property
    def driver_log(self) -> str:
        """The log file every command run against the run appends to (the CLI's `--verbose` lines and more)."""
        return os.path.join(self.logs_root, "driver.log")
