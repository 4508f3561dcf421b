"""The driver's progress bar: follows metrics.jsonl, which rank 0 appends to, and shows
step, loss and ETA while Ray Train runs."""

from __future__ import annotations

import json
import os
import threading
import warnings
from pathlib import Path

from tqdm import tqdm

from trainers.metrics import TruncatedMetricsWarning


class MetricsFollower:
    """Complete rows appended to a metrics.jsonl since the last call. A replaced log (a
    resumed run rewrites it) is read again from its start. A half-written last line waits
    for the next call; a line that ends but does not parse (a writer killed mid-line whose
    log was then appended to) is left out with a warning naming the file and line, as the
    follower only shows progress and must not stop on it."""

    def __init__(self, path: Path):
        self.path, self.offset, self.inode, self.lines = Path(path), 0, None, 0

    def rows(self) -> list[dict]:
        try:
            fh = self.path.open("rb")
        except FileNotFoundError:
            return []
        with fh:
            stat = os.fstat(fh.fileno())  # of the file actually opened
            if stat.st_ino != self.inode or stat.st_size < self.offset:
                self.inode, self.offset, self.lines = stat.st_ino, 0, 0
            fh.seek(self.offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a half-written line waits for the next call
        self.offset += len(complete)
        rows = []
        for line in complete.decode(errors="replace").splitlines():
            self.lines += 1
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                warnings.warn(f"{self.path}:{self.lines}: not a JSON metrics row ({exc.msg}); left out",
                              TruncatedMetricsWarning, stacklevel=2)
        return rows


class MetricsProgress:
    """A background thread that advances a tqdm bar as metrics rows appear."""

    def __init__(self, metrics_path: Path, total_steps: int, desc: str, interval: float = 0.5):
        self.path, self.total, self.desc, self.interval = Path(metrics_path), total_steps, desc, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._follower = MetricsFollower(self.path)

    def __enter__(self):
        self.bar = tqdm(total=self.total, desc=self.desc, unit="step", dynamic_ncols=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()
        self.bar.close()

    def _run(self):
        while not self._stop.wait(self.interval):
            self._poll()

    def _poll(self):
        for row in self._follower.rows():
            step = row.get("step", 0)
            if step > self.bar.n:
                self.bar.update(step - self.bar.n)
            shown = {k: f"{row[k]:.4g}" for k in ("loss", "eval_loss", "reward") if k in row}
            if shown:
                self.bar.set_postfix(shown, refresh=False)
