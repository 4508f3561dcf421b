"""The run's metrics log (one JSON object per logged step in metrics.jsonl, written by
rank 0 only; on resume, rows past the restored step are dropped so the log reads as one
uninterrupted run) and the metric formulas that training and `rayft eval` share.

A process killed mid-write (or a full disk) can leave the last line cut short: readers
drop that line with a warning naming the file and line, and a resumed run rewrites the
log without it. A bad line anywhere else is damage, not an interrupted append, and stays
an error naming the file and line.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

from trainers.errors import DataError


class TruncatedMetricsWarning(UserWarning):
    """The last line of a metrics log was cut short and is left out."""


class MetricsLog:
    def __init__(self, path: Path, enabled: bool, resume_step: int = 0):
        self.path, self.enabled = Path(path), enabled
        if enabled and self.path.exists():
            kept = [json.dumps(row) for row in parse_rows(self.path, self.path.read_text())
                    if row.get("step", 0) <= resume_step]
            # A new file replaces the old one whole, so a reader never sees it half-rewritten.
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
        with self.path.open("a") as fh:
            fh.write(json.dumps(clean) + "\n")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return parse_rows(path, path.read_text())


def parse_rows(path: Path, text: str) -> list[dict]:
    """The rows of a metrics log's `text`; see the module docstring for a bad line."""
    lines = text.splitlines()
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if n == last:
                warnings.warn(f"{path}:{n}: the last line is cut short ({exc.msg}); left out",
                              TruncatedMetricsWarning, stacklevel=3)
                break
            raise DataError(path, n, f"not a JSON metrics row ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(path, n, "not a JSON object")
        rows.append(row)
    return rows


def f1_from_counts(tp: float, fp: float, fn: float) -> float:
    """F1 = 2TP / (2TP + FP + FN) (the harmonic mean of precision and recall); 0 when the
    class never occurs in labels or predictions."""
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def macro_f1(tp: list[float], fp: list[float], fn: list[float]) -> float:
    """Unweighted mean F1 over the classes that occur in the labels or the predictions."""
    scores = [f1_from_counts(t, p, n) for t, p, n in zip(tp, fp, fn) if t + p + n]
    return sum(scores) / len(scores) if scores else 0.0
