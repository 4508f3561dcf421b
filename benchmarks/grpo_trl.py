"""TRL's side of the GRPO benchmark: `GRPOTrainer` with transformers `generate` in one
process, matched to rayft's step, timed by trainer callbacks; the held-out evaluation is a
callback that samples greedily on the same prompts rayft evaluates on."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from benchmarks.common import Timer
from benchmarks.grpo_clock import mean, steady_rates, step_seconds, time_to_target, without_pauses
from benchmarks.hf_reference import quiet_trainer, step_clock


def trl_reward(completions, reference, **_) -> list[float]:
    """rayft's built-in exact_match in TRL's reward signature (conversational completions)."""
    from rollout.reward_rules import exact_match

    return [exact_match("", c[-1]["content"], ref, {}) for c, ref in zip(completions, reference)]


def held_out_eval(rows: list[dict], tokenizer, every: int, new_tokens: int):
    """A TrainerCallback: the mean exact-match reward of greedy answers to `rows`, before
    training and after every `every` steps, in `evals` (step -> reward), with the time
    each took in `pauses` (start, seconds)."""
    import torch
    from transformers import TrainerCallback

    from rollout.reward_rules import exact_match

    prompts = [tokenizer.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=False)
               for r in rows]

    class HeldOut(TrainerCallback):
        def __init__(self):
            self.evals: dict[int, float] = {}
            self.pauses: list[tuple[float, float]] = []

        def evaluate(self, model, step: int) -> None:
            started = time.perf_counter()
            was_training = model.training
            model.eval()
            side = tokenizer.padding_side
            tokenizer.padding_side = "left"
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            tokenizer.padding_side = side
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            self.evals[step] = mean(exact_match("", a, r["reference"], {}) for a, r in zip(answers, rows))
            model.train(was_training)
            self.pauses.append((started, time.perf_counter() - started))

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.evaluate(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                self.evaluate(model, state.global_step)

    return HeldOut()


def run_reference(w, data: dict[str, Path], workdir: Path) -> dict:
    """TRL's GRPOTrainer on CPU with transformers generation, on workload `w`."""
    import warnings

    import torch
    from datasets import Dataset

    with warnings.catch_warnings():  # TRL warns about the vLLM version even when it does not use vLLM
        warnings.filterwarnings("ignore", message="TRL currently supports vLLM")
        import trl
        from trl import GRPOConfig, GRPOTrainer

    from trainers.models import load_causal_lm, load_tokenizer

    def read(path):
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

    tokenizer = load_tokenizer(data["model"])
    dataset = Dataset.from_list([{"prompt": r["messages"][:1], "reference": r["reference"]} for r in read(data["train"])])
    clock = step_clock()
    callbacks = [clock]
    held_out = None
    if w.eval_every:
        held_out = held_out_eval(read(data["eval"])[:w.eval_prompts], tokenizer, w.eval_every, w.new_tokens)
        callbacks.append(held_out)
    args = GRPOConfig(
        output_dir=str(workdir / f"trl-{w.name}"), max_steps=w.total_steps, seed=w.seed,
        # One generation batch per optimizer step: P prompts x G samples, one pass, no accumulation.
        per_device_train_batch_size=w.prompts * w.samples, gradient_accumulation_steps=1, num_iterations=1,
        num_generations=w.samples, max_completion_length=w.new_tokens, temperature=w.temperature,
        top_p=1.0, top_k=0,
        learning_rate=w.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.0, epsilon=0.2, scale_rewards="group", loss_type="dapo",  # dapo: mean over every response token
        # TRL's own defaults (bf16, gradient checkpointing) differ from rayft's CPU defaults.
        bf16=False, gradient_checkpointing=False, use_cpu=True, use_vllm=False,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    trainer = quiet_trainer(GRPOTrainer(model=load_causal_lm(data["model"]), reward_funcs=trl_reward, args=args,
                                        train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks))
    with Timer() as wall:
        trainer.train()
    pauses = held_out.pauses if held_out else []
    ends = without_pauses({0: clock.start, **{step: end for step, end, _ in clock.ends}}, pauses)
    evals = held_out.evals if held_out else {}
    measured = [h for h in trainer.state.log_history if w.warmup < h.get("step", 0) and "reward" in h]
    return {**steady_rates(ends, w.warmup, w.total_steps), **time_to_target(ends, evals, w.target),
            "wall_s": wall.seconds, "step_seconds": step_seconds(ends), "evals": evals,
            "eval_s": sum(seconds for _, seconds in pauses),
            "mean_reward": mean(h["reward"] for h in measured),
            "mean_response_tokens": mean(h.get("completions/mean_length") for h in measured),
            "mean_step_time_s": mean(h.get("step_time") for h in measured), "load_avg": os.getloadavg(),
            "trl": trl.__version__, "generation": "transformers generate (use_vllm=False)",
            "torch_threads": torch.get_num_threads(), "loss_type": args.loss_type}
