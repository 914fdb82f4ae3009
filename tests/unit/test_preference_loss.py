"""Preference losses against values computed by hand from the papers' / TRL's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.train.preference_loss import (
    PreferenceSettings,
    SequenceLogps,
    dpo_loss,
    ipo_loss,
    kto_kl,
    kto_loss,
    orpo_odds_ratio,
    preference_loss,
    sequence_logps,
    simpo_loss,
)


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_sequence_logps_sums_labelled_next_tokens_only():
    # row 0: uniform logits over 3 tokens, labels at positions 1 and 2 -> 2 tokens of log(1/3)
    # row 1: position 0 predicts token 2 with logits [0, 0, ln 2] -> p = 2/4; positions 1, 2 masked
    logits = torch.zeros(2, 3, 3)
    logits[1, 0] = torch.tensor([0.0, 0.0, math.log(2.0)])
    labels = torch.tensor([[-100, 1, 2], [-100, 2, -100]])
    out = sequence_logps(logits, labels)
    assert out.counts.tolist() == [2.0, 1.0]
    assert out.sums[0].item() == pytest.approx(2 * math.log(1 / 3), abs=1e-6)
    assert out.sums[1].item() == pytest.approx(math.log(0.5), abs=1e-6)
    assert out.means[0].item() == pytest.approx(math.log(1 / 3), abs=1e-6)


def test_sequence_logps_drops_leading_virtual_token_positions():
    logits = torch.zeros(1, 5, 4)  # 2 virtual tokens + 3 real positions
    logits[0, :2] = 100.0  # garbage on the virtual positions must not be read
    labels = torch.tensor([[-100, 3, 3]])
    assert sequence_logps(logits, labels).sums.item() == pytest.approx(2 * math.log(0.25), abs=1e-6)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_sigmoid_dpo_with_and_without_label_smoothing():
    chosen, rejected, ref_c, ref_r = _t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0)
    losses, rc, rr = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1)
    assert losses.item() == pytest.approx(-_logsig(0.2), abs=1e-9)  # z = (−1+3) − 0 = 2
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)
    smoothed, _, _ = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(-0.9 * _logsig(0.2) - 0.1 * _logsig(-0.2), abs=1e-9)


def test_ipo_is_squared_distance_to_half_inverse_beta():
    losses = ipo_loss(_t(-0.5), _t(-1.5), _t(-1.0), _t(-1.0), beta=0.5)
    assert losses.item() == pytest.approx((1.0 - 1 / (2 * 0.5)) ** 2 + 0.0, abs=1e-9)  # z = 1 -> 0
    losses = ipo_loss(_t(-0.5), _t(-0.5), _t(-1.0), _t(-1.0), beta=0.25)
    assert losses.item() == pytest.approx((0 - 2.0) ** 2, abs=1e-9)


def test_orpo_odds_ratio_term():
    pc, pr = -0.2, -1.0
    log_odds = (pc - pr) - (math.log1p(-math.exp(pc)) - math.log1p(-math.exp(pr)))
    term, rc, rr, odds = orpo_odds_ratio(_t(pc), _t(pr), beta=0.1)
    assert odds.item() == pytest.approx(log_odds, abs=1e-9)
    assert term.item() == pytest.approx(0.1 * _logsig(log_odds), abs=1e-9)
    assert rc.item() == pytest.approx(0.1 * pc) and rr.item() == pytest.approx(0.1 * pr)


def test_simpo_shifts_the_margin_by_gamma_over_beta():
    losses, rc, rr = simpo_loss(_t(-1.0), _t(-2.0), beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(-_logsig(2.0 * (1.0 - 0.25)), abs=1e-9)
    assert rc.item() == pytest.approx(-2.0) and rr.item() == pytest.approx(-4.0)


def test_kto_desirable_and_undesirable_with_kl():
    policy, reference = _t(-1.0, -1.0), _t(-2.0, -2.0)
    desirable = torch.tensor([True, False])
    kl = kto_kl(_t(-3.0, -5.0), _t(-4.0, -4.0))  # mean(1, −1) = 0, clamped at 0
    assert kl.item() == 0.0
    kl = kto_kl(_t(-3.0, -3.0), _t(-3.5, -3.5))
    assert kl.item() == pytest.approx(0.5)
    losses, rewards = kto_loss(policy, reference, desirable, kl, beta=0.1, desirable_weight=1.0,
                               undesirable_weight=2.0)
    assert losses[0].item() == pytest.approx(1 - _sig(0.1 * (1.0 - 0.5)), abs=1e-9)
    assert losses[1].item() == pytest.approx(2.0 * (1 - _sig(0.1 * (0.5 - 1.0))), abs=1e-9)
    assert rewards.tolist() == pytest.approx([0.1, 0.1])


def _logps(sums: list[float], counts: list[float]) -> SequenceLogps:
    return SequenceLogps(torch.tensor(sums, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64))


def test_batch_sigmoid_metrics_match_trl_names_and_values():
    # two pairs: chosen rows first, then rejected
    policy = _logps([-4.0, -6.0, -8.0, -5.0], [2, 3, 4, 5])
    reference = _logps([-5.0, -6.0, -6.0, -6.0], [2, 3, 4, 5])
    loss, m = preference_loss(PreferenceSettings("sigmoid", beta=0.5), policy, reference)
    z = [(-4 + 8) - (-5 + 6), (-6 + 5) - (-6 + 6)]  # 3, -1
    assert loss.item() == pytest.approx(sum(-_logsig(0.5 * v) for v in z) / 2, abs=1e-9)
    assert m["rewards/chosen"].item() == pytest.approx((0.5 * 1 + 0.5 * 0) / 2)
    assert m["rewards/rejected"].item() == pytest.approx((0.5 * -2 + 0.5 * 1) / 2)
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)
    assert m["rewards/margins"].item() == pytest.approx((1.5 + -0.5) / 2)
    assert m["logps/chosen"].item() == pytest.approx(-5.0) and m["logps/rejected"].item() == pytest.approx(-6.5)


def test_batch_ipo_uses_length_averaged_logps():
    policy = _logps([-4.0, -8.0], [2, 4])  # means −2, −2
    reference = _logps([-6.0, -4.0], [2, 4])  # means −3, −1
    loss, m = preference_loss(PreferenceSettings("ipo", beta=0.5), policy, reference)
    assert loss.item() == pytest.approx((((-2 + 2) - (-3 + 1)) - 1.0) ** 2)  # (2 − 1)²
    # Reported as TRL reports them (test_preference_loss_trl): summed log-probs and rewards on summed ratios.
    assert m["logps/chosen"].item() == pytest.approx(-4.0)
    assert m["rewards/chosen"].item() == pytest.approx(0.5 * (-4.0 + 6.0))


def test_batch_orpo_is_token_mean_nll_minus_odds_term():
    policy = _logps([-1.0, -3.0, -2.0, -2.0], [2, 3, 4, 2])
    loss, m = preference_loss(PreferenceSettings("orpo", beta=0.2), policy, None)
    nll = 4.0 / 5.0
    terms = []
    for pc, pr in ((-0.5, -0.5), (-1.0, -1.0)):
        log_odds = (pc - pr) - (math.log1p(-math.exp(pc)) - math.log1p(-math.exp(pr)))
        terms.append(0.2 * _logsig(log_odds))
    assert m["nll_loss"].item() == pytest.approx(nll)
    assert loss.item() == pytest.approx(nll - sum(terms) / 2, abs=1e-9)
    assert m["rewards/chosen"].item() == pytest.approx(0.2 * (-0.5 - 1.0) / 2)


def test_batch_simpo_is_reference_free():
    policy = _logps([-2.0, -4.0], [2, 2])
    loss, m = preference_loss(PreferenceSettings("simpo", beta=2.0, simpo_gamma=1.0), policy, None)
    assert loss.item() == pytest.approx(-_logsig(2.0 * ((-1 + 2) - 0.5)), abs=1e-9)
    assert m["rewards/accuracies"].item() == 1.0


def test_batch_kto_metrics():
    policy = _logps([-1.0, -4.0], [1, 1])
    reference = _logps([-2.0, -3.0], [1, 1])
    loss, m = preference_loss(PreferenceSettings("kto", beta=1.0), policy, reference,
                              desirable=torch.tensor([True, False]), kl=torch.tensor(0.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(((1 - _sig(1.0)) + (1 - _sig(1.0))) / 2, abs=1e-9)
    assert m["rewards/chosen"].item() == pytest.approx(1.0)
    assert m["rewards/rejected"].item() == pytest.approx(-1.0)
    assert m["rewards/accuracies"].item() == 1.0  # desirable up, undesirable down
    assert m["rewards/margins"].item() == pytest.approx(2.0)


def test_reference_losses_refuse_to_run_without_reference():
    with pytest.raises(ValueError, match="reference"):
        preference_loss(PreferenceSettings("sigmoid"), _logps([-1.0, -2.0], [1, 1]), None)


def test_gradient_flows_to_the_policy_only():
    chosen = torch.tensor([-1.0], requires_grad=True)
    rejected = torch.tensor([-2.0], requires_grad=True)
    losses, _, _ = dpo_loss(chosen, rejected, torch.tensor([-1.5]), torch.tensor([-1.5]), beta=1.0)
    losses.sum().backward()
    # d/dz −log σ(z) = −(1 − σ(z)), z = 1
    assert chosen.grad.item() == pytest.approx(-(1 - _sig(1.0)), abs=1e-6)
    assert rejected.grad.item() == pytest.approx(1 - _sig(1.0), abs=1e-6)
