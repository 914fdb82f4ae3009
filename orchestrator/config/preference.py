"""Config section: stage 3's optimisation settings, which add the preference loss to a stage's `train`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from orchestrator.config.train import TrainConfig

REFERENCE_FREE = ("orpo", "simpo")


class PreferenceTrainConfig(TrainConfig):
    """`preference.train`: everything a stage's `train` has, plus the loss and its knobs (named as TRL and
    LLaMA-Factory name them)."""

    loss: Literal["sigmoid", "ipo", "orpo", "simpo", "kto"] = Field(
        "sigmoid",
        description="sigmoid: DPO; ipo: IPO (length-averaged log-probs); orpo: SFT NLL + odds-ratio term, no "
        "reference; simpo: length-normalised margin, no reference; kto: unpaired desirable/undesirable answers "
        "(paired records are split into one of each).",
    )
    beta: float = Field(
        0.1, gt=0, description="DPO/IPO/KTO/SimPO temperature β (LLaMA-Factory pref_beta); for orpo the weight λ "
        "of the odds-ratio term (TRL's beta). SimPO's paper uses 2.0-2.5.",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="sigmoid and simpo: the share of pairs assumed mislabelled (cDPO)."
    )
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin γ (TRL's simpo_gamma).")
    kto_desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable examples' loss.")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable examples' loss.")
    precompute_reference: bool = Field(
        False, description="One pass before the first step writes the reference log-probs of every example next to "
        "the prepared data (<run>/data/preference/); training then holds no reference model and runs no reference "
        "forward (full / freeze: no frozen copy in memory). Reused by resumed runs.",
    )

    @model_validator(mode="after")
    def _knobs_fit_the_loss(self) -> "PreferenceTrainConfig":
        if self.label_smoothing and self.loss not in ("sigmoid", "simpo"):
            raise ValueError(f"label_smoothing applies to the sigmoid and simpo losses, not {self.loss}")
        if self.precompute_reference and not self.needs_reference:
            raise ValueError(f"precompute_reference: the {self.loss} loss has no reference model to precompute")
        return self

    @property
    def needs_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE
