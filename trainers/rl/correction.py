"""Off-policy correction of the RL losses (`algo.rollout_correction`): importance weights
between the trainer and the engine that sampled, on the sampled tokens.

The engines sample with their own kernels (bf16, another attention implementation) and,
with `rollout.max_staleness` > 0, with weights up to k updates old, so the samples come
from a behaviour policy mu that is not the trainer's rollout policy pi_old. The clipped
PPO ratio pi / pi_old corrects only the update's own drift; the weight
w = pi_old(a) / mu(a) corrects the rest:

  tis  truncated importance sampling: w = min(w, cap)           (Ionides 2008; TRL, verl)
  mis  masked importance sampling:    w, or 0 where w > cap     (TRL's "mask", ICEPOP-like)

At `token` level each token gets its own ratio; at `sequence` level every token of a
response gets the product of its tokens' ratios (the exact correction of a whole sample,
with more variance). Both log-probs are of the raw model distribution (before the
sampling temperature), which is what the engines report.
"""

from __future__ import annotations

import torch

from trainers.rl_losses import MAX_LOG_RATIO, masked_mean

CORRECTIONS = ("none", "tis", "mis")
LEVELS = ("token", "sequence")


def correction_weights(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                       level: str, cap: float) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Per-token weights (B, R) for the policy loss (None with mode 'none') and their
    statistics: mean and max of the weights applied, and the share of tokens whose ratio
    went over `cap` (truncated by tis, masked by mis)."""
    if mode == "none":
        return None, {}
    if mode not in CORRECTIONS or level not in LEVELS:
        raise ValueError(f"unknown correction {mode!r} at level {level!r}; expected {CORRECTIONS} at {LEVELS}")
    with torch.no_grad():
        log_ratio = (trainer_logp.float() - engine_logp.float()) * mask
        if level == "sequence":
            log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(mask)
        ratio = torch.exp(log_ratio.clamp(max=MAX_LOG_RATIO))
        over = (ratio > cap).to(ratio.dtype)
        weights = torch.clamp(ratio, max=cap) if mode == "tis" else ratio * (1 - over)
        weights = weights * mask
        stats = {"correction_weight_mean": float(masked_mean(weights, mask)),
                 "correction_weight_max": float(weights.max()) if weights.numel() else 0.0,
                 "correction_over_cap": float(masked_mean(over, mask))}
    return weights, stats
