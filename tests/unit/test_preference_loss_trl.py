"""Our preference losses and reward metrics against TRL's own code on the same fixed batches (TRL: a test-only
dependency). TRL computes its losses inside its trainers' loss methods, after the model forward: each trainer is
built without its setup (no model, data or Accelerate state) and given a stand-in model that returns fixed
per-token log-probs, so TRL's own loss and metric code runs on exactly the numbers ours gets.

Covered: sigmoid DPO and IPO (trl.DPOTrainer), KTO (trl.KTOTrainer), ORPO (trl.experimental ORPOTrainer), SimPO
(trl.experimental CPOTrainer, loss_type=simpo), and the per-sequence log-probs themselves (their get_batch_logps).
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.kto_trainer import KTOTrainer

from orchestrator.train.preference_loss import (
    PreferenceSettings,
    SequenceLogps,
    kto_kl,
    orpo_odds_ratio,
    preference_loss,
    sequence_logps,
)

PAIRS, LENGTH, PROMPT = 4, 9, 3
TOLERANCE = 1e-5


class _Accelerator:
    """The parts of an Accelerator TRL's loss code calls, for one process."""

    device = torch.device("cpu")

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather

    def unwrap_model(self, model):
        return model


def _trainer(cls, **attributes):
    """A TRL trainer object without its setup: just what its loss method reads."""
    trainer = object.__new__(cls)
    common = {"accelerator": _Accelerator(), "model": types.SimpleNamespace(training=True), "aux_loss_enabled": False,
              "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)}, "_total_train_tokens": 0,
              "_tp_size": 1}
    for name, value in {**common, **attributes}.items():
        setattr(trainer, name, value)
    return trainer


def _stand_in_model(per_token_logps: torch.Tensor):
    """A model whose fused LM head 'computed' these per-token log-probs (zero outside the completion)."""
    def forward(**_):
        zeros = torch.zeros_like(per_token_logps)
        return types.SimpleNamespace(log_probs=per_token_logps, entropy=zeros, mean_logits=zeros,
                                     is_top1=zeros.bool(), aux_loss=None)
    return forward


def _batch(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(completion_mask [rows, T], per-token log-probs [rows, T-1] on the shifted completion, counts [rows]):
    a prompt of PROMPT tokens, then a completion of 2..T-PROMPT tokens, the rest padding."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, LENGTH - PROMPT + 1, (rows,), generator=generator)
    mask = torch.zeros(rows, LENGTH, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        mask[row, PROMPT:PROMPT + length] = 1
    shifted = mask[:, 1:].double()
    logps = -torch.rand(rows, LENGTH - 1, generator=generator, dtype=torch.float64) * 2 * shifted
    return mask, logps, shifted.sum(-1)


def _trl_metrics(trainer) -> dict[str, float]:
    return {name: values[-1] for name, values in trainer._metrics["train"].items()}


def _assert_close(ours: dict[str, torch.Tensor], theirs: dict[str, float], names: list[str]) -> None:
    for name in names:
        assert float(ours[name]) == pytest.approx(theirs[name], abs=TOLERANCE), name


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_and_ipo_equal_trl(loss):
    mask, logps, counts = _batch(2 * PAIRS, seed=1)
    reference = -torch.rand(2 * PAIRS, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 8
    beta = 0.2
    trainer = _trainer(DPOTrainer, beta=beta, loss_types=[loss], loss_weights=[1.0], ld_alpha=None,
                       precompute_ref_logps=True, f_divergence_type="reverse_kl", use_weighting=False,
                       label_smoothing=0.0)
    inputs = {"input_ids": torch.ones(2 * PAIRS, LENGTH, dtype=torch.long), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "ref_chosen_logps": reference[:PAIRS], "ref_rejected_logps": reference[PAIRS:]}
    trl_loss = trainer._compute_loss(_stand_in_model(logps), inputs, return_outputs=False)

    ours, metrics = preference_loss(PreferenceSettings(loss=loss, beta=beta), SequenceLogps(logps.sum(-1), counts),
                                    SequenceLogps(reference, counts))
    assert float(ours) == pytest.approx(float(trl_loss), abs=TOLERANCE)
    _assert_close(metrics, _trl_metrics(trainer), ["rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                                    "rewards/margins", "logps/chosen", "logps/rejected"])


def test_kto_equals_trl():
    rows = 2 * PAIRS
    mask, logps, counts = _batch(rows, seed=3)
    generator = torch.Generator().manual_seed(4)
    reference = -torch.rand(rows, dtype=torch.float64, generator=generator) * 8
    mismatched = -torch.rand(rows, dtype=torch.float64, generator=generator) * 8
    reference_mismatched = mismatched - torch.rand(rows, dtype=torch.float64, generator=generator)
    desirable = torch.tensor([True, False, True, True, False, True, False, False])
    beta, good_weight, bad_weight = 0.1, 1.0, 1.33
    trainer = _trainer(KTOTrainer, beta=beta, loss_type="kto", precompute_ref_logps=True, calculate_KL=True,
                       desirable_weight=good_weight, undesirable_weight=bad_weight)
    trainer._compute_kl_logps = lambda model, batch: mismatched  # the policy on answers of other prompts
    inputs = {"input_ids": torch.ones(rows, LENGTH, dtype=torch.long), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "label": desirable, "ref_logps": reference, "ref_KL_logps": reference_mismatched}
    trl_loss = trainer._compute_loss(_stand_in_model(logps), inputs, return_outputs=False)

    kl = kto_kl(mismatched, reference_mismatched)
    settings = PreferenceSettings(loss="kto", beta=beta, desirable_weight=good_weight, undesirable_weight=bad_weight)
    ours, metrics = preference_loss(settings, SequenceLogps(logps.sum(-1), counts), SequenceLogps(reference, counts),
                                    desirable=desirable, kl=kl)
    assert float(ours) == pytest.approx(float(trl_loss), abs=TOLERANCE)
    _assert_close(metrics, _trl_metrics(trainer), ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                                                    "logps/chosen", "logps/rejected"])


def _logits_and_labels(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A concatenated [chosen; rejected] batch of logits and labels, prompts and padding at -100."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * PAIRS, LENGTH, 11, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 11, (2 * PAIRS, LENGTH), generator=generator)
    mask, _, _ = _batch(2 * PAIRS, seed)
    return logits, labels.masked_fill(mask == 0, -100)


def test_sequence_logps_equal_trl_batch_logps():
    logits, labels = _logits_and_labels(5)
    ours = sequence_logps(logits, labels)
    # Ours computes log-softmax in fp32 (whatever the logits' dtype); TRL in the logits' dtype (here fp64).
    trl_sums = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=False)
    trl_means = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    assert torch.allclose(ours.sums.double(), trl_sums, atol=TOLERANCE), (ours.sums, trl_sums)
    assert torch.allclose(ours.means.double(), trl_means, atol=TOLERANCE), (ours.means, trl_means)


def test_orpo_equals_trl():
    logits, labels = _logits_and_labels(6)
    beta = 0.1
    policy = sequence_logps(logits, labels)
    averaged = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    chosen_labels = labels[:PAIRS, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:PAIRS, :-1].reshape(-1, logits.shape[-1]),
                                            chosen_labels.reshape(-1), ignore_index=-100)
    trainer = _trainer(ORPOTrainer, beta=beta)
    trainer.concatenated_forward = lambda model, batch: (averaged[:PAIRS], averaged[PAIRS:], logits[:PAIRS],
                                                         logits[PAIRS:], nll)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(None, {}, "train")

    ours, metrics = preference_loss(PreferenceSettings(loss="orpo", beta=beta), policy, None)
    assert float(ours) == pytest.approx(float(trl_loss), abs=TOLERANCE)
    _assert_close(metrics, trl_metrics, ["rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                         "rewards/margins", "logps/chosen", "logps/rejected", "nll_loss",
                                         "log_odds_ratio", "log_odds_chosen"])


def test_orpo_is_stable_for_answers_the_model_is_sure_of():
    """log(1 - p) for p near 1 (average log-prob near 0): TRL's log1mexp branch; ours must not lose it."""
    # fp32, as training computes them: there 1 - exp(-1e-7) cancels to ~1.2e-7 without the expm1 branch.
    chosen, rejected = torch.tensor([-1e-7, -0.01]), torch.tensor([-2.0, -1e-6])
    trainer = _trainer(ORPOTrainer, beta=0.1)
    trl_losses, *_ = trainer.odds_ratio_loss(chosen, rejected)
    ours, *_ = orpo_odds_ratio(chosen, rejected, 0.1)
    assert torch.allclose(ours, trl_losses, atol=TOLERANCE), (ours, trl_losses)


def test_simpo_equals_trl():
    logits, labels = _logits_and_labels(7)
    beta, gamma, smoothing = 2.0, 0.5, 0.1
    policy = sequence_logps(logits, labels)
    averaged = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    trainer = _trainer(CPOTrainer, beta=beta, loss_type="simpo", simpo_gamma=gamma, label_smoothing=smoothing,
                       alpha=0.0)
    trl_losses, chosen_rewards, rejected_rewards = trainer.cpo_loss(averaged[:PAIRS], averaged[PAIRS:])

    ours, metrics = preference_loss(PreferenceSettings(loss="simpo", beta=beta, simpo_gamma=gamma,
                                                       label_smoothing=smoothing), policy, None)
    assert float(ours) == pytest.approx(float(trl_losses.mean()), abs=TOLERANCE)
    assert float(metrics["rewards/chosen"]) == pytest.approx(float(chosen_rewards.mean()), abs=TOLERANCE)
    assert float(metrics["rewards/rejected"]) == pytest.approx(float(rejected_rewards.mean()), abs=TOLERANCE)
    assert float(metrics["rewards/accuracies"]) == pytest.approx(
        float((chosen_rewards > rejected_rewards).double().mean()), abs=TOLERANCE)
