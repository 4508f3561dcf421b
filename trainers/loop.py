"""The training loop every supervised method shares, run inside each Ray Train worker:
restore, step through the planned batches with gradient accumulation, log, evaluate,
stop early, checkpoint through `ray.train.report`, and save `final/`.

The method (`trainers.method.Method`) supplies the model, collation and loss. The loop
normalises each step's loss by the number of loss items in the whole step across all
workers, so micro-batch size, accumulation and worker count do not change the update.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray.train
import torch

from trainers.batching import StepBatches, length_table, plan_steps, shard
from trainers.checkpoint import load_checkpoint, save_checkpoint, save_final
from trainers.metrics import MetricsLog, peak_rss_mb
from trainers.setup import describe_trainable
from trainers.strategy import all_gather_float, all_reduce_sum, build_strategy


@dataclass
class Worker:
    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def current(cls) -> "Worker":
        import ray.train.torch as rtt

        ctx = ray.train.get_context()
        return cls(ctx.get_world_rank(), ctx.get_world_size(), rtt.get_device())

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Progress:
    """Loop state that a checkpoint carries besides weights and optimizer."""
    step: int = 0
    best_metric: float | None = None
    best_step: int = 0
    bad_evals: int = 0
    stopped_early: bool = False

    def improved(self, value: float, higher_is_better: bool) -> bool:
        if self.best_metric is None or not math.isfinite(self.best_metric):
            return math.isfinite(value)
        return value > self.best_metric if higher_is_better else value < self.best_metric

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Hooks:
    """Optional per-step callbacks, e.g. gradual unfreezing: `before_step(step, model)`
    returns True when it changed which parameters train."""
    before_step: list = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def method_worker(loop_config: dict) -> None:
    """Ray Train entry point of every supervised method. `loop_config` holds the job config,
    the dataset ref, the method class ("module:Class") and any extra arguments the driver
    derived from the data (e.g. the label set)."""
    import importlib

    from trainers.models import load_tokenizer

    job = loop_config["job"]
    module, _, name = loop_config["method"].partition(":")
    method_cls = getattr(importlib.import_module(module), name)
    tokenizer = load_tokenizer(job.model.path, job.model.trust_remote_code, job.data.chat_template)
    method = method_cls(job, tokenizer, loop_config.get("use_gpu", False), **loop_config.get("method_kwargs", {}))
    run_loop(job, ray.get(loop_config["datasets"]), method)


def run_loop(job, datasets, method, hooks: Hooks | None = None) -> None:
    """Train `method.build_model()` on `datasets.train`; see the module docstring."""
    hooks = hooks or method.hooks()
    worker, cfg, run_dir = Worker.current(), job.train, Path(job.run_dir)
    seed_everything(cfg.seed)
    model = method.build_model().to(worker.device)
    plan = plan_steps(len(datasets.train), cfg.batch_size, cfg.grad_accum, worker.world_size,
                      cfg.epochs, cfg.max_steps)
    strategy = build_strategy(job.cluster.strategy, model, cfg, plan.total_steps, worker.world_size,
                              offload_optimizer=job.cluster.offload_optimizer,
                              offload_params=job.cluster.offload_params)
    progress = restore_progress(strategy, worker)
    if progress.step == 0:
        seed_everything(cfg.seed * 1000 + worker.rank)  # per-rank dropout streams, reproducible
    log = MetricsLog(run_dir / "metrics.jsonl", worker.is_main, resume_step=progress.step)
    if progress.step > 0:
        log.write({"step": progress.step, "event": "resume"})
    else:
        log.write({"step": 0, "event": "start", "total_steps": plan.total_steps, **describe_trainable(model)})
        log.write({"step": 0, **evaluate(strategy.model, datasets.eval, method, worker, cfg)})

    lengths = length_table(datasets.train) if cfg.group_by_length else None
    batches = StepBatches(plan, worker.rank, job.data.seed + cfg.seed, lengths)
    tokens, t_last, last_logged = 0, time.perf_counter(), progress.step
    for step in range(progress.step, plan.total_steps):
        if progress.stopped_early:
            break
        if any([hook(step, strategy.module) for hook in hooks.before_step]):
            strategy.refresh_trainable()
        row, step_tokens = _train_step(strategy, method, datasets.train, batches.micro_batches(step), worker)
        tokens += step_tokens
        progress.step = done = step + 1
        row = {"step": done, **row}
        last = done == plan.total_steps
        if (cfg.eval_every and done % cfg.eval_every == 0) or last:
            row.update(evaluate(strategy.model, datasets.eval, method, worker, cfg))
            _track_best(progress, row, method, cfg, strategy, run_dir, worker)
        if done % cfg.log_every == 0 or last or method.metric in row:
            now = time.perf_counter()
            row["tokens_per_s"] = tokens / max(now - t_last, 1e-9)
            row["step_s"] = (now - t_last) / (done - last_logged)
            tokens, t_last, last_logged = 0, now, done
            log.write(row)
        if (cfg.save_every and done % cfg.save_every == 0) or last or progress.stopped_early:
            report_checkpoint(strategy, worker, progress, row)
    if progress.stopped_early and worker.is_main:
        log.write({"step": progress.step, "event": "early_stop", "best_step": progress.best_step,
                   f"best_{method.metric}": progress.best_metric})
    if not cfg.early_stopping_patience:
        _save_final(strategy, method, run_dir, worker)
    log_peak_memory(log, worker, progress.step)


def _train_step(strategy, method, examples, micro_ids, worker) -> tuple[dict, int]:
    groups = [[examples[i] for i in ids] for ids in micro_ids]
    micro = [method.collate(group) for group in groups]
    local_items = sum(method.count_items(b) for b in micro)
    (global_items,) = all_reduce_sum([local_items], worker.device)
    strategy.model.train()
    loss_sum = 0.0
    for j, batch in enumerate(micro):
        batch = {k: v.to(worker.device) for k, v in batch.items()}
        with strategy.accumulating(more_to_come=j < len(micro) - 1):
            summed, _ = method.loss(strategy.model, batch)
            # Gradients are averaged over workers; scale so the update is the mean over
            # every loss item of the step, wherever it was computed.
            strategy.backward(summed * worker.world_size / max(global_items, 1))
        loss_sum += float(summed.detach())
    lr = strategy.lr
    grad_norm = strategy.step()
    total_loss, total_tokens = all_reduce_sum([loss_sum, sum(method.count_tokens(g) for g in groups)],
                                              worker.device)
    return {"loss": total_loss / max(global_items, 1), "lr": lr, "grad_norm": grad_norm}, int(total_tokens)


@torch.no_grad()
def evaluate(model, examples, method, worker: Worker, cfg) -> dict[str, float]:
    """Method metrics over the eval split, each worker taking a strided shard. Every worker
    runs the same number of batches (sharded strategies gather weights collectively)."""
    if not examples:
        return {}
    model.eval()
    ids = shard(len(examples), worker.rank, worker.world_size)
    longest = math.ceil(len(examples) / worker.world_size)
    n_batches = math.ceil(longest / cfg.batch_size)
    if cfg.eval_batches:
        n_batches = min(n_batches, cfg.eval_batches)
    totals: dict[str, float] = {}
    for b in range(n_batches):
        chunk = ids[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        batch = method.collate([examples[k] for k in (chunk or [0])])
        sums = method.eval_sums(model, {k: v.to(worker.device) for k, v in batch.items()})
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + (value if chunk else 0.0)  # a stand-in batch counts nothing
    keys = sorted(totals)
    reduced = dict(zip(keys, all_reduce_sum([totals[k] for k in keys], worker.device)))
    return method.finish_eval(reduced)


def _track_best(progress: Progress, row: dict, method, cfg, strategy, run_dir: Path, worker: Worker) -> None:
    """With early stopping on, final/ always holds the best model seen so far."""
    if not cfg.early_stopping_patience or method.metric not in row:
        return
    value = row[method.metric]
    if progress.improved(value, method.higher_is_better):
        progress.best_metric, progress.best_step, progress.bad_evals = value, progress.step, 0
        _save_final(strategy, method, run_dir, worker)
    else:
        progress.bad_evals += 1
        progress.stopped_early = progress.bad_evals >= cfg.early_stopping_patience


def log_peak_memory(log: MetricsLog, worker: Worker, step: int) -> None:
    """A `memory` event with every worker's peak resident memory (MiB, rank order)."""
    peaks = all_gather_float(peak_rss_mb(), worker.device)
    log.write({"step": step, "event": "memory", "peak_rss_mb": [round(p, 1) for p in peaks]})


def _save_final(strategy, method, run_dir: Path, worker: Worker) -> None:
    state = strategy.full_state_dict()  # collective under ZeRO-3: every rank calls it
    if worker.is_main:
        save_final(run_dir, strategy.module, method.tokenizer, state_dict=state)


def restore_progress(strategy, worker: Worker, progress_cls=Progress, read_rank_files=None):
    """The loop state of the last complete checkpoint (weights and optimizer restored
    into `strategy`), or a fresh `progress_cls()` when the run starts. `read_rank_files
    (directory, rank)` reads what `report_checkpoint`'s `write_rank_files` wrote."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return progress_cls()
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(Path(directory), strategy, worker.rank)
        if read_rank_files is not None:
            read_rank_files(Path(directory), worker.rank)
    return progress_cls(**{k: v for k, v in state.items() if k in progress_cls.__dataclass_fields__})


def report_checkpoint(strategy, worker: Worker, progress: Progress, metrics: dict, write_rank_files=None) -> None:
    """Save and report a checkpoint; `write_rank_files(directory, rank)` adds this rank's own
    files to it (names that carry the rank: the ranks' directories are merged)."""
    with tempfile.TemporaryDirectory(prefix="rayft-ckpt-") as tmp:
        if write_rank_files is not None:
            write_rank_files(Path(tmp), worker.rank)
        save_checkpoint(Path(tmp), strategy, progress.step, worker.rank, extra=progress.as_dict())
        ray.train.report({k: v for k, v in metrics.items() if k != "step"} | {"step": progress.step},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{progress.step:08d}")
