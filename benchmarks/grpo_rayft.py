"""rayft's side of the GRPO benchmark: its `grpo` method (a Ray Train worker, a vLLM
engine actor and a reward actor) run as a user would, timed from the outside by the
moments its rows appear in the run's metrics.jsonl (polled every 20 ms)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from benchmarks.common import Timer
from benchmarks.grpo_clock import mean, steady_rates, step_seconds, time_to_target, without_pauses
from benchmarks.memory import PeakMemory
from cluster.progress import MetricsFollower

# rayft's processes of a GRPO run: the training worker, the engine (actor and vLLM's engine
# core) and the reward actor.
RUN_ROLES = ("ray::RayTrainWorker", "ray::EngineActor", "ray::RewardActor", "VLLM::")


class MetricsWatcher(threading.Thread):
    """Notes when each step row (step 0: the start model's evaluation) first appears in a
    growing metrics.jsonl."""

    def __init__(self, path: Path, interval: float = 0.02):
        super().__init__(daemon=True)
        self.follower, self.interval, self.ends = MetricsFollower(path), interval, {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        now = time.perf_counter()
        for row in self.follower.rows():
            if "event" not in row and "step" in row:
                self.ends.setdefault(row["step"], now)

    def stop(self) -> None:
        self.done.set()
        self.join()
        self.poll()


def rayft_config(w, data: dict[str, Path], max_staleness: int, workdir: Path):
    """The run a user would write for workload `w` (see benchmarks.grpo.Workload)."""
    from cluster.config import JobConfig, from_dict

    config = from_dict(JobConfig, {
        "method": "grpo", "name": f"grpo-{w.name}-k{max_staleness}", "output_dir": str(workdir / "runs"),
        "model": {"path": str(data["model"])},
        "data": {"train": [str(data["train"])], "eval": [str(data["eval"])] if w.eval_every else [],
                 "eval_fraction": 0.0},
        "algo": {"prompts_per_step": w.prompts, "samples_per_prompt": w.samples, "max_new_tokens": w.new_tokens,
                 "temperature": w.temperature, "top_p": 1.0, "estimator": "grpo", "kl_coef": 0.0,
                 "ppo_epochs": 1, "mini_batches": 1, "clip_eps": 0.2, "aggregation": "token",
                 "eval_prompts": w.eval_prompts if w.eval_every else 0},
        "rollout": {"engine": "vllm", "num_engines": 1, "max_staleness": max_staleness},
        "rewards": {"rewards": [{"fn": "exact_match"}]},
        "train": {"max_steps": w.total_steps, "lr": w.lr, "scheduler": "constant", "warmup_ratio": 0.0,
                  "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": w.seed, "log_every": 1,
                  "eval_every": w.eval_every},
        "cluster": {"num_workers": 1, "device": "cpu"},
    })
    config.validate()
    return config


def run_rayft(w, data: dict[str, Path], max_staleness: int, workdir: Path) -> dict:
    """rayft's grpo method on workload `w`, one training worker and one vLLM engine."""
    import ray

    from cluster.train import run_training

    config = rayft_config(w, data, max_staleness, workdir)
    watcher = MetricsWatcher(config.run_dir / "metrics.jsonl")
    watcher.start()
    try:
        with Timer() as wall, PeakMemory() as memory:
            summary = run_training(config, echo=lambda *_: None)
    finally:
        watcher.stop()
        ray.shutdown()
    processes = {name: peak for name, peak in memory.peaks().items() if name.startswith(RUN_ROLES)}
    rows = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "event" not in r and "step" in r]
    # An evaluation runs inside the step whose row carries it, just before that row is written.
    pauses = [(watcher.ends[r["step"]] - r["eval_s"], r["eval_s"]) for r in rows if "eval_s" in r]
    ends = without_pauses(watcher.ends, pauses)
    evals = {r["step"]: r["eval_reward"] for r in rows if "eval_reward" in r}
    measured = [r for r in rows if r["step"] > w.warmup and "step_s" in r]
    phases = {key: mean(r.get(key) for r in measured) for key in ("generate_s", "score_s", "train_s", "sync_s",
                                                                  "step_s")}
    return {**steady_rates(ends, w.warmup, w.total_steps), **time_to_target(ends, evals, w.target),
            "wall_s": wall.seconds, "step_seconds": step_seconds(ends), "evals": evals,
            "eval_s": sum(seconds for _, seconds in pauses), "max_staleness": max_staleness,
            "mean_reward": mean(r.get("reward_mean") for r in measured),
            "mean_response_tokens": mean(r.get("response_length") for r in measured),
            "mean_phase_s": phases, "summary_wall_s": summary.get("wall_time_s"), "load_avg": os.getloadavg(),
            "peak_rss_mb": {"processes": processes, "total": sum(processes.values()),
                            "training_workers": summary.get("peak_rss_mb_per_worker")}}
