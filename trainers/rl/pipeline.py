"""Pipelined rollouts (`rollout.max_staleness` = k >= 1): the engines generate the samples
of the next k steps while the trainer trains on the current one.

The schedule is fixed, so a run is reproducible and a resumed run equals an uninterrupted
one: the request for step t + k is sent at the start of step t, when the engines hold the
weights of t updates (version t), and every engine serves its calls in the order the pool's
owner sent them, so the sync that ends step t reaches each engine after that request.
Step t thus trains on samples of version max(0, t - k): never more than k updates old
(an engine replaced mid-request serves newer weights, which only lowers the staleness).
Each step's generations carry the version that served them, and a step whose samples are
older than k versions fails rather than train on them.

A checkpoint holds the requests in flight (their generations, waited for), one file per
rank, so a resumed run trains on the same samples an uninterrupted one would."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from rollout.engine import Generation

FILE = "rollouts_rank{rank}.json"


class RolloutPipeline:
    def __init__(self, collector, staleness: int, total_steps: int, records_for: Callable[[int], list]):
        self.collector, self.staleness, self.total_steps = collector, staleness, total_steps
        self.records_for = records_for
        self.tickets: dict[int, int] = {}                      # step -> pool ticket, in flight
        self.ready: dict[int, list[list[Generation]]] = {}     # step -> generations, collected

    def fill(self, step: int) -> None:
        """Send the requests of steps `step` .. `step + k` not sent yet (at the start of a
        run all of them, at the weights the engines hold; later only step + k)."""
        for ahead in range(step, min(step + self.staleness, self.total_steps - 1) + 1):
            if ahead not in self.tickets and ahead not in self.ready:
                self.tickets[ahead] = self.collector.submit(self.records_for(ahead), ahead)

    def take(self, step: int) -> list[list[Generation]]:
        """Step `step`'s generations, after checking they are at most k versions old."""
        groups = self.ready.pop(step) if step in self.ready else self.collector.result(self.tickets.pop(step))
        oldest = min(g.policy_version for group in groups for g in group)
        if oldest < step - self.staleness:
            raise RuntimeError(f"step {step + 1} got samples of weight version {oldest}, more than "
                               f"rollout.max_staleness={self.staleness} updates old")
        return groups

    # -- checkpoint ---------------------------------------------------------------------

    def save(self, directory: Path, rank: int) -> None:
        """Wait for every request in flight and write all not yet trained on."""
        for step in sorted(self.tickets):
            self.ready[step] = self.collector.result(self.tickets.pop(step))
        rows = {str(step): [[asdict(g) for g in group] for group in groups] for step, groups in self.ready.items()}
        (directory / FILE.format(rank=rank)).write_text(json.dumps(rows))

    def restore(self, directory: Path, rank: int) -> None:
        path = directory / FILE.format(rank=rank)
        if path.exists():
            rows = json.loads(path.read_text())
            self.ready = {int(step): [[Generation(**g) for g in group] for group in groups]
                          for step, groups in rows.items()}
