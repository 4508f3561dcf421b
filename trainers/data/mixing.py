"""Seeded train/eval splitting and weighted mixing of several sources.

Both are pure functions of their inputs and seed: the same data and seed give the same
split and the same mixed order on every worker and every restart.
"""

from __future__ import annotations

import random
from typing import Optional, Sequence, TypeVar

T = TypeVar("T")


def split(records: Sequence[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, eval) after a seeded shuffle; eval has round(n * fraction) items, at least
    one when the fraction is positive and there are two or more records."""
    items = list(records)
    random.Random(seed).shuffle(items)
    n_eval = round(len(items) * eval_fraction)
    if eval_fraction > 0 and len(items) >= 2:
        n_eval = min(max(n_eval, 1), len(items) - 1)  # never leave train empty
    return items[n_eval:], items[:n_eval]


def shares(weights: Sequence[float], total: int) -> list[int]:
    """`total` split in proportion to `weights`, as integers summing to `total` (largest remainder)."""
    exact = [w / sum(weights) * total for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mix(groups: list[tuple[Sequence[T], float]], seed: int, total: Optional[int] = None) -> list[T]:
    """Items drawn from each (items, weight) group in proportion to its weight, shuffled.

    `total` defaults to the sum of the group sizes. A group asked for no more than it has
    gives distinct items; an upsampled group gives every item the same number of times
    (give or take one), which repeats no item more than needed.
    """
    if any(w <= 0 for _, w in groups):
        raise ValueError("mixing weights must be > 0")
    if any(len(items) == 0 for items, _ in groups):
        raise ValueError("cannot mix an empty group")
    rng = random.Random(seed)
    total = sum(len(items) for items, _ in groups) if total is None else total
    mixed: list[T] = []
    for (items, _), count in zip(groups, shares([w for _, w in groups], total)):
        copies, rest = divmod(count, len(items))
        mixed += list(items) * copies + rng.sample(list(items), rest)
    rng.shuffle(mixed)
    return mixed


def mix_with_replay(groups: list, replay: list, ratio: float, seed: int) -> list:
    """Mix the training groups by weight; with replay, the replay groups make up `ratio`
    of the result and the training groups keep all their rows (the epoch grows)."""
    if not replay or ratio <= 0:
        return mix(groups, seed)
    main_total = sum(len(items) for items, _ in groups)
    main_weight, replay_weight = sum(w for _, w in groups), sum(w for _, w in replay)
    weighted = ([(items, w / main_weight * (1 - ratio)) for items, w in groups]
                + [(items, w / replay_weight * ratio) for items, w in replay])
    return mix(weighted, seed, total=mixed_total(main_total, ratio))


def mixed_total(main_total: int, replay_ratio: float) -> int:
    """Items in an epoch of `main_total` training items with `replay_ratio` replayed on top."""
    return round(main_total / (1 - replay_ratio)) if replay_ratio > 0 else main_total
