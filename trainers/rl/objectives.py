"""What each RL method optimises, given a step's `Experience`: `prepare` turns rewards
(and values, KL) into advantages once per rollout batch; `loss` is the mini-batch loss
and its statistics. PPO (GAE on a value head), the critic-free GRPO family (GRPO, RLOO,
REINFORCE++) and on-policy distillation (the teacher's distributions on the student's
own samples) share the clipped-ratio machinery of `trainers.rl_losses`."""

from __future__ import annotations

import torch

from trainers.methods import method_spec, resolve
from trainers.rl.experience import Experience
from trainers.rl_losses import (aggregate, broadcast_to_tokens, entropy_from_logits, gae, grpo_advantages, kl_estimate,
                                SumOverWorkers, masked_mean, masked_whiten, ppo_policy_loss, reinforce_pp_advantages,
                                rloo_advantages, support_divergence, token_rewards, value_loss)


class AdaptiveKL:
    """The KL coefficient: fixed, or steered towards `target` (Ziegler et al. 2019):
    coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * responses / horizon."""

    def __init__(self, coef: float, target: float, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, responses: int) -> None:
        if self.target > 0 and self.coef > 0:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.coef *= 1 + error * responses / self.horizon


class Objective:
    """Clipped policy-gradient loss on advantages that a subclass computes in `prepare`."""
    needs_values = False
    needs_teacher = False

    def __init__(self, algo, kl: AdaptiveKL, temperature: float):
        self.algo, self.kl, self.temperature = algo, kl, temperature

    @classmethod
    def from_job(cls, job, kl: AdaptiveKL) -> "Objective":
        return cls(job.algo, kl, job.algo.temperature)

    @property
    def needs_reference(self) -> bool:
        return self.kl.coef > 0

    def token_kl(self, logp: torch.Tensor, ref_logp: torch.Tensor | None) -> torch.Tensor:
        if ref_logp is None:
            return torch.zeros_like(logp)
        return kl_estimate(logp, ref_logp, self.algo.kl_estimator)

    def reward_kl_coef(self) -> float:
        """The coefficient of the KL inside the reward (0 when the KL is a loss term)."""
        return self.kl.coef if self.algo.kl_in == "reward" else 0.0

    @property
    def needs_old_pass(self) -> bool:
        """Whether `prepare` needs the rollout policy's log-probs (or values) before the
        update starts; otherwise a single-pass update takes them from its own forward."""
        return self.reward_kl_coef() > 0

    def prepare(self, exp: Experience, group_size: int,
                sum_over_workers: SumOverWorkers | None = None) -> dict[str, float]:
        """Advantages of this worker's share of the step, into `exp`. Batch-wide
        statistics (whitening) span every worker's share through `sum_over_workers`;
        group baselines need none, as a prompt's samples all sit on one worker."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, logp: torch.Tensor, values: torch.Tensor | None,
             mb: Experience) -> tuple[torch.Tensor, dict]:
        """The mini-batch loss from the forward's response logits (B, R, V), the sampled
        tokens' log-probs at the sampling temperature (B, R), values (B, R) or None."""
        algo = self.algo
        loss, stats = ppo_policy_loss(logp, mb.old_logp, mb.advantages, mb.mask, algo.clip_eps,
                                      algo.clip_eps_high or None, algo.aggregation, mb.correction,
                                      ratio_level=algo.ratio_level, loss=algo.policy_loss, horizon=algo.max_new_tokens)
        stats = {"policy_loss": loss.detach(), **stats}
        if mb.ref_logp is not None and algo.kl_in == "loss":
            kl_term = masked_mean(self.token_kl(logp, mb.ref_logp), mb.mask)
            loss = loss + self.kl.coef * kl_term
        with torch.set_grad_enabled(bool(algo.entropy_coef) and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits, mb.mask)
        stats["entropy"] = entropy.detach()
        if algo.entropy_coef:
            loss = loss - algo.entropy_coef * entropy
        return loss, stats


class PPO(Objective):
    needs_values = True
    needs_old_pass = True

    def prepare(self, exp, group_size, sum_over_workers=None):
        kl = self.token_kl(exp.old_logp, exp.ref_logp)
        rewards = token_rewards(exp.scores, kl, exp.mask, self.reward_kl_coef())
        advantages, exp.returns = gae(rewards, exp.old_values, exp.mask, self.algo.gamma, self.algo.lam)
        if self.algo.whiten_advantages:
            advantages = masked_whiten(advantages, exp.mask, sum_over_workers=sum_over_workers)
        exp.advantages = advantages
        return {"return_mean": float(masked_mean(exp.returns, exp.mask)),
                "value_mean": float(masked_mean(exp.old_values, exp.mask))}

    def loss(self, logits, logp, values, mb):
        loss, stats = super().loss(logits, logp, values, mb)
        v_loss = value_loss(values, mb.old_values, mb.returns, mb.mask, self.algo.value_clip or None)
        stats["value_loss"] = v_loss.detach()
        return loss + self.algo.vf_coef * v_loss, stats


class GroupRL(Objective):
    """GRPO, RLOO and REINFORCE++: baselines from the other samples, no critic."""

    def prepare(self, exp, group_size, sum_over_workers=None):
        algo = self.algo
        coef = self.reward_kl_coef()
        kl = self.token_kl(exp.old_logp, exp.ref_logp) if coef else torch.zeros_like(exp.mask)
        if algo.estimator == "reinforce_pp":
            exp.advantages = reinforce_pp_advantages(exp.scores, exp.mask, kl, coef, algo.gamma, sum_over_workers)
            return {}
        scores = exp.scores - coef * (kl * exp.mask).sum(-1)
        if algo.estimator == "grpo":
            advantages = grpo_advantages(scores, group_size, scale=algo.scale_rewards)
        else:
            advantages = rloo_advantages(scores, group_size)
        exp.advantages = broadcast_to_tokens(advantages, exp.mask)
        return {}


class OnPolicyDistill(Objective):
    """The student's divergence from the teacher on the student's own samples."""
    needs_teacher = True

    def __init__(self, algo, kl, temperature, distill):
        super().__init__(algo, kl, temperature)
        self.distill = distill

    @classmethod
    def from_job(cls, job, kl):
        return cls(job.algo, kl, job.algo.temperature, job.distill)

    def prepare(self, exp, group_size, sum_over_workers=None):
        return {}

    def loss(self, logits, logp, values, mb):
        d = self.distill
        per_token = support_divergence(logits, mb.teacher_logprobs, mb.teacher_ids, mb.mask, d.loss, d.beta,
                                       d.temperature)
        weighted = per_token if mb.correction is None else per_token * mb.correction
        loss = aggregate(weighted, mb.mask, self.algo.aggregation, self.algo.max_new_tokens)
        with torch.no_grad():
            stats = {"divergence": masked_mean(per_token, mb.mask), "entropy": entropy_from_logits(logits, mb.mask)}
        return loss, stats


def build_objective(job, kl: AdaptiveKL) -> Objective:
    """The objective `trainers.methods.METHODS` names for `job.method`."""
    spec = method_spec(job.method)
    if not spec.objective:
        raise ValueError(f"method '{job.method}' has no RL objective in trainers.methods.METHODS")
    return resolve(spec.objective).from_job(job, kl)
