"""GRPO training speed and time to learn: rayft's `grpo` method (a Ray Train worker, a vLLM
engine actor and a reward actor), synchronous and pipelined one step ahead, against TRL's
`GRPOTrainer` (transformers `generate` in one process), on the same local model, prompts,
reward and settings, all in one run.

    python -m benchmarks grpo [--workloads learn,bench128] [--staleness 0,1] [--trl-threads 0]
                              [--learn-steps 100] [--bench-steps 20] [--target 0.3] [--reference-only]

Workloads (`WORKLOADS`):
  learn     the tiny model after a short SFT on single-digit sums answered in two styles,
            "7" and "The answer is 7."; greedy decoding picks the verbose one, so the
            exact-match reward on held-out prompts starts near 0 and rises as GRPO learns
            the rewarded style. Reported: steady-state steps/min and the training time
            until the held-out reward first reaches `target` (evaluated every 5 steps on
            64 prompts, evaluation time left out on every side).
  bench128  the 34M-parameter `bench` preset (random weights) with 128-token responses,
            where generation dominates a step; steady-state steps/min.

One step on every side: draw `prompts` chat prompts, sample `samples` responses each
(temperature 1, at most `new_tokens` tokens), score them with exact match against the
row's reference, group-normalise the rewards (GRPO), and take one optimizer step on all
of them (no KL term, no reference model, one pass). TRL's torch runs on every core, as a
user runs it (`--trl-threads 1` holds it to one thread, as Ray runs that of rayft's
training worker). rayft runs once per `--staleness` value: 0 generates and trains in turn,
as TRL does; 1 generates the next step's samples while it trains (truncated
importance-sampling correction, its default).

Steady state, the same for every side, leaves out model loading, Ray and engine start-up
and the first `warmup` steps' one-off costs, two ways: the median step, which stays put
when other processes share the machine's cores, and the mean (the steps after `warmup`
over their wall time), which counts every stall. The wall time with start-up is reported
beside them. See benchmarks.grpo_clock for how steps and evaluations are timed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks.common import CACHE, bench_model, run_child, update_performance_doc, write_result
from benchmarks.hf_reference import child_main

# What the sides do differently although the settings match.
DIFFERENCES = [
    "neither side runs a separate scoring pass with one pass and one mini-batch: both take the "
    "rollout log-probs from the update's own forward (importance ratio exactly 1 when synchronous)",
    "rayft samples with vLLM in an engine actor and pushes the new weights to it every step; TRL calls "
    "transformers generate in the training process, where the weights already are",
    "rayft's training worker, engine and reward actor each reserve 1 CPU (Ray runs their torch on 1 thread); "
    "TRL's one process runs torch on trl_threads threads (0: every core)",
    "TRL loss_type dapo (token losses averaged over every response token of the batch) is rayft's "
    "aggregation token with one mini-batch",
    "held-out evaluation: rayft samples greedily on its engine, TRL with transformers generate; the time "
    "either takes is left out of every rate and of the time to the target",
]


@dataclass
class Workload:
    name: str
    preset: str                    # trainers.models preset of the policy
    pretrain_steps: int            # so the policy writes short answers and stops at end of turn
    start: str                     # "pretrained", or "mixed_sft": then SFT on answers in two styles
    task: str                      # trainers.data.synth task of the prompts
    steps: int                     # measured steps (after the warm-up)
    new_tokens: int                # longest response
    lr: float
    eval_every: int = 0            # held-out evaluation every this many steps (0: none)
    eval_prompts: int = 64
    target: float = 0.3            # held-out reward whose first reaching is timed
    warmup: int = 2                # steps left out of the steady-state time
    prompts: int = 8               # prompts per step
    samples: int = 4               # responses per prompt (the GRPO group)
    temperature: float = 1.0
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


WORKLOADS = {
    "learn": Workload("learn", "tiny", 200, "mixed_sft", "small_addition", steps=100, new_tokens=32, lr=1e-4,
                      eval_every=5, target=0.3),
    "bench128": Workload("bench128", "bench", 0, "pretrained", "addition", steps=8, new_tokens=128, lr=1e-5),
}


def mixed_sft_model(base: Path) -> Path:
    """`base` after rayft SFT on single-digit sums answered half as "7" and half as "The
    answer is 7." (cached): the start model of the `learn` workload."""
    import ray

    from cluster.config import JobConfig, from_dict
    from cluster.train import run_training
    from trainers.data.synth import synth_rows

    out = CACHE / f"{base.name}-mixed-sft"
    if (out / "config.json").exists():
        return out
    with tempfile.TemporaryDirectory(prefix="mixed-sft-", dir=CACHE) as tmp:
        data = Path(tmp) / "mixed.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in synth_rows("small_addition_mixed", 2000, seed=1)))
        config = from_dict(JobConfig, {
            "method": "sft", "name": "mixed-sft", "output_dir": tmp, "model": {"path": str(base)},
            "data": {"train": [str(data)], "max_length": 48},
            "train": {"max_steps": 150, "batch_size": 16, "lr": 1e-3}, "cluster": {"num_workers": 1}})
        config.validate()
        try:
            run_training(config, echo=lambda *_: None)
        finally:
            ray.shutdown()
        staged = CACHE / f".{out.name}.partial"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(config.run_dir / "final", staged)
        staged.rename(out)
    return out


def prepare(w: Workload, workdir: Path) -> dict[str, Path]:
    """The policy (cached across runs), the training prompts and the held-out prompts."""
    from trainers.data.synth import synth_rows

    model = bench_model(w.preset, w.pretrain_steps)
    if w.start == "mixed_sft":
        model = mixed_sft_model(model)
    paths = {"model": model, "train": workdir / f"{w.name}-train.jsonl", "eval": workdir / f"{w.name}-eval.jsonl"}
    for key, n, seed in (("train", max(256, w.total_steps * w.prompts), w.seed), ("eval", w.eval_prompts, w.seed + 1)):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in synth_rows(w.task, n, seed=seed)))
    return paths


def run_workload(w: Workload, staleness: list[int], trl_threads: int, workdir: Path,
                 reference_only: bool = False) -> dict:
    from benchmarks.grpo_rayft import run_rayft

    data = prepare(w, workdir)
    rayft = {} if reference_only else {k: run_rayft(w, data, k, workdir) for k in staleness}
    reference = run_child("benchmarks.grpo", {"side": "trl", "workload": asdict(w), "workdir": str(workdir),
                                              "data": {k: str(v) for k, v in data.items()},
                                              "threads": trl_threads or os.cpu_count() or 1})
    return {"workload": asdict(w), "reference": reference, "rayft": {str(k): v for k, v in rayft.items()},
            "rows": table_rows(w, rayft, reference)}


def table_rows(w: Workload, rayft: dict[int, dict], reference: dict) -> list[dict]:
    name = f"TRL {reference['trl']} GRPOTrainer"
    label = f"GRPO {w.name} ({w.preset}, {w.new_tokens}-token responses)"
    metrics = [("steps_per_min_median", "steps/min, median step"),
               ("steps_per_min_mean", f"steps/min, steps {w.warmup + 1}-{w.total_steps} wall time"),
               ("time_to_target_s", f"time to held-out reward {w.target}, s (lower is better)"),
               ("wall_s", f"wall time, {w.total_steps} steps with start-up, s (lower is better)")]
    rows = []
    for k, side in rayft.items():
        for key, metric in metrics:
            if side.get(key) is not None and reference.get(key) is not None:
                rows.append({"metric": f"{label} max_staleness {k}: {metric}", "rayft": side[key],
                             "reference": reference[key], "reference_name": name})
        rows.append({"metric": f"{label} max_staleness {k}: peak RSS, every process, MiB (lower is better)",
                     "rayft": side["peak_rss_mb"]["total"], "reference": reference["peak_rss_mb"],
                     "reference_name": name})
    return rows


def run(names: list[str], staleness: list[int], trl_threads: int, overrides: dict,
        reference_only: bool = False) -> dict:
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores; every side's timings will be noisy")
    CACHE.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="grpo-", dir=CACHE) as tmp:
        for name in names:
            w = replace(WORKLOADS[name], **overrides.get(name, {}))
            results[name] = run_workload(w, staleness, trl_threads, Path(tmp), reference_only)
    return {"settings": {"workloads": names, "staleness": staleness, "trl_threads": trl_threads},
            "workloads": results, "differences": DIFFERENCES,
            "rows": [row for result in results.values() for row in result["rows"]]}


def run_trl_child(payload: dict) -> dict:
    """Child process: TRL's side, on the prompt files rayft trained and evaluated on."""
    from benchmarks.grpo_trl import run_reference

    return run_reference(Workload(**payload["workload"]), {k: Path(v) for k, v in payload["data"].items()},
                         Path(payload["workdir"]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks grpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"of {', '.join(WORKLOADS)}")
    parser.add_argument("--staleness", default="0,1", help="rayft's rollout.max_staleness values, one run each")
    parser.add_argument("--trl-threads", type=int, default=0, help="TRL's torch threads (0: every core)")
    parser.add_argument("--learn-steps", type=int, default=WORKLOADS["learn"].steps,
                        help="learn: measured steps after the warm-up")
    parser.add_argument("--bench-steps", type=int, default=WORKLOADS["bench128"].steps,
                        help="bench128: measured steps after the warm-up")
    parser.add_argument("--target", type=float, default=WORKLOADS["learn"].target,
                        help="learn: the held-out reward to reach")
    parser.add_argument("--reference-only", action="store_true", help="time TRL alone (no result file)")
    args = parser.parse_args(argv)
    names = [n for n in args.workloads.split(",") if n]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {unknown[0]!r}; expected some of {', '.join(WORKLOADS)}")
    overrides = {"learn": {"steps": args.learn_steps, "target": args.target}, "bench128": {"steps": args.bench_steps}}
    staleness = [int(k) for k in args.staleness.split(",") if k]
    result = run(names, staleness, args.trl_threads, overrides, args.reference_only)
    if args.reference_only:
        print(json.dumps({n: r["reference"] for n, r in result["workloads"].items()}, indent=2))
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
