"""What every benchmark shares: the bench model, the machine's description, timing, and
writing results plus the docs/performance.md table."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

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


# Every workload, in the order `python -m benchmarks all` runs them and the table lists them.
WORKLOADS = ("sft", "dpo", "rollout", "grpo", "serve", "data")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": round(memory_gib, 1),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "measured": time.strftime("%Y-%m-%d")}


def describe(m: dict) -> str:
    """One line naming a results file's machine."""
    memory = f", {m['memory_gib']:g} GiB" if "memory_gib" in m else ""
    when = f", measured {m['measured']}" if "measured" in m else ""
    return f"{m['cpu']}, {m['cores']} cores{memory}, {m['gpu'] or 'no GPU'}, torch {m['torch']}{when}"


def matmul_ceiling(threads: int = 0, size: int = 2048, repeats: int = 8) -> float:
    """The float32 matmul rate of this machine in FLOP/s, measured now (the best of
    `repeats` square products of `size`), with `threads` torch threads (0: every core).
    Model FLOPs utilisation is a workload's model FLOP/s over this ceiling."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    torch.set_num_threads(before)
    return 2 * size ** 3 / best


def run_child(module: str, payload: dict, timeout: float = 1800) -> dict:
    """`python -m module --child JSON` in a fresh process, so a reference gets its own
    threads and its own peak memory; the child prints its result as the last stdout line."""
    proc = subprocess.run([sys.executable, "-m", module, "--child", json.dumps(payload)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def steady_state(steps: list[dict], warmup: int) -> dict:
    """Throughput after the first `warmup` steps from per-step rows {step, seconds, tokens,
    loss}: tokens/s over the measured steps' time, the median step, and the loss at the end
    (the mean of the last three steps, so one batch's noise does not decide it)."""
    measured = [r for r in steps if r["step"] > warmup]
    if not measured:
        raise RuntimeError(f"no steps after the {warmup} warm-up steps (got {len(steps)})")
    seconds = sum(r["seconds"] for r in measured)
    return {"tokens_per_s": sum(r["tokens"] for r in measured) / seconds,
            "step_s_median": statistics.median(r["seconds"] for r in measured),
            "step_s_mean": seconds / len(measured), "measured_steps": len(measured),
            "tokens_measured": sum(r["tokens"] for r in measured),
            "tokens_total": sum(r["tokens"] for r in steps),
            "final_loss": statistics.fmean(r["loss"] for r in steps[-3:])}


@dataclass
class TrainingSettings:
    """What the training benchmarks (sft, dpo) share: the rayft side runs `workers` workers
    with micro-batch x accumulation each; a reference accumulates workers x that in one
    process, so both take steps of the same size."""
    mode: str = "lora"            # lora | full
    preset: str = "bench"
    max_length: int = 256
    workers: int = 2
    micro_batch: int = 4
    grad_accum: int = 2           # per rayft worker
    steps: int = 12               # measured optimizer steps
    warmup: int = 2
    seed: int = 0
    threads: int = 0              # torch threads of a reference; 0 = every core

    rates: ClassVar[dict[str, float]] = {}  # learning rate per mode

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def lr(self) -> float:
        return self.rates[self.mode]

    @property
    def per_step(self) -> int:
        """Sequences (sft) or pairs (dpo) per optimizer step."""
        return self.workers * self.micro_batch * self.grad_accum


def passages(n: int, seed: int, prompt_lines: int, answer_lines: int):
    """n times (rng, prompt, answer): a passage of the tokenizer's corpus cut into a prompt
    of 1..prompt_lines lines and its continuation of 1..answer_lines lines. The rng is
    yielded so a caller's own draws (a shuffle) stay in the same seeded stream."""
    from trainers.models import builtin_corpus

    lines, rng = builtin_corpus(), random.Random(seed)
    for _ in range(n):
        start = rng.randrange(len(lines) - 24)
        k, m = rng.randint(1, prompt_lines), rng.randint(1, answer_lines)
        yield rng, " ".join(lines[start:start + k]), " ".join(lines[start + k:start + k + m])


def loss_check(sides: dict, tolerance: float) -> dict:
    """Did every reference reach rayft's loss after the same steps, within `tolerance`
    (relative)? A speed comparison between sides that did not learn alike means nothing."""
    base = sides["rayft"]["final_loss"]
    gaps = {name: abs(side["final_loss"] - base) / side["final_loss"] for name, side in sides.items() if name != "rayft"}
    return {"tolerance": tolerance, "relative_gaps": gaps, "ok": all(g <= tolerance for g in gaps.values())}


def record_mode(result: dict, workload: str, s: TrainingSettings, sides: dict, rows: list[dict], tolerance: float,
                rate: str) -> None:
    """Add one mode's sides, loss check and table rows to `result`, and print a line per
    side (`rate` names the side's throughput key) plus a warning when the losses differ."""
    check = loss_check(sides, tolerance)
    result["modes"][s.mode] = {"settings": asdict(s), "sides": sides, "loss_check": check}
    result["rows"] += rows
    for name, side in sides.items():
        mfu = f", MFU {side['mfu']:.1%}" if "mfu" in side else ""
        print(f"{workload} {s.mode} {name}: {side[rate]:.4g} {rate.replace('_per_s', '/s')}{mfu}, "
              f"loss {side['final_loss']:.4g}, peak RSS {side['peak_rss_mb']} MiB")
    if not check["ok"]:
        print(f"warning: {workload} {s.mode}: losses differ by more than {tolerance:.0%}: {check['relative_gaps']}")


# LoRA on every linear layer but the head, the same on every side of every benchmark.
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


def run_rayft_job(config: dict, warmup: int) -> dict:
    """Run a rayft job config (a dict, as in a YAML file) on the local Ray cluster and read
    its steady state, wall time and per-worker peak memory from the run's own metrics."""
    import ray

    from cluster.config import JobConfig, from_dict
    from cluster.train import run_training
    from trainers.metrics import read_metrics

    job = from_dict(JobConfig, config)
    job.validate()
    try:
        summary = run_training(job, echo=lambda *_: None)
    finally:
        ray.shutdown()
    rows = read_metrics(job.run_dir / "metrics.jsonl")
    steps = [{"step": r["step"], "seconds": r["step_s"], "tokens": r["tokens_per_s"] * r["step_s"], "loss": r["loss"]}
             for r in rows if "event" not in r and r.get("step", 0) > 0]
    return {**steady_state(steps, warmup), "wall_s": summary["wall_time_s"],
            "peak_rss_mb": summary["peak_rss_mb_per_worker"], "workers": job.cluster.num_workers,
            "torch_threads": 1, "run_dir": str(job.run_dir)}


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
    """One row per measured comparison in results/*.json, then the machines they ran on."""
    lines = ["| workload | metric | rayft | reference | ratio (rayft / reference) |", "|---|---|---|---|---|"]
    machines: dict[str, list[str]] = {}
    paths = sorted(RESULTS.glob("*.json"), key=lambda p: (WORKLOADS.index(p.stem) if p.stem in WORKLOADS else 99, p.stem))
    for path in paths:
        data = json.loads(path.read_text())
        for row in data.get("rows", []):
            lines.append(f"| {data['workload']} | {row['metric']} | {row['rayft']:.4g} | {row['reference']:.4g} "
                         f"({row['reference_name']}) | {row['rayft'] / row['reference']:.2f} |")
        machines.setdefault(describe(data["machine"]), []).append(data["workload"])
    lines.append("")
    lines += [f"Machine ({', '.join(names)}): {text}." for text, names in machines.items()]
    return "\n".join(lines)


def update_performance_doc() -> None:
    """Replace the generated table between the markers in docs/performance.md."""
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    text = PERFORMANCE_DOC.read_text() if PERFORMANCE_DOC.exists() else f"# Performance\n\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    PERFORMANCE_DOC.write_text(f"{head}{start}\n{render_table()}\n{end}{tail}")
