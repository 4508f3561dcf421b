"""`rayft train`: the driver side of a training run. Prepares the run directory and data
(so bad input fails here, before any worker starts), launches the method's Ray Train
loop (as `trainers.methods` names it), follows its progress, then writes summary.json and
report.html. A worker's failure is raised as what the worker raised (`_fit`)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from cluster.config import JobConfig, dump_yaml, with_absolute_paths
from cluster.failures import StopOnUserError, clear_errors, raise_failure, worker_entry
from cluster.progress import MetricsProgress
from cluster.ray_env import cluster_has_gpus, ensure_ray
from cluster.report import write_report
from cluster.resume import check_resume
from cluster.rl import actor_cpus, rollout_services, summarise_rl
from trainers.batching import plan_steps
from trainers.data import build_datasets
from trainers.loop import method_worker
from trainers.metrics import read_metrics
from trainers.models import load_tokenizer

def run_training(config: JobConfig, echo=print, pool=None) -> dict:
    """Run `config` to completion on Ray; returns the summary written to summary.json. An RL
    run samples from `pool` where given (a `rollout.pool.RolloutPool` started from the run's
    model with its rollout settings, which several runs in turn can share) instead of
    starting its own engines."""
    spec = config.spec
    config = with_absolute_paths(config)
    run_dir = config.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(config.model.path, config.model.trust_remote_code, config.data.chat_template)
    cluster = config.cluster
    extra_cpus = actor_cpus(config) if config.uses_rollouts else 0.0
    if config.data.streaming:  # the data is tokenised on the cluster
        ensure_ray(cluster.address, num_cpus=cluster.num_workers * cluster.cpus_per_worker + extra_cpus)
    datasets = build_datasets(config.data, tokenizer, purpose=spec.data(config), stream_dir=run_dir / "data")
    # Method-specific checks and encoding fail here, on the driver, not in a worker.
    method_kwargs = spec.prepare(config, datasets, tokenizer) if spec.prepare else {}
    _echo_data(datasets.stats, echo)
    check_resume(config, run_dir, echo)  # before config.yaml is rewritten below
    batch, accum = config.train.batch_size, config.train.grad_accum
    if config.uses_rollouts:
        batch, accum = config.algo.prompts_per_step, 1
    plan = plan_steps(len(datasets.train), batch, accum, config.cluster.num_workers, config.train.epochs,
                      config.train.max_steps)
    dump_yaml(config, run_dir / "config.yaml")

    import ray

    ensure_ray(cluster.address, num_cpus=cluster.num_workers * cluster.cpus_per_worker + extra_cpus)
    use_gpu = cluster.device == "cuda" or (cluster.device == "auto" and cluster_has_gpus())
    loop_config = {"job": config, "datasets": ray.put(datasets), "use_gpu": use_gpu}
    echo(f"training {config.method} on {cluster.num_workers} worker(s), {plan.total_steps} steps -> {run_dir}")
    started = time.time()
    if config.uses_rollouts:
        from trainers.rl.loop import rl_worker

        with rollout_services(config, use_gpu, echo, pool) as services:
            result = _fit(_trainer(config, run_dir, rl_worker, loop_config | {"services": services}, use_gpu),
                          run_dir, plan.total_steps)
    else:
        loop_config |= {"method": spec.method_class, "method_kwargs": method_kwargs}
        result = _fit(_trainer(config, run_dir, method_worker, loop_config, use_gpu), run_dir, plan.total_steps)
    summary = summarise(config, run_dir, time.time() - started, datasets.stats, plan.total_steps)
    if config.uses_rollouts:
        summary |= summarise_rl(read_metrics(run_dir / "metrics.jsonl"))
    summary["checkpoint"] = str(result.checkpoint.path) if result.checkpoint else None
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(run_dir, summary)
    return summary


def _trainer(config: JobConfig, run_dir: Path, entry, loop_config: dict, use_gpu: bool):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    clear_errors(run_dir)  # an earlier run's
    cluster = config.cluster
    return TorchTrainer(
        worker_entry,
        train_loop_config=loop_config | {"entry": entry},
        scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cluster.cpus_per_worker},
                                     placement_strategy=cluster.placement.upper()),
        run_config=RunConfig(name="checkpoints", storage_path=str(run_dir),
                             failure_config=FailureConfig(max_failures=cluster.max_failures),
                             callbacks=[StopOnUserError()],  # a user error fails alike on every retry
                             checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints)),
    )


def summarise(config: JobConfig, run_dir: Path, wall_s: float, data_stats: dict, total_steps: int) -> dict:
    rows = read_metrics(run_dir / "metrics.jsonl")
    start = next((r for r in rows if r.get("event") == "start"), {})
    steps = [r for r in rows if "event" not in r]
    evals = [r["eval_loss"] for r in steps if _finite(r.get("eval_loss"))]
    tokens = [r["tokens_per_s"] for r in steps if "tokens_per_s" in r]
    train_tokens = data_stats.get("train_tokens", 0)
    samples = total_steps * config.train.batch_size * config.train.grad_accum * config.cluster.num_workers
    stop = next((r for r in rows if r.get("event") == "early_stop"), None)
    memory = [r["peak_rss_mb"] for r in rows if r.get("event") == "memory"]
    return {
        "name": config.name, "method": config.method,
        "stopped_early": stop is not None, "best_step": stop["best_step"] if stop else None, "steps": steps[-1]["step"] if steps else 0,
        "final_loss": steps[-1].get("loss") if steps else None,
        "first_eval_loss": evals[0] if evals else None, "final_eval_loss": evals[-1] if evals else None,
        "wall_time_s": round(wall_s, 2), "tokens_per_s": round(sum(tokens) / len(tokens), 1) if tokens else None,
        "samples_per_s": round(samples / max(wall_s, 1e-9), 2), "train_samples": data_stats.get("train_samples"),
        "train_tokens_per_epoch": train_tokens, "trainable_params": start.get("trainable_params"),
        "total_params": start.get("total_params"), "num_workers": config.cluster.num_workers,
        "peft": config.peft.method, "final_dir": str(run_dir / "final"),
        "peak_rss_mb_per_worker": memory[-1] if memory else None,
    }


def _fit(trainer, run_dir: Path, total_steps: int):
    """trainer.fit() under a progress bar; a failure raised as `cluster.failures` says."""
    from ray.train import ControllerError
    from ray.train.v2.api.exceptions import WorkerGroupError

    try:
        with MetricsProgress(run_dir / "metrics.jsonl", total_steps, desc=run_dir.name):
            return trainer.fit()
    except (WorkerGroupError, ControllerError) as exc:
        raise_failure(exc, run_dir)


def _echo_data(stats: dict, echo) -> None:
    for src in stats.get("sources", []):
        skipped = f", {src['skipped']} bad rows skipped" if src.get("skipped") else ""
        echo(f"data: {src['path']} [{src['format']}] {src['rows']} rows{skipped}")
    echo(f"data: {stats.get('train_samples')} train / {stats.get('eval_samples')} eval samples, "
         f"{stats.get('truncated', 0)} truncated")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
