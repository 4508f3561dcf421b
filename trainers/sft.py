"""Supervised fine-tuning (instruction, chat, chain-of-thought, continued pre-training):
next-token loss on the trained spans of each sample, on Ray Train workers."""

from __future__ import annotations

import ray

from trainers.loop import run_token_loop
from trainers.losses import token_nll_sum
from trainers.setup import build_policy


def sft_loss(model, batch: dict):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False)
    return token_nll_sum(out.logits, batch["labels"])


def sft_worker(loop_config: dict) -> None:
    """Ray Train entry point: `loop_config` holds the job config and the dataset ref."""
    job = loop_config["job"]
    datasets = ray.get(loop_config["datasets"])
    use_gpu = loop_config.get("use_gpu", False)
    run_token_loop(job, datasets, lambda: build_policy(job.model, job.peft, use_gpu), sft_loss)
