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


def _log_with_cut_last_line(path):
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')


def test_a_cut_short_last_line_is_left_out_with_a_warning(tmp_path):
    import pytest

    from trainers.metrics import TruncatedMetricsWarning, read_metrics

    path = tmp_path / "metrics.jsonl"
    _log_with_cut_last_line(path)
    with pytest.warns(TruncatedMetricsWarning, match=rf"{path}:3: the last line is cut short"):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
    with pytest.warns(TruncatedMetricsWarning):
        log = MetricsLog(path, enabled=True, resume_step=2)  # a restart after the kill
    log.write({"step": 3, "loss": 1.0})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]  # the log reads cleanly again


def test_a_bad_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    import pytest

    from trainers.errors import DataError
    from trainers.metrics import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not a JSON metrics row"):
        read_metrics(path)
    with pytest.raises(DataError, match=rf"{path}:2:"):
        MetricsLog(path, enabled=True, resume_step=3)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=rf"{path}:2: not a JSON object"):
        read_metrics(path)


def test_the_follower_waits_for_a_half_line_and_skips_a_broken_one(tmp_path):
    import pytest

    from cluster.progress import MetricsFollower
    from trainers.metrics import TruncatedMetricsWarning

    path = tmp_path / "metrics.jsonl"
    _log_with_cut_last_line(path)
    follower = MetricsFollower(path)
    assert [r["step"] for r in follower.rows()] == [1, 2]  # step 3 is still being written
    with path.open("a") as fh:
        fh.write('ss": 1.0}\n{"step": 4}\n')
    assert [r["step"] for r in follower.rows()] == [3, 4]
    with path.open("a") as fh:
        fh.write('{"step": 5, "lo\n{"step": 6}\n')  # a writer killed mid-line, then appended to
    with pytest.warns(TruncatedMetricsWarning, match=rf"{path}:5:"):
        assert [r["step"] for r in follower.rows()] == [6]
