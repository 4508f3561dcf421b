"""The rollout pool: `num_engines` engine actors behind one handle, in a placement group
(packed onto as few nodes as fit, or one engine per node where possible:
`rollout.placement`). A batch is split across the engines and comes back in input order;
an engine that dies is replaced (at the weights and adapter the pool last synced) and its
share re-issued, so `generate` returns complete results or raises `RolloutError` after a
bounded number of retries. Weight sync sends size-bounded safetensors buckets through the
object store once, and every engine loads them and confirms the sync's version and
fingerprint. A request can be sent (`submit`) and collected (`result`) apart.

The engines, their placement group and the synced weights belong to one owner actor
(`rollout.pool_owner.PoolOwner`). `RolloutPool` is a small handle to it: the driver
creates one, and a copy pickled into each training worker talks to the same owner. Every
wait on the owner has a timeout (`pool_wait_s`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from rollout.config import RolloutConfig
from rollout.engine import Generation, PromptInput, Sampling
from rollout.pool_owner import PoolOwner, RolloutError
from rollout.slots import split_evenly

__all__ = ["RolloutPool", "RolloutError", "SentSync", "SyncReport", "split_evenly", "pool_wait_s"]

MAX_CALLERS = 64  # owner calls served at once (every worker's generate, plus a sync)


@dataclass
class SentSync:
    """A sync sent to the engines, not yet confirmed (`RolloutPool.confirm_sync`)."""
    started: float
    bytes: int
    buckets: int
    version: int


@dataclass
class SyncReport:
    seconds: float          # wall time of the whole sync, as the trainer waits for it
    engine_seconds: float   # slowest engine's load time
    bytes: int
    buckets: int
    version: int            # the weight version every engine confirmed


def pool_wait_s(cfg: RolloutConfig) -> float:
    """The longest a caller waits for one pool call: room for every retry of a share
    (each up to timeout_s) and for every replacement start and weight load before it."""
    retries = max(0, cfg.max_retries)
    return cfg.timeout_s * (1 + retries) * (1 + 2 * max(1, retries)) + 60


class RolloutPool:
    def __init__(self, model_dir: str, cfg: RolloutConfig, adapter_dir: str | None = None, use_gpu: bool = False):
        self.cfg, self.model_dir = cfg, str(model_dir)
        self.owner = ray.remote(PoolOwner).options(num_cpus=0, max_concurrency=MAX_CALLERS).remote(
            str(model_dir), cfg, adapter_dir, use_gpu)
        try:
            self.kind = self._wait(self.owner.start.remote(), "start")
        except BaseException:
            ray.kill(self.owner)
            raise

    def _wait(self, ref, what: str):
        try:
            return ray.get(ref, timeout=pool_wait_s(self.cfg))
        except GetTimeoutError:
            raise RolloutError(f"the rollout pool did not finish {what} within {pool_wait_s(self.cfg):.0f} s "
                               "(rollout.timeout_s bounds each engine call)") from None
        except RayActorError as exc:
            raise RolloutError(f"the rollout pool's owner actor is gone ({type(exc).__name__}) during {what}") from exc

    @property
    def engines(self) -> list:
        """The engine actor handles serving now (for inspection)."""
        return self._wait(self.owner.engine_handles.remote(), "engine_handles")

    def generate(self, prompts: list[PromptInput], sampling: Sampling) -> list[list[Generation]]:
        """`sampling.n` generations per prompt, in input order, spread over the engines."""
        return self._wait(self.owner.generate.remote(prompts, sampling), "generate")

    def submit(self, prompts: list[PromptInput], sampling: Sampling) -> int:
        """Send a generation request to the engines and return once it is sent (a ticket for
        `result`): a sync made after this returns reaches every engine after the request."""
        return self._wait(self.owner.submit.remote(prompts, sampling), "submit")

    def result(self, ticket: int) -> list[list[Generation]]:
        """The generations of a `submit`ted request, as `generate` returns them."""
        return self._wait(self.owner.result.remote(ticket), "result")

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        return self._wait(self.owner.score.remote(prompt_ids, response_ids), "score")

    def sync_weights(self, state_dict: dict, version: int | None = None) -> SyncReport:
        """Push (a subset of) the model's tensors to every engine as weight version `version`
        (default: the pool's next); the pool keeps them for engines that start later. Every
        engine confirms the version and the fingerprint of what it loaded, or the call
        raises (`SyncError` naming the engine and the tensors, or `RolloutError`)."""
        return self.confirm_sync(self.send_weights(state_dict, version))

    def sync_adapter(self, tensors: dict, adapter_config: dict, version: int | None = None) -> SyncReport:
        """Serve a LoRA adapter on every engine as weight version `version`, the base left as
        it is: only the adapter's tensors travel (peft's names, as in adapter_model.safetensors,
        with `adapter_config` as in adapter_config.json). Needs engines started with
        `enable_lora`; confirmed like `sync_weights`."""
        return self.confirm_sync(self.send_adapter(tensors, adapter_config, version))

    def send_weights(self, state_dict: dict, version: int | None = None) -> SentSync:
        """`sync_weights` without waiting for the engines: returns once every engine has the
        sync queued after the requests sent before it (a request sent after this returns is
        served at the new weights). `confirm_sync` waits for the engines and checks them."""
        from rollout.weight_sync import fingerprint, pack_state

        start = time.perf_counter()
        sent = fingerprint(state_dict)
        buckets = pack_state(state_dict, self.cfg.sync_bucket_mb)
        sizes = [len(b) for b in buckets]
        refs = [ray.put(buckets.pop(0)) for _ in range(len(buckets))]
        version = self._wait(self.owner.send_weights.remote(refs, sent, version), "send_weights")
        return SentSync(start, sum(sizes), len(sizes), version)

    def send_adapter(self, tensors: dict, adapter_config: dict, version: int | None = None) -> SentSync:
        """`sync_adapter` without waiting for the engines, as `send_weights`."""
        from safetensors.torch import save

        from rollout.weight_sync import fingerprint

        start = time.perf_counter()
        sent = fingerprint(tensors)
        payload = save({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()})
        version = self._wait(self.owner.send_adapter.remote(ray.put(payload), adapter_config, sent, version),
                             "send_adapter")
        return SentSync(start, len(payload), 1, version)

    def confirm_sync(self, sync: SentSync) -> SyncReport:
        """Wait until every engine confirmed `sync` (the last one sent): its report."""
        confirmed = self._wait(self.owner.confirm_sync.remote(), "confirm_sync")
        if not confirmed or confirmed[0]["version"] != sync.version:
            raise RolloutError(f"sync {sync.version} was not confirmed (the pool was reset, or a later sync "
                               "was sent meanwhile)")
        return SyncReport(time.perf_counter() - sync.started, max(c["seconds"] for c in confirmed), sync.bytes,
                          sync.buckets, sync.version)

    def reset(self) -> float:
        """Back to the start model on every engine (for another run on this pool); returns
        the slowest engine's load time."""
        return self._wait(self.owner.reset.remote(), "reset")

    def verify(self, prompt_ids: list[list[int]], response_ids: list[list[int]],
               trainer_logprobs: list[list[float]]) -> float:
        """Max |log-prob| difference between the engines and the trainer on the same tokens."""
        engine = self.score(prompt_ids, response_ids)
        return max((abs(a - b) for row_e, row_t in zip(engine, trainer_logprobs) for a, b in zip(row_e, row_t)),
                   default=0.0)

    def shutdown(self) -> None:
        try:
            ray.get(self.owner.shutdown.remote(), timeout=60)
        finally:
            ray.kill(self.owner)
