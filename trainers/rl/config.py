"""Typed config of the RL and distillation methods: `algo` (rollout batch, PPO / GRPO
objective, KL to the reference) and `distill` (teacher, divergence, offline or on-policy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rollout.config import opt
from trainers.errors import ConfigError


@dataclass
class AlgoConfig:
    prompts_per_step: int = opt(
        8, "Prompts each worker draws per RL step (the rollout batch is this x samples_per_prompt).")
    samples_per_prompt: int = opt(4, "Responses sampled per prompt (the group of GRPO / RLOO; 1 is usual for PPO).")
    max_new_tokens: int = opt(32, "Longest sampled response, tokens.")
    temperature: float = opt(1.0, "Sampling temperature of the rollouts.")
    top_p: float = opt(1.0, "Nucleus sampling of the rollouts.")
    estimator: Literal["grpo", "rloo", "reinforce_pp"] = opt(
        "grpo", "method grpo: the baseline. grpo: group mean / std; rloo: mean of the other samples of the "
                "prompt; reinforce_pp: batch-whitened returns with the KL as a per-token reward (REINFORCE++).")
    ppo_epochs: int = opt(1, "Passes over each rollout batch.")
    mini_batches: int = opt(1, "Optimizer steps per pass: the rollout batch is split into this many mini-batches.")
    clip_eps: float = opt(0.2, "PPO ratio clip: the update is clipped outside [1 - clip_eps, 1 + clip_eps_high].")
    clip_eps_high: float = opt(0.0, "Upper clip (clip-higher); 0 = clip_eps.")
    aggregation: Literal["token", "sequence", "fixed"] = opt(
        "token", "Loss aggregation: token = mean over every response token of the mini-batch (DAPO); sequence = "
                 "mean per response, then over responses (each response weighs the same; GRPO's paper); fixed = "
                 "sum over responses x max_new_tokens (Dr. GRPO: no length bias either way).")
    scale_rewards: bool = opt(
        True, "estimator grpo: divide the group-centred rewards by the group's std; false is Dr. GRPO's "
              "(no up-weighting of prompts whose rewards barely differ).")
    ratio_level: Literal["token", "sequence"] = opt(
        "token", "Importance ratio of the policy loss: token = each token's own; sequence = exp of the mean "
                 "log-ratio over the response, for all its tokens (GSPO).")
    policy_loss: Literal["clip", "cispo"] = opt(
        "clip", "clip = PPO's clipped surrogate (GRPO, DAPO, GSPO); cispo = the policy gradient weighted by the "
                "importance ratio capped at 1 + clip_eps_high, with no gradient through the weight (CISPO): "
                "clipped tokens keep their gradient.")
    kl_coef: float = opt(0.0, "Weight of the KL to the reference model (model.reference); 0 = no reference "
                              "model at all.")
    kl_estimator: Literal["k1", "k2", "k3"] = opt(
        "k1", "KL estimator per token: k1 log-ratio, k2 half squared log-ratio, k3 the low-variance unbiased one.")
    kl_in: Literal["reward", "loss"] = opt(
        "reward", "reward: subtract kl_coef * KL from the per-token reward (PPO, REINFORCE++); "
                  "loss: add kl_coef * KL to the loss (GRPO's way).")
    kl_target: float = opt(0.0, "Adaptive KL: steer the coefficient so the KL stays near this (0 = fixed coefficient).")
    kl_horizon: int = opt(10000, "Adaptive KL: responses over which the coefficient adapts.")
    gamma: float = opt(1.0, "PPO: discount of the GAE returns.")
    lam: float = opt(0.95, "PPO: GAE lambda.")
    vf_coef: float = opt(0.5, "PPO: weight of the value loss.")
    value_clip: float = opt(0.2, "PPO: clip of the value update around the rollout's values; 0 = unclipped.")
    whiten_advantages: bool = opt(True, "PPO: whiten the advantages over the rollout batch.")
    rollout_correction: Literal["none", "tis", "mis"] = opt(
        "tis", "Off-policy correction of the policy loss by the ratio of the trainer's to the sampling engine's "
               "probability of each sampled token (engine numerics, rollout.max_staleness): tis truncates it at "
               "correction_cap, mis drops tokens over the cap, none trusts the engine's samples as on-policy.")
    correction_level: Literal["token", "sequence"] = opt(
        "token", "token: each token's own ratio; sequence: the product over the response, for all its tokens.")
    correction_cap: float = opt(2.0, "Truncation (tis) or masking (mis) threshold of the correction weights, >= 1.")
    entropy_coef: float = opt(0.0, "Weight of the entropy bonus (higher keeps sampling diverse).")
    mask_truncated: bool = opt(
        False, "Give no loss to responses cut off at max_new_tokens (DAPO's overlong filtering); they still "
               "count in their group's baseline. The soft alternative is the overlong_penalty reward.")
    dynamic_sampling: bool = opt(
        False, "DAPO's dynamic sampling: drop the groups whose rewards are all equal (they carry no "
               "group-relative signal) and sample more prompts until prompts_per_step informative groups are "
               "found or max_sampling_rounds is reached (then the batch is filled with the dropped ones).")
    max_sampling_rounds: int = opt(3, "dynamic_sampling: most generation rounds per step, the first included.")
    share_prompts: bool = opt(
        True, "Train on a prompt's samples as one sequence, the prompt computed once and every response "
              "attending to it (a 4D mask; sdpa or eager attention), when that means fewer tokens: the same "
              "loss, less compute with long prompts or large groups.")
    eval_prompts: int = opt(64, "Held-out prompts (data.eval) scored greedily at each evaluation; 0 = all.")

    def validate(self, section: str) -> None:
        for key in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "ppo_epochs", "mini_batches",
                    "kl_horizon", "max_sampling_rounds"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{section}.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise ConfigError(f"{section}.temperature", f"must be > 0 for sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{section}.top_p", f"must be in (0, 1], got {self.top_p}")
        for key in ("clip_eps", "clip_eps_high", "kl_coef", "kl_target", "vf_coef", "value_clip", "entropy_coef"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{section}.{key}", f"must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError(f"{section}.gamma" if not 0 <= self.gamma <= 1 else f"{section}.lam", "must be in [0, 1]")
        if self.correction_cap < 1:
            raise ConfigError(f"{section}.correction_cap", f"must be >= 1, got {self.correction_cap}")
        if self.eval_prompts < 0:
            raise ConfigError(f"{section}.eval_prompts", f"must be >= 0, got {self.eval_prompts}")


@dataclass
class DistillConfig:
    mode: Literal["offline", "on_policy"] = opt(
        "offline", "offline: the teacher's soft labels on the SFT data (data.train), mixed with the CE loss; "
                   "on_policy: the student samples responses from the rollout pool and learns the teacher's "
                   "distribution on them.")
    teacher: str = opt(
        "", "Teacher: a causal LM directory, or a run directory (its final/), with the student's tokenizer.")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = opt(
        "forward_kl", "Divergence per token: forward_kl KL(teacher || student) (offline's classic), reverse_kl "
                      "KL(student || teacher) (mode seeking), jsd the generalised JSD with `beta`.")
    temperature: float = opt(
        1.0, "Softening temperature of both distributions (the loss is scaled by T^2 as in Hinton et al.).")
    ce_weight: float = opt(0.5, "offline: weight of the hard-label CE loss; the divergence gets 1 - ce_weight.")
    beta: float = opt(0.5, "jsd: interpolation weight; 0 = forward KL, 1 = reverse KL.")
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "Teacher weights dtype.")
    teacher_trust_remote_code: bool = opt(
        False, "Run the teacher directory's own modelling code (its config's auto_map); model.trust_remote_code "
               "covers the student only.")
    cpus_per_teacher: float = opt(1.0, "on_policy: CPUs reserved for the teacher actor.")
    teacher_top_k: int = opt(
        64, "on_policy: the teacher sends, per response token, the log-probs of its k most likely tokens and "
            "of all others together; the divergence is computed on those k + 1 outcomes (what travels no longer "
            "grows with the vocabulary). 0: the whole vocabulary.")

    def validate(self, section: str) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"{section}.temperature", f"must be > 0, got {self.temperature}")
        if not 0 <= self.ce_weight <= 1:
            raise ConfigError(f"{section}.ce_weight", f"must be in [0, 1], got {self.ce_weight}")
        if not 0 <= self.beta <= 1:
            raise ConfigError(f"{section}.beta", f"must be in [0, 1], got {self.beta}")
        if self.cpus_per_teacher <= 0:
            raise ConfigError(f"{section}.cpus_per_teacher", f"must be > 0, got {self.cpus_per_teacher}")
        if self.teacher_top_k < 0:
            raise ConfigError(f"{section}.teacher_top_k", f"must be >= 0 (0: the whole vocabulary), "
                                                          f"got {self.teacher_top_k}")
