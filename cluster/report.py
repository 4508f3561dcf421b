"""report.html: the run's curves (loss, eval loss, lr, throughput, and reward/KL when
present) as embedded PNGs plus the summary table, viewable offline."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from trainers.metrics import read_metrics

# Panels in display order: (title, metric keys drawn together).
PANELS = [
    ("Loss", ["loss", "eval_loss"]),
    ("Learning rate", ["lr"]),
    ("Throughput (tokens/s)", ["tokens_per_s"]),
    ("Gradient norm", ["grad_norm"]),
    ("Reward", ["reward_mean", "eval_reward"]),
    ("KL to the reference", ["kl", "approx_kl"]),
    ("Response length (tokens)", ["response_length", "eval_length"]),
    ("Divergence from the teacher", ["divergence", "eval_divergence"]),
    ("Entropy and clipping", ["entropy", "clip_fraction"]),
    ("Value loss", ["value_loss"]),
    ("Step time (s)", ["generate_s", "score_s", "teacher_s", "train_s", "sync_s"]),
    ("Accuracy", ["eval_accuracy", "eval_reward_accuracy", "eval_f1"]),
    ("Reward margin", ["eval_margin", "eval_reward_margin"]),
    ("Implicit rewards", ["eval_chosen_reward", "eval_rejected_reward"]),
]


def write_report(run_dir: Path, summary: dict) -> Path:
    rows = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "event" not in r]
    figures = [(title, _plot(rows, keys)) for title, keys in PANELS if any(k in r for r in rows for k in keys)]
    body = [f"<h1>rayft run: {html.escape(str(summary.get('name', Path(run_dir).name)))}</h1>",
            "<h2>Summary</h2>", _table(summary)]
    body += [f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='data:image/png;base64,{png}'/>"
             for t, png in figures]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>rayft report</title>"
            "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}"
            "td{padding:2px 12px;border-bottom:1px solid #ddd}img{max-width:100%}</style></head>"
            f"<body>{''.join(body)}</body></html>")
    out = Path(run_dir) / "report.html"
    out.write_text(page, encoding="utf-8")
    return out


def _plot(rows: list[dict], keys: list[str]) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _table(summary: dict) -> str:
    cells = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
                    for k, v in summary.items())
    return f"<table>{cells}</table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)
