"""RL and distillation math (trainers/rl_losses.py) against numbers computed by hand or
by a plain reference loop."""

import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from trainers.rl_losses import (broadcast_to_tokens, discounted_returns, entropy_from_logits,
                                forward_kl_with_temperature, gae, generalized_jsd, grpo_advantages, kl_estimate,
                                masked_mean, masked_whiten, ppo_policy_loss, reinforce_pp_advantages, reverse_kl,
                                rloo_advantages, token_rewards, value_loss)

t = torch.tensor


def approx(values, abs=1e-6):
    return pytest.approx(values, abs=abs)


def assert_table(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, t(expected, dtype=actual.dtype), atol=atol, rtol=0)


def reference_kl(p_logits, q_logits):
    """KL(p || q) per position from torch.distributions, the reference for the divergences."""
    return kl_divergence(Categorical(logits=p_logits), Categorical(logits=q_logits))


# -- masked statistics ------------------------------------------------------------------

def test_masked_mean_ignores_padding():
    values, mask = t([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0]]), t([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == approx(2.0)  # (1 + 2 + 3) / 3
    assert masked_mean(values, mask, dim=-1).tolist() == approx([1.5, 3.0])
    assert masked_mean(values, torch.zeros(2, 3)).item() == 0.0


def test_masked_whiten_uses_masked_entries_only():
    values = t([[1.0, 2.0, 1e6], [3.0, 4.0, -1e6]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    # masked entries 1, 2, 3, 4: mean 2.5, population variance (2.25 + .25 + .25 + 2.25) / 4 = 1.25
    white = masked_whiten(values, mask)
    assert_table(white, [[-1.5 / math.sqrt(1.25), -0.5 / math.sqrt(1.25), 0.0],
                         [0.5 / math.sqrt(1.25), 1.5 / math.sqrt(1.25), 0.0]], atol=1e-5)
    assert masked_mean(white, mask).item() == approx(0.0)
    assert masked_mean(white ** 2, mask).item() == approx(1.0, abs=1e-5)
    kept = masked_whiten(values, mask, keep_mean=True)
    assert masked_mean(kept, mask).item() == approx(2.5, abs=1e-5)


# -- KL estimators and token rewards ------------------------------------------------------

def test_kl_estimators_by_hand():
    logp, ref_logp = t([-1.0, -2.0, -0.5]), t([-2.0, -1.0, -0.5])  # d = logp - ref = 1, -1, 0
    assert kl_estimate(logp, ref_logp, "k1").tolist() == approx([1.0, -1.0, 0.0])
    assert kl_estimate(logp, ref_logp, "k2").tolist() == approx([0.5, 0.5, 0.0])
    # k3 = exp(-d) + d - 1: e^-1 + 1 - 1 = 0.36788; e^1 - 1 - 1 = 0.71828; 1 + 0 - 1 = 0
    assert kl_estimate(logp, ref_logp, "k3").tolist() == approx([math.exp(-1), math.e - 2, 0.0])
    with pytest.raises(ValueError):
        kl_estimate(logp, ref_logp, "k4")


def test_k3_is_nonnegative_and_k1_k3_are_unbiased():
    generator = torch.manual_seed(0)
    logp, ref_logp = torch.randn(1000, generator=generator), torch.randn(1000, generator=generator)
    assert (kl_estimate(logp, ref_logp, "k3") >= 0).all()
    # exact expectation over a small vocabulary, tokens drawn from the policy p: E_p[k] = KL(p || ref)
    p_logits, ref_logits = t([0.3, -1.0, 2.0, 0.5]), t([1.0, 0.0, -0.5, 0.2])
    p_logps, ref_logps = p_logits.log_softmax(-1), ref_logits.log_softmax(-1)
    exact = reference_kl(p_logits, ref_logits).item()
    for kind in ("k1", "k3"):
        assert (p_logps.exp() * kl_estimate(p_logps, ref_logps, kind)).sum().item() == approx(exact)


def test_token_rewards_put_the_score_on_the_last_response_token():
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = t([[1, 1, 0], [0, 1, 1]])  # right padding in row 0, a prompt position in row 1
    rewards = token_rewards(t([1.0, -1.0]), kl, mask, kl_coef=0.5)
    # -0.5 * kl on response tokens; the score joins the last one
    assert_table(rewards, [[-0.05, -0.1 + 1.0, 0.0], [0.0, -0.25, -0.3 - 1.0]])
    assert token_rewards(t([5.0]), t([[0.1, 0.1]]), t([[0, 0]]), 0.5).tolist() == [[0.0, 0.0]]


# -- advantage estimators -----------------------------------------------------------------

# rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 0.9, lam 0.8 (gamma * lam = 0.72):
# delta2 = 1 + 0 - 0.7 = 0.3          A2 = 0.3
# delta1 = 0 + 0.9 * 0.7 - 0.6 = 0.03  A1 = 0.03 + 0.72 * 0.3 = 0.246
# delta0 = 0 + 0.9 * 0.6 - 0.5 = 0.04  A0 = 0.04 + 0.72 * 0.246 = 0.21712
# returns = A + V = 0.21712 + 0.5, 0.246 + 0.6, 0.3 + 0.7 = 0.71712, 0.846, 1.0
GAE_ADVANTAGES, GAE_RETURNS = [0.21712, 0.246, 0.3], [0.71712, 0.846, 1.0]


def test_gae_on_a_three_step_trajectory():
    advantages, returns = gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]]), torch.ones(1, 3), gamma=0.9, lam=0.8)
    assert advantages[0].tolist() == approx(GAE_ADVANTAGES)
    assert returns[0].tolist() == approx(GAE_RETURNS)


def test_gae_ignores_whatever_right_padding_holds():
    rewards = t([[0.0, 0.0, 1.0, 9.0, 9.0], [2.0, 9.0, 9.0, 9.0, 9.0]])
    values = t([[0.5, 0.6, 0.7, 9.0, 9.0], [1.0, 9.0, 9.0, 9.0, 9.0]])
    mask = t([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert advantages[0].tolist() == approx(GAE_ADVANTAGES + [0.0, 0.0])
    assert returns[0].tolist() == approx(GAE_RETURNS + [0.0, 0.0])
    # one-token row: A = 2 + 0.9 * 0 - 1 = 1 (no bootstrap from the padding), R = 1 + 1 = 2
    assert advantages[1].tolist() == approx([1.0, 0.0, 0.0, 0.0, 0.0])
    assert returns[1].tolist() == approx([2.0, 0.0, 0.0, 0.0, 0.0])


def test_gae_skips_holes_in_the_mask():
    # a tool-output position between two response tokens: the same as the two-token trajectory
    holed, _ = gae(t([[0.0, 7.0, 1.0]]), t([[0.5, 7.0, 0.7]]), t([[1, 0, 1]]), gamma=0.9, lam=0.8)
    plain, _ = gae(t([[0.0, 1.0]]), t([[0.5, 0.7]]), torch.ones(1, 2), gamma=0.9, lam=0.8)
    assert holed[0].tolist() == approx([plain[0, 0].item(), 0.0, plain[0, 1].item()])


def test_gae_with_lambda_one_is_discounted_return_minus_value():
    generator = torch.manual_seed(1)
    rewards, values = torch.randn(3, 6, generator=generator), torch.randn(3, 6, generator=generator)
    mask = t([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    assert torch.allclose(returns, discounted_returns(rewards, mask, gamma=0.9), atol=1e-5)
    assert torch.allclose(advantages, (returns - values) * mask, atol=1e-5)


def test_discounted_returns_by_hand():
    # gamma 0.5: G2 = 4, G1 = 2 + 0.5 * 4 = 4, G0 = 1 + 0.5 * 4 = 3; padding stays 0
    returns = discounted_returns(t([[1.0, 2.0, 4.0, 8.0]]), t([[1, 1, 1, 0]]), gamma=0.5)
    assert_table(returns, [[3.0, 4.0, 4.0, 0.0]])


REWARDS_TWO_GROUPS = t([1.0, 0.0, 0.5, 2.0, 2.0, 2.0])  # two prompts, three samples each


def test_grpo_advantages_by_hand():
    # group 1: mean 0.5, sample std sqrt((0.25 + 0.25 + 0) / 2) = 0.5 -> 1, -1, 0
    # group 2: all equal -> 0 (std 0, eps keeps it finite)
    advantages = grpo_advantages(REWARDS_TWO_GROUPS, group_size=3, eps=1e-6)
    assert advantages.tolist() == approx([1.0, -1.0, 0.0, 0.0, 0.0, 0.0], abs=1e-5)
    centred = grpo_advantages(REWARDS_TWO_GROUPS, group_size=3, scale=False)
    assert centred.tolist() == approx([0.5, -0.5, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError):
        grpo_advantages(REWARDS_TWO_GROUPS, group_size=4)


def test_rloo_advantages_by_hand():
    # 1 - (0 + 0.5) / 2 = 0.75; 0 - (1 + 0.5) / 2 = -0.75; 0.5 - (1 + 0) / 2 = 0; group 2: 0
    assert rloo_advantages(REWARDS_TWO_GROUPS, group_size=3).tolist() == approx([0.75, -0.75, 0, 0, 0, 0])
    assert rloo_advantages(t([3.0, 1.0]), group_size=2).tolist() == approx([2.0, -2.0])
    with pytest.raises(ValueError):
        rloo_advantages(t([3.0]), group_size=1)


def test_reinforce_pp_advantages_by_hand():
    scores, kl = t([1.0, 0.0]), torch.full((2, 3), 0.1)
    mask = t([[1, 1, 0], [1, 1, 1]])
    # token rewards (kl_coef 0.5): [-0.05, 0.95, 0], [-0.05, -0.05, -0.05]
    # returns (gamma 1): [0.9, 0.95, 0], [-0.15, -0.1, -0.05]
    # masked mean (0.9 + 0.95 - 0.15 - 0.1 - 0.05) / 5 = 0.31
    # variance (0.59^2 + 0.64^2 + 0.46^2 + 0.41^2 + 0.36^2) / 5 = 1.267 / 5 = 0.2534
    std = math.sqrt(0.2534)
    advantages = reinforce_pp_advantages(scores, mask, kl, kl_coef=0.5)
    assert_table(advantages, [[0.59 / std, 0.64 / std, 0.0], [-0.46 / std, -0.41 / std, -0.36 / std]], atol=1e-5)


def test_broadcast_to_tokens():
    assert broadcast_to_tokens(t([2.0, -1.0]), t([[1, 1, 0], [1, 0, 0]])).tolist() == [[2, 2, 0], [-1, 0, 0]]


# -- PPO losses -----------------------------------------------------------------------------

# ratios and advantages, clip_eps 0.2 (range [0.8, 1.2]); per-token loss -min(r A, clip(r) A):
#   r 1.1, A +1: inside the range           -> -1.1
#   r 1.5, A +1: min(1.5, 1.2) = 1.2, clipped -> -1.2
#   r 1.5, A -1: min(-1.5, -1.2) = -1.5       ->  1.5 (the pessimistic side is never clipped)
#   r 0.5, A -1: min(-0.5, -0.8) = -0.8, clipped ->  0.8
#   r 0.5, A +1: min(0.5, 0.8) = 0.5          -> -0.5
# the last column of row 1 is padding with a wild ratio
RATIOS = t([[1.1, 1.5, 1.5], [0.5, 0.5, 50.0]])
ADVANTAGES = t([[1.0, 1.0, -1.0], [-1.0, 1.0, 1.0]])
PPO_MASK = t([[1, 1, 1], [1, 1, 0]])


def ppo(**kwargs):
    return ppo_policy_loss(RATIOS.log(), torch.zeros(2, 3), ADVANTAGES, PPO_MASK, clip_eps=0.2, **kwargs)


def test_ppo_policy_loss_clips_only_the_optimistic_side():
    loss, stats = ppo()
    assert loss.item() == approx((-1.1 - 1.2 + 1.5 + 0.8 - 0.5) / 5)  # -0.1
    assert stats["clip_fraction"].item() == approx(2 / 5)
    k3 = [r - 1 - math.log(r) for r in (1.1, 1.5, 1.5, 0.5, 0.5)]  # k3 of KL(old || new), r = new / old
    assert stats["approx_kl"].item() == approx(sum(k3) / 5)


def test_ppo_policy_loss_sequence_aggregation():
    loss, _ = ppo(aggregation="sequence")
    # row 0: (-1.1 - 1.2 + 1.5) / 3 = -0.26667; row 1: (0.8 - 0.5) / 2 = 0.15
    assert loss.item() == approx(((-1.1 - 1.2 + 1.5) / 3 + (0.8 - 0.5) / 2) / 2)
    with pytest.raises(ValueError):
        ppo(aggregation="batch")


def test_ppo_policy_loss_clip_higher():
    loss, stats = ppo(clip_eps_high=0.6)  # range [0.8, 1.6]: r 1.5 with A +1 is no longer clipped
    assert loss.item() == approx((-1.1 - 1.5 + 1.5 + 0.8 - 0.5) / 5)
    assert stats["clip_fraction"].item() == approx(1 / 5)


def test_ppo_policy_loss_gradient_vanishes_on_clipped_tokens():
    logp = RATIOS.log().requires_grad_()
    loss, _ = ppo_policy_loss(logp, torch.zeros(2, 3), ADVANTAGES, PPO_MASK, clip_eps=0.2)
    loss.backward()
    # d(-r A)/d logp = -r A / 5 where unclipped; 0 where clipped or padded
    expected = [[-1.1 / 5, 0.0, 1.5 / 5], [0.0, -0.5 / 5, 0.0]]
    assert_table(logp.grad, expected)


def test_value_loss_clipping_by_hand():
    values, old_values = t([[1.5, 1.1, 1.5, 0.5]]), t([[1.0, 1.0, 1.0, 1.0]])
    returns, mask = t([[2.0, 0.0, 1.6, 0.0]]), t([[1, 1, 1, 0]])
    # v 1.5 -> clipped 1.2, R 2.0: max(0.25, 0.64) = 0.64
    # v 1.1 inside, R 0.0: max(1.21, 1.21) = 1.21
    # v 1.5 -> clipped 1.2, R 1.6: max(0.01, 0.16) = 0.16
    # padding ignored; loss = 0.5 * (0.64 + 1.21 + 0.16) / 3
    assert value_loss(values, old_values, returns, mask, clip_eps=0.2).item() == approx(0.5 * 2.01 / 3)
    # unclipped: 0.5 * (0.25 + 1.21 + 0.01) / 3
    assert value_loss(values, old_values, returns, mask, clip_eps=None).item() == approx(0.5 * 1.47 / 3)


def test_entropy_by_hand():
    logits = torch.zeros(2, 2, 7)
    logits[0, 1, :2] = t([0.0, math.log(3.0)]) + 50.0  # p = [0.25, 0.75, ~0...]
    logits[1, 0, 0] = 100.0  # near one-hot: entropy ~ 0, masked out anyway
    mask = t([[1, 1], [0, 1]])
    two_way = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_from_logits(logits, mask).item() == approx((math.log(7) + two_way + math.log(7)) / 3, abs=1e-5)
    assert entropy_from_logits(torch.zeros(1, 1, 5), torch.ones(1, 1)).item() == approx(math.log(5))


# -- distillation ---------------------------------------------------------------------------

def random_logits(seed):
    generator = torch.manual_seed(seed)
    return (torch.randn(2, 3, 11, generator=generator) * 2, torch.randn(2, 3, 11, generator=generator) * 2,
            t([[1, 1, 1], [1, 1, 0]]))


def test_forward_and_reverse_kl_match_the_reference():
    student, teacher, mask = random_logits(2)
    forward = reference_kl(teacher, student)[mask.bool()].mean().item()
    reverse = reference_kl(student, teacher)[mask.bool()].mean().item()
    assert forward_kl_with_temperature(student, teacher, mask).item() == approx(forward, abs=1e-5)
    assert reverse_kl(student, teacher, mask).item() == approx(reverse, abs=1e-5)
    assert forward != approx(reverse, abs=1e-3)  # the directions differ on these logits


def test_forward_kl_temperature_by_hand():
    # T = 2: teacher [0, 2 ln 3] / 2 -> p = [1/4, 3/4]; student [0, 0] -> q = [1/2, 1/2]
    # KL(p || q) = 1/4 ln(1/2) + 3/4 ln(3/2); times T^2 = 4
    student, teacher = t([[[0.0, 0.0]]]), t([[[0.0, 2 * math.log(3.0)]]])
    expected = 4 * (0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert forward_kl_with_temperature(student, teacher, torch.ones(1, 1), temperature=2.0).item() == approx(expected)


def test_generalized_jsd_endpoints_are_the_two_kl_directions():
    student, teacher, mask = random_logits(3)
    forward = forward_kl_with_temperature(student, teacher, mask)
    reverse = reverse_kl(student, teacher, mask)
    assert generalized_jsd(student, teacher, mask, beta=0.0).item() == approx(forward.item())
    assert generalized_jsd(student, teacher, mask, beta=1.0).item() == approx(reverse.item())
    for beta in (0.1, 0.5, 0.9):
        interior = generalized_jsd(student, teacher, mask, beta=beta).item()
        assert 0.0 < interior < max(forward.item(), reverse.item())
    with pytest.raises(ValueError):
        generalized_jsd(student, teacher, mask, beta=1.5)


def test_generalized_jsd_interior_by_hand():
    # S = [1/2, 1/2], T = [1/4, 3/4]; beta weighs the teacher: M = beta T + (1 - beta) S
    student, teacher = t([[[0.0, 0.0]]]), t([[[0.0, math.log(3.0)]]])
    s, q = [0.5, 0.5], [0.25, 0.75]

    def kl(p, r):
        return sum(pi * math.log(pi / ri) for pi, ri in zip(p, r))

    for beta in (0.25, 0.5):
        m = [beta * qi + (1 - beta) * si for qi, si in zip(q, s)]  # beta 0.25: [0.4375, 0.5625]
        expected = beta * kl(q, m) + (1 - beta) * kl(s, m)
        assert generalized_jsd(student, teacher, torch.ones(1, 1), beta=beta).item() == approx(expected)


def _top(teacher_logits, k, temperature=1.0):
    """What the teacher actor sends: its top-k log-probs at T, the rest's mass last, and the ids."""
    logp = torch.log_softmax(teacher_logits / temperature, -1)
    values, ids = logp.topk(k, -1)
    rest = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), -1, keepdim=True)
    return torch.cat([values, rest], -1), ids


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_support_divergence_bounds_and_meets_the_full_one(loss):
    from trainers.rl_losses import support_divergence, token_divergence

    student, teacher, mask = random_logits(4)
    vocab = student.shape[-1]
    full = token_divergence(student, teacher, mask, loss, 0.3, temperature=0.7)
    whole = support_divergence(student, torch.log_softmax(teacher / 0.7, -1), None, mask, loss, 0.3, 0.7)
    torch.testing.assert_close(whole, full, atol=1e-6, rtol=0)
    # every token but one on the support: the rest is one token, the same distribution
    exact = support_divergence(student, *_top(teacher, vocab - 1, 0.7), mask, loss, 0.3, 0.7)
    torch.testing.assert_close(exact, full, atol=1e-5, rtol=0)
    coarse = support_divergence(student, *_top(teacher, 2, 0.7), mask, loss, 0.3, 0.7)
    assert (coarse <= full + 1e-6).all() and (coarse[mask.bool()] > 0).all()  # data processing inequality


def test_reverse_kl_on_the_support_moves_the_students_top_k_to_the_teachers():
    from trainers.rl_losses import support_divergence

    g = torch.Generator().manual_seed(3)
    teacher = 3 * torch.randn(1, 1, 50, generator=g)
    teacher_logp, ids = _top(teacher, 4)
    student = torch.zeros(1, 1, 50, requires_grad=True)
    optimiser = torch.optim.Adam([student], lr=0.1)
    for _ in range(400):
        optimiser.zero_grad()
        support_divergence(student, teacher_logp, ids, torch.ones(1, 1), "reverse_kl").sum().backward()
        optimiser.step()
    learned = torch.log_softmax(student.detach(), -1)
    torch.testing.assert_close(learned.gather(-1, ids).exp(), teacher_logp[..., :4].exp(), atol=2e-3, rtol=0)
    outside = learned.scatter(-1, ids, float("-inf")).logsumexp(-1).exp()
    torch.testing.assert_close(outside, teacher_logp[..., 4].exp(), atol=2e-3, rtol=0)
