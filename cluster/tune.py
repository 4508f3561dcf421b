"""`rayft tune`: hyper-parameter searches with Ray Tune over rayft training runs.

    rayft tune examples/tune.yaml                      # the search in the config's tune: section
    rayft tune examples/tune.yaml tune.num_samples=16 train.max_steps=200
    rayft tune --help-config                           # the tune: keys

Every trial is a full `rayft train` run of the config with the trial's sampled values
applied as key=value overrides, in its own run directory, on its own Ray Train worker
group; ASHA stops the trials that fall behind at its rungs. The search directory
output_dir/<name>/ ends up holding:

    trial_<i>/            each trial's run directory (config.yaml, metrics.jsonl, ...; error.txt if it failed)
    tune_results.csv      one line per trial, best first: values, status, steps, metric
    best_config.yaml      the best trial's config, runnable as `rayft train .../best_config.yaml`
    tune/                 Ray Tune's own experiment state
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from trainers.errors import ConfigError, UserError


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "tune", help="search hyper-parameters with Ray Tune (ASHA early stopping)",
        description="Search any config keys with Ray Tune. The config's tune: section names the space "
                    "(dotted key -> {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]} or "
                    "{randint: [lo, hi]}), the eval metric, the number of trials and how many run at once. "
                    "Each trial is a full training run (its own Ray Train worker group of cluster.num_workers "
                    "workers); ASHA stops trials that fall behind at its rungs. A failed trial is reported in "
                    "the results, not fatal. Writes output_dir/<name>/tune_results.csv and best_config.yaml, "
                    "which `rayft train` runs as it is. See docs/tune.md.",
        epilog="examples:\n"
               "  rayft tune examples/tune.yaml\n"
               "  rayft tune examples/tune.yaml tune.num_samples=16 'tune.space.train.lr={loguniform: [1e-4, 1e-2]}'\n"
               "  rayft train runs/tune-lr/best_config.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML job config with a tune: section")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (tune.* keys too)")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--help-config", action="store_true", help="list the tune: keys with their defaults and help")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    from cluster.config import config_help, load_config
    from cluster.tune_config import TuneConfig

    if args.help_config:
        print(config_help(TuneConfig, prefix="tune."))
        print("every other key: rayft train --help-config")
        return 0
    if args.config is None and not args.overrides:
        raise UserError("give a config file with a tune: section (see examples/tune.yaml), or key=value overrides")
    config_file = args.config if args.config and "=" not in args.config else None
    overrides = ([args.config] if args.config and config_file is None else []) + list(args.overrides)
    if args.address:
        overrides.append(f"cluster.address={args.address}")
    outcome = run_tune(load_config(config_file, overrides, default_name="" if config_file else "tune"))
    print(outcome["table"])
    print(f"results: {outcome['csv']} ({len(outcome['rows'])} trials in {outcome['wall_s']:.0f}s)")
    if outcome["best"] is None:
        print("no trial finished with a finite metric; see the error column and each trial's trial.log")
        return 1
    print(f"best: {outcome['best'].trial}, config: {outcome['best_config']}\n"
          f"run it: rayft train {outcome['best_config']}")
    return 0


def run_tune(config, echo=print) -> dict:
    """Run the search of `config.tune` over `config`; write tune_results.csv and
    best_config.yaml in output_dir/<name>/. Returns {rows, best, table, csv, best_config,
    search_dir, wall_s}; `best` (a TrialRow) is None when every trial failed."""
    from cluster.config import to_dict, with_absolute_paths
    from cluster.ray_env import ensure_ray
    from cluster.tune_config import plain, trial_config
    from cluster.tune_results import best_trial, format_table, ranked, read_trial, write_best_config, write_csv

    tune_cfg = config.tune
    distributions = tune_cfg.distributions()
    if not distributions:
        raise ConfigError("tune.space", "is empty; give at least one key to search, e.g. "
                                        "train.lr: {loguniform: [1.0e-4, 1.0e-2]}")
    config = with_absolute_paths(config)
    search_dir = config.run_dir
    _check_fresh(search_dir)
    _check_inputs(config)
    base = to_dict(config)
    base.pop("tune")
    candidates = check_candidates(base, distributions, str(search_dir))

    per_trial = max(trial_cpus(c) for c in candidates)
    resources = ensure_ray(config.cluster.address, num_cpus=tune_cfg.max_concurrent * per_trial)
    _check_capacity(resources, per_trial, max(c.cluster.num_workers for c in candidates), config.cluster.device,
                    tune_cfg.max_concurrent, echo)

    from cluster.tune_search import TrialSetup, search  # imports Ray Tune

    search_dir.mkdir(parents=True, exist_ok=True)
    echo(f"tune: {tune_cfg.num_samples} trials, up to {tune_cfg.max_concurrent} at once, of "
         + "; ".join(f"{d.key} {d.describe()}" for d in distributions))
    echo(f"tune: ASHA on {tune_cfg.metric} ({tune_cfg.mode}), grace {tune_cfg.grace_period} steps, "
         f"reduction {tune_cfg.reduction_factor:g}, max_t {tune_cfg.max_t or 'none'} -> {search_dir}")
    started = time.time()
    setup = TrialSetup(base=base, search_dir=str(search_dir), metric=tune_cfg.metric, mode=tune_cfg.mode)
    grid = search(setup, distributions, tune_cfg, echo)

    keys = [d.key for d in distributions]
    rows = []
    for result in grid:
        name = Path(result.path).name if result.path else None
        values = {k: plain((result.config or {}).get(k)) for k in keys}
        error = None
        if result.error is not None:
            error_file = search_dir / str(name) / "error.txt"
            error = error_file.read_text().strip() if error_file.is_file() else _one_line(result.error)
        rows.append(read_trial(search_dir / str(name), values, tune_cfg.metric, tune_cfg.mode, error))
    rows = ranked(rows, tune_cfg.mode)
    best = best_trial(rows, tune_cfg.mode)
    csv_path = write_csv(search_dir / "tune_results.csv", rows, keys, tune_cfg.metric)
    best_path = None
    if best is not None:
        best_config = trial_config(base, best.values, f"{config.name}-best", config.output_dir)
        best_path = write_best_config(search_dir / "best_config.yaml", best_config, best, config.name,
                                      tune_cfg.metric)
    return {"rows": rows, "best": best, "table": format_table(rows, keys, tune_cfg.metric, best),
            "csv": csv_path, "best_config": best_path, "search_dir": search_dir,
            "wall_s": round(time.time() - started, 1)}


def check_candidates(base: dict, distributions, search_dir: str) -> list:
    """Every choice value, and both ends of every range, applied alone to the base config
    must give a valid job config that can be tuned; raises ConfigError naming
    tune.space.<key> otherwise. Returns the base config and those candidate configs."""
    from cluster.tune_config import trial_config

    configs = [trial_config(base, {}, "candidate", search_dir)]
    _check_tunable(configs[0], "")
    for dist in distributions:
        for value in dist.candidates():
            where = f"tune.space.{dist.key}"
            try:
                config = trial_config(base, {dist.key: value}, "candidate", search_dir)
                _check_tunable(config, f"with {dist.key}={value!r}, ")
            except ConfigError as exc:
                raise ConfigError(where, f"value {value!r} gives an invalid config: {exc}") from None
            configs.append(config)
    return configs


def _check_tunable(config, context: str) -> None:
    if not config.train.eval_every:
        raise ConfigError("train.eval_every", f"{context}must be > 0 for rayft tune: ASHA compares trials at "
                                              "their evaluations")


def trial_cpus(config) -> float:
    """Logical CPUs one trial holds: its Train workers, plus rollout actors for RL methods."""
    from cluster.rl import actor_cpus
    from cluster.tune_search import TRIAL_CPUS

    cluster = config.cluster
    extra = actor_cpus(config) if config.uses_rollouts else 0.0
    return cluster.num_workers * cluster.cpus_per_worker + extra + TRIAL_CPUS


def _check_fresh(search_dir: Path) -> None:
    if (search_dir / "tune_results.csv").exists() or list(search_dir.glob("trial_*")):
        raise UserError(f"{search_dir} already holds a search; choose another name (name=...) or remove it")


def _check_inputs(config) -> None:
    """Paths every trial needs, checked once here rather than failing in every trial."""
    if not Path(config.model.path).exists():
        raise ConfigError("model.path", f"{config.model.path} does not exist")
    for i, source in enumerate(config.data.train):
        if not Path(source.path).exists():
            raise ConfigError(f"data.train[{i}].path", f"{source.path} does not exist")
    for i, source in enumerate(config.data.eval):
        if not Path(source.path).exists():
            raise ConfigError(f"data.eval[{i}].path", f"{source.path} does not exist")


def _check_capacity(resources: dict, per_trial_cpus: float, workers: int, device: str, max_concurrent: int,
                    echo) -> None:
    """Tune does not count the Train workers' resources (their placement groups are made
    by each trial's Train controller), so check here that trials can get them at all."""
    need = {"CPU": per_trial_cpus}
    if device != "cpu" and resources.get("GPU", 0) > 0:
        need["GPU"] = float(workers)  # one GPU per worker, as in rayft train
    fits = max_concurrent
    for name, amount in need.items():
        have = resources.get(name, 0.0)
        if have + 1e-9 < amount:
            raise UserError(f"one trial needs {amount:g} {name}s (cluster.num_workers x per-worker "
                            f"resources) but the cluster has {have:g}")
        fits = min(fits, math.floor((have + 1e-9) / amount))
    if fits < max_concurrent:
        echo(f"tune: the cluster fits {fits} trial(s) at once, not tune.max_concurrent {max_concurrent}; "
             "the others wait for workers")


def _one_line(error) -> str:
    from cluster.tune_search import describe_error

    return describe_error(error)
