"""The GRPO benchmark's steady-state rates: warm-up steps are left out, the median step
ignores one stall and the mean counts it."""

import pytest

from benchmarks.grpo import steady_rates


def test_steady_rates_leave_out_the_warm_up_and_read_a_stall_two_ways():
    ends = {0: 0.0, 1: 30.0, 2: 31.0, 3: 32.0, 4: 33.0, 5: 39.0}  # step 1 is start-up, step 5 stalls
    rates = steady_rates(ends, warmup=1, total=5)
    assert rates["steps_per_min_median"] == pytest.approx(60.0)        # median step 1 s
    assert rates["steps_per_min_mean"] == pytest.approx(60.0 * 4 / 9)  # 4 steps in 9 s


def test_steady_rates_need_every_step():
    with pytest.raises(RuntimeError, match="step 3"):
        steady_rates({0: 0.0, 1: 1.0, 2: 2.0, 4: 4.0}, warmup=1, total=4)
