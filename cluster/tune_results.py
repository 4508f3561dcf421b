"""What `rayft tune` leaves behind: one row per trial (read from the trial's run directory
and Tune's verdict), the ranked results table (printed, and tune_results.csv) and
best_config.yaml, the best trial's job config ready for `rayft train`."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from cluster.config import to_dict
from trainers.metrics import read_metrics

COMPLETED, EARLY_STOPPED, FAILED = "completed", "early-stopped", "failed"


@dataclass
class TrialRow:
    trial: str            # trial_<i>, also its run directory's name
    values: dict          # searched key -> sampled value
    status: str           # completed | early-stopped | failed
    steps: int            # optimizer steps the run trained
    final: float | None   # the metric at the trial's last evaluation
    best: float | None    # the best value of the metric over its evaluations
    error: str            # one line, for a failed trial
    run_dir: str


def read_trial(run_dir: Path, values: dict, metric: str, mode: str, error: str | None = None) -> TrialRow:
    """A trial's row from its run directory: metrics.jsonl gives steps and the metric (the
    step-0 eval of the untrained model is left out); summary.json exists only when the run
    finished, so a trial without one that did not fail was stopped early by ASHA."""
    run_dir = Path(run_dir)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "event" not in r]
    evals = [r[metric] for r in rows if r.get("step", 0) > 0 and _number(r.get(metric))]
    finite = [v for v in evals if math.isfinite(v)]
    if error is None and (run_dir / "error.txt").is_file():
        error = (run_dir / "error.txt").read_text().strip()
    status = FAILED if error is not None else COMPLETED if (run_dir / "summary.json").is_file() else EARLY_STOPPED
    return TrialRow(trial=run_dir.name, values=dict(values), status=status,
                    steps=max((r.get("step", 0) for r in rows), default=0),
                    final=evals[-1] if evals else None,
                    best=(min(finite) if mode == "min" else max(finite)) if finite else None,
                    error=error or "", run_dir=str(run_dir))


def ranked(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    """Best first by the metric at each trial's last evaluation; then more steps first
    (a completed trial before one stopped at the same value); non-finite, missing and
    failed last."""
    sign = 1.0 if mode == "min" else -1.0

    def key(row: TrialRow):
        usable = row.status != FAILED and row.final is not None and math.isfinite(row.final)
        return (row.status == FAILED, not usable, sign * row.final if usable else 0.0, -row.steps,
                _index(row.trial))

    return sorted(rows, key=key)


def best_trial(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The best trial that did not fail and has a finite metric; None when there is none."""
    top = ranked(rows, mode)[:1]
    if top and top[0].status != FAILED and top[0].final is not None and math.isfinite(top[0].final):
        return top[0]
    return None


def columns(keys: list[str], metric: str) -> list[str]:
    return ["trial", *keys, "status", "steps", metric, f"best_{metric}", "error", "run_dir"]


def as_record(row: TrialRow, keys: list[str], metric: str) -> dict:
    return {"trial": row.trial, **{k: row.values.get(k) for k in keys}, "status": row.status,
            "steps": row.steps, metric: row.final, f"best_{metric}": row.best, "error": row.error,
            "run_dir": row.run_dir}


def write_csv(path: Path, rows: list[TrialRow], keys: list[str], metric: str) -> Path:
    """tune_results.csv: one line per trial, best first; empty cells for missing values."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns(keys, metric))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in as_record(row, keys, metric).items()})
    return path


def format_table(rows: list[TrialRow], keys: list[str], metric: str, best: TrialRow | None = None,
                 error_width: int = 60) -> str:
    """The table as aligned text, best first, the best trial marked with '*'."""
    names = columns(keys, metric)[:-1]  # the run directory is in the CSV
    lines = [[""] + names]
    for row in rows:
        record = as_record(row, keys, metric)
        error = record["error"]
        record["error"] = error if len(error) <= error_width else error[:error_width - 3] + "..."
        lines.append(["*" if best is not None and row.trial == best.trial else ""]
                     + [_fmt(record[name]) for name in names])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def write_best_config(path: Path, config, row: TrialRow, search: str, metric: str) -> Path:
    """best_config.yaml: `config` (the best trial's values applied, its own run name, no
    tune section) as a complete job config, headed by where it came from and its command."""
    path = Path(path)
    data = to_dict(config)
    data.pop("tune", None)
    values = ", ".join(f"{k}={_fmt(v)}" for k, v in row.values.items())
    header = (f"# Best trial of the `rayft tune` search '{search}': {row.trial} ({values}),\n"
              f"# {metric} {_fmt(row.final)} after {row.steps} steps ({row.status}).\n"
              f"# Run: rayft train {path}\n")
    path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _index(trial: str) -> int:
    tail = trial.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0
