"""The Ray Tune side of `rayft tune`: the Tuner with ASHA, and the trial trainable.

Train inside Tune (Ray 2.60, Train V2): each trial is a Tune *function trainable* that
runs a whole rayft training run, `cluster.train.run_training`, which builds a
`TorchTrainer` and calls `fit()`. The Train controller actor that `fit()` starts is
owned by the trial's actor and its worker group has its own placement group, outside
Tune's resource accounting: the trial itself reserves a sliver of a CPU (TRIAL_CPUS),
the Train workers reserve theirs (cluster.num_workers x cluster.cpus_per_worker), and
`max_concurrent` bounds how many worker groups exist at once. When ASHA stops a trial,
Tune ends the trial's actor and with it the controller and the workers it owns.

Metrics reach Tune from the run's own metrics.jsonl (rank 0 appends a row at every
evaluation): the trial follows the file while `fit()` runs in a thread and calls
`ray.tune.report` for each evaluation. (Ray's `TuneReportCallback` forwards only what
workers pass to `ray.train.report`, which rayft calls at checkpoints, not evaluations.)
The row of the last step is held back until the run has written final/ and
summary.json, so a stop decision at the last rung cannot cut a finished run short.

A stopped trial's controller dies without shutting its worker group down. Ray Train then
relies on a detached PlacementGroupCleaner that asks the State API (served by the Ray
dashboard) whether the controller is alive; on a cluster without the dashboard (rayft's
embedded one) it never finds out and the workers' CPUs stay reserved. `release_orphaned_
worker_groups` does that cleaner's job from the GCS tables, during the search and after.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from cluster.progress import MetricsFollower
from cluster.tune_config import Distribution, trial_config
from trainers.errors import UserError, WorkerError

# The trial's own actor only waits on fit(); the Train workers reserve the real CPUs.
TRIAL_CPUS = 0.01
# ASHA needs a finite max_t; with tune.max_t 0 its rungs simply go on past every schedule.
NO_CAP_STEPS = 10**6
# What a non-finite metric (a diverged run) is reported to ASHA as: the worst value, finite
# so that rung cutoffs (percentiles of the recorded values) stay finite.
WORST = 1e30
POLL_S = 0.2
# How often the search releases the worker groups of stopped trials, and how long it waits
# at the end for the last stopped trials' controllers to be gone.
RELEASE_EVERY_S, RELEASE_WAIT_S = 2.0, 30.0


@dataclass
class TrialSetup:
    base: dict          # the job config as plain data, absolute paths
    search_dir: str     # absolute output_dir/<name>: trial_<i>/ run directories go here
    metric: str
    mode: str


def search(setup: TrialSetup, distributions: list[Distribution], tune_cfg, echo=print):
    """Run the Tuner; returns Tune's ResultGrid (failed trials included, never raised)."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune's default console output (an experiment box and status tables, printed even at
    # verbose=0 by the new output engine) gives way to TrialLines; the legacy engine is silent at 0.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": TRIAL_CPUS})
    scheduler = ASHAScheduler(time_attr="step", max_t=tune_cfg.max_t or NO_CAP_STEPS,
                              grace_period=tune_cfg.grace_period, reduction_factor=tune_cfg.reduction_factor)
    tuner = tune.Tuner(
        trainable,
        param_space={d.key: d.to_tune() for d in distributions},
        tune_config=tune.TuneConfig(
            metric=setup.metric, mode=setup.mode, scheduler=scheduler, num_samples=tune_cfg.num_samples,
            search_alg=BasicVariantGenerator(max_concurrent=tune_cfg.max_concurrent, random_state=tune_cfg.seed),
            reuse_actors=False, trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(
            name="tune", storage_path=setup.search_dir, verbose=0,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            callbacks=[TrialLines(echo, setup, tune_cfg.num_samples, [d.key for d in distributions])]),
    )
    earlier = set(train_controllers())  # e.g. a finished run's controller, idle in this driver
    with _quiet(_TUNE_LOGGERS), _releasing(RELEASE_EVERY_S):
        grid = tuner.fit()
    release_orphaned_worker_groups(wait_s=RELEASE_WAIT_S, ignore=earlier)
    return grid


@contextlib.contextmanager
def _releasing(every_s: float):
    """Release stopped trials' worker groups every `every_s` while the search runs (in a
    thread: reading the GCS tables can take longer than Tune's loop should wait)."""
    stop = threading.Event()

    def loop():
        while not stop.wait(every_s):
            release_orphaned_worker_groups()

    thread = threading.Thread(target=loop, name="rayft-tune-release", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


# Tune logs each failed trial's traceback and a closing "Trials did not complete" at ERROR;
# TrialLines says it in one line, and the traceback is in the trial's trial.log.
_TUNE_LOGGERS = ("ray.tune.execution.tune_controller", "ray.tune.tune")


@contextlib.contextmanager
def _quiet(names):
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def trial_name(trial) -> str:
    """trial_0, trial_1, ... in sampling order (Tune's trial ids end in a counter)."""
    return f"trial_{int(trial.trial_id.rsplit('_', 1)[-1])}"


def run_trial(values: dict, setup: TrialSetup) -> None:
    """The Tune trainable: one rayft training run with `values` applied, reported to Tune
    at each evaluation. A failure writes error.txt in the run directory and raises, which
    Tune records as the trial's error."""
    name = tune.get_context().get_trial_name()
    run_dir = Path(setup.search_dir) / name
    try:
        config = trial_config(setup.base, values, name, setup.search_dir)
        _train_and_report(config, setup.metric, setup.mode)
    except BaseException as exc:
        if not isinstance(exc, SystemExit):  # SystemExit: Tune stopping the trial
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text(describe_error(exc) + "\n")
            _append(run_dir / "trial.log", "trial failed:\n" + traceback.format_exc())
        raise


def _train_and_report(config, metric: str, mode: str) -> None:
    from cluster.train import run_training

    run_dir = config.run_dir
    outcome: dict = {}

    def train():
        try:
            outcome["summary"] = run_training(config, echo=lambda msg: _append(run_dir / "trial.log", msg))
        except BaseException as exc:  # handed to the reporting thread, which raises it
            outcome["error"] = exc

    thread = threading.Thread(target=train, name=f"rayft-{config.name}", daemon=True)
    thread.start()
    follower = MetricsFollower(run_dir / "metrics.jsonl")
    total_steps, held, last, logged = None, [], None, set()
    while True:
        alive = thread.is_alive()  # read rows after this, so none written before the end is missed
        for row in follower.rows():
            logged.update(k for k in row if k.startswith("eval_"))
            if row.get("event") == "start":
                total_steps = row.get("total_steps")
            elif "event" not in row and row.get("step", 0) > 0 and metric in row:
                held.append(row)
        while held and total_steps is not None and held[0]["step"] < total_steps:
            last = held.pop(0)
            tune.report(_tune_metrics(last, metric, mode, completed=False))
            _append(run_dir / "trial.log", f"reported step {last['step']}: {metric} {last[metric]}")
        if not alive:
            break
        thread.join(timeout=POLL_S)
    if "error" in outcome:
        raise outcome["error"]
    if not held and last is None:
        seen = ", ".join(sorted(logged)) or "no eval metrics"
        raise UserError(f"the run never logged tune.metric '{metric}' (it logged {seen}); "
                        "set tune.metric to one of them and train.eval_every > 0")
    # The run is complete (final/ and summary.json written): its last evaluation, again if
    # it was already reported (a run that train.early_stopping_patience ended), says so.
    final = held or [last]
    for i, row in enumerate(final):
        tune.report(_tune_metrics(row, metric, mode, completed=i == len(final) - 1))


def _tune_metrics(row: dict, metric: str, mode: str, completed: bool) -> dict:
    out = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not math.isfinite(out[metric]):
        out[metric] = WORST if mode == "min" else -WORST
    return out | {"trial_completed": completed}


def describe_error(exc: BaseException) -> str:
    """One line for the results table: a UserError as it reads; a worker's exception by its
    type and message, without the traceback Ray wraps it in."""
    try:
        from ray.train.v2.api.exceptions import WorkerGroupError
    except ImportError:  # pragma: no cover
        WorkerGroupError = ()
    if isinstance(exc, WorkerGroupError) and exc.worker_failures:
        exc = next(iter(exc.worker_failures.values()))
    cause = getattr(exc, "cause", None)  # RayTaskError: the exception the task raised
    if isinstance(cause, BaseException):
        exc = cause
    if isinstance(exc, UserError):
        return str(exc)
    name, text = (exc.type_name, exc.message) if isinstance(exc, WorkerError) else (type(exc).__name__, str(exc))
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    message = lines[-1] if lines else ""
    return message if message.startswith(name) else f"{name}: {message}".rstrip(": ")


class TrialLines(tune.Callback):
    """One line per finished trial instead of Tune's status tables."""

    def __init__(self, echo, setup: TrialSetup, total: int, keys: list[str]):
        self.echo, self.trial_setup, self.total, self.keys, self.done = echo, setup, total, keys, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        status = "completed" if result.get("trial_completed") else "early-stopped"
        value = result.get(self.trial_setup.metric)
        shown = f"{value:.4g}" if isinstance(value, (int, float)) and abs(value) < WORST else "n/a"
        self._line(trial, f"{status} at step {result.get('step', '?')}: {self.trial_setup.metric} {shown}")

    def on_trial_error(self, iteration, trials, trial, **info):
        error_file = Path(self.trial_setup.search_dir) / trial_name(trial) / "error.txt"
        error = error_file.read_text().strip() if error_file.is_file() else "see the trial's log"
        self._line(trial, f"failed: {error}")

    def _line(self, trial, what: str) -> None:
        self.done += 1
        values = " ".join(f"{k}={_short(trial.config.get(k))}" for k in self.keys)
        self.echo(f"[{self.done}/{self.total}] {trial_name(trial)} ({values}) {what}")


def train_controllers(alive: bool = True) -> dict[str, str]:
    """Ray Train controllers of this job (actor id -> state): the alive ones, or the dead
    ones; {} when the GCS actor table cannot be read."""
    import ray

    try:
        from services.ray_compat import actor_table

        job = ray.get_runtime_context().get_job_id()
        return {aid: a["State"] for aid, a in actor_table().items()
                if a["ActorClassName"] == "TrainController" and a["JobID"] == job
                and (a["State"] == "ALIVE") == alive and a["State"] in ("ALIVE", "DEAD")}
    except Exception as exc:
        logging.getLogger(__name__).debug("reading the actor table failed: %s", exc)
        return {}


def release_orphaned_worker_groups(wait_s: float = 0.0, ignore=frozenset()) -> int:
    """Remove the placement groups (the reserved worker CPUs and GPUs) that Ray Train
    controllers of this job created and died holding, as Ray Train's PlacementGroupCleaner
    does where the State API is up. With `wait_s`, first wait (up to that long) until no
    controller of this job is alive but those in `ignore`, as after a search. Returns how
    many were removed; best effort, never raises. (Reads the GCS tables through
    services.ray_compat: the public State API is the dashboard that is missing.)"""
    try:
        from ray.util.placement_group import remove_placement_group

        from services.ray_compat import placement_groups_created_by

        deadline = time.monotonic() + wait_s
        while set(train_controllers()) - set(ignore) and time.monotonic() < deadline:
            time.sleep(0.5)
        orphans = placement_groups_created_by(set(train_controllers(alive=False)))
        for pg in orphans:
            remove_placement_group(pg)
        return len(orphans)
    except Exception as exc:  # a cleanup aid; the search's results do not depend on it
        logging.getLogger(__name__).debug("releasing orphaned worker groups failed: %s", exc)
        return 0


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _append(path: Path, message: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(f"{time.strftime('%H:%M:%S')} {message}\n")
