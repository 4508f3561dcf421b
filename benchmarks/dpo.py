"""DPO training speed: rayft's `dpo` method (2 Ray Train workers) against TRL's
`DPOTrainer`, on the same model, preference pairs and hyper-parameters, as pairs/s.

    python -m benchmarks dpo [--modes lora,full] [--steps 8] [--warmup 2] [--pairs 400]

LoRA: the reference is the policy with its adapter disabled on both sides (no second
copy of the model). Full: a frozen copy of the start model is the reference on both
sides. Every step computes the reference log-probs afresh on both sides (no step here
sees a pair twice, so rayft's per-pair cache never hits, and TRL's precompute is off).
The loss after the same steps must agree; peak resident memory per worker is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import ClassVar
from pathlib import Path

from benchmarks.common import (CACHE, LORA, TrainingSettings, bench_model, passages, record_mode, run_child,
                               run_rayft_job, steady_state, update_performance_doc, write_result)
from benchmarks.hf_reference import child_main, matched_args, peft_lora_config, quiet_trainer, step_clock, step_rows

# Relative, on the mean loss of the last three steps: the pairs reach the two sides in different
# orders, and 48 pairs of DPO loss move by several percent with the batch.
LOSS_TOLERANCE = 0.15


@dataclass
class Settings(TrainingSettings):
    pairs: int = 400              # preference pairs; micro-batches count pairs
    steps: int = 8
    beta: float = 0.1

    rates: ClassVar[dict[str, float]] = {"lora": 2e-4, "full": 2e-5}


def preference_rows(n: int, seed: int) -> list[dict]:
    """Conversational pairs: continue a passage of the tokenizer's corpus; chosen is the
    real continuation, rejected the same words shuffled (so the lengths match)."""
    rows = []
    for rng, prompt, chosen in passages(n, seed, prompt_lines=5, answer_lines=8):
        words = chosen.split()
        rng.shuffle(words)
        rows.append({"prompt": [{"role": "user", "content": f"Continue: {prompt}"}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": " ".join(words)}]})
    return rows


def run_rayft(model_dir: Path, data_path: Path, s: Settings, workdir: Path) -> dict:
    peft = {"method": "lora", "target_modules": ["all-linear"], **LORA} if s.mode == "lora" else {}
    result = run_rayft_job({
        "method": "dpo", "name": f"dpo-{s.mode}", "output_dir": str(workdir / "runs"),
        "model": {"path": str(model_dir)},
        "data": {"train": [str(data_path)], "eval_fraction": 0.0, "max_length": s.max_length},
        "peft": peft, "dpo": {"beta": s.beta, "loss": "sigmoid"},
        "train": {"max_steps": s.total_steps, "batch_size": s.micro_batch, "grad_accum": s.grad_accum,
                  "lr": s.lr, "scheduler": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0,
                  "max_grad_norm": 1.0, "seed": s.seed, "log_every": 1, "eval_every": 0},
        "cluster": {"num_workers": s.workers, "device": "cpu"},
    }, s.warmup)
    return {**result, "pairs_per_s": s.per_step / result["step_s_mean"]}


def run_trl(payload: dict) -> dict:
    """TRL DPOTrainer on the same rows (it applies the chat template itself)."""
    from datasets import Dataset
    import trl
    from trl import DPOConfig, DPOTrainer

    from trainers.models import load_causal_lm, load_tokenizer

    s = Settings(**payload["settings"])
    model, tokenizer = load_causal_lm(payload["model_dir"]), load_tokenizer(payload["model_dir"])
    rows = [json.loads(line) for line in Path(payload["data"]).read_text().splitlines()]
    clock = step_clock()
    args = DPOConfig(**matched_args(s, payload["output_dir"]), per_device_train_batch_size=s.micro_batch,
                     gradient_accumulation_steps=s.workers * s.grad_accum, max_length=s.max_length,
                     beta=s.beta, loss_type=["sigmoid"], precompute_ref_log_probs=False)
    ref_model = None if s.mode == "lora" else load_causal_lm(payload["model_dir"])  # TRL's frozen copy
    trainer = quiet_trainer(DPOTrainer(model=model, ref_model=ref_model, args=args,
                                       train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                       peft_config=peft_lora_config() if s.mode == "lora" else None,
                                       callbacks=[clock]))
    trainer.train()
    result = steady_state(step_rows(clock, trainer), s.warmup)
    return {**result, "pairs_per_s": s.per_step / result["step_s_mean"],
            "name": f"TRL {trl.__version__} DPOTrainer"}


def run_mode(s: Settings, workdir: Path) -> dict:
    model_dir = bench_model(s.preset)
    data_path = workdir / "pairs.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(s.pairs, s.seed)))
    payload = {"side": "trl", "settings": asdict(s), "model_dir": str(model_dir), "data": str(data_path),
               "output_dir": str(workdir / "trl"), "threads": s.threads or os.cpu_count() or 1}
    return {"rayft": run_rayft(model_dir, data_path, s, workdir), "trl": run_child("benchmarks.dpo", payload)}


def comparison_rows(s: Settings, sides: dict) -> list[dict]:
    rayft, ref = sides["rayft"], sides["trl"]
    metrics = [("pairs_per_s", f"DPO {s.mode} pairs/s"),
               ("final_loss", f"DPO {s.mode} loss after {s.total_steps} steps (lower is better)")]
    rows = [{"metric": label, "rayft": rayft[key], "reference": ref[key], "reference_name": ref["name"]}
            for key, label in metrics]
    return rows + [{"metric": f"DPO {s.mode} peak RSS per worker, MiB (lower is better)",
                    "rayft": max(rayft["peak_rss_mb"]), "reference": ref["peak_rss_mb"], "reference_name": ref["name"]}]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks dpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="lora,full", help="comma-separated: lora, full (default both)")
    defaults = Settings()
    for key in ("pairs", "max_length", "micro_batch", "grad_accum", "steps", "warmup", "threads"):
        value = getattr(defaults, key)
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value, help=f"default {value}")
    args = vars(parser.parse_args(argv))
    result = {"modes": {}, "rows": []}
    CACHE.mkdir(parents=True, exist_ok=True)
    for mode in args.pop("modes").split(","):
        s = Settings(mode=mode, **args)
        with tempfile.TemporaryDirectory(prefix=f"dpo-{mode}-", dir=CACHE) as tmp:
            sides = run_mode(s, Path(tmp))
        record_mode(result, "dpo", s, sides, comparison_rows(s, sides), LOSS_TOLERANCE, rate="pairs_per_s")
    print(write_result("dpo", result))
    update_performance_doc()


if __name__ == "__main__":
    if "--child" in sys.argv:
        child_main({"trl": run_trl})
    else:
        main()
