"""Off-policy correction weights: what each mode does to the ratios, and that the corrected
loss has the on-policy gradient when the samples come from another policy."""

import math

import pytest
import torch

from trainers.rl.correction import correction_weights
from trainers.rl_losses import ppo_policy_loss

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
# trainer - engine log-probs: ratios 1, 3, 0.5 / 1.5, 1, (padding)
LOG_RATIO = torch.tensor([[0.0, math.log(3.0), math.log(0.5)], [math.log(1.5), 0.0, 5.0]])


def _weights(mode, level="token", cap=2.0):
    return correction_weights(LOG_RATIO, torch.zeros(2, 3), MASK, mode, level, cap)


def test_none_gives_no_weights():
    assert _weights("none") == (None, {})


def test_tis_truncates_at_the_cap_and_mis_drops_what_is_over_it():
    tis, stats = _weights("tis")
    assert torch.allclose(tis, torch.tensor([[1.0, 2.0, 0.5], [1.5, 1.0, 0.0]]))
    assert stats["correction_over_cap"] == pytest.approx(1 / 5)
    assert stats["correction_weight_max"] == pytest.approx(2.0)
    assert stats["correction_weight_mean"] == pytest.approx(6.0 / 5)
    mis, stats = _weights("mis")
    assert torch.allclose(mis, torch.tensor([[1.0, 0.0, 0.5], [1.5, 1.0, 0.0]]))
    assert stats["correction_weight_max"] == pytest.approx(1.5) and stats["correction_over_cap"] == pytest.approx(0.2)


def test_sequence_level_gives_every_token_the_product_of_the_ratios():
    tis, _ = _weights("tis", "sequence", cap=10.0)
    assert torch.allclose(tis, torch.tensor([[1.5, 1.5, 1.5], [1.5, 1.5, 0.0]]))
    mis, stats = _weights("mis", "sequence", cap=1.2)  # both products (1.5) are over: all masked
    assert float(mis.abs().sum()) == 0.0 and stats["correction_over_cap"] == pytest.approx(1.0)


def test_the_corrected_loss_has_the_on_policy_gradient_on_another_policys_samples():
    """A 4-armed bandit, every arm enumerated with its behaviour probability mu (the engine's
    stale policy): the gradient of the mu-weighted loss equals the on-policy gradient
    E_pi[A grad log pi] only with the correction."""
    logits = torch.tensor([0.5, -0.3, 1.2, 0.0], requires_grad=True)
    advantages = torch.tensor([1.0, -0.5, 0.3, -1.0])
    mu = torch.softmax(torch.tensor([-1.0, 0.8, 0.1, 0.4]), -1)

    pi = torch.softmax(logits, -1)
    on_policy = torch.autograd.grad((pi * advantages).sum(), logits)[0]  # grad of E_pi[A]

    def gradient(mode):
        logp = torch.log_softmax(logits, -1)
        arms = logp.unsqueeze(0)  # (1, 4): one "token" per arm, each its own sample
        weights, _ = correction_weights(logp.detach().unsqueeze(0), mu.log().unsqueeze(0), torch.ones(1, 4), mode,
                                        "token", cap=1e6)
        per_arm = mu.unsqueeze(0) * (weights if weights is not None else 1.0)
        # sum over arms of mu(a) * w(a) * (PPO loss at ratio 1), i.e. the expectation under mu
        loss, _ = ppo_policy_loss(arms, arms.detach(), advantages.unsqueeze(0), torch.ones(1, 4), 0.2,
                                  aggregation="token", weights=per_arm)
        return -torch.autograd.grad(loss * 4, logits)[0]

    assert torch.allclose(gradient("tis"), on_policy, atol=1e-6)
    assert torch.allclose(gradient("mis"), on_policy, atol=1e-6)
    assert not torch.allclose(gradient("none"), on_policy, atol=1e-2)
