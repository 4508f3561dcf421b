"""Supervised fine-tuning (instruction, chat, chain-of-thought, continued pre-training):
next-token loss on the trained spans of each sample, on Ray Train workers."""

from __future__ import annotations

import ray

from trainers.loop import run_loop
from trainers.method import Method
from trainers.models import load_tokenizer


def sft_worker(loop_config: dict) -> None:
    """Ray Train entry point: `loop_config` holds the job config and the dataset ref."""
    job = loop_config["job"]
    tokenizer = load_tokenizer(job.model.path, job.model.trust_remote_code, job.data.chat_template)
    run_loop(job, ray.get(loop_config["datasets"]), Method(job, tokenizer, loop_config.get("use_gpu", False)))
