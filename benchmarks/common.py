"""What every benchmark shares: the bench model, the machine's description, timing, and
writing results plus the docs/performance.md table."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("RAYFT_BENCH_CACHE", "/tmp/rayft-bench"))
PERFORMANCE_DOC = ROOT / "docs" / "performance.md"


def bench_model(preset: str = "bench", pretrain_steps: int = 0) -> Path:
    """The benchmark model, built once and cached (random weights are fine for speed)."""
    from trainers.models import build_model

    out = CACHE / f"{preset}-{pretrain_steps}"
    if not (out / "config.json").exists():
        build_model(preset, out, pretrain_steps=pretrain_steps)
    return out


def machine() -> dict:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def write_result(workload: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{workload}.json"
    path.write_text(json.dumps({"workload": workload, "machine": machine(), **result}, indent=2))
    return path


def render_table() -> str:
    """One row per measured comparison in results/*.json."""
    lines = ["| workload | metric | rayft | reference | ratio (rayft / reference) |", "|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        for row in data.get("rows", []):
            lines.append(f"| {data['workload']} | {row['metric']} | {row['rayft']:.4g} | {row['reference']:.4g} "
                         f"({row['reference_name']}) | {row['rayft'] / row['reference']:.2f} |")
    return "\n".join(lines)


def update_performance_doc() -> None:
    """Replace the generated table between the markers in docs/performance.md."""
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    text = PERFORMANCE_DOC.read_text() if PERFORMANCE_DOC.exists() else f"# Performance\n\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    PERFORMANCE_DOC.write_text(f"{head}{start}\n{render_table()}\n{end}{tail}")
