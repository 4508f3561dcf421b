"""`rayft eval RUN_OR_CHECKPOINT --data FILE`: score a trained model on a data file, in
this process (no Ray), on the GPU when there is one.

Which metrics a run gets (see docs/eval.md and `metrics.choose_passes`):
  causal LM, conversations or raw text    loss per trained token, perplexity
  ... rows with `reference`/`answer`      + greedy generation and exact match
  causal LM, prompt rows with a reference exact match only
  classifier, text/label rows             accuracy, macro-F1, F1 per label

Modules: target (what a path holds and loading it; `rayft export` uses it too), data
(the file, loaded per pass), passes (the model runs), metrics (pure functions).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cluster.evaluate.data import label_ids, load_eval_data
from cluster.evaluate.metrics import CLASSIFICATION, EXACT_MATCH, LOSS
from cluster.evaluate.target import CLASSIFIER, class_labels, inspect_model, load_model, saved_dtype
from trainers.errors import UserError

DEFAULT_MAX_LENGTH = 512  # the training default (data.max_length)


@dataclass
class EvalOptions:
    max_length: Optional[int] = None  # None: the run's data.max_length, else DEFAULT_MAX_LENGTH
    batch_size: int = 8
    limit: Optional[int] = None       # only the first N rows
    max_new_tokens: int = 32

    def validate(self) -> None:
        for name in ("max_length", "batch_size", "limit", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def evaluate(target: str | Path, data_path: str | Path, opts: EvalOptions) -> tuple[dict, list[dict]]:
    """(report, per-row results). Paths, data rows and labels are all checked before any
    weights are loaded, so a mistake costs a second, not a model load."""
    opts.validate()
    md = inspect_model(target)
    data = load_eval_data(data_path, md.task, opts.limit)
    id2label = class_labels(md) if md.task == CLASSIFIER else {}
    gold = label_ids(data.labelled, id2label) if CLASSIFICATION in data.passes else []
    run_data = run_data_config(md.path)
    max_length = opts.max_length or run_data.get("max_length") or DEFAULT_MAX_LENGTH
    side = run_data.get("truncation_side", "right")

    import torch

    from cluster.evaluate.passes import classification_pass, exact_match_pass, loss_pass

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # float32 on CPU (half precision is slow there); on GPU the dtype the weights were saved in.
    model, tokenizer = load_model(md, saved_dtype(md.base or md.path) if device == "cuda" else "float32", device)
    report = {"model": str(md.path), "task": md.task, "peft": md.peft_type, "base": str(md.base) if md.base else None,
              "data": data.path, "format": data.format, "samples": data.rows, "max_length": max_length}
    samples = [{"origin": origin} for origin in data.origins]
    if LOSS in data.passes:
        metrics, results = loss_pass(model, tokenizer, data.scored, max_length, side, opts.batch_size, device)
        report.update(metrics)
        for sample, result in zip(samples, results):
            sample.update(result or {"loss": None, "tokens": 0})
    if EXACT_MATCH in data.passes:
        metrics, by_row = exact_match_pass(model, tokenizer, data.prompts, max_length, opts.max_new_tokens,
                                           opts.batch_size, device)
        report.update(metrics)
        for i, result in by_row.items():
            samples[i].update(result)
    if CLASSIFICATION in data.passes:
        metrics, results = classification_pass(model, tokenizer, data.labelled, gold, id2label, max_length, side,
                                               opts.batch_size, device)
        report.update(metrics)
        for sample, result in zip(samples, results):
            sample.update(result)
    return report, samples


def run_data_config(model_dir: Path) -> dict:
    """The run's `data.max_length` and `data.truncation_side` when `model_dir` is a run's
    final/, so rows are cut as they were in training; {} otherwise."""
    import yaml

    config_file = model_dir.parent / "config.yaml"
    if model_dir.name != "final" or not config_file.is_file():
        return {}
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}  # only defaults are at stake; the model itself loads without it
    data = config.get("data") if isinstance(config, dict) else None
    data = data if isinstance(data, dict) else {}
    found = {}
    if isinstance(data.get("max_length"), int) and data["max_length"] > 0:
        found["max_length"] = data["max_length"]
    if data.get("truncation_side") in ("right", "left"):
        found["truncation_side"] = data["truncation_side"]
    return found


def to_json(value) -> str:
    """One JSON object; NaN and infinity (nothing scored, overflow) become null."""
    return json.dumps(_finite(value), ensure_ascii=False)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_samples(path: str | Path, samples: list[dict]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(to_json(s) + "\n" for s in samples), encoding="utf-8")
    return out


def format_report(report: dict) -> str:
    """The report as aligned `name  value` lines for a terminal."""
    model = report["model"] + (f" ({report['peft'].lower()} adapter on {report['base']})" if report["peft"] else "")
    lines = [("model", model), ("task", report["task"].replace("_", " ")),
             ("data", f"{report['data']} ({report['format']}, {report['samples']} rows)")]
    if "loss" in report:
        truncated = f", {report['truncated']} truncated" if report["truncated"] else ""
        lines += [("loss", f"{report['loss']:.4f}  per trained token ({report['tokens']} tokens in "
                           f"{report['loss_samples']} rows{truncated})"),
                  ("perplexity", f"{report['perplexity']:.4f}")]
    if "exact_match" in report:
        lines.append(("exact match", f"{report['exact_match']:.4f}  ({report['exact_match_correct']} of "
                                     f"{report['exact_match_samples']} rows with a reference)"))
    if "accuracy" in report:
        lines += [("accuracy", f"{report['accuracy']:.4f}"), ("macro F1", f"{report['macro_f1']:.4f}")]
        lines += [(f"F1 {label}", f"{f1:.4f}") for label, f1 in report["f1_per_label"].items()]
    if report.get("samples_file"):
        lines.append(("per-row results", report["samples_file"]))
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)
