"""`rayft tune` without a cluster: the tune section and its space (errors name the key),
applying a trial's values, the checks before a search, reading trial run directories,
ranking, and the CSV, table and best-config writers."""

import csv
import json
import math

import numpy as np
import pytest
import yaml

from cluster.config import load_config, to_dict
from cluster.tune_config import trial_config
from cluster.tune_results import (COMPLETED, EARLY_STOPPED, FAILED, TrialRow, best_trial, format_table, ranked,
                                  read_trial, write_best_config, write_csv)
from trainers.errors import ConfigError, UserError

BASE = ["model.path=/models/tiny", "data.train=[/data/a.jsonl]", "train.eval_every=2"]


def _load(*overrides):
    return load_config(None, BASE + list(overrides), default_name="search")


# --- the space ---------------------------------------------------------------------------

def test_space_forms_parse_to_the_same_distributions():
    flat = _load("tune.space={train.lr: {loguniform: [1e-4, 1e-2]}, peft.r: {choice: [8, 16]}}")
    nested = _load("tune.space={train: {lr: {loguniform: [1e-4, 1e-2]}}, peft: {r: {choice: [8, 16]}}}")
    dotted = _load("tune.space.train.lr={loguniform: [1e-4, 1e-2]}", "tune.space.peft.r={choice: [8, 16]}")
    expected = [("train.lr", "loguniform", (1e-4, 1e-2)), ("peft.r", "choice", (8, 16))]
    for config in (flat, nested, dotted):
        assert [(d.key, d.kind, d.values) for d in config.tune.distributions()] == expected
    # YAML 1.1 reads 1e-4 (no dot) as a string; bounds and choices come out as numbers.
    assert all(isinstance(v, float) for v in flat.tune.distributions()[0].values)
    assert _load("tune.space.train.lr={choice: [1e-4, 3e-4]}").tune.distributions()[0].values == (1e-4, 3e-4)


def test_an_override_replaces_the_files_entry(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "/m"}, "data": {"train": ["/d.jsonl"]},
                                    "train": {"eval_every": 2},
                                    "tune": {"space": {"train.lr": {"choice": [1.0e-3]}}}}))
    config = load_config(path, ["tune.space.train.lr={uniform: [0.1, 0.2]}"])
    (dist,) = config.tune.distributions()
    assert (dist.key, dist.kind, dist.values) == ("train.lr", "uniform", (0.1, 0.2))


def test_distributions_map_to_tune_domains():
    config = _load("tune.space={train.lr: {uniform: [0.1, 0.2]}, train.batch_size: {randint: [4, 5]},"
                   " train.weight_decay: {loguniform: [1e-3, 1e-1]}, train.scheduler: {choice: [cosine, linear]}}")
    rng = np.random.default_rng(0)
    domains = {d.key: d.to_tune() for d in config.tune.distributions()}
    sizes = {int(domains["train.batch_size"].sample(random_state=rng)) for _ in range(200)}
    assert sizes == {4, 5}  # randint includes both ends (Tune's own upper bound is exclusive)
    assert all(0.1 <= domains["train.lr"].sample(random_state=rng) <= 0.2 for _ in range(50))
    assert all(1e-3 <= domains["train.weight_decay"].sample(random_state=rng) <= 1e-1 for _ in range(50))
    assert domains["train.scheduler"].categories == ["cosine", "linear"]


@pytest.mark.parametrize("override, key, fragment", [
    ("tune.space.train.lr={normal: [0, 1]}", "tune.space.train.lr", "unknown distribution 'normal'"),
    ("tune.space.train.lrr={choice: [1]}", "tune.space.train.lrr", "did you mean train.lr"),
    ("tune.space.nope.x={choice: [1]}", "tune.space.nope.x", "not a config key"),
    ("tune.space.train={choice: [1]}", "tune.space.train", "is a section"),
    ("tune.space={train.lr.x: {choice: [1]}}", "tune.space.train.lr.x", "'train.lr' is not a section"),
    ("tune.space.train.lr.x={choice: [1]}", "tune.space.train.lr", "unknown distribution 'x'"),
    ("tune.space.name={choice: [a, b]}", "tune.space.name", "cannot be searched"),
    ("tune.space.tune.seed={choice: [1]}", "tune.space.tune.seed", "cannot be searched"),
    ("tune.space.train.lr=0.1", "tune.space.train.lr", "expected one distribution"),
    ("tune.space.train.lr={choice: []}", "tune.space.train.lr", "non-empty list"),
    ("tune.space.train.lr={uniform: [1]}", "tune.space.train.lr", "needs [lo, hi]"),
    ("tune.space.train.lr={uniform: [0.2, 0.1]}", "tune.space.train.lr", "lo < hi"),
    ("tune.space.train.lr={loguniform: [0, 0.1]}", "tune.space.train.lr", "lo > 0"),
    ("tune.space.train.lr={uniform: [a, 1]}", "tune.space.train.lr[0]", "expected a number"),
    ("tune.space.train.batch_size={uniform: [1, 8]}", "tune.space.train.batch_size", "use randint"),
    ("tune.space.train.batch_size={randint: [1.5, 8]}", "tune.space.train.batch_size[0]", "expected an integer"),
    ("tune.space.train.scheduler={uniform: [1, 2]}", "tune.space.train.scheduler", "use choice"),
    ("tune.space.train.scheduler={choice: [cosine, cubic]}", "tune.space.train.scheduler[1]", "must be one of"),
    ("tune.space.train.batch_size={choice: [8, x]}", "tune.space.train.batch_size[1]", "expected an integer"),
    ("tune.mode=best", "tune.mode", "must be one of"),
    ("tune.num_samples=0", "tune.num_samples", ">= 1"),
    ("tune.max_concurrent=0", "tune.max_concurrent", ">= 1"),
    ("tune.reduction_factor=1", "tune.reduction_factor", "> 1"),
    ("tune.max_t=3", "tune.max_t", ">= grace_period"),
    ("tune.metric=", "tune.metric", "must name an eval metric"),
])
def test_bad_tune_settings_name_the_key(override, key, fragment):
    extra = ["tune.grace_period=4"] if key == "tune.max_t" else []
    with pytest.raises(ConfigError) as err:
        _load(*extra, override)
    assert err.value.key == key, str(err.value)
    assert fragment in str(err.value)


def test_the_default_tune_section_is_valid_and_empty():
    config = _load()
    assert config.tune.space == {} and config.tune.distributions() == []


# --- a trial's config ----------------------------------------------------------------------

def test_trial_values_apply_like_overrides():
    base = to_dict(_load("tune.space.train.lr={choice: [0.1]}"))
    config = trial_config(base, {"train.lr": np.float64(0.05), "peft.r": np.int64(4),
                                 "peft.target_modules": ["q_proj"]}, "trial_3", "/runs/search")
    assert (config.train.lr, config.peft.r, config.peft.target_modules) == (0.05, 4, ["q_proj"])
    assert type(config.peft.r) is int  # numpy scalars come out as plain Python
    assert str(config.run_dir) == "/runs/search/trial_3"
    assert config.tune.space == {}  # a trial does not carry the search
    assert base["train"]["lr"] != 0.05  # the base is left as it was
    with pytest.raises(ConfigError) as err:
        trial_config(base, {"train.lr": -1.0}, "trial_0", "/runs/search")
    assert err.value.key == "train.lr"


def test_candidates_are_checked_before_the_search():
    from cluster.tune import check_candidates

    ok = _load("tune.space.train.lr={choice: [0.1, 0.2]}", "tune.space.train.batch_size={randint: [2, 4]}")
    base = to_dict(ok)
    configs = check_candidates(base, ok.tune.distributions(), "/runs/search")
    assert len(configs) == 1 + 2 + 2  # the base, each choice, both ends of the range
    bad = _load("tune.space.train.lr={choice: [0.1, -1.0]}")
    with pytest.raises(ConfigError) as err:
        check_candidates(to_dict(bad), bad.tune.distributions(), "/runs/search")
    assert err.value.key == "tune.space.train.lr" and "-1.0" in str(err.value) and "train.lr" in str(err.value)
    no_eval = load_config(None, BASE[:2] + ["tune.space.train.lr={choice: [0.1]}"], default_name="s")
    with pytest.raises(ConfigError) as err:
        check_candidates(to_dict(no_eval), no_eval.tune.distributions(), "/runs/search")
    assert err.value.key == "train.eval_every"
    zero = _load("tune.space.train.eval_every={choice: [2, 0]}")
    with pytest.raises(ConfigError) as err:
        check_candidates(to_dict(zero), zero.tune.distributions(), "/runs/search")
    assert err.value.key == "tune.space.train.eval_every"


def test_a_search_needs_a_space_and_a_fresh_directory(tmp_path):
    from cluster.tune import run_tune

    with pytest.raises(ConfigError) as err:
        run_tune(load_config(None, BASE + [f"output_dir={tmp_path}"], default_name="s"))
    assert err.value.key == "tune.space"
    (tmp_path / "s" / "trial_0").mkdir(parents=True)
    with pytest.raises(UserError, match="already holds a search"):
        run_tune(load_config(None, BASE + [f"output_dir={tmp_path}", "tune.space.train.lr={choice: [0.1]}"],
                             default_name="s"))
    with pytest.raises(ConfigError) as err:  # inputs are checked once, before any trial
        run_tune(load_config(None, BASE + [f"output_dir={tmp_path}", "tune.space.train.lr={choice: [0.1]}"],
                             default_name="t"))
    assert err.value.key == "model.path"


def test_trial_cpus_count_every_worker():
    from cluster.tune import trial_cpus
    from cluster.tune_search import TRIAL_CPUS

    config = _load("cluster.num_workers=3", "cluster.cpus_per_worker=2")
    assert trial_cpus(config) == pytest.approx(6 + TRIAL_CPUS)


# --- trial results -------------------------------------------------------------------------

def _run_dir(root, name, evals, summary=False, error=None, metric="eval_loss", total=8):
    run = root / name
    run.mkdir(parents=True)
    rows = [{"step": 0, "event": "start", "total_steps": total}, {"step": 0, metric: 9.0}]
    for step, value in evals:
        rows.append({"step": step, "loss": 1.0, metric: value})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        (run / "summary.json").write_text("{}")
    if error:
        (run / "error.txt").write_text(error + "\n")
    return run


def test_read_trial_status_steps_and_metric(tmp_path):
    done = read_trial(_run_dir(tmp_path, "trial_0", [(2, 3.0), (4, 2.0), (6, 2.5)], summary=True),
                      {"train.lr": 0.1}, "eval_loss", "min")
    assert (done.status, done.steps, done.final, done.best) == (COMPLETED, 6, 2.5, 2.0)
    stopped = read_trial(_run_dir(tmp_path, "trial_1", [(2, 5.0)]), {"train.lr": 1.0}, "eval_loss", "min")
    assert (stopped.status, stopped.steps, stopped.final) == (EARLY_STOPPED, 2, 5.0)  # the step-0 eval is left out
    failed = read_trial(_run_dir(tmp_path, "trial_2", [], error="boom"), {"train.lr": 2.0}, "eval_loss", "min")
    assert (failed.status, failed.error, failed.final, failed.best) == (FAILED, "boom", None, None)
    never_started = read_trial(tmp_path / "trial_3", {}, "eval_loss", "min", error="bad value")
    assert (never_started.status, never_started.steps) == (FAILED, 0)
    diverged = read_trial(_run_dir(tmp_path, "trial_4", [(2, 3.0), (4, float("nan"))], summary=True), {},
                          "eval_loss", "min")
    assert math.isnan(diverged.final) and diverged.best == 3.0
    accuracy = read_trial(_run_dir(tmp_path, "trial_5", [(2, 0.5), (4, 0.75), (6, 0.6)], metric="eval_accuracy"),
                          {}, "eval_accuracy", "max")
    assert (accuracy.final, accuracy.best) == (0.6, 0.75)


def _row(name, status, final, steps=8, error=""):
    return TrialRow(name, {"train.lr": float(name[-1])}, status, steps, final, final, error, f"/r/{name}")


def test_ranking_and_the_best_trial():
    rows = [_row("trial_0", FAILED, None, 0, "boom"), _row("trial_1", EARLY_STOPPED, 3.0, 2),
            _row("trial_2", COMPLETED, 2.0), _row("trial_3", COMPLETED, float("nan")),
            _row("trial_4", COMPLETED, 3.0), _row("trial_5", EARLY_STOPPED, 9.0, 2)]
    order = [r.trial for r in ranked(rows, "min")]
    assert order == ["trial_2", "trial_4", "trial_1", "trial_5", "trial_3", "trial_0"]  # ties: more steps first
    assert best_trial(rows, "min").trial == "trial_2"
    assert [r.trial for r in ranked(rows, "max")][:2] == ["trial_5", "trial_4"]
    assert best_trial([_row("trial_0", FAILED, None, 0, "x"), _row("trial_1", COMPLETED, float("inf"))], "min") is None


def test_csv_and_table(tmp_path):
    rows = ranked([_row("trial_0", COMPLETED, 2.0), _row("trial_1", EARLY_STOPPED, 4.123456, 2),
                   _row("trial_2", FAILED, None, 0, "x" * 100)], "min")
    path = write_csv(tmp_path / "tune_results.csv", rows, ["train.lr"], "eval_loss")
    with path.open() as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["trial", "train.lr", "status", "steps", "eval_loss", "best_eval_loss", "error",
                              "run_dir"]
    assert [r["trial"] for r in table] == ["trial_0", "trial_1", "trial_2"]
    assert table[1]["status"] == "early-stopped" and float(table[1]["eval_loss"]) == 4.123456
    assert table[2]["eval_loss"] == "" and table[2]["error"] == "x" * 100
    text = format_table(rows, ["train.lr"], "eval_loss", best=rows[0])
    lines = text.splitlines()
    assert lines[0].split() == ["trial", "train.lr", "status", "steps", "eval_loss", "best_eval_loss", "error"]
    assert lines[1].startswith("*") and "trial_0" in lines[1] and "4.123" in lines[2]
    assert "x" * 57 + "..." in lines[3] and "x" * 61 not in lines[3]


def test_best_config_is_a_complete_runnable_config(tmp_path):
    search = _load("tune.space.train.lr={choice: [0.1, 0.2]}", "output_dir=/runs")
    row = _row("trial_2", COMPLETED, 1.5)
    best = trial_config(to_dict(search), {"train.lr": 0.2}, "search-best", search.output_dir)
    path = write_best_config(tmp_path / "best_config.yaml", best, row, "search", "eval_loss")
    text = path.read_text()
    assert text.startswith("# Best trial") and f"# Run: rayft train {path}" in text
    assert "trial_2" in text.splitlines()[0]
    data = yaml.safe_load(text)
    assert "tune" not in data and data["name"] == "search-best" and data["train"]["lr"] == 0.2
    again = load_config(path)
    assert again.train.lr == 0.2 and str(again.run_dir) == "/runs/search-best"
    assert again.model.path == "/models/tiny" and again.train.eval_every == 2


# --- the trial side --------------------------------------------------------------------------

def test_metrics_follower_reads_complete_rows_only(tmp_path):
    from cluster.tune_search import MetricsFollower

    path = tmp_path / "metrics.jsonl"
    follower = MetricsFollower(path)
    assert follower.rows() == []  # not written yet
    path.write_text('{"step": 1}\n{"step": 2, "eval_loss": NaN}\n{"step": 3, "lo')
    rows = follower.rows()
    assert [r["step"] for r in rows] == [1, 2] and math.isnan(rows[1]["eval_loss"])
    with path.open("a") as fh:
        fh.write('ss": 1.0}\n')
    assert follower.rows() == [{"step": 3, "loss": 1.0}]
    path.write_text('{"step": 1}\n')  # replaced, as a resumed run rewrites it
    assert follower.rows() == [{"step": 1}]


def test_reported_metrics_keep_asha_cutoffs_finite():
    from cluster.tune_search import WORST, _tune_metrics

    row = {"step": 4, "eval_loss": float("nan"), "loss": 2.0, "note": "x", "flag": True}
    out = _tune_metrics(row, "eval_loss", "min", completed=False)
    assert out == {"step": 4, "eval_loss": WORST, "loss": 2.0, "trial_completed": False}
    assert _tune_metrics({"step": 1, "eval_accuracy": float("-inf")}, "eval_accuracy", "max", True)["eval_accuracy"] \
        == -WORST
    assert _tune_metrics({"step": 1, "eval_loss": 1.5}, "eval_loss", "min", True)["eval_loss"] == 1.5


def test_errors_read_as_one_line():
    from cluster.tune_search import describe_error

    assert describe_error(UserError("config key 'x': bad")) == "config key 'x': bad"
    assert describe_error(ValueError("first line\nTraceback ...\nthe end")) == "ValueError: the end"
    assert describe_error(RuntimeError()) == "RuntimeError"
    from trainers.errors import WorkerError

    assert describe_error(WorkerError(1, "KeyError", "'gelu_x'", "error.txt")) == "KeyError: 'gelu_x'"


def test_trial_names_follow_the_sampling_order():
    from types import SimpleNamespace

    from cluster.tune_search import trial_name

    assert trial_name(SimpleNamespace(trial_id="a1b2c_00012")) == "trial_12"


def test_cli_help_and_help_config(capsys):
    from cluster.cli import main, parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["tune", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "ASHA" in out and "best_config.yaml" in out and "rayft tune examples/tune.yaml" in out
    assert main(["tune", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "tune.space" in out and "tune.max_concurrent" in out
    assert main(["tune"]) == 2
    assert "tune: section" in capsys.readouterr().err
