"""The supervised training loop every token-loss method shares, run inside each Ray Train
worker: restore, step through the planned batches with gradient accumulation, log, evaluate,
checkpoint through `ray.train.report`, and save `final/`.

A method supplies a `loss_fn(model, batch) -> (summed loss, number of loss items)`; the
loop normalises by the number of loss items in the whole optimizer step across all
workers, so micro-batch size, accumulation and worker count do not change the update.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray.train
import torch

from trainers.batching import StepBatches, plan_steps, shard
from trainers.checkpoint import load_checkpoint, save_checkpoint, save_final
from trainers.data import collate
from trainers.metrics import MetricsLog
from trainers.models import load_tokenizer
from trainers.optim import build_optimizer, build_scheduler
from trainers.setup import describe_trainable
from trainers.strategy import DDPStrategy, all_reduce_sum

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Worker:
    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def current(cls) -> "Worker":
        ctx = ray.train.get_context()
        import ray.train.torch as rtt
        return cls(ctx.get_world_rank(), ctx.get_world_size(), rtt.get_device())

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run_token_loop(job, datasets, build_model: Callable[[], torch.nn.Module], loss_fn: LossFn) -> None:
    """Train `build_model()` on `datasets.train` with `loss_fn`; see the module docstring."""
    worker = Worker.current()
    seed_everything(job.train.seed)
    model = build_model().to(worker.device)
    cfg = job.train
    plan = plan_steps(len(datasets.train), cfg.batch_size, cfg.grad_accum, worker.world_size,
                      cfg.epochs, cfg.max_steps)
    optimizer = build_optimizer(model, cfg)
    strategy = DDPStrategy(model, optimizer, build_scheduler(optimizer, cfg, plan.total_steps), cfg.max_grad_norm)
    tokenizer = load_tokenizer(job.model.path, job.model.trust_remote_code, job.data.chat_template)
    pad_id = tokenizer.pad_token_id
    run_dir = Path(job.run_dir)

    start = _restore(strategy, worker)
    # Per-rank RNG streams differ (dropout) but are reproducible for the seed.
    if start == 0:
        seed_everything(cfg.seed * 1000 + worker.rank)
    log = MetricsLog(run_dir / "metrics.jsonl", worker.is_main, resume_step=start)
    if worker.is_main and start == 0:
        log.write({"step": 0, "event": "start", "total_steps": plan.total_steps, **describe_trainable(model)})
    if start == 0:  # the baseline every later eval is compared with
        log.write({"step": 0, "eval_loss": evaluate(strategy.model, datasets.eval, loss_fn, worker, cfg, pad_id)})

    batches = StepBatches(plan, worker.rank, job.data.seed + cfg.seed)
    tokens_seen, t_last = 0, time.perf_counter()
    for step in range(start, plan.total_steps):
        examples = [[datasets.train[i] for i in ids] for ids in batches.micro_batches(step)]
        micro = [collate(group, pad_id) for group in examples]
        local_items = sum(int((b["labels"] != -100).sum()) for b in micro)
        local_tokens = sum(sum(ex.seq_lens) for group in examples for ex in group)
        (global_items,) = all_reduce_sum([local_items], worker.device)
        strategy.model.train()
        loss_sum = 0.0
        for j, batch in enumerate(micro):
            batch = {k: v.to(worker.device) for k, v in batch.items()}
            with strategy.accumulating(more_to_come=j < len(micro) - 1):
                summed, _ = loss_fn(strategy.model, batch)
                # DDP averages gradients over workers; scale so the result is the mean
                # over every loss item of the step, wherever it was computed.
                strategy.backward(summed * worker.world_size / max(global_items, 1))
            loss_sum += float(summed.detach())
        lr = strategy.lr
        grad_norm = strategy.step()
        total_loss, total_tokens = all_reduce_sum([loss_sum, local_tokens], worker.device)
        tokens_seen += total_tokens
        done = step + 1
        row = {"step": done, "loss": total_loss / max(global_items, 1), "lr": lr, "grad_norm": grad_norm}
        last = done == plan.total_steps
        if (cfg.eval_every and done % cfg.eval_every == 0) or last:
            row["eval_loss"] = evaluate(strategy.model, datasets.eval, loss_fn, worker, cfg, pad_id)
        if done % cfg.log_every == 0 or last or "eval_loss" in row:
            now = time.perf_counter()
            row["tokens_per_s"] = tokens_seen / max(now - t_last, 1e-9)
            tokens_seen, t_last = 0, now
            log.write(row)
        if (cfg.save_every and done % cfg.save_every == 0) or last:
            _report_checkpoint(strategy, worker, done, row)
    if worker.is_main:
        save_final(run_dir, strategy.module, tokenizer)


@torch.no_grad()
def evaluate(model, examples, loss_fn: LossFn, worker: Worker, cfg, pad_id: int) -> float:
    """Mean loss per loss item over the eval split, each worker taking a strided shard."""
    if not examples:
        return float("nan")
    model.eval()
    ids = shard(len(examples), worker.rank, worker.world_size)
    if cfg.eval_batches:
        ids = ids[: cfg.eval_batches * cfg.batch_size]
    loss, items = 0.0, 0.0
    for i in range(0, len(ids), cfg.batch_size):
        batch = collate([examples[k] for k in ids[i:i + cfg.batch_size]], pad_id)
        summed, count = loss_fn(model, {k: v.to(worker.device) for k, v in batch.items()})
        loss, items = loss + float(summed), items + float(count)
    loss, items = all_reduce_sum([loss, items], worker.device)
    return loss / max(items, 1.0)


def _restore(strategy, worker: Worker) -> int:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(Path(directory), strategy, worker.rank)
    return int(state["step"])


def _report_checkpoint(strategy, worker: Worker, step: int, metrics: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="rayft-ckpt-") as tmp:
        save_checkpoint(Path(tmp), strategy, step, worker.rank)
        ray.train.report({"step": step, **{k: v for k, v in metrics.items() if k != "step"}},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{step:08d}")
