"""The RL loop of `method: ppo | grpo | distill (on_policy)`, run inside each Ray Train
worker. Each step a worker draws its share of prompts (a pure function of the step, so
a resumed run sees the same remaining prompts), samples responses from the rollout pool
(requested `rollout.max_staleness` steps ahead where set: `trainers.rl.pipeline`),
has them scored by the reward actors (or the teacher actor), computes log-probs, values
and advantages, updates over `ppo_epochs` x `mini_batches`, and rank 0 pushes the new
weights to the engines. Evaluation samples greedily on held-out prompts.

The pool, reward actors and teacher are started by the driver (`cluster.rl`) and handed
in: they outlive a restarted worker group, which re-syncs them from its checkpoint.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
import torch

from trainers.batching import StepBatches, plan_steps
from trainers.loop import Progress, Worker, log_peak_memory, report_checkpoint, restore_progress, seed_everything
from trainers.metrics import MetricsLog
from trainers.rl.collect import Collector, digest
from trainers.rl.correction import correction_weights
from trainers.rl.pipeline import RolloutPipeline
from trainers.rl.experience import Experience, at_response, sampled_and_raw_logp, token_logp
from trainers.rl.shared_rows import Layout
from trainers.reference import Reference
from trainers.rl.model import build_rl_model, engine_adapter, engine_weights, policy_state
from trainers.rl.objectives import AdaptiveKL, build_objective
from trainers.setup import describe_trainable
from trainers.strategy import all_reduce_max, all_reduce_sum, build_strategy, unwrap


@dataclass
class RLProgress(Progress):
    kl_coef: float = 0.0
    prompts_seen: int = 0    # prompts drawn so far by all workers: the data position


def rl_worker(loop_config: dict) -> None:
    """Ray Train entry point of the RL methods."""
    from trainers.models import load_tokenizer

    job = loop_config["job"]
    tokenizer = load_tokenizer(job.model.path, job.model.trust_remote_code, job.data.chat_template)
    RLLoop(job, tokenizer, ray.get(loop_config["datasets"]), loop_config["services"],
           loop_config.get("use_gpu", False)).run()


class RLLoop:
    def __init__(self, job, tokenizer, datasets, services, use_gpu: bool):
        self.job, self.algo, self.tokenizer, self.datasets = job, job.algo, tokenizer, datasets
        self.worker, self.run_dir = Worker.current(), Path(job.run_dir)
        self.collector = Collector(job, tokenizer, services, self.worker)
        self.collector.draw = self.draw_prompts
        self.pool = services.pool
        self.unconfirmed = None  # a sync sent to the engines, its confirmation not yet waited for
        seed_everything(job.train.seed)
        self.kl = AdaptiveKL(self.algo.kl_coef, self.algo.kl_target, self.algo.kl_horizon)
        self.objective = build_objective(job, self.kl)
        model = build_rl_model(job, use_gpu, self.objective.needs_values).to(self.worker.device)
        self.plan = plan_steps(len(datasets.train), self.algo.prompts_per_step, 1, self.worker.world_size,
                               job.train.epochs, job.train.max_steps)
        updates = self.plan.total_steps * self.algo.ppo_epochs * self.algo.mini_batches
        self.strategy = build_strategy(job.cluster.strategy, model, job.train, updates, self.worker.world_size,
                                       offload_optimizer=job.cluster.offload_optimizer,
                                       offload_params=job.cluster.offload_params)
        self.reference = Reference(job, use_gpu, self.worker.device) if self.objective.needs_reference else None
        self.layout = Layout.for_model(model.policy, self.algo.share_prompts)

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        job, worker = self.job, self.worker
        batches = StepBatches(self.plan, worker.rank, job.data.seed + job.train.seed)
        step_prompts = lambda step: [i for micro in batches.micro_batches(step) for i in micro]  # noqa: E731
        pipeline = None
        if job.rollout.max_staleness:
            pipeline = RolloutPipeline(self.collector, job.rollout.max_staleness, self.plan.total_steps,
                                       lambda step: [self.datasets.train[i] for i in step_prompts(step)])
        progress = restore_progress(self.strategy, worker, RLProgress, pipeline and pipeline.restore)
        log = MetricsLog(self.run_dir / "metrics.jsonl", worker.is_main, resume_step=progress.step)
        if progress.step > 0:
            self.kl.coef = progress.kl_coef
            log.write({"step": progress.step, "event": "resume", "prompts_seen": progress.prompts_seen})
            self.sync(progress.step)  # the engines may hold weights newer than this checkpoint
        else:
            seed_everything(job.train.seed * 1000 + worker.rank)
            log.write({"step": 0, "event": "start", "total_steps": self.plan.total_steps,
                       **describe_trainable(self.strategy.module)})
            log.write({"step": 0, **self.evaluate()})
        for step in range(progress.step, self.plan.total_steps):
            prompt_ids = step_prompts(step)
            if pipeline is not None:
                pipeline.fill(step)
            pending = None if pipeline is None else (lambda step=step: pipeline.take(step))
            row = self.step(step, [self.datasets.train[i] for i in prompt_ids], pending)
            (row["prompt_digest"],) = all_reduce_sum([digest(prompt_ids)], worker.device)
            progress.step = done = step + 1
            progress.prompts_seen = done * self.plan.samples_per_step
            progress.kl_coef = self.kl.coef
            row = {"step": done, **row, "prompts_seen": progress.prompts_seen}
            last = done == self.plan.total_steps
            evaluate = (job.train.eval_every and done % job.train.eval_every == 0) or last
            saving = (job.train.save_every and done % job.train.save_every == 0) or last
            if evaluate or saving:
                self.confirm_sync()
            if evaluate:
                row.update(self.evaluate())
            if done % job.train.log_every == 0 or last or any(k.startswith("eval_") for k in row):
                log.write(row)
            if saving:
                report_checkpoint(self.strategy, worker, progress, row, pipeline and pipeline.save)
        self.save_final()
        log_peak_memory(log, worker, progress.step)

    def draw_prompts(self, step: int, round_: int, count: int) -> list:
        """`count` training prompts for dynamic sampling's round `round_` of `step`: seeded by
        the step, the round and the rank, so a resumed run draws what an uninterrupted one did."""
        seed = ((self.job.data.seed + self.job.train.seed) * 1_000_003 + step) * 1009 + round_ * 31 + self.worker.rank
        train = self.datasets.train
        return [train[i] for i in random.Random(seed).sample(range(len(train)), min(count, len(train)))]

    def step(self, step: int, records: list, pending=None) -> dict:
        started = time.perf_counter()
        exp, timings, metrics = self.collector.collect(records, step, pending)
        exp = exp.to(self.worker.device)
        t = time.perf_counter()
        metrics.update(self.score_old(exp))
        metrics.update(self.objective.prepare(exp, self.algo.samples_per_prompt,
                                              lambda values: all_reduce_sum(values, self.worker.device)))
        metrics.update(self.update(exp, step))
        timings["train_s"] = time.perf_counter() - t
        timings["sync_s"] = self.sync(step + 1)
        metrics["sync_mb"] = self.sync_mb
        if self.job.rollout.verify_sync:
            metrics["sync_gap_max"] = self.sync_gap(exp)
        timings["step_s"] = time.perf_counter() - started
        row = self.reduce({**metrics, **timings})
        # From the all-reduced KL, so every worker keeps the same coefficient.
        self.kl.update(row.get("kl", 0.0) * row["response_length"], len(exp) * self.worker.world_size)
        return row | {"kl_coef": self.kl.coef}

    # -- the parts of a step ----------------------------------------------------------

    def chunks(self, n: int) -> list[torch.Tensor]:
        size = -(-n // self.algo.mini_batches)
        return [torch.arange(i, min(i + size, n)) for i in range(0, n, size)]

    @property
    def single_pass(self) -> bool:
        """One update over the whole rollout batch, nothing needed before it: the update's
        own forward pass gives the rollout policy's log-probs (no separate scoring pass)."""
        return self.algo.ppo_epochs == 1 and self.algo.mini_batches == 1 and not self.objective.needs_old_pass

    @torch.no_grad()
    def score_old(self, exp: Experience) -> dict:
        """Log-probs (and values) under the policy that sampled, and under the reference."""
        model = self.strategy.model
        model.eval()
        old, raw, values, ref = [], [], [], []
        for rows in self.chunks(len(exp)):
            mb = exp.rows(rows)
            inputs, at_responses = self.layout(mb)
            if not self.single_pass:
                logits, v = model(**inputs)
                logits = at_responses(logits)
                sampled, raw_logp = sampled_and_raw_logp(logits, mb.response_ids, self.algo.temperature)
                old.append(sampled)
                raw.append(raw_logp)
                if v is not None:
                    values.append(at_responses(v))
            if self.reference is not None:
                ref_logits = self.reference.logits(unwrap(model).policy, **inputs)
                ref.append(token_logp(at_responses(ref_logits), mb.response_ids, self.algo.temperature))
        exp.ref_logp = torch.cat(ref) if ref else None
        if self.single_pass:
            return {}
        exp.old_logp = torch.cat(old)
        exp.old_values = torch.cat(values) if values else None
        return self.rollout_metrics(torch.cat(raw), exp)

    def rollout_metrics(self, raw_logp: torch.Tensor, exp: Experience) -> dict:
        """Engine vs trainer log-prob gap on the sampled tokens, the off-policy correction
        weights it gives (set on `exp`), and the KL to the reference, at the trainer's
        weights before the update."""
        gap = (raw_logp - exp.engine_logp).abs() * exp.mask
        tokens = exp.mask.sum().clamp(min=1)
        metrics = {"logprob_diff": float(gap.sum() / tokens), "logprob_diff_max": float(gap.max())}
        algo = self.algo
        exp.correction, stats = correction_weights(raw_logp, exp.engine_logp, exp.mask, algo.rollout_correction,
                                                   algo.correction_level, algo.correction_cap)
        metrics.update(stats)
        if exp.ref_logp is not None:
            metrics["kl"] = float((self.objective.token_kl(exp.old_logp, exp.ref_logp) * exp.mask).sum() / tokens)
        return metrics

    def update(self, exp: Experience, step: int) -> dict:
        model, sums, count, first = self.strategy.model, {}, 0, {}
        model.train()
        # Mini-batch order: seeded by step, the same on a resumed run.
        generator = torch.Generator().manual_seed(self.job.train.seed * 1_000_003 + step)
        for _ in range(self.algo.ppo_epochs):
            order = torch.randperm(len(exp), generator=generator)
            for rows in self.chunks(len(exp)):
                mb = exp.rows(order[rows].to(exp.input_ids.device))
                inputs, at_responses = self.layout(mb)
                logits, values = model(**inputs)
                if values is not None:
                    values = at_responses(values)
                logits = at_responses(logits)
                logp, raw_logp = sampled_and_raw_logp(logits, mb.response_ids, self.algo.temperature)
                if mb.old_logp is None:  # single pass: this forward is the rollout policy's
                    mb.old_logp = logp.detach()
                    first = self.rollout_metrics(raw_logp, mb)
                loss, stats = self.objective.loss(logits, logp, values, mb)
                self.strategy.backward(loss)
                stats["grad_norm"] = self.strategy.step()
                stats["loss"] = loss.detach()
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                count += 1
        return {k: v / count for k, v in sums.items()} | first | {"lr": self.strategy.lr}

    def sync(self, version: int) -> float:
        """Rank 0 sends the policy after `version` updates to the engines; every worker waits
        until it is sent (a request sent after it is served at the new weights). The engines'
        confirmation is waited for now, or with pipelined rollouts at the next sync (or
        before an evaluation or a checkpoint): the engines load it while the trainer trains
        on samples generated before it, and a sync that did not arrive still fails before
        any sample of its weights is trained on (the pool's owner waits for the last sync's
        confirmation before it sends the next). Returns the time the trainer spent on it."""
        started, sent_mb = time.perf_counter(), 0.0
        self.unconfirmed = None  # sending confirms it
        if self.job.adapter_sync:
            adapter = engine_adapter(self.strategy, self.worker.is_main)
            if self.worker.is_main:
                self.unconfirmed = self.pool.send_adapter(*adapter, version)
        else:
            state = engine_weights(self.strategy, self.worker.is_main, self.job.peft.method)
            if self.worker.is_main:
                self.unconfirmed = self.pool.send_weights(state, version)
        if self.unconfirmed is not None:
            sent_mb = self.unconfirmed.bytes / 2**20
        if not self.job.rollout.max_staleness or self.job.rollout.verify_sync:
            self.confirm_sync()
        seconds = time.perf_counter() - started if self.worker.is_main else 0.0
        # Rank 0's figures, summed with zeros: also the barrier.
        seconds, self.sync_mb = all_reduce_sum([seconds, sent_mb], self.worker.device)
        return seconds

    def confirm_sync(self) -> None:
        """Wait for the engines' confirmation of the last sync sent, if any (rank 0)."""
        if self.unconfirmed is not None:
            sync, self.unconfirmed = self.unconfirmed, None
            self.pool.confirm_sync(sync)

    @torch.no_grad()
    def sync_gap(self, exp: Experience, rows: int = 4) -> float:
        """Max |log-prob| gap on a few of this step's responses between the engines and the
        trainer's updated weights: what the engines serve after the sync (rollout.verify_sync)."""
        model, mb = self.strategy.model, exp.rows(slice(0, rows))
        model.eval()
        logits, _ = model(mb.input_ids, mb.attention_mask, mb.position_ids)
        trainer = token_logp(at_response(logits, mb), mb.response_ids)
        lengths = mb.response_lengths.long().tolist()
        width = exp.prompt_width
        prompts = [ids[width - int(n):].tolist() for ids, n in
                   zip(mb.input_ids[:, :width], mb.attention_mask[:, :width].sum(1))]
        responses = [r[:n].tolist() for r, n in zip(mb.response_ids, lengths)]
        return self.pool.verify(prompts, responses, [t[:n].tolist() for t, n in zip(trainer, lengths)])

    def reduce(self, metrics: dict) -> dict:
        """Every metric averaged over the workers, but a per-worker maximum (`*_max`) is the
        maximum over them."""
        means = sorted(k for k in metrics if not k.endswith("_max"))
        maxima = sorted(k for k in metrics if k.endswith("_max"))
        totals = all_reduce_sum([float(metrics[k]) for k in means], self.worker.device)
        out = {k: v / self.worker.world_size for k, v in zip(means, totals)}
        if maxima:
            out |= dict(zip(maxima, all_reduce_max([float(metrics[k]) for k in maxima], self.worker.device)))
        return out

    def evaluate(self) -> dict:
        """Greedy responses to held-out prompts: mean reward (or divergence from the teacher),
        and the seconds the evaluation took (`eval_s`)."""
        started = time.perf_counter()
        records = self.datasets.eval
        if self.algo.eval_prompts:
            records = records[:self.algo.eval_prompts]
        if not records:
            return {}
        mine = records[self.worker.rank::self.worker.world_size]
        sums = self.collector.evaluate(mine, self.eval_divergence if self.objective.needs_teacher else None)
        keys = sorted(sums)
        totals = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], self.worker.device)))
        n = max(totals.pop("responses"), 1.0)
        out = {f"eval_{k}": v / n for k, v in totals.items() if k != "tokens"}
        if "divergence" in totals:
            out["eval_divergence"] = totals["divergence"] / max(totals["tokens"], 1.0)
        return out | {"eval_s": time.perf_counter() - started}

    @torch.no_grad()
    def eval_divergence(self, exp: Experience) -> float:
        """Summed per-token divergence student vs teacher on the given responses."""
        from trainers.rl_losses import support_divergence

        model = self.strategy.model
        model.eval()
        exp = exp.to(self.worker.device)
        d = self.job.distill
        logits, _ = model(exp.input_ids, exp.attention_mask, exp.position_ids)
        per_token = support_divergence(at_response(logits, exp), exp.teacher_logprobs, exp.teacher_ids, exp.mask,
                                       d.loss, d.beta)
        return float((per_token * exp.mask).sum())

    def save_final(self) -> None:
        from trainers.checkpoint import save_final

        full = self.strategy.full_state_dict()  # collective under ZeRO-3
        if self.worker.is_main:
            policy = self.strategy.module.policy
            save_final(self.run_dir, policy, self.tokenizer, state_dict=policy_state(full) if full else None)
