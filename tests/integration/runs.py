"""Helpers the integration tests share to run jobs in-process on the session's Ray cluster
and read what a run wrote."""

import json

from cluster.config import load_config
from cluster.train import run_training


def write_rows(path, rows):
    """JSONL rows to `path`; returns the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(tmp_path, name, model, *overrides, pool=None):
    """One run of `name` under `tmp_path` from `model`, one worker, quiet: (config, summary)."""
    config = load_config(None, [f"name={name}", f"output_dir={tmp_path}", f"model.path={model}",
                                "cluster.num_workers=1", *overrides])
    return config, run_training(config, echo=lambda *_: None, pool=pool)


def metric_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_rows(run_dir):
    """The per-step training rows of metrics.jsonl (not evaluations or events)."""
    return [r for r in metric_rows(run_dir) if "event" not in r and "step_s" in r]
