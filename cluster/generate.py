"""`rayft generate`: batch generation through the rollout pool. Reads prompts (any
prompt-carrying format), generates `n` samples per prompt on `--engines` engine actors,
and writes one JSON line per prompt; with `--reward`, scores every sample and keeps the
best (best-of-n / rejection sampling). Prints progress and throughput."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from cluster.evaluate.target import CAUSAL_LM, inspect_model
from cluster.ray_env import cluster_has_gpus, ensure_ray
from cluster.reward_test import reward_spec
from rollout.config import RolloutConfig
from rollout.engine import Sampling
from trainers.data import load_records
from trainers.errors import UserError


def serving_dirs(checkpoint: str) -> tuple[str, str | None]:
    """(base model dir, LoRA adapter dir or None) for a run or model directory."""
    model = inspect_model(checkpoint)
    if model.task != CAUSAL_LM:
        raise UserError(f"{checkpoint}: a {model.task.replace('_', ' ')} cannot generate text")
    if model.peft_type is None:
        return str(model.path), None
    if model.peft_type != "LORA":
        raise UserError(f"{checkpoint}: a {model.peft_type} adapter cannot be served by the engines; "
                        f"merge it first (`rayft export {checkpoint} --out DIR --merge-lora`) or use LoRA")
    return str(model.base), str(model.path)


def run_generate(checkpoint: str, prompts_file: str, out_file: str, *, engine: str = "auto", engines: int = 1,
                 n: int = 1, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 128,
                 seed: int = 0, batch_size: int = 64, reward: list[str] | None = None, echo=print) -> dict:
    base, adapter = serving_dirs(checkpoint)
    records = load_records(prompts_file, purpose="prompt").records
    cfg = RolloutConfig(engine=engine, num_engines=engines, enable_lora=adapter is not None, seed=seed)
    spec = reward_spec(reward) if reward else None
    # The embedded cluster must offer every actor a CPU slot, or one waits forever.
    ensure_ray(num_cpus=engines * cfg.cpus_per_engine + (spec.num_actors * spec.cpus_per_actor if spec else 0))
    from rollout.pool import RolloutPool
    from rollout.reward_actor import start_reward_actors

    pool = RolloutPool(base, cfg, adapter_dir=adapter, use_gpu=cluster_has_gpus())
    scorer = start_reward_actors(spec) if spec else None
    sampling = Sampling(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    out, tokens, started = Path(out_file), 0, time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with out.open("w") as fh, tqdm(total=len(records), desc="generate", unit="prompt") as bar:
            for i in range(0, len(records), batch_size):
                chunk = records[i:i + batch_size]
                groups = pool.generate([r.prompt_messages for r in chunk], sampling)
                for record, group in zip(chunk, groups):
                    row = {"prompt": record.prompt_messages, "reference": record.reference,
                           "responses": [g.text for g in group], "finish_reasons": [g.finish_reason for g in group]}
                    if scorer is not None:
                        row.update(_best_of(scorer, record, group))
                    fh.write(json.dumps(row) + "\n")
                    tokens += sum(len(g.response_ids) for g in group)
                bar.update(len(chunk))
                bar.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - started):.0f}", refresh=False)
    finally:
        pool.shutdown()
        if scorer is not None:
            from rollout.reward_actor import stop_reward_actors

            stop_reward_actors(scorer)
    seconds = time.perf_counter() - started
    stats = {"prompts": len(records), "samples": len(records) * n, "new_tokens": tokens,
             "seconds": round(seconds, 2), "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
             "engine": pool.kind, "engines": engines, "out": str(out)}
    echo(f"{stats['prompts']} prompts x {n} samples, {tokens} tokens in {seconds:.1f}s "
         f"({stats['tokens_per_s']} tokens/s on {engines} {pool.kind} engine(s)) -> {out}")
    return stats


def _best_of(actors, record, group) -> dict:
    from rollout.reward_actor import score_batch
    from rollout.rewards import RewardItem

    items = [RewardItem.from_generation(record.prompt_messages, g, record.reference) for g in group]
    rewards = [r.reward for r in score_batch(actors, items)]
    best = max(range(len(rewards)), key=rewards.__getitem__)
    return {"rewards": rewards, "best": group[best].text, "best_reward": rewards[best]}
