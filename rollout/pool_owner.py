"""The rollout pool's owner: one Ray actor (threaded, so every training worker's calls run
at once) that holds the engine actors, their placement group and the last synced weights.
It is the only place that knows which engine serves which slot: a dead engine is replaced
in its own bundle once, however many callers saw it die, and loads the last synced weights
(and serves the pool's adapter) before it serves again. Callers reach it through
`rollout.pool.RolloutPool`, which bounds every wait.

Generation can be sent and collected apart (`submit`, then `result`), so a trainer can
train while the engines generate its next steps. Each engine runs its calls one at a time
in the order this owner sent them: a sync sent after a request reaches an engine after
that request, and every generation records the sync version it was served at."""

from __future__ import annotations

import itertools
import threading

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rollout.config import RolloutConfig
from rollout.engine import Generation, PromptInput, Sampling
from rollout.engine_actor import EngineActor, resolve_engine_kind
from rollout.slots import Gathering, Slots, split_evenly


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
        # (tensor names, ref, their fingerprints), in order, less those a later sync wholly
        # overwrote: replayed on a replacement engine they give it exactly what the live
        # engines hold, at `version`.
        self.weights: list[tuple[frozenset, object, dict]] = []
        self.adapter: tuple | None = None  # the last synced adapter: (ref, adapter config, fingerprint)
        self.version = 0
        self.engines: Slots | None = None
        self.requests: dict[int, tuple[Gathering, list[range]]] = {}  # submitted, not yet collected
        self.tickets, self.requests_lock = itertools.count(1), threading.Lock()
        self.unconfirmed: tuple[Gathering, int, int] | None = None  # the last sync sent: (its shares, tensors, version)

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
            sent = {n: crc for _, _, crcs in self.weights for n, crc in crcs.items()}
            ray.get(engine.update_weights.remote([ref for _, ref, _ in self.weights], self.version, sent,
                                                 "a replacement engine"), timeout=timeout_s)
        if self.adapter:
            ray.get(engine.load_adapter_tensors.remote(*self.adapter[:2], self.version, self.adapter[2],
                                                       "a replacement engine"), timeout=timeout_s)

    def _send(self, shards: list, method: str, args_for) -> Gathering:
        """`method` sent to engine i with `args_for(shard i)`; a dead or hung engine's share is
        re-issued on its replacement while the result is waited for."""
        return Gathering(self.engines.current, self.engines.replace, shards,
                         lambda engine, shard: getattr(engine, method).remote(*args_for(shard)), role="engine",
                         error=RolloutError, timeout_s=self.cfg.timeout_s, max_retries=self.cfg.max_retries)

    def _send_each(self, method: str, args_for) -> Gathering:
        """`method` sent to every engine with `args_for(index)`."""
        return self._send([range(i, i + 1) for i in range(len(self.engines))], method,
                          lambda shard: args_for(shard.start))

    def _each_engine(self, method: str, args_for) -> list:
        """`method` on every engine with `args_for(index)`, waited for."""
        return self._send_each(method, args_for).wait()

    def submit(self, prompts: list[PromptInput], sampling: Sampling) -> int:
        """Send a generation request to the engines now; returns the ticket `result` takes."""
        shards = split_evenly(len(prompts), len(self.engines))
        request = self._send(shards, "generate", lambda shard: ([prompts[k] for k in shard], sampling))
        with self.requests_lock:
            ticket = next(self.tickets)
            self.requests[ticket] = (request, shards)
        return ticket

    def result(self, ticket: int) -> list[list[Generation]]:
        """The generations of a submitted request, in input order (each ticket once)."""
        with self.requests_lock:
            if ticket not in self.requests:
                raise RolloutError(f"no pending generation request {ticket} (collected already, or dropped by "
                                   "a reset of the pool)")
            request, shards = self.requests.pop(ticket)
        out: list[list[Generation]] = []
        for shard, part in zip(shards, request.wait()):
            for group in part:
                for g in group:
                    g.prompt_index += shard.start  # engine-local -> request index
                out.append(group)
        return out

    def generate(self, prompts: list[PromptInput], sampling: Sampling) -> list[list[Generation]]:
        return self.result(self.submit(prompts, sampling))

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        shards = split_evenly(len(prompt_ids), len(self.engines))
        parts = self._send(shards, "score", lambda s: ([prompt_ids[k] for k in s], [response_ids[k] for k in s])).wait()
        return [row for part in parts for row in part]

    def send_weights(self, bucket_refs: list, sent: dict[str, int], version: int | None = None) -> int:
        """Keep a copy of the buckets (the caller's refs die with the caller) and send them to
        every engine as `version` (default: the next), after the requests sent before; each
        engine checks what it loaded against the fingerprint `sent`. Returns the version once
        sent; `confirm_sync` waits for the engines' confirmations."""
        from rollout.weight_sync import payload_names

        self.confirm_sync()  # one sync in flight at most: never one left unchecked
        with self.engines.lock:  # no replacement starts from the previous weights meanwhile
            payloads = [ray.get(ref, timeout=self.cfg.timeout_s) for ref in bucket_refs]
            synced = [(frozenset(names), ray.put(p), {n: sent.get(n) for n in names})
                      for p, names in ((p, payload_names(p)) for p in payloads)]
            covered = frozenset().union(*(names for names, _, _ in synced))
            if covered != set(sent):
                raise RolloutError(f"a weight sync's buckets hold {len(covered)} tensors, its fingerprint "
                                   f"{len(sent)}: {sorted(covered ^ set(sent))[:3]} differ")
            self.version = self.version + 1 if version is None else version
            self.weights = [w for w in self.weights if not w[0] <= covered] + synced
            refs, synced_version = [ref for _, ref, _ in synced], self.version
            self._sent(self._send_each("update_weights", lambda i: (refs, synced_version, sent, f"engine {i}")),
                       len(sent), synced_version)
        return synced_version

    def send_adapter(self, payload: bytes, adapter_config: dict, sent: dict[str, int],
                     version: int | None = None) -> int:
        """Send a LoRA adapter (its tensors as one safetensors payload; Ray resolves a ref
        passed for it) to every engine as `version`, to serve on the unchanged base; engines
        check it against the fingerprint `sent`. Kept for engines that start later. Returns
        the version once sent; `confirm_sync` waits for the confirmations."""
        self.confirm_sync()
        with self.engines.lock:
            self.adapter = (ray.put(payload), adapter_config, sent)
            self.version = self.version + 1 if version is None else version
            ref, synced_version = self.adapter[0], self.version
            self._sent(self._send_each("load_adapter_tensors", lambda i: (
                ref, adapter_config, synced_version, sent, f"engine {i}")), len(sent), synced_version)
        return synced_version

    def _sent(self, gathering: Gathering, tensors: int, version: int) -> None:
        with self.requests_lock:
            self.unconfirmed = (gathering, tensors, version)

    def confirm_sync(self) -> list[dict]:
        """Each engine's confirmation of the last sync sent, once every engine loaded it (a
        lost engine's share re-sent to its replacement); [] when none is waiting. Raises
        `SyncError` naming the engine and the tensors it did not load as sent."""
        with self.requests_lock:
            unconfirmed, self.unconfirmed = self.unconfirmed, None
        if unconfirmed is None:
            return []
        gathering, tensors, version = unconfirmed
        confirmed = gathering.wait()
        for i, confirmation in enumerate(confirmed):
            if confirmation.get("version") != version or confirmation.get("tensors") != tensors:
                raise RolloutError(f"engine {i} confirmed {confirmation} after sync {version} of {tensors} tensors")
        return confirmed

    def reset(self) -> float:
        """Every engine back at the start model (version 0), the kept weights and pending
        requests dropped, so another run can start on this pool; returns the slowest
        engine's load time."""
        with self.engines.lock:
            self.weights, self.adapter, self.version = [], None, 0
            with self.requests_lock:
                self.requests.clear()
                self.unconfirmed = None
            loaded = self._each_engine("load_checkpoint",
                                       lambda _: (self.model_dir, self.cfg.sync_bucket_mb, self.adapter_dir))
        return max(c["seconds"] for c in loaded)

    def engine_handles(self) -> list:
        return self.engines.handles() if self.engines else []

    def generations(self) -> list[int]:
        """How many times each slot's engine was replaced."""
        return [generation for _, generation in self.engines.slots] if self.engines else []

    def shutdown(self) -> None:
        if self.engines is not None:
            self.engines.stop()
        remove_placement_group(self.group)
