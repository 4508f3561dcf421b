"""The rollout pool: `num_engines` engine actors behind one handle, in a placement group
the pool owns (packed onto as few nodes as fit, or one engine per node where possible:
`rollout.placement`). A batch is split across the engines and comes back in input order; an
engine that dies is replaced (with the weights and adapter the pool last synced) and its
share re-issued, so `generate` returns complete results or raises after a bounded number
of retries. Weight sync sends size-bounded safetensors buckets through the object store
once, and every engine loads them."""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rollout.config import RolloutConfig
from rollout.engine import Generation, PromptInput, Sampling
from rollout.engine_actor import EngineActor, resolve_engine_kind

ENGINE_LOST = RayActorError  # a dead or unreachable engine actor (ActorDiedError, ...)


class RolloutError(RuntimeError):
    """The pool could not complete a request within its retry budget."""


@dataclass
class SyncReport:
    seconds: float          # wall time of the whole sync, as the trainer waits for it
    engine_seconds: float   # slowest engine's load time
    bytes: int
    buckets: int


def split_evenly(n: int, parts: int) -> list[range]:
    """`parts` contiguous index ranges covering 0..n-1, sizes differing by at most one."""
    base, extra = divmod(n, parts)
    ranges, start = [], 0
    for i in range(parts):
        size = base + (i < extra)
        ranges.append(range(start, start + size))
        start += size
    return ranges


class RolloutPool:
    def __init__(self, model_dir: str, cfg: RolloutConfig, adapter_dir: str | None = None, use_gpu: bool = False):
        self.model_dir, self.cfg, self.adapter_dir = str(model_dir), cfg, adapter_dir
        self.kind = resolve_engine_kind(cfg.engine)
        bundle = {"CPU": cfg.cpus_per_engine}
        if use_gpu:
            bundle["GPU"] = cfg.tensor_parallel_size
        self.group = placement_group([dict(bundle) for _ in range(cfg.num_engines)],
                                     strategy=cfg.placement.upper())  # PACK or SPREAD (best effort)
        ray.get(self.group.ready())
        self._resources = {"num_cpus": cfg.cpus_per_engine, "num_gpus": bundle.get("GPU", 0)}
        self._weights: list = []        # ObjectRefs of the last synced buckets
        self.engines = [self._start(i) for i in range(cfg.num_engines)]
        ray.get([e.ready.remote() for e in self.engines])

    def _start(self, index: int):
        actor = ray.remote(**self._resources)(EngineActor).options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index),
            max_concurrency=1)
        return actor.remote(self.kind, self.model_dir, self.cfg, self.adapter_dir)

    def _replace(self, index: int) -> None:
        """A fresh engine in the dead one's bundle, brought to the pool's current weights."""
        try:
            ray.kill(self.engines[index])
        except Exception:  # already gone
            pass
        engine = self._start(index)
        ray.get(engine.ready.remote())
        if self._weights:
            ray.get(engine.update_weights.remote(self._weights))
        self.engines[index] = engine

    def _call_all(self, shards: list[range], method: str, args_for) -> list:
        """Call `method` on engine i with `args_for(shard i)`; re-issue a dead engine's share."""
        refs = {i: getattr(self.engines[i], method).remote(*args_for(shard)) for i, shard in enumerate(shards) if shard}
        results, attempts = {}, {i: 0 for i in refs}
        while refs:
            for i, ref in list(refs.items()):
                try:
                    results[i] = ray.get(ref)
                    del refs[i]
                except ENGINE_LOST as exc:
                    attempts[i] += 1
                    if attempts[i] > self.cfg.max_retries:
                        raise RolloutError(f"engine {i} failed {attempts[i]} times: {exc}") from exc
                    self._replace(i)
                    refs[i] = getattr(self.engines[i], method).remote(*args_for(shards[i]))
        return [results.get(i, []) for i in range(len(shards))]

    def _broadcast(self, method: str, *args) -> list:
        """The same call on every engine (with the same replacement rules)."""
        return self._call_all([range(1)] * len(self.engines), method, lambda _: args)

    def generate(self, prompts: list[PromptInput], sampling: Sampling) -> list[list[Generation]]:
        """`sampling.n` generations per prompt, in input order, spread over the engines."""
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

    def sync_weights(self, state_dict: dict) -> SyncReport:
        """Push (a subset of) the model's tensors to every engine."""
        from rollout.weight_sync import pack_state

        start = time.perf_counter()
        buckets = pack_state(state_dict, self.cfg.sync_bucket_mb)
        self._weights = [ray.put(b) for b in buckets]
        engine_seconds = self._broadcast("update_weights", self._weights)
        return SyncReport(time.perf_counter() - start, max(engine_seconds), sum(len(b) for b in buckets), len(buckets))

    def sync_adapter(self, adapter_dir: str) -> int:
        """Serve a new LoRA adapter version on every engine (a path all engines can read)."""
        self.adapter_dir = str(adapter_dir)
        versions = self._broadcast("load_adapter", self.adapter_dir)
        return max(versions)

    def verify(self, prompt_ids: list[list[int]], response_ids: list[list[int]],
               trainer_logprobs: list[list[float]]) -> float:
        """Max |log-prob| difference between the engines and the trainer on the same tokens."""
        engine = self.score(prompt_ids, response_ids)
        return max((abs(a - b) for row_e, row_t in zip(engine, trainer_logprobs) for a, b in zip(row_e, row_t)),
                   default=0.0)

    def shutdown(self) -> None:
        for engine in self.engines:
            ray.kill(engine)
        remove_placement_group(self.group)
