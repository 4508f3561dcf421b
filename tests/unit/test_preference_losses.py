"""Preference losses against values computed by hand."""

import math

import pytest
import torch

from trainers.losses import dpo_loss, pairwise_reward_loss, sequence_logps

t = torch.tensor


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_sequence_logps_masks_prompt_and_padding():
    # vocab 2, uniform logits: every counted token has log-prob log(1/2)
    logits = torch.zeros(2, 5, 2)
    labels = t([[-100, -100, 1, 0, -100], [-100, 1, 1, 1, 1]])
    logps, counts = sequence_logps(logits, labels)
    assert counts.tolist() == [2, 4]
    assert logps.tolist() == pytest.approx([2 * math.log(0.5), 4 * math.log(0.5)])
    logits[0, 1, 1] = 100.0  # position 1 predicts token 2 (label 1) with certainty
    assert sequence_logps(logits, labels)[0][0].item() == pytest.approx(math.log(0.5), abs=1e-6)


def test_pairwise_reward_loss_by_hand():
    loss = pairwise_reward_loss(t([2.0, 0.0]), t([1.0, 1.0]))
    assert loss.tolist() == pytest.approx([-math.log(sig(1.0)), -math.log(sig(-1.0))])
    with_margin = pairwise_reward_loss(t([2.0]), t([1.0]), margin=t([0.5]))
    assert with_margin.item() == pytest.approx(-math.log(sig(0.5)))
    centred = pairwise_reward_loss(t([2.0]), t([1.0]), center_coef=0.01)
    assert centred.item() == pytest.approx(-math.log(sig(1.0)) + 0.01 * 9.0)


# policy chosen/rejected, reference chosen/rejected summed log-probs: h = (−1 − −2) − (−3 − −2) = 2
PC, PR, RC, RR = t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0])


def test_dpo_sigmoid_and_label_smoothing_by_hand():
    beta = 0.1
    assert dpo_loss(PC, PR, RC, RR, beta).item() == pytest.approx(-math.log(sig(0.2)))
    eps = 0.2
    expected = -(1 - eps) * math.log(sig(0.2)) - eps * math.log(sig(-0.2))
    assert dpo_loss(PC, PR, RC, RR, beta, label_smoothing=eps).item() == pytest.approx(expected)


def test_dpo_hinge_by_hand():
    assert dpo_loss(PC, PR, RC, RR, 0.1, "hinge").item() == pytest.approx(1 - 0.2)
    assert dpo_loss(PC, PR, RC, RR, 1.0, "hinge").item() == 0.0


def test_dpo_ipo_is_length_normalised():
    # chosen 2 tokens, rejected 4 tokens: h' = (1 / 2) - (-1 / 4) = 0.75; target 1/(2*0.5) = 1
    loss = dpo_loss(PC, PR, RC, RR, 0.5, "ipo", chosen_len=t([2.0]), rejected_len=t([4.0]))
    assert loss.item() == pytest.approx((0.75 - 1.0) ** 2)
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, 0.5, "ipo")


def test_dpo_gradient_raises_chosen_lowers_rejected():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    dpo_loss(pc, pr, RC, RR, 0.1).sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()
