"""The reward actor: one `Rewards` (rule functions and reward models) in its own Ray actor
process, and the two calls that start N of them and score a batch across them.

    actors = start_reward_actors(spec)             # waits until every actor has loaded
    results = score_batch(actors, items, spec.timeout_s)   # list[RewardResult], in order

A reward that fails raises `RewardError` naming the reward and the sample; through
`ray.get` it arrives as Ray's `RayTaskError` made an instance of `RewardError` too, with
the original message in its text. An actor whose rewards failed to load stays alive and
raises that load error from every call, so it is reported as a `RewardError` as well,
not as a dead actor.

A training run holds its reward actors through `RewardService` instead (started by the
driver, pickled into every worker): one owner actor restarts a reward actor that died and
its share of the batch is re-issued, a bounded number of times.

    rewards = RewardService(spec, max_retries=2)
    results = rewards.score(items)                 # the same results as score_batch
    rewards.stop()
"""

from __future__ import annotations

import os
from functools import partial
from typing import Sequence

import ray

from rollout.actor_owner import OwnedActors
from rollout.rewards import RewardError, RewardResult, Rewards, RewardSpec
from rollout.slots import split_evenly


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

    def pid(self) -> int:
        """This actor's process id (fault-injection tests kill exactly this process)."""
        return os.getpid()


def new_reward_actor(spec: RewardSpec):
    """One reward actor (not waited on)."""
    return ray.remote(RewardActor).options(num_cpus=spec.cpus_per_actor, num_gpus=spec.gpus_per_actor).remote(spec)


def start_reward_actors(spec: RewardSpec) -> list:
    """`spec.num_actors` reward actors, each with every reward loaded."""
    spec = spec.with_absolute_paths()
    spec.validate()
    actors = [new_reward_actor(spec) for _ in range(spec.num_actors)]
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


class RewardService:
    """`spec.num_actors` reward actors behind one owner actor that restarts a dead one;
    `score` re-issues a lost actor's share, up to `max_retries` times, then raises a
    `RewardError` naming the actor. A hung rule is still a `RewardError` after
    `spec.timeout_s`, not a restart; an actor's (re)start may take `start_timeout_s`."""

    def __init__(self, spec: RewardSpec, max_retries: int = 2, start_timeout_s: float = 600.0):
        spec = spec.with_absolute_paths()
        spec.validate()
        self.timeout_s = spec.timeout_s
        self.actors = OwnedActors(partial(new_reward_actor, spec), spec.num_actors, "reward actor", RewardError,
                                  spec.timeout_s, max_retries, start_timeout_s)

    def score(self, batch: Sequence) -> list[RewardResult]:
        parts = self.actors.call(split_evenly(len(batch), self.actors.count),
                                 lambda actor, s: actor.score.remote([batch[k] for k in s], s.start))
        return [result for part in parts for result in part]

    def stop(self) -> None:
        self.actors.stop()
