"""Stage 3 on a worker: preference batches, the reference log-probs and the preference loss.

The worker recipe (orchestrator.train.recipe) asks a `PreferenceObjective` for three things: a
micro-batch from table rows (`collate`), its loss and metrics (`loss`), and the held-out metrics
(`evaluate`). The reference is never a second copy when it need not be:

* adapter methods (LoRA, AdaLoRA, prompt methods): the policy itself with its adapters disabled;
* full / freeze: a frozen copy of the stage base, wrapped in a DeepSpeed engine without optimizer —
  partitioned like the policy under ZeRO-3, whole (stage 0) otherwise, as TRL prepares it;
* reference-free losses (orpo, simpo): none;
* `precompute_reference`: one pass before the first step computes every example's reference log-probs
  (`precompute_reference_logps`: each rank its share of the examples, gathered, written next to the
  prepared data by rank 0); training then reads them from the batch and holds no reference at all.
  The pass uses the policy itself — adapters disabled, or for full / freeze the untrained weights.

A micro-batch of B pairs is one forward of 2B rows (chosen, then rejected); for KTO the B examples and
their B mismatched partners (KTO's KL estimate, no gradient through it).
"""

from __future__ import annotations

from typing import Any, Optional

import json
import math

import numpy as np
import torch
import torch.distributed as dist

from orchestrator import storage

from orchestrator.config import ADAPTER_METHODS, PreferenceTrainConfig
from orchestrator.data.sft import IGNORE_INDEX
from orchestrator.train.preference_loss import (
    PreferenceSettings,
    SequenceLogps,
    kto_kl,
    preference_loss,
    sequence_logps,
)

PAIRED_COLUMNS = (("chosen_input_ids", "chosen_labels"), ("rejected_input_ids", "rejected_labels"))
UNPAIRED_COLUMNS = (("input_ids", "labels"), ("kl_input_ids", "kl_labels"))


def settings_of(train: PreferenceTrainConfig) -> PreferenceSettings:
    return PreferenceSettings(loss=train.loss, beta=train.beta, label_smoothing=train.label_smoothing,
                              simpo_gamma=train.simpo_gamma, desirable_weight=train.kto_desirable_weight,
                              undesirable_weight=train.kto_undesirable_weight)


def pad_rows(inputs: list, labels: list, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad token rows to the longest: input_ids, attention_mask, labels (-100 on padding)."""
    longest = max(len(r) for r in inputs)
    input_ids = np.full((len(inputs), longest), pad_id, dtype=np.int64)
    label_ids = np.full((len(inputs), longest), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(inputs), longest), dtype=np.int64)
    for i, (row, label) in enumerate(zip(inputs, labels)):
        input_ids[i, :len(row)], label_ids[i, :len(row)], mask[i, :len(row)] = row, label, 1
    return {"input_ids": torch.from_numpy(input_ids).to(device), "attention_mask": torch.from_numpy(mask).to(device),
            "labels": torch.from_numpy(label_ids).to(device)}


class PreferenceObjective:
    """The preference loss of one worker (see the module docstring)."""

    def __init__(self, train: PreferenceTrainConfig, pad_id: int, device: torch.device,
                 reference_engine: Optional[Any] = None):
        self.settings = settings_of(train)
        self.unpaired = train.loss == "kto"
        self.is_adapter = train.method in ADAPTER_METHODS
        self.pad_id, self.device = pad_id, device
        self.reference_engine = reference_engine
        self.precomputed: Optional[dict[int, tuple[float, float]]] = None  # example_id → (first, second) sums

    # --- batches -----------------------------------------------------------------------------------
    def collate(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Table rows → one padded batch of 2B rows (first halves, then second halves)."""
        (first_ids, first_labels), (second_ids, second_labels) = UNPAIRED_COLUMNS if self.unpaired else PAIRED_COLUMNS
        inputs = list(batch[first_ids]) + list(batch[second_ids])
        labels = list(batch[first_labels]) + list(batch[second_labels])
        out = pad_rows(inputs, labels, self.pad_id, self.device)
        if self.precomputed is not None:
            out["reference_sums"] = self._precomputed_sums(batch["example_id"])
        if self.unpaired:
            out["desirable"] = torch.as_tensor(np.asarray(batch["desirable"], dtype=bool), device=self.device)
        return out

    def _precomputed_sums(self, example_ids: Any) -> torch.Tensor:
        try:
            pairs = [self.precomputed[int(i)] for i in example_ids]
        except KeyError as exc:
            raise RuntimeError(f"example {exc} has no precomputed reference log-probs; the prepared data changed "
                               "since they were written (delete them to recompute)") from None
        sums = [p[0] for p in pairs] + [p[1] for p in pairs]
        return torch.tensor(sums, dtype=torch.float32, device=self.device)

    # --- log-probs ---------------------------------------------------------------------------------
    @staticmethod
    def _logps(model: Any, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sequence_logps(logits, batch["labels"])

    def reference_logps(self, engine: Any, batch: dict[str, torch.Tensor]) -> Optional[SequenceLogps]:
        """The reference's log-probs of the batch, without gradient (None for reference-free losses)."""
        if not self.settings.needs_reference:
            return None
        if "reference_sums" in batch:
            counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).float()
            return SequenceLogps(batch["reference_sums"], counts)
        return self.live_reference_logps(engine, batch)

    def live_reference_logps(self, engine: Any, batch: dict[str, torch.Tensor], untrained: bool = False
                             ) -> SequenceLogps:
        """A reference forward. `untrained`: the policy has not stepped yet, so full / freeze may use it."""
        with torch.no_grad():
            if self.reference_engine is not None:
                return self._logps(self.reference_engine, batch)
            if self.is_adapter:
                with engine.module.disable_adapter():
                    return self._logps(engine, batch)
            if untrained:
                return self._logps(engine, batch)
        raise RuntimeError("the preference loss needs a reference, and this worker has none")

    # --- loss --------------------------------------------------------------------------------------
    def loss(self, engine: Any, batch: dict[str, torch.Tensor], reduce_kl: bool = True
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """The micro-batch's loss and its metrics. `reduce_kl`: average KTO's KL estimate over all ranks (as
        TRL does); every rank must then call this the same number of times."""
        reference = self.reference_logps(engine, batch)
        policy = self._logps(engine, batch)
        if not self.unpaired:
            loss, metrics = preference_loss(self.settings, policy, reference)
            chosen, rejected = policy.split()
            metrics["preference_accuracy"] = (chosen.means > rejected.means).float().mean()
        else:
            own, partner = policy.split()
            ref_own, ref_partner = reference.split()
            kl = kto_kl(partner.sums.detach(), ref_partner.sums)
            if reduce_kl and dist.is_initialized():
                kl = kl.clone()
                dist.all_reduce(kl)
                kl = (kl / dist.get_world_size()).clamp(min=0)
            loss, metrics = preference_loss(self.settings, own, ref_own, desirable=batch["desirable"], kl=kl)
        return loss, {name: float(value) for name, value in metrics.items()}

    # --- evaluate ----------------------------------------------------------------------------------
    def evaluate(self, engine: Any, eval_data: Any, micro_batch_size: int, max_batches: Optional[int]
                 ) -> dict[str, float]:
        """Means over the held-out examples (every worker sees all of them): eval_loss, eval_rewards/…,
        eval_preference_accuracy (share of pairs whose chosen answer has the higher mean log-prob)."""
        engine.eval()
        sums: dict[str, float] = {}
        examples = 0
        with torch.no_grad():
            for i, rows in enumerate(eval_data.iter_batches(batch_size=micro_batch_size, batch_format="numpy")):
                if max_batches is not None and i >= max_batches:
                    break
                batch = self.collate(rows)
                loss, metrics = self.loss(engine, batch, reduce_kl=False)
                n = batch["input_ids"].shape[0] // 2
                for name, value in {"loss": float(loss), **metrics}.items():
                    sums[name] = sums.get(name, 0.0) + value * n
                examples += n
        engine.train()
        return {f"eval_{name}": value / examples for name, value in sums.items()} if examples else {}


def precompute_reference_logps(objective: PreferenceObjective, engine: Any, shards: list[Any], micro_batch_size: int,
                               rank: int, world: int) -> dict[int, tuple[float, float]]:
    """Reference log-prob sums of every example of `shards` (each rank sees all rows and takes those with
    example_id % world == rank), gathered so every rank returns the whole table.

    Every rank runs the same number of forwards (ZeRO-3's are collective): ranks with fewer rows repeat one.
    Call before the first optimizer step (full / freeze use the untrained policy as the reference).
    """
    own, total, spare = [], 0, None
    for shard in shards:
        for rows in shard.iter_batches(batch_size=256, batch_format="numpy"):
            for i, example_id in enumerate(rows["example_id"]):
                row = {name: column[i] for name, column in rows.items()}
                spare = spare or row
                total += 1
                if int(example_id) % world == rank:
                    own.append(row)
    forwards = math.ceil(math.ceil(total / world) / micro_batch_size) if total else 0
    table: dict[int, tuple[float, float]] = {}
    engine.eval()
    for b in range(forwards):
        chunk = own[b * micro_batch_size:(b + 1) * micro_batch_size] or [spare]
        rows = {name: [row[name] for row in chunk] for name in chunk[0]}
        sums = objective.live_reference_logps(engine, objective.collate(rows), untrained=True).sums.tolist()
        if b * micro_batch_size < len(own):
            half = len(chunk)
            table.update({int(i): (sums[k], sums[half + k]) for k, i in enumerate(rows["example_id"])})
    engine.train()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, table)
    return {k: v for part in gathered for k, v in part.items()}


def write_reference_logps(uri: str, table: dict[int, tuple[float, float]]) -> None:
    ids = sorted(table)
    storage.write_bytes(uri, json.dumps({"example_id": ids, "sums": [list(table[i]) for i in ids]}).encode("utf-8"))


def read_reference_logps(uri: str) -> dict[int, tuple[float, float]]:
    data = json.loads(storage.read_bytes(uri))
    return {int(i): (float(a), float(b)) for i, (a, b) in zip(data["example_id"], data["sums"])}


def build_reference_engine(model: Any, ds_config: dict[str, Any], zero_stage: int) -> Any:
    """A frozen reference in a DeepSpeed engine without optimizer: ZeRO-3 partitions it like the policy; for
    stages 0-2 (which partition only optimizer state and gradients) it is kept whole."""
    import copy

    import deepspeed

    for param in model.parameters():
        param.requires_grad_(False)
    config = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    if zero_stage != 3:
        config["zero_optimization"] = {"stage": 0}
    else:
        zero.pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
    engine.eval()
    return engine
