"""GRPO training speed: rayft's `grpo` method (a Ray Train worker, a vLLM engine actor and
a reward actor) against TRL's `GRPOTrainer` (transformers `generate` in one process), on
the same local model, prompts, reward and settings, as steady-state steps per minute.

    python -m benchmarks grpo [--preset tiny] [--steps 100] [--warmup 2] [--prompts 8]
                              [--samples 4] [--new-tokens 32] [--trl-threads 0] [--max-staleness 1]
                              [--reference-only]

One step on both sides: draw `prompts` chat prompts of the synthetic task, sample
`samples` responses each (temperature 1, at most `new-tokens` tokens), score them with
exact match against the row's reference, group-normalise the rewards (GRPO), and take one
optimizer step on all of them (no KL term, no reference model, one pass). TRL's torch runs
on every core, as a user runs it (`--trl-threads 1` holds it to one thread, as Ray runs
that of rayft's training worker). rayft generates the next step's samples while it trains
(`rollout.max_staleness` 1, with its default truncated importance-sampling correction;
`--max-staleness 0` generates and trains in turn, as TRL does).

Steady state, the same for both, leaves out model loading, Ray and engine start-up and
the first `warmup` steps' one-off costs (vLLM's warm-up, allocator growth), two ways:
the median step (60 / the median duration of the steps after `warmup`), which stays put
when other processes share the machine's cores, and the mean (the steps after `warmup`
over the wall time from the end of step `warmup` to the end of the last), which counts
every stall. The wall time with start-up is reported beside them.
rayft's step ends are the moments its step rows appear in the run's metrics.jsonl
(polled every 20 ms); TRL's come from a trainer callback's `on_step_end`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import CACHE, Timer, bench_model, run_child, update_performance_doc, write_result
from benchmarks.hf_reference import child_main, quiet_trainer, step_clock
from cluster.progress import MetricsFollower
from benchmarks.memory import PeakMemory

# rayft's processes of a GRPO run: the training worker, the engine (actor and vLLM's engine
# core) and the reward actor.
RUN_ROLES = ("ray::RayTrainWorker", "ray::EngineActor", "ray::RewardActor", "VLLM::")

# What the two sides do differently although the settings match.
DIFFERENCES = [
    "neither side runs a separate scoring pass with one pass and one mini-batch: both take the "
    "rollout log-probs from the update's own forward (importance ratio exactly 1)",
    "rayft samples with vLLM in an engine actor and pushes the new weights to it every step; TRL calls "
    "transformers generate in the training process, where the weights already are",
    "rayft's training worker, engine and reward actor each reserve 1 CPU (Ray runs their torch on 1 thread); "
    "TRL's one process runs torch on settings.trl_threads threads (0: every core)",
    "TRL loss_type dapo (token losses averaged over every response token of the batch) is rayft's "
    "aggregation token with one mini-batch",
]


@dataclass
class Settings:
    preset: str = "tiny"           # trainers.models preset of the policy
    pretrain_steps: int = 200      # so the policy writes short answers and stops at end of turn
    task: str = "addition"         # trainers.data.synth task of the prompts
    steps: int = 100               # measured steps (after the warm-up)
    warmup: int = 2                # steps left out of the steady-state time
    prompts: int = 8               # prompts per step
    samples: int = 4               # responses per prompt (the GRPO group)
    new_tokens: int = 32           # longest response
    temperature: float = 1.0
    lr: float = 1e-5
    seed: int = 0
    # torch threads of TRL's process: 0 = every core, as a user runs it; 1 matches rayft's
    # training worker (1 CPU, so Ray runs its torch on 1 thread)
    trl_threads: int = 0
    # rayft's rollout.max_staleness: 1 generates the next step's samples while the trainer
    # trains (what a user after speed runs); 0 = generate and train in turn
    max_staleness: int = 1

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


def steady_rates(step_ends: dict[int, float], warmup: int, total: int) -> dict:
    """Steps per minute after step `warmup` up to step `total`, from the median step and
    from the mean (`step_ends`: step number -> the time it ended, in seconds)."""
    missing = [s for s in range(warmup, total + 1) if s not in step_ends]
    if missing:
        raise RuntimeError(f"no end time for step {missing[0]} (seen: {sorted(step_ends)})")
    durations = [step_ends[s] - step_ends[s - 1] for s in range(warmup + 1, total + 1)]
    return {"steps_per_min_median": 60.0 / statistics.median(durations),
            "steps_per_min_mean": 60.0 * (total - warmup) / (step_ends[total] - step_ends[warmup])}


def step_seconds(step_ends: dict[int, float]) -> list[float]:
    """Each step's duration after the first (for reading how steady the steady state was)."""
    steps = sorted(step_ends)
    return [round(step_ends[b] - step_ends[a], 3) for a, b in zip(steps, steps[1:])]


def mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def trl_reward(completions, reference, **_) -> list[float]:
    """rayft's built-in exact_match in TRL's reward signature (conversational completions)."""
    from rollout.reward_rules import exact_match

    return [exact_match("", c[-1]["content"], ref, {}) for c, ref in zip(completions, reference)]


def run_reference(model_dir: Path, rows: list[dict], s: Settings, workdir: Path) -> dict:
    """TRL's GRPOTrainer on CPU with transformers generation, matched to rayft's step."""
    import warnings

    import torch
    from datasets import Dataset

    with warnings.catch_warnings():  # TRL warns about the vLLM version even when it does not use vLLM
        warnings.filterwarnings("ignore", message="TRL currently supports vLLM")
        import trl
        from trl import GRPOConfig, GRPOTrainer

    from trainers.models import load_causal_lm, load_tokenizer

    dataset = Dataset.from_list([{"prompt": row["messages"][:1], "reference": row["reference"]} for row in rows])
    clock = step_clock()
    args = GRPOConfig(
        output_dir=str(workdir / "trl"), max_steps=s.total_steps, seed=s.seed,
        # One generation batch per optimizer step: P prompts x G samples, one pass, no accumulation.
        per_device_train_batch_size=s.prompts * s.samples, gradient_accumulation_steps=1, num_iterations=1,
        num_generations=s.samples, max_completion_length=s.new_tokens, temperature=s.temperature,
        top_p=1.0, top_k=0,
        learning_rate=s.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.0, epsilon=0.2, scale_rewards="group", loss_type="dapo",  # dapo: mean over every response token
        # TRL's own defaults (bf16, gradient checkpointing) differ from rayft's CPU defaults.
        bf16=False, gradient_checkpointing=False, use_cpu=True, use_vllm=False,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    trainer = quiet_trainer(GRPOTrainer(model=load_causal_lm(model_dir), reward_funcs=trl_reward, args=args,
                                        train_dataset=dataset, processing_class=load_tokenizer(model_dir),
                                        callbacks=[clock]))
    with Timer() as wall:
        trainer.train()
    ends = {step: end for step, end, _ in clock.ends}
    measured = [h for h in trainer.state.log_history if s.warmup < h.get("step", 0) and "reward" in h]
    return {**steady_rates(ends, s.warmup, s.total_steps), "wall_s": wall.seconds,
            "step_seconds": step_seconds(ends),
            "mean_reward": mean(h["reward"] for h in measured),
            "mean_response_tokens": mean(h.get("completions/mean_length") for h in measured),
            "mean_step_time_s": mean(h.get("step_time") for h in measured), "load_avg": os.getloadavg(),
            "trl": trl.__version__, "generation": "transformers generate (use_vllm=False)",
            "torch_threads": torch.get_num_threads(), "loss_type": args.loss_type}


class MetricsWatcher(threading.Thread):
    """Notes when each step row first appears in a growing metrics.jsonl."""

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
            if "event" not in row and row.get("step", 0) > 0:
                self.ends.setdefault(row["step"], now)

    def stop(self) -> None:
        self.done.set()
        self.join()
        self.poll()


def rayft_config(model_dir: Path, data_path: Path, s: Settings, workdir: Path):
    from cluster.config import JobConfig, from_dict

    config = from_dict(JobConfig, {
        "method": "grpo", "name": "grpo-bench", "output_dir": str(workdir / "runs"),
        "model": {"path": str(model_dir)},
        "data": {"train": [str(data_path)], "eval_fraction": 0.0},
        "algo": {"prompts_per_step": s.prompts, "samples_per_prompt": s.samples, "max_new_tokens": s.new_tokens,
                 "temperature": s.temperature, "top_p": 1.0, "estimator": "grpo", "kl_coef": 0.0,
                 "ppo_epochs": 1, "mini_batches": 1, "clip_eps": 0.2, "aggregation": "token"},
        "rollout": {"engine": "vllm", "num_engines": 1, "max_staleness": s.max_staleness},
        "rewards": {"rewards": [{"fn": "exact_match"}]},
        "train": {"max_steps": s.total_steps, "lr": s.lr, "scheduler": "constant", "warmup_ratio": 0.0,
                  "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": s.seed, "log_every": 1, "eval_every": 0},
        "cluster": {"num_workers": 1, "device": "cpu"},
    })
    config.validate()
    return config


def run_rayft(model_dir: Path, data_path: Path, s: Settings, workdir: Path) -> dict:
    """rayft's grpo method, one training worker and one vLLM engine."""
    import ray

    from cluster.train import run_training

    config = rayft_config(model_dir, data_path, s, workdir)
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
    measured = [r for r in rows if "event" not in r and r.get("step", 0) > s.warmup]
    phases = {key: mean(r.get(key) for r in measured)
              for key in ("generate_s", "score_s", "train_s", "sync_s", "step_s")}
    return {**steady_rates(watcher.ends, s.warmup, s.total_steps), "wall_s": wall.seconds,
            "step_seconds": step_seconds(watcher.ends),
            "mean_reward": mean(r.get("reward_mean") for r in measured),
            "mean_response_tokens": mean(r.get("response_length") for r in measured),
            "mean_phase_s": phases, "summary_wall_s": summary.get("wall_time_s"), "load_avg": os.getloadavg(),
            "peak_rss_mb": {"processes": processes, "total": sum(processes.values()),
                            "training_workers": summary.get("peak_rss_mb_per_worker")}}


def prepare(s: Settings, workdir: Path) -> tuple[Path, Path, list[dict]]:
    """The policy (cached across runs) and the prompt file both sides train on."""
    from trainers.data.synth import synth_rows

    model_dir = bench_model(s.preset, s.pretrain_steps)
    rows = synth_rows(s.task, max(256, s.total_steps * s.prompts), seed=s.seed)
    data_path = workdir / f"{s.task}.jsonl"
    data_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return model_dir, data_path, rows


def run(s: Settings, reference_only: bool = False) -> dict:
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores; both sides' timings will be noisy")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="grpo-", dir=CACHE) as tmp:
        workdir = Path(tmp)
        model_dir, data_path, _ = prepare(s, workdir)
        rayft = None if reference_only else run_rayft(model_dir, data_path, s, workdir)
        reference = run_child("benchmarks.grpo", {"side": "trl", "settings": asdict(s), "model_dir": str(model_dir),
                                                  "data": str(data_path), "workdir": str(workdir),
                                                  "threads": s.trl_threads or os.cpu_count() or 1})
    result = {"settings": {**asdict(s), "steady_state": f"steps {s.warmup + 1}..{s.total_steps}: "
                                                         "median step, and steps over their wall time"},
              "reference": reference, "rayft": rayft, "differences": DIFFERENCES}
    if rayft:
        name = f"TRL {reference['trl']} GRPOTrainer"
        rows = [("steps_per_min_median", "GRPO steps/min, median step"),
                ("steps_per_min_mean", f"GRPO steps/min, steps {s.warmup + 1}-{s.total_steps} wall time"),
                ("wall_s", f"GRPO wall time, {s.total_steps} steps with start-up, s")]
        result["rows"] = [{"metric": metric, "rayft": rayft[key], "reference": reference[key], "reference_name": name}
                          for key, metric in rows]
        result["rows"].append({"metric": "GRPO peak RSS, every process of the run, MiB (lower is better)",
                               "rayft": rayft["peak_rss_mb"]["total"], "reference": reference["peak_rss_mb"],
                               "reference_name": name})
    return result


def run_trl_child(payload: dict) -> dict:
    """Child process: TRL's side, on the prompt file rayft trained on."""
    rows = [json.loads(line) for line in Path(payload["data"]).read_text().splitlines() if line.strip()]
    return run_reference(Path(payload["model_dir"]), rows, Settings(**payload["settings"]), Path(payload["workdir"]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks grpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    for key in ("preset", "pretrain_steps", "task", "steps", "warmup", "prompts", "samples", "new_tokens", "lr",
                "trl_threads", "max_staleness"):
        value = getattr(defaults, key)
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value,
                            help=f"default {value}")
    parser.add_argument("--reference-only", action="store_true", help="time TRL alone (no result file)")
    args = vars(parser.parse_args(argv))
    reference_only = args.pop("reference_only")
    result = run(Settings(**args), reference_only)
    if reference_only:
        print(json.dumps(result["reference"], indent=2))
        return
    print(write_result("grpo", result))
    update_performance_doc()
    for row in result["rows"]:
        print(f"{row['metric']}: rayft {row['rayft']:.1f}, TRL {row['reference']:.1f} "
              f"(x{row['rayft'] / row['reference']:.2f})")


if __name__ == "__main__":
    if "--child" in sys.argv:
        child_main({"trl": run_trl_child})
    else:
        main()
