"""The GRPO benchmark's clock, the same for every side: when each step ended with the time
spent on held-out evaluation taken out, the steady-state rates read from those ends, and
the training time until the held-out reward first reached its target.

Both sides evaluate greedily on the same held-out prompts every few steps, each with its
own generator (rayft on its engine, TRL with transformers `generate`); that time is left
out, so neither is charged for measuring.
"""

from __future__ import annotations

import statistics


def without_pauses(ends: dict[int, float], pauses: list[tuple[float, float]]) -> dict[int, float]:
    """Step ends on a clock that stops during each pause (start time, seconds): an end
    moves back by every pause that began before it."""
    return {step: end - sum(seconds for start, seconds in pauses if start < end) for step, end in ends.items()}


def steady_rates(step_ends: dict[int, float], warmup: int, total: int) -> dict:
    """Steps per minute after step `warmup` up to step `total`, from the median step and
    from the mean (`step_ends`: step number -> the time it ended, in seconds)."""
    missing = [s for s in range(warmup, total + 1) if s not in step_ends]
    if missing:
        raise RuntimeError(f"no end time for step {missing[0]} (seen: {sorted(step_ends)})")
    durations = [step_ends[s] - step_ends[s - 1] for s in range(warmup + 1, total + 1)]
    return {"steps_per_min_median": 60.0 / statistics.median(durations),
            "steps_per_min_mean": 60.0 * (total - warmup) / (step_ends[total] - step_ends[warmup])}


def time_to_target(step_ends: dict[int, float], evals: dict[int, float], target: float) -> dict:
    """The first step after which the held-out reward was at least `target`, and the
    seconds from the end of step 0 (training about to start) to the end of that step; both
    None when the target was never reached."""
    reached = [step for step in sorted(evals) if step > 0 and evals[step] >= target]
    if not reached:
        return {"target_step": None, "time_to_target_s": None}
    return {"target_step": reached[0], "time_to_target_s": step_ends[reached[0]] - step_ends[0]}


def step_seconds(step_ends: dict[int, float]) -> list[float]:
    """Each step's duration after the first (for reading how steady the steady state was)."""
    steps = sorted(step_ends)
    return [round(step_ends[b] - step_ends[a], 3) for a, b in zip(steps, steps[1:])]


def mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None
