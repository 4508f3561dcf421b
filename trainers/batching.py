"""Which samples each worker sees at each step: a seeded per-epoch permutation, sharded
by rank, cut into micro-batches. The position is a pure function of the optimizer step,
so a resumed run sees exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from trainers.errors import UserError


@dataclass(frozen=True)
class StepPlan:
    """How many optimizer steps the run takes and how samples map onto them."""
    num_samples: int
    batch_size: int      # micro-batch per worker
    grad_accum: int
    world_size: int
    total_steps: int

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.samples_per_step


def plan_steps(num_samples: int, batch_size: int, grad_accum: int, world_size: int,
               epochs: float, max_steps: int) -> StepPlan:
    per_step = batch_size * grad_accum * world_size
    if num_samples < per_step:
        raise UserError(
            f"{num_samples} training samples are fewer than one optimizer step needs "
            f"({batch_size} micro-batch x {grad_accum} accumulation x {world_size} workers); "
            "lower train.batch_size or train.grad_accum, or add data")
    per_epoch = num_samples // per_step
    total = max_steps if max_steps > 0 else max(1, math.ceil(epochs * per_epoch))
    return StepPlan(num_samples, batch_size, grad_accum, world_size, total)


class StepBatches:
    """Sample indices of rank `rank` for any optimizer step (every micro-batch of it)."""

    def __init__(self, plan: StepPlan, rank: int, seed: int):
        self.plan, self.rank, self.seed = plan, rank, seed
        self._epoch, self._perm = -1, []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            order = list(range(self.plan.num_samples))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch, self._perm = epoch, order
        return self._perm

    def micro_batches(self, step: int) -> list[list[int]]:
        p = self.plan
        epoch, within = divmod(step, p.steps_per_epoch)
        perm = self._permutation(epoch)
        start = within * p.samples_per_step
        step_ids = perm[start:start + p.samples_per_step]
        # Micro-batch m of every rank comes from one contiguous global slice, so the
        # union over ranks of micro-batch m is the same whatever the accumulation split.
        out = []
        for m in range(p.grad_accum):
            chunk = step_ids[m * p.batch_size * p.world_size:(m + 1) * p.batch_size * p.world_size]
            out.append(chunk[self.rank * p.batch_size:(self.rank + 1) * p.batch_size])
        return out


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """Evaluation indices for `rank`: strided, every sample seen by exactly one rank."""
    return list(range(rank, n, world_size))
