"""A user error raised in a worker stops the run at once instead of being retried
`cluster.max_failures` times, and reaches the driver as itself."""

import pytest
from ray.train import ControllerError, WorkerGroupError

from cluster.failures import StopOnUserError, user_error
from trainers.errors import ConfigError


def _raised_in_a_worker(exc):
    """What Ray hands over for a worker's exception: a wrapper whose cause is the error."""
    try:
        try:
            raise exc
        except Exception as inner:
            raise RuntimeError("Training worker 0 failed") from inner
    except RuntimeError as wrapped:
        return wrapped


def test_a_worker_user_error_is_raised_on_the_controller_so_it_is_not_retried():
    bad = ConfigError("freeze.layers", "is 9 but the model has 2 blocks")
    with pytest.raises(ConfigError) as err:
        StopOnUserError().after_exception(None, {0: _raised_in_a_worker(RuntimeError("collective aborted")),
                                                 1: _raised_in_a_worker(bad)})
    assert err.value is bad
    # Anything else (a killed process, a lost node) is left to Ray's retries.
    StopOnUserError().after_exception(None, {0: _raised_in_a_worker(RuntimeError("worker died"))})


def test_the_driver_finds_the_user_error_behind_either_failure_kind():
    bad = ConfigError("freeze.layers", "is 9 but the model has 2 blocks")
    assert user_error(ControllerError(bad)) is bad  # what the stopped run raises
    assert user_error(WorkerGroupError("failed", {0: _raised_in_a_worker(bad)})) is bad
    assert user_error(ControllerError(RuntimeError("placement timed out"))) is None
    assert user_error(WorkerGroupError("failed", {0: _raised_in_a_worker(RuntimeError("oom"))})) is None
