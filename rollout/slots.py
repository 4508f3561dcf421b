"""Actor slots: the mechanics every owner of long-lived actors shares (the rollout pool's
engines, the reward actors, the teacher). A slot holds one actor and a generation number;
`Slots.replace` starts a new actor in a dead one's slot once, however many callers saw it
die (a caller names the generation it saw; a newer one means someone replaced it already),
and brings it up (ready, then e.g. the last synced weights) before anyone can use it.
`Gathering` sends each slot its share of a batch and re-issues a dead actor's share on
its replacement, a bounded number of times. Every wait has a timeout."""

from __future__ import annotations

import threading
import time
from typing import Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError

ACTOR_LOST = RayActorError  # a dead or unreachable actor (ActorDiedError, ActorUnavailableError, ...)


def split_evenly(n: int, parts: int) -> list[range]:
    """`parts` contiguous index ranges covering 0..n-1, sizes differing by at most one."""
    base, extra = divmod(n, parts)
    ranges, start = [], 0
    for i in range(parts):
        size = base + (i < extra)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def kill_quietly(handle) -> None:
    try:
        ray.kill(handle)
    except Exception:  # noqa: BLE001 (already gone)
        pass


class Slots:
    """`count` actors made by `start(index)` (a handle, not yet waited on), each brought up by
    `bring_up(handle, timeout_s)` (default: its `ready` call). Thread-safe: owner actors run
    several callers at once."""

    def __init__(self, start: Callable, count: int, role: str, error: type[Exception], timeout_s: float,
                 tries: int, bring_up: Callable | None = None):
        self.start, self.role, self.error, self.timeout_s = start, role, error, timeout_s
        self.tries = max(1, tries)
        self.bring_up = bring_up or (lambda handle, timeout: ray.get(handle.ready.remote(), timeout=timeout))
        # Held while a slot is replaced (and by owners while they change what a new actor
        # must be brought to, e.g. the synced weights): re-entrant for a replacement inside.
        self.lock = threading.RLock()
        handles = [start(i) for i in range(count)]
        try:
            for i, handle in enumerate(handles):
                self._bring_up(i, handle)
        except BaseException:
            for handle in handles:
                kill_quietly(handle)
            raise
        self.slots = [(handle, 0) for handle in handles]

    def __len__(self) -> int:
        return len(self.slots)

    def current(self, index: int) -> tuple:
        """(handle, generation) of slot `index` (a tuple read: no lock needed)."""
        return self.slots[index]

    def handles(self) -> list:
        return [handle for handle, _ in self.slots]

    def _bring_up(self, index: int, handle) -> None:
        try:
            self.bring_up(handle, self.timeout_s)
        except GetTimeoutError:
            raise self.error(f"{self.role} {index} did not start within {self.timeout_s} s") from None

    def replace(self, index: int, seen: int, why: str) -> tuple:
        """A working actor in slot `index` whose generation is newer than `seen`."""
        with self.lock:
            handle, generation = self.slots[index]
            if generation != seen:
                return self.slots[index]  # another caller replaced it meanwhile
            kill_quietly(handle)
            failures = []
            for _ in range(self.tries):
                new = self.start(index)
                try:
                    self._bring_up(index, new)
                except (ACTOR_LOST, self.error) as exc:  # a start that failed: try again, a bounded number of times
                    kill_quietly(new)
                    failures.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}")
                    continue
                self.slots[index] = (new, generation + 1)
                return self.slots[index]
            raise self.error(f"{self.role} {index} was lost ({why}) and could not be replaced in {self.tries} "
                             f"tries: {'; '.join(failures)}")

    def stop(self) -> None:
        for handle in self.handles():
            kill_quietly(handle)


class Gathering:
    """`issue(handle, shard)` (an ObjectRef) sent to slot i's actor for each non-empty shard
    i when made; `wait` gives the results in shard order ([] for an empty shard). Made and
    waited on apart, the shares run while the caller does something else. `current(i)`
    gives (handle, generation) of slot i, `replace(i, generation, why)` a replacement. A
    lost actor's share is re-issued on its replacement up to `max_retries` times, then
    `error` names the slot and why. A share that takes longer than `timeout_s` (from its
    sending or the start of `wait`, whichever is later) is treated as lost with on_timeout="replace" (the actor is hung), or raises
    `error` with on_timeout="raise"."""

    def __init__(self, current: Callable, replace: Callable, shards: list, issue: Callable, *, role: str,
                 error: type[Exception], timeout_s: float, max_retries: int, on_timeout: str = "replace"):
        self.current, self.replace, self.shards, self.issue = current, replace, shards, issue
        self.role, self.error, self.timeout_s, self.max_retries, self.on_timeout = (
            role, error, timeout_s, max_retries, on_timeout)
        self.pending: dict = {}   # ref -> (slot, generation, deadline)
        self.failures = {i: 0 for i, shard in enumerate(shards) if shard}
        for i in self.failures:
            self._send(i, *current(i))

    def _send(self, i: int, handle, generation: int) -> None:
        self.pending[self.issue(handle, self.shards[i])] = (i, generation, time.monotonic() + self.timeout_s)

    def wait(self) -> list:
        """The results; a share's `timeout_s` counts from here for shares sent before (an
        engine serves its calls in turn, so a share sent early may wait behind others)."""
        pending, results, timeout_s = self.pending, {}, self.timeout_s
        start = time.monotonic()
        for ref, (i, generation, deadline) in pending.items():
            pending[ref] = (i, generation, max(deadline, start + timeout_s))
        while pending:
            soonest = min(deadline for _, _, deadline in pending.values())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, soonest - time.monotonic()))
            lost = []
            for ref in ready:
                i, generation, _ = pending.pop(ref)
                try:
                    results[i] = ray.get(ref, timeout=timeout_s)
                except ACTOR_LOST as exc:
                    lost.append((i, generation, f"{type(exc).__name__}"))
            now = time.monotonic()
            for ref, (i, generation, deadline) in list(pending.items()):
                if deadline <= now:
                    del pending[ref]
                    if self.on_timeout == "raise":
                        raise self.error(f"{self.role} {i} did not answer within {timeout_s} s")
                    lost.append((i, generation, f"no answer within {timeout_s} s"))
            for i, generation, why in lost:
                self.failures[i] += 1
                if self.failures[i] > self.max_retries:
                    raise self.error(f"{self.role} {i} failed {self.failures[i]} times (last: {why}); giving up "
                                     f"after {self.max_retries} retries")
                self._send(i, *self.replace(i, generation, why))
        return [results.get(i, []) for i in range(len(self.shards))]


def gather(current: Callable, replace: Callable, shards: list, issue: Callable, **options) -> list:
    """Send every shard and wait for the results (`Gathering`, in one call)."""
    return Gathering(current, replace, shards, issue, **options).wait()
