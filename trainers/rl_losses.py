"""RL and distillation math as pure functions of tensors: KL estimators, masked
statistics, advantage estimators (GAE, GRPO, RLOO, REINFORCE++), the PPO policy and
value losses, token entropy and the distillation divergences (forward/reverse KL,
generalized JSD). No models, no state: tensors in, tensors out.

Conventions: B sequences of T response positions; `mask` is (B, T), bool or float,
1 on the response tokens that count and 0 on padding (or on prompt positions).
Logits are (B, T, V) and already aligned with the tokens they score. Group-wise
estimators take rewards laid out prompt-major: the n samples of a prompt are contiguous.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

KL_KINDS = ("k1", "k2", "k3")
AGGREGATIONS = ("token", "sequence", "fixed")
POLICY_LOSSES = ("clip", "cispo")
RATIO_LEVELS = ("token", "sequence")
MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: over any clip, and far from float32 overflow

SumOverWorkers = Callable[[list[float]], list[float]]


# -- masked statistics -----------------------------------------------------------------

def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values * mask) / sum(mask) over `dim` (all entries when None); 0 where mask is empty."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1e-8)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1e-8)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, keep_mean: bool = False,
                  eps: float = 1e-8, sum_over_workers: SumOverWorkers | None = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and population variance over masked entries only.

    keep_mean=True adds the mean back (scale only). Unmasked entries come out as 0.
    The statistics are the whole tensor's, so pass the whole batch, not a micro-batch.
    With data-parallel workers each holding a share of the batch, `sum_over_workers`
    (a function summing a list of floats across them) makes every worker whiten with the
    statistics of the whole step, exactly as if one worker held it all.
    """
    total = sum_over_workers or list
    weights = mask.to(values.dtype)
    value_sum, count = total([float((values * weights).sum()), float(weights.sum())])
    mean = value_sum / max(count, 1e-8)
    (squares,) = total([float(((values - mean) ** 2 * weights).sum())])
    variance = squares / max(count, 1e-8)
    whitened = (values - mean) / math.sqrt(variance + eps)
    if keep_mean:
        whitened = whitened + mean
    return whitened * weights


def zero_outside(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`values` where `mask` is set, 0 elsewhere, selected (not multiplied: 0 * NaN is NaN)."""
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str, horizon: int | None = None) -> torch.Tensor:
    """'token': mean over every masked token of the batch (long answers weigh more);
    'sequence': masked mean per sequence, then mean over sequences; 'fixed': the masked
    sum over (sequences x `horizon`), the longest response allowed (Dr. GRPO): a token
    weighs the same whatever its response's length. Masked-out entries are selected
    away, not multiplied by 0, so a non-finite value there never reaches the loss."""
    per_token = zero_outside(per_token, mask)
    if aggregation == "token":
        return masked_mean(per_token, mask)
    if aggregation == "sequence":
        return masked_mean(per_token, mask, dim=-1).mean()
    if aggregation == "fixed":
        if not horizon:
            raise ValueError("aggregation 'fixed' needs the horizon (the longest response allowed)")
        return per_token.sum() / (per_token.shape[0] * horizon)
    raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")


# -- KL penalty and per-token rewards --------------------------------------------------

def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from log-probs of tokens sampled from the policy.

    With d = logp - ref_logp (any shape, elementwise):
      k1 = d                     unbiased, high variance, can be negative
      k2 = d^2 / 2               biased, low variance, >= 0
      k3 = exp(-d) - (-d) - 1    unbiased, low variance, >= 0 (Schulman, "Approximating KL")
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_KINDS}")


def _last_token_onehot(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) float, 1 at the last position where mask is set (none in an empty row)."""
    mask = mask.to(torch.float32)
    positions = torch.arange(mask.size(-1), device=mask.device, dtype=torch.float32)
    last = (mask * (positions + 1)).argmax(-1)  # +1 so that position 0 beats an empty row
    return F.one_hot(last, mask.size(-1)).to(mask.dtype) * mask


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (B, T): -kl_coef * kl on every response token, plus the sequence
    score (B,) on the last response token. Zero outside the mask."""
    mask = mask.to(kl.dtype)
    return -kl_coef * kl * mask + scores.to(kl.dtype).unsqueeze(-1) * _last_token_onehot(mask)


# -- advantage estimators ----------------------------------------------------------------

def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t'} where t' is the next masked position (0 after the last one).
    rewards, mask: (B, T) -> (B, T), zero outside the mask. Unmasked positions are skipped,
    so right padding adds nothing and holes (e.g. tool output between turns) are transparent."""
    mask = mask.to(torch.bool)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(-1))):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return returns * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation per token; returns (advantages, returns), both (B, T).

      delta_t = r_t + gamma * V_{t'} - V_t            t' = the next masked position
      A_t     = delta_t + gamma * lam * A_{t'}
      R_t     = A_t + V_t                              (the critic's regression target)

    rewards, values, mask: (B, T). V and A after the last masked token are 0 (the episode
    ends there), so right padding, whatever it holds, changes nothing; unmasked positions
    in between are skipped as in discounted_returns. Zero outside the mask.
    """
    mask = mask.to(torch.bool)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(-1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = torch.where(mask[:, t], delta + gamma * lam * next_advantage, next_advantage)
        next_value = torch.where(mask[:, t], values[:, t], next_value)
        advantages[:, t] = next_advantage
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(num_prompts * n,) -> (num_prompts, n); the n samples of a prompt are contiguous."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"expected a flat reward vector of a multiple of {group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    return rewards.view(-1, group_size)


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """Group-relative advantages (B,) = (r - mean_group) / (std_group + eps) with the
    sample (n - 1) std, as TRL and verl do. scale=False: r - mean_group only (Dr. GRPO),
    which does not up-weight prompts whose rewards barely vary."""
    groups = _grouped(rewards, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out advantages (B,): r_i - mean of the other n - 1 rewards of the group,
    i.e. n / (n - 1) * (r_i - mean_group). Needs n >= 2."""
    if group_size < 2:
        raise ValueError("RLOO needs at least two samples per prompt")
    groups = _grouped(rewards, group_size)
    others_mean = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).reshape(-1)


def reinforce_pp_advantages(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor, kl_coef: float,
                            gamma: float = 1.0, sum_over_workers: SumOverWorkers | None = None) -> torch.Tensor:
    """REINFORCE++ advantages (B, T), as OpenRLHF's `reinforce_plus_plus`: the discounted
    returns of token_rewards(scores, kl, mask, kl_coef), whitened over every masked token
    of the batch (population variance). Pass the whole rollout batch (or each worker's share
    with `sum_over_workers`, see masked_whiten): the baseline is its mean."""
    returns = discounted_returns(token_rewards(scores, kl, mask, kl_coef), mask, gamma)
    return masked_whiten(returns, mask, sum_over_workers=sum_over_workers)


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence-level advantages (B,) -> (B, T): the same value on every masked token."""
    return advantages.unsqueeze(-1) * mask.to(advantages.dtype)


# -- PPO losses ----------------------------------------------------------------------------

def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float, clip_eps_high: float | None = None, aggregation: str = "token",
                    weights: torch.Tensor | None = None, *, ratio_level: str = "token", loss: str = "clip",
                    horizon: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy-gradient loss; all inputs (B, T).

      ratio = exp(logp - old_logp)                     ratio_level 'token'
      ratio = exp(mean over the response of that)      ratio_level 'sequence' (GSPO), every token of a response
      clip:  loss_t = -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps_high) * A)     (PPO, GRPO, DAPO)
      cispo: loss_t = -sg(min(ratio, 1 + clip_eps_high)) * A * logp                          (CISPO)

    clip_eps_high defaults to clip_eps (a larger one is DAPO's clip-higher). CISPO clips
    the importance weight, not the update: every token keeps its gradient. Aggregated by
    `aggregation` ('token', 'sequence', or 'fixed' over `horizon`: see `aggregate`), each
    token's loss times its off-policy correction `weights` where given
    (`trainers.rl.correction`). Log-ratios are clamped to +-MAX_LOG_RATIO before `exp`.
    Stats (detached scalars): clip_fraction = share of masked tokens whose ratio was
    clipped (for cispo: whose weight was capped); approx_kl = masked mean of the k3
    estimate of KL(old || new).
    """
    if loss not in POLICY_LOSSES or ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown policy loss {loss!r} at ratio level {ratio_level!r}; expected {POLICY_LOSSES} "
                         f"at {RATIO_LEVELS}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = zero_outside(logp - old_logp, mask)
    token_log_ratio = log_ratio.detach().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    if ratio_level == "sequence":
        log_ratio = (log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(logp)
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    if loss == "cispo":
        capped = torch.clamp(ratio, max=1 + high)
        per_token = -capped.detach() * advantages * logp
        clipped_share = (ratio > 1 + high).to(logp.dtype)
    else:
        unclipped = ratio * advantages
        clipped = torch.clamp(ratio, 1 - clip_eps, 1 + high) * advantages
        per_token = -torch.minimum(unclipped, clipped)
        clipped_share = (clipped < unclipped).to(logp.dtype)
    result = aggregate(per_token if weights is None else per_token * weights, mask, aggregation, horizon)
    with torch.no_grad():
        stats = {"clip_fraction": masked_mean(clipped_share, mask),
                 "approx_kl": masked_mean(kl_estimate(torch.zeros_like(token_log_ratio), token_log_ratio, "k3"), mask)}
    return result, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_eps: float | None) -> torch.Tensor:
    """Clipped critic loss, masked mean over tokens; inputs (B, T).

      v_clip = old_v + clip(v - old_v, -clip_eps, clip_eps)
      loss_t = 0.5 * max((v - R)^2, (v_clip - R)^2)      (clip_eps None: 0.5 * (v - R)^2)
    """
    loss = (values - returns) ** 2
    if clip_eps is not None:
        clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        loss = torch.maximum(loss, (clipped_values - returns) ** 2)
    return 0.5 * masked_mean(loss, mask)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens of H(p) = logsumexp(z) - sum_v p_v z_v, p = softmax(z); logits (B, T, V).
    One row at a time: its (T, V) temporaries stay small enough to stay in cache."""
    rows = []
    for z in logits.float().unbind(0):
        rows.append(torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1))
    return masked_mean(torch.stack(rows) if rows else logits.new_zeros(mask.shape), mask)


# -- distillation ----------------------------------------------------------------------------

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _token_kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, summed over the vocabulary: sum_v p_v (log p_v - log q_v)."""
    return (p_logprobs.exp() * (p_logprobs - q_logprobs)).sum(-1)


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                     loss: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Per-token divergence between the teacher's and the student's distributions at
    temperature T (x_T = softmax(logits / T)); logits (..., V) aligned, mask (...);
    returns (...) float32, zero where mask is 0. Not scaled by T^2 (the caller's choice).

      forward_kl  KL(teacher || student)                mean seeking (Hinton distillation)
      reverse_kl  KL(student || teacher)                mode seeking
      jsd         generalized JSD of GKD (Agarwal et al. 2023, Eq. 1), exactly as TRL's
                  `GKDTrainer.generalized_jsd_loss`, with M = beta * T + (1 - beta) * S:
                    0 < beta < 1:  beta * KL(T || M) + (1 - beta) * KL(S || M)
                    beta == 0:     KL(T || S)   (forward KL)
                    beta == 1:     KL(S || T)   (reverse KL)
                  The endpoints are special cases, not limits: the interior formula tends to
                  0 as beta goes to 0 or 1 (JSD_beta ~ beta * KL(T || S) near 0), and by
                  convexity JSD_beta <= beta (1 - beta) (KL(T || S) + KL(S || T)).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ (same tokenizer and vocabulary needed)")
    student = F.log_softmax(student_logits.float() / temperature, -1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, -1)
    return _divergence(student, teacher, loss, beta) * mask.to(student.dtype)


def support_divergence(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_ids: torch.Tensor | None,
                       mask: torch.Tensor, loss: str = "forward_kl", beta: float = 0.5,
                       temperature: float = 1.0) -> torch.Tensor:
    """`token_divergence` against a teacher that sent log-probs already at temperature T,
    on the support it sent: with `teacher_ids` (..., k) its top-k tokens, `teacher_logp`
    (..., k + 1) holds their log-probs and, last, the log of every other token's mass
    together; the student's tempered distribution is folded onto the same k + 1 outcomes
    (its mass outside the teacher's top k counts in the last one, so reverse KL still
    penalises it). That divergence is at most the full-vocabulary one and equals it when
    the rest is empty. teacher_ids None: `teacher_logp` is over the whole vocabulary."""
    student = F.log_softmax(student_logits.float() / temperature, -1)
    if teacher_ids is not None:
        top = student.gather(-1, teacher_ids)
        rest = torch.logsumexp(student.scatter(-1, teacher_ids, float("-inf")), -1, keepdim=True)
        student = torch.cat([top, rest], -1)
    if student.shape != teacher_logp.shape:
        raise ValueError(f"student distribution {tuple(student.shape)} and the teacher's "
                         f"{tuple(teacher_logp.shape)} differ (same tokenizer and vocabulary needed)")
    return _divergence(student, teacher_logp.float(), loss, beta) * mask.to(student.dtype)


def _divergence(student: torch.Tensor, teacher: torch.Tensor, loss: str, beta: float) -> torch.Tensor:
    """The divergence `loss` between two log-distributions over the last dimension."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if loss == "forward_kl" or (loss == "jsd" and beta == 0.0):
        return _token_kl(teacher, student)
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1.0):
        return _token_kl(student, teacher)
    if loss == "jsd":
        mixture = torch.logsumexp(torch.stack([teacher + math.log(beta), student + math.log(1 - beta)]), 0)
        return beta * _token_kl(teacher, mixture) + (1 - beta) * _token_kl(student, mixture)
    raise ValueError(f"unknown divergence {loss!r}; expected one of {DIVERGENCES}")


def forward_kl_with_temperature(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                                temperature: float = 1.0) -> torch.Tensor:
    """Hinton distillation: T^2 * KL(teacher_T || student_T), masked mean over tokens.
    The T^2 keeps gradient magnitudes independent of T."""
    per_token = token_divergence(student_logits, teacher_logits, mask, "forward_kl", temperature=temperature)
    return temperature ** 2 * masked_mean(per_token, mask)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher) per token (mode-seeking), masked mean over tokens."""
    return masked_mean(token_divergence(student_logits, teacher_logits, mask, "reverse_kl"), mask)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    beta: float = 0.5) -> torch.Tensor:
    """The generalized JSD of `token_divergence` (loss jsd), masked mean over tokens."""
    return masked_mean(token_divergence(student_logits, teacher_logits, mask, "jsd", beta), mask)
