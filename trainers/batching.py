"""Which samples each worker sees at each step: a seeded per-epoch permutation, sharded
by rank, cut into micro-batches. The position is a pure function of the optimizer step,
so a resumed run sees exactly the batches an uninterrupted one would have seen.

With sample lengths given, each step's samples are regrouped by length before they are
dealt out: micro-batches hold samples of similar length (less padding), and each worker
gets a mix of long and short micro-batches (balanced work). The step's set of samples,
and so its update (the loss is normalised over the whole step), is unchanged.
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

    def __init__(self, plan: StepPlan, rank: int, seed: int, lengths: list[int] | None = None):
        self.plan, self.rank, self.seed, self.lengths = plan, rank, seed, lengths
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
        if self.lengths is not None:
            return self._grouped_by_length(step_ids)
        # Micro-batch m of every rank comes from one contiguous global slice, so the
        # union over ranks of micro-batch m is the same whatever the accumulation split.
        out = []
        for m in range(p.grad_accum):
            chunk = step_ids[m * p.batch_size * p.world_size:(m + 1) * p.batch_size * p.world_size]
            out.append(chunk[self.rank * p.batch_size:(self.rank + 1) * p.batch_size])
        return out

    def _grouped_by_length(self, step_ids: list[int]) -> list[list[int]]:
        """Longest first, cut into micro-batches, dealt to workers in snake order (0 1 1 0
        0 1 ...), so every worker's longest and shortest micro-batches pair up."""
        p = self.plan
        ordered = sorted(step_ids, key=lambda i: (-self.lengths[i], i))
        chunks = [ordered[k * p.batch_size:(k + 1) * p.batch_size] for k in range(p.grad_accum * p.world_size)]
        mine = []
        for k, chunk in enumerate(chunks):
            turn, slot = divmod(k, p.world_size)
            if (slot if turn % 2 == 0 else p.world_size - 1 - slot) == self.rank:
                mine.append(chunk)
        return mine


def sample_length(sample) -> int | None:
    """Padded length a sample takes in a batch: tokens of an `Example`, the longer side of
    a preference pair, the tokens of a scored or labelled sample; None when unknown."""
    if hasattr(sample, "input_ids"):
        return len(sample.input_ids)
    if hasattr(sample, "chosen") and hasattr(sample, "rejected"):
        return max(len(sample.chosen.input_ids), len(sample.rejected.input_ids))
    inner = getattr(sample, "example", None)
    return len(inner.input_ids) if inner is not None and hasattr(inner, "input_ids") else None


def length_table(samples: list) -> list[int] | None:
    """Every sample's length, or None if any is unknown (then no grouping). A sequence
    that knows its lengths without reading its samples (`streaming.ArrowExamples`) says so."""
    if hasattr(samples, "lengths"):
        return samples.lengths()
    lengths = [sample_length(s) for s in samples]
    return None if any(n is None for n in lengths) else lengths


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """Evaluation indices for `rank`: strided, every sample seen by exactly one rank."""
    return list(range(rank, n, world_size))
