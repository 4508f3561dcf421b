"""Which worker failures a run retries.

Ray Train restarts the worker group after any worker error, up to
`cluster.max_failures` times: its failure policy cannot be told that an error is
deterministic. A `UserError` raised in a worker (a config value only the model can check,
a bad row) fails the same way on every attempt, so retrying it only costs restarts.
`StopOnUserError`, a Ray Train callback on the controller, raises such an error as soon as
a worker reports it; Ray wraps an error from a callback in a `ControllerError`, which its
failure policy does not retry, and `user_error` finds the UserError again for the driver.
"""

from __future__ import annotations

from ray.train import UserCallback

from trainers.errors import UserError


def user_error(exc: BaseException) -> UserError | None:
    """The UserError behind a failed fit (a worker group's or the controller's), if any."""
    failures = list(getattr(exc, "worker_failures", {}).values())
    if getattr(exc, "controller_failure", None) is not None:
        failures.append(exc.controller_failure)
    return _first_user_error(failures)


class StopOnUserError(UserCallback):
    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        cause = _first_user_error(worker_exceptions.values())
        if cause is not None:
            raise cause


def _first_user_error(failures) -> UserError | None:
    for failure in failures:
        cause = failure
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is not None:
            return cause
    return None
