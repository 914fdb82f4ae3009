"""Preference losses on per-sequence log-probabilities: sigmoid DPO, IPO, ORPO, SimPO, KTO (pure torch).

The formulas follow TRL's trainers (DPOTrainer `sigmoid` and `ipo`, ORPOTrainer, CPOTrainer
`simpo`, KTOTrainer), with the knobs named as TRL and LLaMA-Factory name them (`beta`,
`label_smoothing`, `simpo_gamma`, `desirable_weight` / `undesirable_weight`):

* sigmoid (DPO): z = (pi_c - pi_r) - (ref_c - ref_r) on summed log-probs;
  loss = -(1 - ls) log σ(βz) - ls log σ(-βz).
* ipo: the same z on length-averaged log-probs; loss = (z - 1/(2β))².
* orpo (reference-free): NLL of the chosen answer (token mean) minus β · log σ(log-odds ratio), where
  log odds(p) = log p - log(1 - p) on length-averaged log-probs.
* simpo (reference-free): z = avg_c - avg_r - γ/β; loss as sigmoid DPO on z.
* kto (unpaired): KL = mean over the batch of (pi - ref) on mismatched prompt/answer pairs, clamped at 0
  and detached; desirable: 1 - σ(β(r - KL)), undesirable: 1 - σ(β(KL - r)), r = pi - ref, weighted.

Rewards: β · (pi - ref) for the reference-based losses, β · avg log-prob for ORPO and SimPO (as TRL
logs them). Every function takes the log-probs and returns per-example losses plus the rewards;
`preference_loss` picks one by name and returns the batch loss with the metrics the recipe logs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from orchestrator.data.sft import IGNORE_INDEX

PAIRED_LOSSES = ("sigmoid", "ipo", "orpo", "simpo")
REFERENCE_FREE_LOSSES = ("orpo", "simpo")
LENGTH_AVERAGED_LOSSES = ("ipo", "orpo", "simpo")  # the rest use summed log-probs
LOSSES = PAIRED_LOSSES + ("kto",)


@dataclass(frozen=True)
class SequenceLogps:
    """Per-sequence sums of the answer tokens' log-probs and the answer token counts."""

    sums: torch.Tensor  # [N]
    counts: torch.Tensor  # [N], float

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp(min=1)

    def pick(self, length_averaged: bool) -> torch.Tensor:
        return self.means if length_averaged else self.sums

    def split(self) -> tuple["SequenceLogps", "SequenceLogps"]:
        """First half, second half (chosen, rejected rows of a concatenated batch)."""
        half = self.sums.shape[0] // 2
        return (SequenceLogps(self.sums[:half], self.counts[:half]),
                SequenceLogps(self.sums[half:], self.counts[half:]))


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> SequenceLogps:
    """Sum and count of log p(label) over the labelled (≠ -100) positions of every row.

    `logits` [N, T, V] predict the next token: position t scores labels[t + 1]. A model that prepends
    virtual tokens (prompt tuning) returns longer rows; only the last T positions are the inputs'.
    """
    logits = logits[:, -labels.shape[1]:, :]
    shifted_logits, shifted_labels = logits[:, :-1, :], labels[:, 1:]
    mask = shifted_labels != IGNORE_INDEX
    safe_labels = torch.where(mask, shifted_labels, torch.zeros_like(shifted_labels))
    token_logps = torch.gather(shifted_logits.float().log_softmax(-1), 2, safe_labels.unsqueeze(-1)).squeeze(-1)
    sums = (token_logps * mask).sum(-1)
    return SequenceLogps(sums, mask.sum(-1).float())


def sigmoid_loss(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """-(1 - ls) log σ(β z) - ls log σ(-β z), per example."""
    return (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO on summed log-probs: (losses, chosen rewards, rejected rewards)."""
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    return (sigmoid_loss(logits, beta, label_smoothing),
            beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach())


def ipo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> torch.Tensor:
    """IPO on length-averaged log-probs: (z - 1/(2β))² per example. Its rewards are DPO's (summed log-probs)."""
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    return (logits - 1 / (2 * beta)) ** 2


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation near 0 (an answer the model is nearly sure of)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio(chosen: torch.Tensor, rejected: torch.Tensor,
                    beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term on length-averaged log-probs: (β log σ(log-odds ratio) per example — to be
    subtracted from the NLL —, chosen rewards, rejected rewards, log-odds ratio per example)."""
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    return beta * ratio, beta * chosen.detach(), beta * rejected.detach(), log_odds.detach()


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO on length-averaged log-probs: sigmoid loss of (avg_c - avg_r - γ/β)."""
    logits = (chosen - rejected) - gamma / beta
    return sigmoid_loss(logits, beta, label_smoothing), beta * chosen.detach(), beta * rejected.detach()


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO per example (summed log-probs): (weighted losses, rewards β(pi - ref)). `kl` is the batch's
    clamped, detached KL estimate (see `kto_kl`)."""
    ratio = policy - reference
    good = 1 - torch.sigmoid(beta * (ratio - kl))
    bad = 1 - torch.sigmoid(beta * (kl - ratio))
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return losses, beta * ratio.detach()


def kto_kl(policy_mismatched: torch.Tensor, reference_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: mean (pi - ref) of answers paired with other prompts, ≥ 0, no gradient.

    TRL averages it over every process's batch; callers that want that all-reduce the mean first.
    """
    return (policy_mismatched - reference_mismatched).mean().clamp(min=0).detach()


@dataclass(frozen=True)
class PreferenceSettings:
    """The loss knobs of `preference.train` the loss needs (kept apart from the config for a pure core)."""

    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @property
    def needs_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE_LOSSES

    @property
    def length_averaged(self) -> bool:
        return self.loss in LENGTH_AVERAGED_LOSSES


def preference_loss(settings: PreferenceSettings, policy: SequenceLogps, reference: Optional[SequenceLogps],
                    desirable: Optional[torch.Tensor] = None, kl: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch loss and its metrics.

    Paired losses: `policy` (and `reference`) hold 2B rows, chosen then rejected. KTO: B rows of
    (prompt, answer) with `desirable` [B] and the batch `kl` from `kto_kl`.
    """
    if settings.loss == "kto":
        return _kto(settings, policy, reference, desirable, kl)
    chosen_all, rejected_all = policy.split()
    averaged = settings.length_averaged
    chosen, rejected = chosen_all.pick(averaged), rejected_all.pick(averaged)
    logged_chosen, logged_rejected = chosen, rejected  # the log-probs reported, as TRL reports them
    metrics: dict[str, torch.Tensor] = {}
    if settings.loss in ("sigmoid", "ipo"):
        if reference is None:
            raise ValueError(f"loss {settings.loss} needs reference log-probs")
        ref_chosen_all, ref_rejected_all = reference.split()
        if settings.loss == "sigmoid":
            losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen_all.sums,
                                                                ref_rejected_all.sums, settings.beta,
                                                                settings.label_smoothing)
        else:
            losses = ipo_loss(chosen, rejected, ref_chosen_all.pick(averaged), ref_rejected_all.pick(averaged),
                              settings.beta)
            # IPO's loss averages per token; its rewards (as TRL reports them) are DPO's, on summed log-probs.
            chosen_rewards = settings.beta * (chosen_all.sums - ref_chosen_all.sums).detach()
            rejected_rewards = settings.beta * (rejected_all.sums - ref_rejected_all.sums).detach()
        logged_chosen, logged_rejected = chosen_all.sums, rejected_all.sums
        loss = losses.mean()
    elif settings.loss == "orpo":
        ratio_term, chosen_rewards, rejected_rewards, log_odds = orpo_odds_ratio(chosen, rejected, settings.beta)
        nll = -chosen_all.sums.sum() / chosen_all.counts.sum().clamp(min=1)  # token mean, as TRL's cross-entropy
        loss = nll - ratio_term.mean()
        # TRL's names: log_odds_ratio is the mean log σ(·), log_odds_chosen the mean log-odds ratio itself
        metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": (ratio_term.detach() / settings.beta).mean(),
                        "log_odds_chosen": log_odds.mean()})
    elif settings.loss == "simpo":
        losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, settings.beta, settings.simpo_gamma,
                                                              settings.label_smoothing)
        loss = losses.mean()
    else:
        raise ValueError(f"unknown preference loss {settings.loss!r}; allowed: {', '.join(LOSSES)}")
    metrics.update(reward_metrics(chosen_rewards, rejected_rewards))
    metrics["logps/chosen"] = logged_chosen.detach().mean()
    metrics["logps/rejected"] = logged_rejected.detach().mean()
    return loss, metrics


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's reward metrics of a paired batch (means over the batch)."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
    }


def _kto(settings: PreferenceSettings, policy: SequenceLogps, reference: Optional[SequenceLogps],
         desirable: Optional[torch.Tensor], kl: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if reference is None or desirable is None or kl is None:
        raise ValueError("loss kto needs reference log-probs, the desirable labels and the KL estimate")
    losses, rewards = kto_loss(policy.sums, reference.sums, desirable, kl, settings.beta,
                               settings.desirable_weight, settings.undesirable_weight)
    loss = losses.mean()
    good, bad = desirable, ~desirable
    zero = rewards.new_zeros(())
    chosen_reward = rewards[good].mean() if good.any() else zero
    rejected_reward = rewards[bad].mean() if bad.any() else zero
    # Unpaired: an example is "right" when its reward has the sign of its label.
    correct = torch.where(desirable, rewards > 0, rewards < 0).float().mean()
    metrics = {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/accuracies": correct,
        "rewards/margins": chosen_reward - rejected_reward,
        "logps/chosen": policy.sums[good].detach().mean() if good.any() else zero,
        "logps/rejected": policy.sums[bad].detach().mean() if bad.any() else zero,
        "kl": kl,
    }
    return loss, metrics
