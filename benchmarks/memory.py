"""Peak resident memory of the processes a workload starts (Ray actors, vLLM engine
processes, a server and everything it spawned), sampled from outside while it runs.
Training workers report their own peak (the `memory` event in metrics.jsonl) and the
references that run in a child process report theirs; this covers everything else."""

from __future__ import annotations

import os
import threading

ROLE_PREFIXES = ("ray::", "VLLM::")  # the process titles Ray and vLLM give their processes


def role(title: str) -> str:
    """A process's role from its title: "ray::EngineActor.generate" -> "ray::EngineActor";
    processes without a Ray or vLLM title are named by their executable."""
    first = title.split()[0] if title else "?"
    if first.startswith(ROLE_PREFIXES):
        return first.split(".")[0]
    return os.path.basename(first)


class PeakMemory(threading.Thread):
    """Samples the process tree under `root_pid` every `interval` s. `peaks()` gives each
    role's largest RSS (MiB), `total_peak` the largest sum over the whole tree at one time.
    Ray's idle pooled workers are left out (they belong to no workload)."""

    def __init__(self, root_pid: int | None = None, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root_pid, self.interval, self.done = root_pid or os.getpid(), interval, threading.Event()
        self._peaks: dict[str, float] = {}
        self.total_peak = 0.0

    def sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0.0
        for proc in processes:
            try:
                name = role(" ".join(proc.cmdline()))
                rss = proc.memory_info().rss / 2 ** 20
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if name == "ray::IDLE":
                continue
            total += rss
            self._peaks[name] = max(self._peaks.get(name, 0.0), rss)
        self.total_peak = max(self.total_peak, total)

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()

    def __enter__(self) -> "PeakMemory":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()

    def peaks(self, prefix: str = "") -> dict[str, float]:
        """Role -> peak RSS in MiB, for the roles starting with `prefix`."""
        return {name: round(peak, 1) for name, peak in sorted(self._peaks.items()) if name.startswith(prefix)}
