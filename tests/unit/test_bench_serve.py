"""The serving benchmark's pure parts: percentiles interpolate between ranks as numpy
does, and the summary counts every non-200 as an error and times only the successes."""

import pytest

from benchmarks.serve import Sample, percentile, summarize


def test_percentile_interpolates_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]  # order does not matter
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 99) == pytest.approx(3.97)  # 3 + 0.97 * (4 - 3)
    assert percentile([7.0], 99) == 7.0


def test_percentile_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summary_rates_latencies_and_errors():
    samples = [Sample(0.1, 200, 32), Sample(0.3, 200, 32), Sample(0.2, 200, 31),
               Sample(0.01, 503, 0), Sample(5.0, 0, 0)]
    summary = summarize(samples, seconds=2.0, max_tokens=32)
    assert summary["requests"] == 5 and summary["ok"] == 3 and summary["errors"] == 2
    assert summary["statuses"] == {"200": 3, "503": 1, "0": 1}
    assert summary["requests_per_s"] == pytest.approx(1.5)        # successes only
    assert summary["output_tokens_per_s"] == pytest.approx(47.5)  # 95 tokens in 2 s
    assert summary["p50_latency_s"] == pytest.approx(0.2)         # errors' latencies left out
    assert summary["p99_latency_s"] == pytest.approx(0.298)
    assert summary["short_completions"] == 1


def test_summary_without_successes_has_no_latency():
    summary = summarize([Sample(0.01, 503, 0)], seconds=1.0, max_tokens=32)
    assert summary["errors"] == 1 and summary["requests_per_s"] == 0
    assert summary["p50_latency_s"] is None and summary["p99_latency_s"] is None
