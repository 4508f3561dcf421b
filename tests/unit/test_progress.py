"""The driver's progress bar follows metrics.jsonl, also when a resume replaces it."""

from trainers.metrics import MetricsLog
from cluster.progress import MetricsProgress


def test_progress_follows_log_across_a_rewrite(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, enabled=True)
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    progress = MetricsProgress(path, total_steps=8, desc="t", interval=60)
    with progress:
        progress._poll()
        assert progress.bar.n == 5
        # a resume from step 3 replaces the file with a shorter one, then appends
        log = MetricsLog(path, enabled=True, resume_step=3)
        for step in range(4, 9):
            log.write({"step": step, "loss": 0.1})
        progress._poll()
        assert progress.bar.n == 8
    assert [r for r in path.read_text().splitlines()][3].startswith('{"step": 4')
