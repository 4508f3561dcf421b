"""The GRPO family's policy losses against hand computation: GSPO's sequence-level ratio,
CISPO's capped stop-gradient weight, Dr. GRPO's fixed normalisation and unscaled group
advantages; padded positions never reach a loss, even when they hold NaN."""

import math

import pytest
import torch

from trainers.rl_losses import aggregate, grpo_advantages, ppo_policy_loss

NAN = float("nan")


def test_gspo_uses_one_ratio_per_response():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, NAN]])  # NaN on padding: must not reach the loss
    old = torch.tensor([[-1.5, -1.0], [-1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = ppo_policy_loss(logp, old, adv, mask, 0.2, ratio_level="sequence")
    # Response 0: log-ratios 0.5 and -1, mean -0.25: ratio e^-0.25 = 0.7788 on both tokens,
    # under the clip range, so min(0.7788, 0.8) * 1 -> -0.7788 each. Response 1: e^0.5 =
    # 1.6487 with A = -1: min(-1.6487, -1.2) -> +1.6487. Token mean over 3 tokens.
    expected = (-2 * math.exp(-0.25) + math.exp(0.5)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(0.0)  # the unclipped term was the smaller each time
    token, _ = ppo_policy_loss(logp, old, adv, mask, 0.2, ratio_level="token")
    # Per token: e^0.5 -> min(1.6487, 1.2) = 1.2; e^-1 = 0.3679 -> min(0.3679, 0.8); e^0.5, A=-1 -> 1.6487.
    assert token.item() == pytest.approx((-1.2 - math.exp(-1) + math.exp(0.5)) / 3, abs=1e-6)


def test_cispo_caps_the_weight_and_keeps_every_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0]])
    adv = torch.tensor([[2.0, 2.0]])
    mask = torch.ones(1, 2)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, 0.2, loss="cispo")
    # Weights: e^0.5 = 1.6487 capped at 1.2; e^-1 = 0.3679 (no lower cap). Loss per token
    # -w * A * logp: 2.4 and 1.4715, mean 1.9358; gradient -w * A / 2 per token.
    w = [1.2, math.exp(-1)]
    assert loss.item() == pytest.approx((w[0] * 2 * 1.0 + w[1] * 2 * 2.0) / 2, abs=1e-6)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-w[0], -w[1]], abs=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
    clip_logp = logp.detach().clone().requires_grad_(True)
    clip_loss, _ = ppo_policy_loss(clip_logp, old, adv, mask, 0.2)
    clip_loss.backward()
    assert clip_logp.grad[0, 0].item() == 0.0  # PPO's clip drops the token CISPO keeps


def test_fixed_aggregation_divides_by_the_horizon():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, NAN, NAN]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "fixed", horizon=4).item() == pytest.approx(10 / 8)
    assert aggregate(per_token, mask, "token").item() == pytest.approx(10 / 4)
    assert aggregate(per_token, mask, "sequence").item() == pytest.approx((2 + 4) / 2)
    with pytest.raises(ValueError, match="horizon"):
        aggregate(per_token, mask, "fixed")


def test_dr_grpo_advantages_are_centred_not_scaled():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 4.0])
    assert grpo_advantages(rewards, 4, scale=False).tolist() == pytest.approx(
        [0.75, -0.25, -0.25, -0.25, -0.5, -0.5, -0.5, 1.5])
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std().item()  # sample std, as TRL and verl
    assert grpo_advantages(rewards, 4)[0].item() == pytest.approx(0.75 / (std + 1e-6), rel=1e-5)


def test_ratios_are_clamped_before_exp():
    logp, old = torch.tensor([[100.0]]), torch.tensor([[0.0]])
    for loss_name in ("clip", "cispo"):
        loss, stats = ppo_policy_loss(logp, old, -torch.ones(1, 1), torch.ones(1, 1), 0.2, loss=loss_name)
        assert torch.isfinite(loss) and torch.isfinite(stats["approx_kl"])
