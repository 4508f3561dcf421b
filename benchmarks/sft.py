"""SFT training speed: rayft (2 Ray Train workers, DDP) against TRL's `SFTTrainer` and a
plain transformers `Trainer`, for LoRA and for full fine-tuning, on the same model, the
same tokenised samples, the same packing and the same hyper-parameters.

    python -m benchmarks sft [--modes lora,full] [--steps 12] [--warmup 2] [--samples 1200]
                             [--max-length 256] [--references trl,transformers]

Reported per side: steady-state tokens/s (the steps after `warmup`), model FLOPs
utilisation (6 * N * tokens/s, N the parameters that take part in matmuls, over the
float32 matmul ceiling measured in the same run), the training loss after the same
number of steps (which must agree, or the speed comparison means nothing) and peak
resident memory per worker process.

Both references run in their own process with torch on every core (the usual single-
process setup); rayft runs 2 workers with 1 CPU each. Every side packs whole samples
into sequences of at most `max-length` tokens without cross-sample attention and steps
on the same number of sequences: rayft 2 workers x `micro-batch` x `grad-accum`, the
references `micro-batch` x (2 x `grad-accum`).
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

from benchmarks.common import (CACHE, LORA, TrainingSettings, bench_model, matmul_ceiling, passages, record_mode,
                               run_child, run_rayft_job, steady_state, update_performance_doc, write_result)
from benchmarks.hf_reference import (child_main, matched_args, peft_lora_config, quiet_trainer, step_clock,
                                     step_rows)

LOSS_TOLERANCE = 0.05  # relative; the sides see the same samples in different orders


@dataclass
class Settings(TrainingSettings):
    samples: int = 1200           # chat samples; micro-batches count packed sequences

    rates: ClassVar[dict[str, float]] = {"lora": 1e-3, "full": 1e-4}


def instruction_rows(n: int, seed: int) -> list[dict]:
    """Chat rows of varied length (about 20 to 250 tokens): continue a passage of the
    tokenizer's corpus, so the model has something learnable."""
    return [{"messages": [{"role": "user", "content": f"Continue: {prompt}"},
                          {"role": "assistant", "content": answer}]}
            for _, prompt, answer in passages(n, seed, prompt_lines=6, answer_lines=12)]


def tokenised(model_dir: Path, data_path: Path, s: Settings):
    """rayft's own encoding of the data file (unpacked), which every side trains on."""
    from trainers.config import DataConfig, DataSource
    from trainers.data import build_datasets
    from trainers.models import load_tokenizer

    cfg = DataConfig(train=[DataSource(path=str(data_path))], eval_fraction=0.0, max_length=s.max_length)
    return build_datasets(cfg, load_tokenizer(model_dir)).train


def model_params(model_dir: Path) -> int:
    """N of 6*N*tokens: every parameter except the input embedding (a lookup, not a matmul)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


# --- rayft --------------------------------------------------------------------------------

def run_rayft(model_dir: Path, data_path: Path, s: Settings, workdir: Path) -> dict:
    peft = {"method": "lora", "target_modules": ["all-linear"], **LORA} if s.mode == "lora" else {}
    return run_rayft_job({
        "method": "sft", "name": f"sft-{s.mode}", "output_dir": str(workdir / "runs"),
        "model": {"path": str(model_dir)},
        "data": {"train": [str(data_path)], "eval_fraction": 0.0, "max_length": s.max_length, "packing": True},
        "peft": peft,
        "train": {"max_steps": s.total_steps, "batch_size": s.micro_batch, "grad_accum": s.grad_accum,
                  "lr": s.lr, "scheduler": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0,
                  "max_grad_norm": 1.0, "seed": s.seed, "log_every": 1, "eval_every": 0},
        "cluster": {"num_workers": s.workers, "device": "cpu"},
    }, s.warmup)


# --- references (each in its own process) -------------------------------------------------

def _reference_model(payload: dict):
    from trainers.models import load_causal_lm, load_tokenizer

    return load_causal_lm(payload["model_dir"]), load_tokenizer(payload["model_dir"])


def run_trl(payload: dict) -> dict:
    """TRL SFTTrainer: pre-tokenised samples with their completion masks, packing "bfd"
    (padding-free: a micro-batch is one row of whole samples with restarting positions)."""
    from datasets import Dataset
    import trl
    from trl import SFTConfig, SFTTrainer

    s = Settings(**payload["settings"])
    model, tokenizer = _reference_model(payload)
    examples = json.loads(Path(payload["examples"]).read_text())
    dataset = Dataset.from_list([{"input_ids": e["input_ids"],
                                  "completion_mask": [int(label != -100) for label in e["labels"]]}
                                 for e in examples])
    clock = step_clock()
    args = SFTConfig(**matched_args(s, payload["output_dir"]), per_device_train_batch_size=s.micro_batch,
                     gradient_accumulation_steps=s.workers * s.grad_accum, max_length=s.max_length,
                     packing=True, packing_strategy="bfd", completion_only_loss=True)
    trainer = quiet_trainer(SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                       peft_config=peft_lora_config() if s.mode == "lora" else None, callbacks=[clock]))
    trainer.train()
    return {**steady_state(step_rows(clock, trainer), s.warmup), "name": f"TRL {trl.__version__} SFTTrainer"}


class FlatPackedCollator:
    """Pre-packed rows to one padding-free row: the samples end to end, positions restarting
    at each sample, no attention mask (transformers then keeps attention within samples,
    as it does for TRL's padding-free batches)."""

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        ids, labels, positions = [], [], []
        for row in rows:
            ids += row["input_ids"]
            labels += row["labels"]
            for n in row["seq_lens"]:
                positions += range(n)
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions])}


def run_transformers(payload: dict) -> dict:
    """A plain transformers Trainer on the same samples, packed by the same best-fit
    decreasing packer rayft uses (data preparation, outside the timed steps)."""
    import transformers
    from transformers import Trainer, TrainingArguments

    from trainers.data import pack
    from trainers.data.records import Example

    s = Settings(**payload["settings"])
    model, tokenizer = _reference_model(payload)
    if s.mode == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, peft_lora_config())
    examples = [Example(e["input_ids"], e["labels"]) for e in json.loads(Path(payload["examples"]).read_text())]
    packed = [{"input_ids": e.input_ids, "labels": e.labels, "seq_lens": e.seq_lens}
              for e in pack(examples, s.max_length)]
    clock = step_clock()
    args = TrainingArguments(**matched_args(s, payload["output_dir"]), per_device_train_batch_size=s.micro_batch,
                             gradient_accumulation_steps=s.workers * s.grad_accum, remove_unused_columns=False)
    trainer = quiet_trainer(Trainer(model=model, args=args, train_dataset=packed, data_collator=FlatPackedCollator(),
                                    processing_class=tokenizer, callbacks=[clock]))
    trainer.train()
    return {**steady_state(step_rows(clock, trainer), s.warmup),
            "name": f"transformers {transformers.__version__} Trainer"}


REFERENCES = {"trl": run_trl, "transformers": run_transformers}


# --- the comparison -----------------------------------------------------------------------

def run_mode(s: Settings, references: list[str], ceiling: float, workdir: Path) -> dict:
    model_dir = bench_model(s.preset)
    data_path = workdir / "sft.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in instruction_rows(s.samples, s.seed)))
    examples_path = workdir / "examples.json"
    examples_path.write_text(json.dumps([{"input_ids": e.input_ids, "labels": e.labels}
                                         for e in tokenised(model_dir, data_path, s)]))
    flops_per_token = 6 * model_params(model_dir)
    sides = {"rayft": run_rayft(model_dir, data_path, s, workdir)}
    for name in references:
        payload = {"side": name, "settings": asdict(s), "model_dir": str(model_dir), "examples": str(examples_path),
                   "output_dir": str(workdir / name), "threads": s.threads or (os.cpu_count() or 1)}
        sides[name] = run_child("benchmarks.sft", payload)
    for side in sides.values():
        side["mfu"] = flops_per_token * side["tokens_per_s"] / ceiling
    return sides


def comparison_rows(mode: str, sides: dict) -> list[dict]:
    rayft, rows = sides["rayft"], []
    for name in (n for n in sides if n != "rayft"):
        ref = sides[name]
        rows += [{"metric": f"SFT {mode} tokens/s", "rayft": rayft["tokens_per_s"], "reference": ref["tokens_per_s"],
                  "reference_name": ref["name"]},
                 {"metric": f"SFT {mode} MFU", "rayft": rayft["mfu"], "reference": ref["mfu"],
                  "reference_name": ref["name"]},
                 {"metric": f"SFT {mode} loss after {ref['measured_steps'] + 2} steps (lower is better)",
                  "rayft": rayft["final_loss"], "reference": ref["final_loss"], "reference_name": ref["name"]},
                 {"metric": f"SFT {mode} peak RSS per worker, MiB (lower is better)",
                  "rayft": max(rayft["peak_rss_mb"]), "reference": ref["peak_rss_mb"], "reference_name": ref["name"]}]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks sft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="lora,full", help="comma-separated: lora, full (default both)")
    parser.add_argument("--references", default="trl,transformers", help="comma-separated: trl, transformers")
    defaults = Settings()
    for key in ("samples", "max_length", "micro_batch", "grad_accum", "steps", "warmup", "threads"):
        value = getattr(defaults, key)
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value, help=f"default {value}")
    args = vars(parser.parse_args(argv))
    modes, references = args.pop("modes").split(","), args.pop("references").split(",")
    ceiling = matmul_ceiling()
    result = {"matmul_ceiling_gflops": ceiling / 1e9, "modes": {}, "rows": []}
    CACHE.mkdir(parents=True, exist_ok=True)
    for mode in modes:
        s = Settings(mode=mode, **args)
        with tempfile.TemporaryDirectory(prefix=f"sft-{mode}-", dir=CACHE) as tmp:
            sides = run_mode(s, references, ceiling, Path(tmp))
        record_mode(result, "sft", s, sides, comparison_rows(mode, sides), LOSS_TOLERANCE, rate="tokens_per_s")
    print(write_result("sft", result))
    update_performance_doc()


if __name__ == "__main__":
    if "--child" in sys.argv:
        child_main(REFERENCES)
    else:
        main()
