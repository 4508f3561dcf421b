"""The rollout pool's owner: one Ray actor (threaded, so every training worker's calls run
at once) that holds the engine actors, their placement group and the last synced weights.
It is the only place that knows which engine serves which slot: a dead engine is replaced
in its own bundle once, however many callers saw it die, and loads the last synced weights
(and serves the pool's adapter) before it serves again. Callers reach it through
`rollout.pool.RolloutPool`, which bounds every wait."""

from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rollout.config import RolloutConfig
from rollout.engine import Generation, PromptInput, Sampling
from rollout.engine_actor import EngineActor, resolve_engine_kind
from rollout.slots import Slots, gather, split_evenly


class RolloutError(RuntimeError):
    """The pool could not complete a request within its retry budget."""


class PoolOwner:
    """Ray actor body; `RolloutPool` creates it (with max_concurrency > 1) and calls `start`."""

    def __init__(self, model_dir: str, cfg: RolloutConfig, adapter_dir: str | None = None, use_gpu: bool = False):
        self.model_dir, self.cfg, self.adapter_dir = str(model_dir), cfg, adapter_dir
        self.kind = resolve_engine_kind(cfg.engine)
        bundle = {"CPU": cfg.cpus_per_engine}
        if use_gpu:
            bundle["GPU"] = cfg.tensor_parallel_size
        self._resources = {"num_cpus": cfg.cpus_per_engine, "num_gpus": bundle.get("GPU", 0)}
        self.group = placement_group([dict(bundle) for _ in range(cfg.num_engines)],
                                     strategy=cfg.placement.upper())  # PACK or SPREAD (best effort)
        # Every sync's buckets (ObjectRefs put by this actor, so they outlive any trainer) as
        # (tensor names, ref), in order, less those a later sync wholly overwrote: replayed on
        # a replacement engine they give it exactly what the live engines hold.
        self.weights: list[tuple[frozenset, object]] = []
        self.engines: Slots | None = None

    def start(self) -> str:
        """Start every engine; returns the engine kind once all are ready."""
        try:
            ray.get(self.group.ready(), timeout=self.cfg.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RolloutError(f"no room for {self.cfg.num_engines} engine(s) of {self.cfg.cpus_per_engine} CPU(s) "
                               f"each within {self.cfg.timeout_s} s (rollout.num_engines, rollout.cpus_per_engine)"
                               ) from None
        self.engines = Slots(self._start_engine, self.cfg.num_engines, "engine", RolloutError, self.cfg.timeout_s,
                             self.cfg.max_retries, bring_up=self._bring_up)
        return self.kind

    def _start_engine(self, index: int):
        actor = ray.remote(**self._resources)(EngineActor).options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index),
            max_concurrency=1)
        return actor.remote(self.kind, self.model_dir, self.cfg, self.adapter_dir)

    def _bring_up(self, engine, timeout_s: float) -> None:
        """Ready, and at the last synced weights (the adapter is loaded by the constructor)."""
        ray.get(engine.ready.remote(), timeout=timeout_s)
        if self.weights:
            ray.get(engine.update_weights.remote([ref for _, ref in self.weights]), timeout=timeout_s)

    def _call_all(self, shards: list, method: str, args_for) -> list:
        """`method` on engine i with `args_for(shard i)`; a dead or hung engine's share is
        re-issued on its replacement."""
        return gather(self.engines.current, self.engines.replace, shards,
                      lambda engine, shard: getattr(engine, method).remote(*args_for(shard)), role="engine",
                      error=RolloutError, timeout_s=self.cfg.timeout_s, max_retries=self.cfg.max_retries)

    def generate(self, prompts: list[PromptInput], sampling: Sampling) -> list[list[Generation]]:
        shards = split_evenly(len(prompts), len(self.engines))
        parts = self._call_all(shards, "generate", lambda shard: ([prompts[k] for k in shard], sampling))
        out: list[list[Generation]] = []
        for shard, part in zip(shards, parts):
            for group in part:
                for g in group:
                    g.prompt_index += shard.start  # engine-local -> request index
                out.append(group)
        return out

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        shards = split_evenly(len(prompt_ids), len(self.engines))
        parts = self._call_all(shards, "score", lambda s: ([prompt_ids[k] for k in s], [response_ids[k] for k in s]))
        return [row for part in parts for row in part]

    def sync_weights(self, bucket_refs: list) -> float:
        """Keep a copy of the buckets (the caller's refs die with the caller) and load them
        on every engine; returns the slowest engine's load time."""
        from rollout.weight_sync import payload_names

        with self.engines.lock:  # no replacement starts from the previous weights meanwhile
            payloads = [ray.get(ref, timeout=self.cfg.timeout_s) for ref in bucket_refs]
            synced = [(frozenset(payload_names(p)), ray.put(p)) for p in payloads]
            covered = frozenset().union(*(names for names, _ in synced))
            self.weights = [(names, ref) for names, ref in self.weights if not names <= covered] + synced
            refs = [ref for _, ref in synced]
            seconds = self._call_all([range(1)] * len(self.engines), "update_weights", lambda _: (refs,))
        return max(seconds)

    def reset(self) -> float:
        """Every engine back at the start model and the kept weights dropped, so another run
        can start on this pool; returns the slowest engine's load time."""
        with self.engines.lock:
            self.weights = []
            seconds = self._call_all([range(1)] * len(self.engines), "load_checkpoint",
                                     lambda _: (self.model_dir, self.cfg.sync_bucket_mb))
        return max(seconds)

    def engine_handles(self) -> list:
        return self.engines.handles() if self.engines else []

    def generations(self) -> list[int]:
        """How many times each slot's engine was replaced."""
        return [generation for _, generation in self.engines.slots] if self.engines else []

    def shutdown(self) -> None:
        if self.engines is not None:
            self.engines.stop()
        remove_placement_group(self.group)
