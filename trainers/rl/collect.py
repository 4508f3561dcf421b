"""Collecting a step's experience from the services the driver started: responses from
the rollout pool, their rewards from the reward actors, the teacher's distributions from
the teacher actor, and the same for evaluation (greedy, on held-out prompts)."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, replace
from typing import Any

import torch

from rollout.engine import Sampling
from trainers.rl.experience import Experience, build_experience


def digest(numbers: list[int]) -> int:
    """A checksum of a worker's prompt indices or sampled tokens (summed over workers in the
    log), so a resumed run can be checked to see what an uninterrupted one would."""
    return zlib.crc32(",".join(map(str, numbers)).encode())


@dataclass
class Services:
    """Handles of what an RL run samples from, each to one owner actor the driver started
    (and stops): a copy in every worker reaches the same actors."""
    pool: Any                          # rollout.pool.RolloutPool
    rewards: Any = None                # rollout.reward_actor.RewardService
    teacher: Any = None                # rollout.teacher.TeacherService


class Collector:
    def __init__(self, job, tokenizer, services: Services, worker):
        self.job, self.algo, self.services, self.worker = job, job.algo, services, worker
        self.tokenizer, self.pad_id = tokenizer, tokenizer.pad_token_id
        self.episodes, self.in_flight = None, {}
        self.draw = None  # (step, round, count) -> prompt records, for dynamic sampling (set by the loop)
        if job.rollout.environment:
            from rollout.environment import load_environment
            from rollout.episodes import EpisodeRunner

            r = job.rollout
            self.episodes = EpisodeRunner(services.pool, tokenizer, load_environment(r.environment, r.env_params or {}),
                                          r.max_turns, r.max_episode_tokens, name=f"environment '{r.environment}'")

    def generate(self, records: list, sampling: Sampling) -> list:
        """n generations per record: one response each, or one episode each with an environment."""
        if self.episodes is not None:
            return self.episodes.run(records, sampling)
        return self.services.pool.generate(self.prompts(records), sampling)

    def prompts(self, records: list) -> list[list[int]]:
        """The records' prompts rendered here, with the run's tokenizer and chat template
        (`data.chat_template`), so the engines sample after exactly the tokens training sees."""
        from rollout.inputs import prompt_ids

        return [prompt_ids(self.tokenizer, r.prompt_messages) for r in records]

    def sampling(self, step: int) -> Sampling:
        """Seeded per step and rank: a resumed run samples what an uninterrupted one would."""
        seed = (self.job.rollout.seed * 1_000_003 + step) * 1009 + self.worker.rank
        return Sampling(n=self.algo.samples_per_prompt, temperature=self.algo.temperature, top_p=self.algo.top_p,
                        max_new_tokens=self.algo.max_new_tokens, seed=seed)

    def submit(self, records: list, step: int) -> int:
        """Send step `step`'s generation request to the pool (a ticket for `result`); with an
        environment, its episodes run in a background thread."""
        if self.episodes is not None:
            self.in_flight[step] = self.episodes.submit(records, self.sampling(step))
            return step
        return self.services.pool.submit(self.prompts(records), self.sampling(step))

    def result(self, ticket: int) -> list:
        if self.episodes is not None:
            return self.in_flight.pop(ticket).result()
        return self.services.pool.result(ticket)

    def collect(self, records: list, step: int, pending=None) -> tuple[Experience, dict, dict]:
        """(experience, timings, metrics) of one step's prompts; `pending()` gives their
        generations where they were requested ahead (`trainers.rl.pipeline`)."""
        timings = {}
        t = time.perf_counter()
        if pending is None:
            groups = self.generate(records, self.sampling(step))
        else:
            groups = pending()
        generations = [g for group in groups for g in group]
        timings["generate_s"] = time.perf_counter() - t  # with pending requests: the wait for them
        t = time.perf_counter()
        scores, terms = self.rewards(records, generations)
        timings["score_s"] = time.perf_counter() - t
        extra = {}
        if self.algo.dynamic_sampling:
            t = time.perf_counter()
            generations, scores, terms, extra = self.keep_informative(len(records), step, generations, scores, terms)
            timings["resample_s"] = time.perf_counter() - t
        exp = build_experience(generations, scores, self.pad_id)
        if self.algo.mask_truncated:  # DAPO's overlong filtering: cut off mid-answer, no loss
            exp.mask[torch.tensor([g.finish_reason == "length" for g in generations])] = 0.0
        if self.services.teacher is not None:
            t = time.perf_counter()
            self.teach(exp, generations, self.job.distill.temperature)
            timings["teacher_s"] = time.perf_counter() - t
        lengths = torch.tensor([sampled_tokens(g) for g in generations], dtype=torch.float32)
        metrics = {"reward_mean": float(exp.scores.mean()), "reward_std": float(exp.scores.std(unbiased=False)),
                   "response_length": float(lengths.mean()),
                   "truncated": sum(g.finish_reason == "length" for g in generations) / len(generations),
                   "staleness_max": float(step - min(g.policy_version for g in generations)),
                   "sample_digest": float(digest([t for g in generations for t in g.response_ids])),
                   **{f"reward_{name}": sum(v) / len(v) for name, v in terms.items()}, **extra}
        if self.episodes is not None:
            metrics["turns"] = sum(g.turns for g in generations) / len(generations)
            outcomes = [g.success for g in generations if g.success is not None]
            if outcomes:
                metrics["success"] = sum(outcomes) / len(outcomes)
        return exp, timings, metrics

    def keep_informative(self, wanted: int, step: int, generations: list, scores: list, terms: dict):
        """DAPO's dynamic sampling: `wanted` groups whose rewards differ, from this round and
        up to `max_sampling_rounds - 1` more on prompts `self.draw(step, round, count)` gives
        (a pure function of the step, so a resumed run draws the same); short of that, the
        batch is filled with equal-reward groups, which train on nothing but keep every
        worker's batch the same size."""
        n = self.algo.samples_per_prompt
        kept, dropped = split_groups(generations, scores, terms, n)
        first_share, rounds = len(kept) / wanted, 1
        while len(kept) < wanted and rounds < self.algo.max_sampling_rounds:
            records = self.draw(step, rounds, min(wanted, 2 * (wanted - len(kept))))
            sampling = self.sampling(step)
            more = [g for group in self.generate(records, replace(sampling, seed=sampling.seed + 104_729 * rounds))
                    for g in group]
            more_kept, more_dropped = split_groups(more, *self.rewards(records, more), n)
            kept, dropped, rounds = kept + more_kept, dropped + more_dropped, rounds + 1
        chosen = (kept + dropped)[:wanted]
        generations = [g for gens, _, _ in chosen for g in gens]
        scores = [s for _, group_scores, _ in chosen for s in group_scores]
        terms = {name: [v for _, _, group_terms in chosen for v in group_terms[name]] for name in terms}
        return generations, scores, terms, {"informative_groups": first_share, "sampling_rounds": float(rounds),
                                            "informative_kept": min(len(kept), wanted) / wanted}

    def rewards(self, records: list, generations: list) -> tuple[list[float], dict[str, list[float]]]:
        """Each generation's combined reward (an episode's own reward plus the reward actors'
        on its last message) and each reward term's values (zeros with no rewards)."""
        own = [g.episode_reward or 0.0 for g in generations]
        terms: dict[str, list[float]] = {"environment": own} if self.episodes is not None else {}
        if self.services.rewards is None:
            return own, terms
        from rollout.rewards import RewardItem

        items = [RewardItem.from_generation(records[g.prompt_index].prompt_messages, g,
                                            records[g.prompt_index].reference) for g in generations]
        results = self.services.rewards.score(items)
        for result in results:
            for name, value in result.terms.items():
                terms.setdefault(name, []).append(value)
        return [mine + r.reward for mine, r in zip(own, results)], terms

    def teach(self, exp, generations: list, temperature: float) -> None:
        """The teacher's log-probs at `temperature` on each response position into `exp`
        (zeros on padding): its top `distill.teacher_top_k` tokens and the rest's mass, or
        the whole vocabulary with top_k 0 (see trainers.rl_losses.support_divergence)."""
        prompts, responses = [g.prompt_ids for g in generations], [g.response_ids for g in generations]
        width, top_k = exp.response_ids.shape[1], self.job.distill.teacher_top_k
        if top_k:
            rows = self.services.teacher.top_logprobs(prompts, responses, top_k, temperature)
            exp.teacher_logprobs = _padded([logp for logp, _ in rows], width, torch.float32)
            exp.teacher_ids = _padded([ids for _, ids in rows], width, torch.long)
        else:
            exp.teacher_logprobs = _padded(self.services.teacher.logprobs(prompts, responses, temperature),
                                           width, torch.float32)

    def evaluate(self, records: list, divergence=None) -> dict[str, float]:
        """Sums over greedy responses to `records`: responses, length, reward (when the run
        has rewards) and, given a `divergence(experience) -> float`, the summed per-token
        divergence and token count."""
        rewarded = self.services.rewards is not None or self.episodes is not None
        episodic = {"success": 0.0, "turns": 0.0} if self.episodes is not None else {}
        if not records:
            sums = {"responses": 0.0, "length": 0.0} | ({"reward": 0.0} if rewarded else {}) | episodic
            return sums | ({"divergence": 0.0, "tokens": 0.0} if divergence else {})
        greedy = Sampling(n=1, temperature=0.0, max_new_tokens=self.algo.max_new_tokens)
        generations = [g for group in self.generate(records, greedy) for g in group]
        scores, _ = self.rewards(records, generations)
        sums = {"responses": float(len(generations)), "length": float(sum(sampled_tokens(g) for g in generations))}
        if rewarded:
            sums["reward"] = float(sum(scores))
        if episodic:  # success: the share of episodes the environment called a success
            sums |= {"success": float(sum(bool(g.success) for g in generations)),
                     "turns": float(sum(g.turns for g in generations))}
        if divergence is not None:
            exp = build_experience(generations, scores, self.pad_id)
            self.teach(exp, generations, 1.0)
            sums.update(divergence=divergence(exp), tokens=float(exp.mask.sum()))
        return sums


def split_groups(generations: list, scores: list, terms: dict, n: int) -> tuple[list, list]:
    """The groups of n (generations, scores, terms) whose scores differ, and those whose
    scores are all equal (no group-relative signal), each in order."""
    informative, flat = [], []
    for at in range(0, len(generations), n):
        group = (generations[at:at + n], scores[at:at + n], {name: v[at:at + n] for name, v in terms.items()})
        (informative if max(group[1]) > min(group[1]) else flat).append(group)
    return informative, flat


def sampled_tokens(g) -> int:
    """Tokens the policy sampled in a generation (an episode's inserted ones not counted)."""
    return len(g.response_ids) if g.loss_mask is None else sum(g.loss_mask)


def _padded(rows: list, width: int, dtype) -> torch.Tensor:
    """Per-sample arrays (n_i, ...) -> one (B, width, ...) tensor, zeros after each n_i."""
    out = torch.zeros((len(rows), width, *rows[0].shape[1:]), dtype=dtype)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.from_numpy(row)
    return out
