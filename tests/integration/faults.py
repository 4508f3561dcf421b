"""Fault injection for resume tests: SIGKILL a Ray Train worker process once Ray has
registered a given checkpoint (a real process death, not an exception)."""

import os
import signal
import threading
import time
from contextlib import contextmanager

import psutil


def train_worker_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]


@contextmanager
def kill_a_worker_after_checkpoint(run_dir, step: int, min_workers: int = 2, timeout_s: float = 300):
    """While the block runs, kill one training worker as soon as Ray's checkpoint snapshot
    names `step_<step>`. Yields the list the killed pid is appended to."""
    killed: list[int] = []

    def watch():
        deadline = time.time() + timeout_s
        while time.time() < deadline and not killed:
            # Ray registers a checkpoint (records it in its snapshot) after every worker
            # reported it; only then is it the one a restart resumes from.
            snapshot = run_dir / "checkpoints" / "checkpoint_manager_snapshot.json"
            if snapshot.exists() and f"step_{step:08d}" in snapshot.read_text():
                pids = train_worker_pids()
                if len(pids) >= min_workers:
                    os.kill(max(pids), signal.SIGKILL)
                    killed.append(max(pids))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield killed
    finally:
        watcher.join(timeout=5)
