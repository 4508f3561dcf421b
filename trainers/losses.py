"""Loss functions as pure functions of tensors. Each returns a sum and the number of
items it summed over, so callers can normalise across micro-batches and workers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainers.data.records import IGNORE_INDEX


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over positions whose label is not IGNORE_INDEX.

    logits: (B, T, V); labels: (B, T) aligned with the inputs (the shift happens here).
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    summed = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")
    return summed, (shift_labels != IGNORE_INDEX).sum()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed log-probability of the labelled tokens, and their count.

    logits: (B, T, V); labels: (B, T) aligned with the inputs, IGNORE_INDEX elsewhere.
    """
    shift_logits, shift_labels = logits[:, :-1, :].float(), labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    token_logps = torch.gather(shift_logits.log_softmax(-1), 2, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def pairwise_reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                         center_coef: float = 0.0) -> torch.Tensor:
    """Bradley-Terry reward-model loss per pair: -log sigmoid(r_c - r_r - margin), plus
    `center_coef * (r_c + r_r)^2` to keep rewards centred on zero (as in TRL)."""
    diff = chosen - rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(diff)
    if center_coef:
        loss = loss + center_coef * (chosen + rejected) ** 2
    return loss


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, variant: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_len: torch.Tensor | None = None, rejected_len: torch.Tensor | None = None) -> torch.Tensor:
    """DPO-family loss per pair from summed response log-probs of policy and reference.

    sigmoid: -(1-eps) log s(b h) - eps log s(-b h), h = (pc - rc) - (pr - rr)  (eps>0: cDPO)
    hinge:   relu(1 - b h)                                                       (SLiC)
    ipo:     (h' - 1/(2b))^2 with h' from length-normalised (mean per token) log-probs
    """
    if variant == "ipo":
        if chosen_len is None or rejected_len is None:
            raise ValueError("ipo needs the response lengths")
        h = (policy_chosen - ref_chosen) / chosen_len - (policy_rejected - ref_rejected) / rejected_len
        return (h - 1.0 / (2.0 * beta)) ** 2
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if variant == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if variant == "hinge":
        return torch.relu(1 - beta * h)
    raise ValueError(f"unknown DPO variant {variant!r}")
