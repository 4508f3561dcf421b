"""What the transformers-based references share: a `Trainer` callback that times every
optimizer step and counts its tokens, the `TrainingArguments` settings that match rayft's
run, and the child-process entry that runs a reference and prints its result."""

from __future__ import annotations

import json
import sys
import time


def matched_args(s, output_dir: str) -> dict:
    """TrainingArguments keywords matching a rayft run of settings `s` (lr, schedule,
    accumulation, clipping, precision, no checkpoints, a log row per step)."""
    return dict(output_dir=output_dir, max_steps=s.total_steps, seed=s.seed,
                learning_rate=s.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999,
                bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
                logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                dataloader_num_workers=0, include_num_input_tokens_seen="non_padding")


def peft_lora_config():
    """benchmarks.common.LORA as a peft config (every linear layer but the head)."""
    import peft

    from benchmarks.common import LORA

    return peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                           target_modules="all-linear", task_type="CAUSAL_LM")


def step_clock():
    """A TrainerCallback recording (end time, tokens seen) at every optimizer step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[tuple[int, float, int]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append((state.global_step, time.perf_counter(), state.num_input_tokens_seen))

    return StepClock()


def step_rows(clock, trainer, loss_key: str = "loss") -> list[dict]:
    """Per-step rows {step, seconds, tokens, loss} from the clock and the trainer's log."""
    losses = {h["step"]: h[loss_key] for h in trainer.state.log_history if loss_key in h}
    rows, last_time, last_tokens = [], clock.start, 0
    for step, end, tokens in clock.ends:
        rows.append({"step": step, "seconds": end - last_time, "tokens": tokens - last_tokens,
                     "loss": losses.get(step)})
        last_time, last_tokens = end, tokens
    return rows


def quiet_trainer(trainer):
    """Drop the per-step printed dicts (the clock and the log history keep the numbers)."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def child_main(runners: dict) -> None:
    """`python -m benchmarks.X --child JSON`: run runners[payload["side"]](payload) with
    torch on payload["threads"] threads and print its result (plus peak memory) as JSON."""
    import torch

    from trainers.metrics import peak_rss_mb

    payload = json.loads(sys.argv[sys.argv.index("--child") + 1])
    torch.set_num_threads(payload["threads"])
    result = runners[payload["side"]](payload)
    result.update(peak_rss_mb=peak_rss_mb(), torch_threads=torch.get_num_threads())
    print(json.dumps(result))
