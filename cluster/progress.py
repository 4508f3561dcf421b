"""The driver's progress bar: follows metrics.jsonl, which rank 0 appends to, and shows
step, loss and ETA while Ray Train runs."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from tqdm import tqdm


class MetricsProgress:
    """A background thread that advances a tqdm bar as metrics rows appear."""

    def __init__(self, metrics_path: Path, total_steps: int, desc: str, interval: float = 0.5):
        self.path, self.total, self.desc, self.interval = Path(metrics_path), total_steps, desc, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._offset, self._inode = 0, None

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
        try:
            fh = self.path.open()
        except FileNotFoundError:
            return
        with fh:
            stat = os.fstat(fh.fileno())  # of the file actually opened
            if stat.st_ino != self._inode or stat.st_size < self._offset:
                self._inode, self._offset = stat.st_ino, 0  # a resumed run replaced the log
            fh.seek(self._offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind("\n") + 1]  # leave a half-written line for later
        self._offset += len(complete)
        for line in complete.splitlines():
            row = json.loads(line) if line.strip() else {}
            step = row.get("step", 0)
            if step > self.bar.n:
                self.bar.update(step - self.bar.n)
            shown = {k: f"{row[k]:.4g}" for k in ("loss", "eval_loss", "reward") if k in row}
            if shown:
                self.bar.set_postfix(shown, refresh=False)
