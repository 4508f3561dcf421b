"""`rayft data check FILE`: what a data file holds, before any training is spent on it.

`check_file` loads the file as training would and reports the detected format, the row
counts, token length statistics, how many rows the length limit cuts, and a few samples
with the trained stretches marked «like this». `format_check` renders the report for a
terminal; the report itself is plain JSON-able data for `--json`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from trainers.data.load import load_records
from trainers.data.records import Conversation, RawText
from trainers.data.render import encode, render_marked, truncate

UNLIMITED = 1 << 62  # encode without cutting, to measure the true lengths


def check_file(path: str | Path, tokenizer=None, fmt: str = "auto", purpose: str = "auto", max_length: int = 512,
               truncation_side: str = "right", skip_bad_rows: bool = False, show: int = 0) -> dict:
    result = load_records(path, fmt=fmt, purpose=purpose, skip_bad_rows=skip_bad_rows)
    records = result.records
    report = {"path": str(path), "format": result.format, "purpose": result.purpose, "rows": len(records),
              "skipped": result.skipped, "errors": result.errors, "max_length": max_length,
              "token_stats": None, "truncated": None, "samples": []}
    if tokenizer is not None and all(isinstance(r, (Conversation, RawText)) for r in records):
        examples = [encode(r, tokenizer, UNLIMITED) for r in records]
        lengths = [len(e.input_ids) for e in examples]
        report["token_stats"] = length_stats(lengths)
        report["truncated"] = sum(n > max_length for n in lengths)
        report["samples"] = [render_marked(truncate(e, max_length, truncation_side), tokenizer)
                             for e in examples[:show]]
    else:
        report["samples"] = [describe(r) for r in records[:show]]
    return report


def length_stats(lengths: list[int]) -> dict:
    ordered = sorted(lengths)
    return {"min": ordered[0], "mean": round(sum(ordered) / len(ordered), 1), "p50": percentile(ordered, 0.5),
            "p95": percentile(ordered, 0.95), "max": ordered[-1]}


def percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def describe(record) -> str:
    """A record as one line of JSON, for samples shown without a tokenizer."""
    fields = {k: v for k, v in asdict(record).items() if k != "origin" and v is not None}
    return json.dumps(fields, ensure_ascii=False)


def format_check(report: dict) -> str:
    """The report as aligned lines for a terminal."""
    skipped = report["skipped"]
    rows = f"{report['rows']}" + (f" ({skipped} bad row{'s' * (skipped != 1)} skipped)" if skipped else "")
    lines = [("file", report["path"]), ("format", report["format"]), ("purpose", report["purpose"]), ("rows", rows)]
    stats = report.get("token_stats")
    if stats:
        lines.append(("tokens", "  ".join(f"{k} {v}" for k, v in stats.items())))
        lines.append(("truncated", f"{report['truncated']} rows longer than {report['max_length']} tokens"))
    width = max(len(label) for label, _ in lines)
    out = [f"{label:<{width}}  {value}" for label, value in lines]
    out += [f"{'skipped':<{width}}  {message}" for message in report.get("errors", [])]
    for i, sample in enumerate(report.get("samples", []), 1):
        out += [f"--- sample {i} (trained text in «»)" if stats else f"--- sample {i}", sample]
    return "\n".join(out)
