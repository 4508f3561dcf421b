"""The owner of a set of long-lived actors of one role that hold no state of their own
(the reward actors, the teacher): one small Ray actor started by the driver that starts
them, hands out their handles and replaces one that died, once however many training
workers saw it die. `OwnedActors` is the handle callers hold (pickled into every worker);
its `call` sends the shares of a batch straight to the actors (the data never passes
through the owner) and re-issues a lost actor's share on its replacement."""

from __future__ import annotations

from typing import Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from rollout.slots import Slots, gather


class ActorOwner:
    """Ray actor body (threaded); `OwnedActors` creates it and calls `start`."""

    def __init__(self, make: Callable, count: int, role: str, error: type[Exception], start_timeout_s: float,
                 tries: int):
        self.args = (make, count, role, error, start_timeout_s, tries)
        self.slots: Slots | None = None

    def start(self) -> int:
        make, count, role, error, start_timeout_s, tries = self.args
        self.slots = Slots(lambda _: make(), count, role, error, start_timeout_s, tries)
        return count

    def current(self) -> list[tuple]:
        """(handle, generation) of every slot."""
        return list(self.slots.slots)

    def replace(self, index: int, seen: int, why: str) -> tuple:
        return self.slots.replace(index, seen, why)

    def generations(self) -> list[int]:
        """How many times each slot's actor was replaced."""
        return [generation for _, generation in self.slots.slots]

    def stop(self) -> None:
        if self.slots is not None:
            self.slots.stop()


class OwnedActors:
    """`count` actors made by `make()` (a picklable callable returning a new actor handle
    with a `ready` method), owned by one `ActorOwner`. Created on the driver; a pickled copy
    in any process reaches the same actors. `timeout_s` bounds a call's wait for its
    results, `start_timeout_s` an actor's start (and each replacement's)."""

    def __init__(self, make: Callable, count: int, role: str, error: type[Exception], timeout_s: float,
                 max_retries: int, start_timeout_s: float = 600.0):
        self.role, self.error, self.timeout_s, self.max_retries = role, error, timeout_s, max_retries
        self.count, self.start_timeout_s = count, start_timeout_s
        self._slots: list | None = None  # (handle, generation) per slot, as last seen here
        self.owner = ray.remote(ActorOwner).options(num_cpus=0, max_concurrency=16).remote(
            make, count, role, error, start_timeout_s, max_retries)
        try:
            self._wait(self.owner.start.remote(), count * start_timeout_s + 60)
        except BaseException:
            ray.kill(self.owner)
            raise

    def _wait(self, ref, timeout_s: float):
        try:
            return ray.get(ref, timeout=timeout_s)
        except GetTimeoutError:
            raise self.error(f"the owner of the {self.role}s did not answer within {timeout_s:.0f} s") from None
        except RayActorError as exc:
            raise self.error(f"the owner of the {self.role}s is gone ({type(exc).__name__})") from exc

    def handles(self) -> list:
        return [handle for handle, _ in self._wait(self.owner.current.remote(), 60)]

    def call(self, shards: list, issue: Callable, on_timeout: str = "raise") -> list:
        """`issue(handle, shard)` on actor i for each non-empty shard i; results in shard order.
        The handles are asked of the owner once per process and kept: one that another
        process saw die and had replaced fails at once here, and the owner hands out its
        replacement without starting another."""
        if self._slots is None:
            self._slots = self._wait(self.owner.current.remote(), 60)
        slots = self._slots
        # A replacement starts an actor and waits for it (and may try a few times).
        replace_wait = self.start_timeout_s * max(1, self.max_retries) + 60

        def replace(i: int, seen: int, why: str) -> tuple:
            slots[i] = self._wait(self.owner.replace.remote(i, seen, why), replace_wait)
            return slots[i]

        return gather(lambda i: slots[i], replace, shards, issue, role=self.role, error=self.error,
                      timeout_s=self.timeout_s, max_retries=self.max_retries, on_timeout=on_timeout)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slots": None}  # each process asks for the current handles

    def stop(self) -> None:
        try:
            ray.get(self.owner.stop.remote(), timeout=60)
        finally:
            ray.kill(self.owner)
