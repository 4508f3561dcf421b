"""What a failed worker means for a run: which failures are retried, and what the user
is shown.

Ray Train restarts the worker group after any worker error, up to
`cluster.max_failures` times: its failure policy cannot be told that an error is
deterministic. A `UserError` raised in a worker (a config value only the model can check,
a bad row) fails the same way on every attempt, so retrying it only costs restarts.
`StopOnUserError`, a Ray Train callback on the controller, raises such an error as soon as
a worker reports it; Ray wraps an error from a callback in a `ControllerError`, which its
failure policy does not retry.

Ray passes on only a worker's exception and cuts the traceback text it shows, so
`worker_entry` (every worker's entry point) writes its full traceback to the run
directory, and `raise_failure` turns a failed fit into what the user should see: the
UserError as itself (one line, exit 2), anything else as a `WorkerError` with the
original type and complete message, every failed worker's traceback in `error.txt`.
"""

from __future__ import annotations

import shutil
import traceback
from pathlib import Path

from ray.train import UserCallback

from trainers.errors import UserError, WorkerError

ERROR_FILE = "error.txt"
WORKER_ERRORS = ".worker_errors"  # each failed worker's traceback, gathered into error.txt


class StopOnUserError(UserCallback):
    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        cause = _first_user_error(worker_exceptions.values())
        if cause is not None:
            raise cause


def user_error(exc: BaseException) -> UserError | None:
    """The UserError behind a failed fit (a worker group's or the controller's), if any."""
    return _first_user_error(_failures(exc).values())


def worker_entry(loop_config: dict) -> None:
    """Every worker's entry point: the method's loop (`loop_config["entry"]`), with the
    full traceback of a failure written to the run directory."""
    import ray.train

    try:
        loop_config["entry"](loop_config)
    except Exception:
        rank = ray.train.get_context().get_world_rank()
        directory = Path(loop_config["job"].run_dir) / WORKER_ERRORS
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"rank_{rank}.txt").write_text(traceback.format_exc(), encoding="utf-8")
        raise


def clear_errors(run_dir: Path) -> None:
    """Forget an earlier attempt's errors before a new fit."""
    shutil.rmtree(run_dir / WORKER_ERRORS, ignore_errors=True)
    (run_dir / ERROR_FILE).unlink(missing_ok=True)


def raise_failure(exc: BaseException, run_dir: Path) -> None:
    """Raise what the user should see of a failed fit (see the module docstring); `exc`
    itself when no worker's error is behind it."""
    failures = {key: _original(error) for key, error in _failures(exc).items()}
    for error in failures.values():
        if isinstance(error, UserError):
            raise error from None
    if not failures:
        raise exc
    path = run_dir / ERROR_FILE
    path.write_text("\n".join(f"=== worker {rank}: {type(error).__name__}\n{_traceback(run_dir, rank, error)}"
                              for rank, error in failures.items()), encoding="utf-8")
    rank, error = next(iter(failures.items()))
    raise WorkerError(rank, type(error).__name__, str(error), path) from None


def _failures(exc: BaseException) -> dict:
    """rank -> exception of every failed worker ('controller' for a callback's error)."""
    failures = dict(sorted(getattr(exc, "worker_failures", {}).items()))
    if getattr(exc, "controller_failure", None) is not None:
        failures["controller"] = exc.controller_failure
    return failures


def _first_user_error(failures) -> UserError | None:
    for failure in failures:
        cause = _original(failure)
        if isinstance(cause, UserError):
            return cause
    return None


def _original(error: BaseException) -> BaseException:
    """The exception a worker's code raised: a UserError anywhere in the chain, else the
    innermost cause (through Ray's RayTaskError of a failed actor call)."""
    from ray.exceptions import RayTaskError

    seen = set()
    while id(error) not in seen and not isinstance(error, UserError):
        seen.add(id(error))
        inner = error.cause if isinstance(error, RayTaskError) and isinstance(error.cause, BaseException) else None
        inner = inner or error.__cause__
        if inner is None:
            break
        error = inner
    return error


def _traceback(run_dir: Path, rank, error: BaseException) -> str:
    written = run_dir / WORKER_ERRORS / f"rank_{rank}.txt"
    if written.is_file():
        return written.read_text(encoding="utf-8")
    return f"{type(error).__name__}: {error}\n(no traceback: the worker process ended before writing one)\n"
