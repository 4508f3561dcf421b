"""`rayft tune` on the local Ray cluster: a Ray Tune search with ASHA whose trials are full
rayft runs on Ray Train (one worker each, two trials at once). An absurd learning rate
gets stopped early; the best trial beats the worst; best_config.yaml trains as it is.
A trial that fails is a row of the results, not the end of the search."""

import csv
import math
import time

import pytest

from cluster.config import load_config
from cluster.train import run_training
from cluster.tune import run_tune
from trainers.data import write_synth

# tune.seed 11 samples train.lr in this order from choice [3e-3, 1e-3, 10.0] (checked in the
# test): the two good rates start first and have recorded the first rung when the absurd one
# reaches it, so ASHA has something certain to stop.
SEED, EXPECTED_LRS = 11, [3e-3, 3e-3, 10.0, 1e-3]
# A tiny model steps in milliseconds; accumulation makes a run last a few seconds, longer
# than ASHA's stop takes to land (report, decision, the trial's actor and workers ending).
STEPS, ACCUM = 40, 4


@pytest.fixture(scope="module")
def tune_data(tmp_path_factory):
    return write_synth("addition", 240, tmp_path_factory.mktemp("tune") / "addition.jsonl", seed=0)


def _config(tmp_path, model_dir, data, name, *overrides):
    return load_config(None, [
        f"model.path={model_dir}", f"data.train=[{data}]", "data.max_length=48", "data.eval_fraction=0.1",
        f"output_dir={tmp_path}", f"name={name}", "train.batch_size=8", f"train.grad_accum={ACCUM}",
        f"train.max_steps={STEPS}", "train.eval_every=4", "train.eval_batches=2", "train.warmup_ratio=0.0",
        "cluster.num_workers=1", "tune.num_samples=4", "tune.max_concurrent=2", "tune.grace_period=4",
        "tune.reduction_factor=2",
        f"tune.seed={SEED}", *overrides])


def _free_cpus(ray) -> float:
    return ray.available_resources().get("CPU", 0.0)


def _wait_for_free_cpus(ray, before: float, timeout_s=60.0) -> float:
    """Stopped trials give their workers back: every CPU free before the search (the shared
    cluster may hold other tests' actors) is free again soon after it."""
    deadline = time.time() + timeout_s
    while _free_cpus(ray) < before - 1e-6 and time.time() < deadline:
        time.sleep(0.5)
    return _free_cpus(ray)


def test_asha_search_stops_a_trial_and_its_best_config_trains(ray_cluster, tiny_model_dir, tune_data, tmp_path):
    lines = []
    config = _config(tmp_path, tiny_model_dir, tune_data, "lr-search",
                     "tune.space.train.lr={choice: [3.0e-3, 1.0e-3, 10.0]}")
    free_before, started = _free_cpus(ray_cluster), time.time()
    out = run_tune(config, echo=lines.append)
    wall = time.time() - started
    rows = {row.trial: row for row in out["rows"]}
    assert sorted(rows) == ["trial_0", "trial_1", "trial_2", "trial_3"], out["table"]
    assert [rows[f"trial_{i}"].values["train.lr"] for i in range(4)] == EXPECTED_LRS, \
        "tune.seed no longer samples good rates first; pick another seed"
    statuses = [row.status for row in out["rows"]]
    assert "early-stopped" in statuses and "failed" not in statuses, out["table"]
    stopped = [row for row in out["rows"] if row.status == "early-stopped"]
    assert all(row.steps < STEPS for row in stopped), out["table"]
    assert rows["trial_2"].status == "early-stopped", out["table"]  # the absurd rate
    assert all(sum(f" trial_{i} (" in line for line in lines) == 1 for i in range(4)), lines  # a line each
    completed = [row for row in out["rows"] if row.status == "completed"]
    assert completed and all(row.steps == STEPS for row in completed)

    # Learning, honestly: the best trial's eval loss is well below the worst's, and below
    # where every trial started (the untrained model's step-0 eval).
    best, worst = out["best"], out["rows"][-1]
    assert best.values["train.lr"] == 3e-3 and worst.values["train.lr"] == 10.0
    assert math.isfinite(best.final) and (not math.isfinite(worst.final) or best.final < worst.final - 1.0), \
        out["table"]
    first_eval = [r for r in _metrics(best.run_dir) if r.get("step") == 0 and "eval_loss" in r][0]["eval_loss"]
    assert best.final < first_eval - 0.5, (first_eval, best.final)

    search_dir = tmp_path / "lr-search"
    with (search_dir / "tune_results.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 4 and table[0]["trial"] == best.trial
    assert {r["status"] for r in table} <= {"completed", "early-stopped"}
    assert "train.lr" in table[0] and "eval_loss" in table[0] and "best_eval_loss" in table[0]
    assert best.trial in out["table"] and "early-stopped" in out["table"]

    assert free_before >= 2, "the search needs the cluster's CPUs"
    free = _wait_for_free_cpus(ray_cluster, free_before)
    assert free >= free_before - 1e-6, f"a stopped trial left workers behind ({free} of {free_before} CPUs free)"

    # best_config.yaml is a complete job config that `rayft train` runs as it is.
    best_path = search_dir / "best_config.yaml"
    assert out["best_config"] == best_path
    text = best_path.read_text()
    assert f"rayft train {best_path}" in text and "tune:" not in text
    best_config = load_config(best_path)
    assert best_config.name == "lr-search-best" and best_config.train.lr == 3e-3
    assert best_config.tune.space == {}
    summary = run_training(best_config, echo=lambda *_: None)
    assert summary["steps"] == STEPS and (tmp_path / "lr-search-best" / "final").is_dir()
    assert summary["final_eval_loss"] == pytest.approx(best.final, rel=0.05)
    print(f"tune search: {wall:.0f}s for 4 trials")


def test_a_failing_trial_is_reported_not_fatal(ray_cluster, tiny_model_dir, tune_data, tmp_path):
    # 216 training rows cannot fill one step of 4096: that trial fails on its driver; the
    # other value trains.
    lines = []
    config = _config(tmp_path, tiny_model_dir, tune_data, "fail-search", "tune.num_samples=2",
                     "train.max_steps=4", "train.grad_accum=1", "tune.space.train.batch_size={choice: [8, 4096]}", "tune.seed=2")
    out = run_tune(config, echo=lines.append)
    by_size = {row.values["train.batch_size"]: row for row in out["rows"]}
    assert set(by_size) == {8, 4096}, out["table"]
    failed = by_size[4096]
    assert failed.status == "failed" and "fewer than one optimizer step" in failed.error
    assert by_size[8].status == "completed" and out["best"].trial == by_size[8].trial
    assert any("failed: " in line and "fewer than one optimizer step" in line for line in lines), lines
    assert (tmp_path / "fail-search" / "best_config.yaml").is_file()
    assert out["rows"][-1] is failed  # failed trials rank last


def _metrics(run_dir):
    from pathlib import Path

    from trainers.metrics import read_metrics

    return read_metrics(Path(run_dir) / "metrics.jsonl")
