"""The reward actor: one `Rewards` (rule functions and reward models) in its own Ray actor
process, and the two calls that start N of them and score a batch across them.

    actors = start_reward_actors(spec)             # waits until every actor has loaded
    results = score_batch(actors, items, spec.timeout_s)   # list[RewardResult], in order

A reward that fails raises `RewardError` naming the reward and the sample; through
`ray.get` it arrives as Ray's `RayTaskError` made an instance of `RewardError` too, with
the original message in its text. An actor whose rewards failed to load stays alive and
raises that load error from every call, so it is reported as a `RewardError` as well,
not as a dead actor.
"""

from __future__ import annotations

from typing import Sequence

import ray

from rollout.rewards import RewardError, RewardResult, Rewards, RewardSpec


class RewardActor:
    """Ray actor body; `start_reward_actors` creates these with `ray.remote(...)`."""

    def __init__(self, spec: RewardSpec):
        device = "cpu"
        if spec.gpus_per_actor > 0:  # rule-only actors never import torch
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.rewards, self.error = None, None
        try:
            self.rewards = Rewards(spec, device)
        except RewardError as exc:
            self.error = exc  # re-raised by every call: a clear RewardError instead of a dead actor

    def _ready(self) -> Rewards:
        if self.error is not None:
            raise self.error
        return self.rewards

    def ready(self) -> list[str]:
        """The names of the rewards, once all of them have loaded."""
        return self._ready().names

    def score(self, batch: Sequence, start: int = 0) -> list[RewardResult]:
        return self._ready().score(batch, start)


def start_reward_actors(spec: RewardSpec) -> list:
    """`spec.num_actors` reward actors, each with every reward loaded."""
    spec = spec.with_absolute_paths()
    spec.validate()
    remote = ray.remote(RewardActor).options(num_cpus=spec.cpus_per_actor, num_gpus=spec.gpus_per_actor)
    actors = [remote.remote(spec) for _ in range(spec.num_actors)]
    try:
        ray.get([a.ready.remote() for a in actors], timeout=spec.timeout_s)
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        raise
    return actors


def score_batch(actors: list, batch: Sequence, timeout_s: float | None = None) -> list[RewardResult]:
    """Split `batch` evenly across `actors` (contiguous shards), gather the results in order."""
    share = -(-len(batch) // len(actors)) if batch else 0
    starts = range(0, len(batch), share) if share else []
    refs = [actors[k].score.remote(list(batch[at: at + share]), at) for k, at in enumerate(starts)]
    try:
        shards = ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        # A sync actor cannot be interrupted mid-call: it stays busy until the call ends.
        raise RewardError(f"reward actors did not score a batch of {len(batch)} within {timeout_s} s "
                          "(a rule function that never returns?); stop_reward_actors ends them") from None
    return [result for shard in shards for result in shard]


def stop_reward_actors(actors: list) -> None:
    for actor in actors:
        ray.kill(actor)
