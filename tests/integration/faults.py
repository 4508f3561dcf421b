"""Fault injection for resume and recovery tests: SIGKILL a process of this test's own
Ray cluster (a real process death, not an exception). Processes are looked for among the
descendants of the test process only (a local `ray.init()` starts its GCS, raylet and
workers as children of the process that called it; a `rayft` subprocess's under that
subprocess), so Ray clusters of other users on the same machine are never touched."""

import os
import signal
import threading
import time
import warnings
from contextlib import contextmanager

import psutil

from trainers.metrics import TruncatedMetricsWarning, read_metrics


def own_pids(title: str, root: int | None = None) -> list[int]:
    """Pids of the descendants of `root` (default: this process) whose command line
    contains `title` (Ray titles its worker processes ray::ClassName[.method])."""
    found = []
    for proc in psutil.Process(root or os.getpid()).children(recursive=True):
        try:
            if title in " ".join(proc.cmdline()):
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def train_worker_pids() -> list[int]:
    return own_pids("RayTrainWorker")


@contextmanager
def _watching(poll, timeout_s: float):
    """Call `poll()` every 50 ms in a background thread while the block runs, until it
    returns True or `timeout_s` has passed."""
    def watch():
        deadline = time.time() + timeout_s
        while time.time() < deadline and not poll():
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        watcher.join(timeout=5)


@contextmanager
def kill_a_worker_after_checkpoint(run_dir, step: int, min_workers: int = 2, timeout_s: float = 300):
    """While the block runs, kill one training worker as soon as Ray's checkpoint snapshot
    names `step_<step>`. Yields the list the killed pid is appended to."""
    killed: list[int] = []

    def poll() -> bool:
        # Ray registers a checkpoint (records it in its snapshot) after every worker
        # reported it; only then is it the one a restart resumes from.
        snapshot = run_dir / "checkpoints" / "checkpoint_manager_snapshot.json"
        if snapshot.exists() and f"step_{step:08d}" in snapshot.read_text():
            pids = train_worker_pids()
            if len(pids) >= min_workers:
                os.kill(max(pids), signal.SIGKILL)
                killed.append(max(pids))
        return bool(killed)

    with _watching(poll, timeout_s):
        yield killed


def logged_steps(run_dir) -> list[int]:
    """Steps of the training rows metrics.jsonl holds so far (a partial last line skipped)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncatedMetricsWarning)  # a line being written now
        rows = read_metrics(run_dir / "metrics.jsonl")
    return [row["step"] for row in rows if "event" not in row and "step_s" in row]


@contextmanager
def kill_after_step(run_dir, title: str, step: int, timeout_s: float = 600):
    """While the block runs, SIGKILL one process titled `title` (the newest) as soon as
    metrics.jsonl has logged training step `step`. Yields a dict that gets `pid` (the
    killed process) and `at` (the last logged step then) and, once a new process with
    that title has appeared, `replaced_by`."""
    info: dict = {}

    def poll() -> bool:
        if "pid" not in info:
            steps = logged_steps(run_dir)
            pids = own_pids(title)
            if steps and max(steps) >= step and pids:
                os.kill(max(pids), signal.SIGKILL)
                info.update(pid=max(pids), at=max(steps), others=set(pids) - {max(pids)})
        else:
            new = set(own_pids(title)) - info["others"] - {info["pid"]}
            if new:
                info["replaced_by"] = max(new)
        return "replaced_by" in info

    with _watching(poll, timeout_s):
        yield info
