"""`rayft eval RUN_OR_CHECKPOINT --data FILE`: score a trained model on a data file, in
this process (no Ray), on the GPU when there is one.

Which metrics a run gets (see docs/eval.md and `metrics.choose_passes`):
  causal LM, conversations or raw text    loss per trained token, perplexity
  ... rows with `reference`/`answer`      + greedy generation and exact match
  causal LM, prompt rows with a reference exact match only
  classifier, text/label rows             accuracy, macro-F1, F1 per label
  reward model, preference rows           pairwise accuracy, margin, mean rewards, loss
  reward model, (prompt, response) rows   a reward per row; MSE and MAE on scored rows

Modules: target (what a path holds and loading it; `rayft export` uses it too), data
(the file, loaded per pass), passes and reward (the model runs), metrics (pure functions).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cluster.evaluate.data import label_ids, load_eval_data
from cluster.evaluate.metrics import CLASSIFICATION, EXACT_MATCH, LOSS, PAIRS, REWARDS
from cluster.evaluate.target import CLASSIFIER, REWARD_MODEL, class_labels, inspect_model, load_model, saved_dtype
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
    run = run_config(md.path)
    run_data = run_data_config(run)
    max_length = opts.max_length or run_data.get("max_length") or DEFAULT_MAX_LENGTH
    side = run_data.get("truncation_side", "right")

    import torch

    from cluster.evaluate.passes import classification_pass, exact_match_pass, loss_pass
    from cluster.evaluate.reward import pairs_pass, rewards_pass

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
        _merge(report, samples, classification_pass(model, tokenizer, data.labelled, gold, id2label, max_length,
                                                     side, opts.batch_size, device))
    if PAIRS in data.passes:
        _merge(report, samples, pairs_pass(model, tokenizer, data.pairs, max_length, side, opts.batch_size, device,
                                           **run_reward_config(run)))
    if REWARDS in data.passes:
        _merge(report, samples, rewards_pass(model, tokenizer, data.responses, data.has_scores, max_length, side,
                                             opts.batch_size, device))
    return report, samples


def _merge(report: dict, samples: list[dict], outcome: tuple[dict, list]) -> None:
    """A pass's metrics into the report, its per-row results into the rows' samples."""
    metrics, results = outcome
    report.update(metrics)
    for sample, result in zip(samples, results, strict=True):
        sample.update(result)


def run_config(model_dir: Path) -> dict:
    """The run's config.yaml when `model_dir` is a run's final/; {} otherwise (or when it
    does not parse: only defaults are at stake, the model itself loads without it)."""
    import yaml

    config_file = model_dir.parent / "config.yaml"
    if model_dir.name != "final" or not config_file.is_file():
        return {}
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}
    return config if isinstance(config, dict) else {}


def _section(config: dict, name: str) -> dict:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def run_data_config(config: dict) -> dict:
    """The run's `data.max_length` and `data.truncation_side`, so rows are cut as they
    were in training; {} when the run sets neither."""
    data = _section(config, "data")
    found = {}
    if isinstance(data.get("max_length"), int) and data["max_length"] > 0:
        found["max_length"] = data["max_length"]
    if data.get("truncation_side") in ("right", "left"):
        found["truncation_side"] = data["truncation_side"]
    return found


def run_reward_config(config: dict) -> dict:
    """The run's `rm.use_margin` and `rm.center_coef`, so the pairwise loss is the one the
    run reported as eval_loss; {} (the trainer's defaults) when the run sets neither."""
    rm = _section(config, "rm")
    found = {}
    if isinstance(rm.get("use_margin"), bool):
        found["use_margin"] = rm["use_margin"]
    if isinstance(rm.get("center_coef"), (int, float)) and not isinstance(rm["center_coef"], bool) \
            and rm["center_coef"] >= 0:
        found["center_coef"] = float(rm["center_coef"])
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
    lines += _reward_lines(report) if report["task"] == REWARD_MODEL else _lm_and_classifier_lines(report)
    if report.get("samples_file"):
        lines.append(("per-row results", report["samples_file"]))
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)


def _lm_and_classifier_lines(report: dict) -> list[tuple[str, str]]:
    lines = []
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
    return lines


def _reward_lines(report: dict) -> list[tuple[str, str]]:
    cut = [f"{report[k]} {k}" for k in ("truncated", "dropped") if report[k]]
    cut = f"; {', '.join(cut)}" if cut else ""
    if "accuracy" in report:
        return [("accuracy", f"{_num(report['accuracy'])}  reward(chosen) > reward(rejected) in "
                             f"{report['pairs']} pairs{cut}"),
                ("margin", f"{_num(report['margin'])}  mean reward(chosen) - reward(rejected)"),
                ("chosen reward", _num(report["chosen_reward"])),
                ("rejected reward", _num(report["rejected_reward"])),
                ("loss", f"{_num(report['loss'])}  pairwise (Bradley-Terry), as training's eval_loss")]
    lines = [("mean reward", f"{_num(report['mean_reward'])}  over {report['scored']} rows{cut}")]
    if "mse" in report:
        lines += [("MSE", f"{_num(report['mse'])}  against the rows' scores"), ("MAE", _num(report["mae"]))]
    return lines


def _num(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"
