"""The GRPO benchmark's clock: warm-up steps are left out of the steady-state rates, the
median step ignores one stall and the mean counts it; evaluation pauses are taken out of
every later step end; the time to the target runs from step 0 to the first evaluation
that reaches it."""

import pytest

from benchmarks.grpo_clock import steady_rates, time_to_target, without_pauses


def test_steady_rates_leave_out_the_warm_up_and_read_a_stall_two_ways():
    ends = {0: 0.0, 1: 30.0, 2: 31.0, 3: 32.0, 4: 33.0, 5: 39.0}  # step 1 is start-up, step 5 stalls
    rates = steady_rates(ends, warmup=1, total=5)
    assert rates["steps_per_min_median"] == pytest.approx(60.0)        # median step 1 s
    assert rates["steps_per_min_mean"] == pytest.approx(60.0 * 4 / 9)  # 4 steps in 9 s


def test_steady_rates_need_every_step():
    with pytest.raises(RuntimeError, match="step 3"):
        steady_rates({0: 0.0, 1: 1.0, 2: 2.0, 4: 4.0}, warmup=1, total=4)


def test_evaluation_pauses_stop_the_clock():
    ends = {0: 10.0, 1: 11.0, 2: 14.0, 3: 15.0}
    pauses = [(9.0, 0.5), (11.5, 2.0)]  # the start model's evaluation, then one after step 1
    assert without_pauses(ends, pauses) == {0: 9.5, 1: 10.5, 2: 11.5, 3: 12.5}
    assert steady_rates(without_pauses(ends, pauses), warmup=0, total=3)["steps_per_min_mean"] == pytest.approx(60.0)


def test_time_to_target_is_from_step_0_to_the_first_evaluation_reaching_it():
    ends = {0: 2.0, 1: 3.0, 2: 4.5, 3: 6.0, 4: 7.0}
    assert time_to_target(ends, {0: 0.9, 2: 0.4, 3: 0.6, 4: 0.7}, 0.5) == {"target_step": 3, "time_to_target_s": 4.0}
    assert time_to_target(ends, {0: 0.0, 2: 0.4}, 0.5) == {"target_step": None, "time_to_target_s": None}
