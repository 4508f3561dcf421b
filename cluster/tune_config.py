"""The `tune` section of the job config (read by `rayft tune`, ignored by `rayft train`):
the search space over other config keys and the ASHA settings.

A space entry maps a dotted config key to one distribution:

    tune:
      space:
        train.lr: {loguniform: [1.0e-4, 1.0e-2]}
        peft.r: {choice: [8, 16, 32]}
        train.warmup_ratio: {uniform: [0.0, 0.1]}
        train.batch_size: {randint: [4, 16]}      # both ends included

The nested form (`train: {lr: {choice: [...]}}`) means the same, so
`tune.space.train.lr=...` overrides on the command line work too.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from cluster.config_core import coerce, field_help, from_dict, set_key
from rollout.config import opt
from trainers.errors import ConfigError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
# Keys a trial cannot take from the space: they place the trial, or are the search itself.
NOT_SEARCHABLE = ("name", "output_dir", "tune")


@dataclass(frozen=True)
class Distribution:
    """One searched key: `kind` is one of DISTRIBUTIONS; `values` the choices, or [lo, hi]."""
    key: str
    kind: str
    values: tuple

    def candidates(self) -> list:
        """The values worth checking before the search: every choice, or both ends."""
        return list(self.values)

    def to_tune(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        lo, hi = self.values
        if self.kind == "uniform":
            return tune.uniform(lo, hi)
        if self.kind == "loguniform":
            return tune.loguniform(lo, hi)
        return tune.randint(lo, hi + 1)  # Tune's upper bound is exclusive; ours is included

    def describe(self) -> str:
        if self.kind == "choice":
            return f"choice of {list(self.values)}"
        return f"{self.kind} [{self.values[0]}, {self.values[1]}]"


@dataclass
class TuneConfig:
    # The config class whose keys the space names. `cluster.config`, which composes this
    # section into it, sets it, so that this module imports no other section.
    job_config: ClassVar[type | None] = None

    space: dict[str, Any] = opt(dict, "Keys to search (rayft tune): dotted config key -> one distribution, "
                                      "{choice: [v, ...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]} or "
                                      "{randint: [lo, hi]} (integers, both ends included).")
    metric: str = opt("eval_loss", "Eval metric ASHA compares trials on and the best trial is picked by, as the "
                                   "run logs it (eval_loss; eval_accuracy, eval_divergence, eval_reward, ...).")
    mode: Literal["min", "max"] = opt("min", "min: lower metric is better; max: higher is better.")
    num_samples: int = opt(8, "Trials to run, each with values sampled from the space.")
    max_concurrent: int = opt(2, "Trials running at once; each holds cluster.num_workers training workers.")
    grace_period: int = opt(1, "Optimizer steps a trial trains before ASHA may stop it (the first rung; a trial "
                               "is only compared at its evaluations, every train.eval_every steps).")
    reduction_factor: float = opt(3.0, "ASHA's halving rate: rungs sit at grace_period x factor^k steps and "
                                       "about 1/factor of the trials reaching a rung go on past it.")
    max_t: int = opt(0, "Optimizer steps after which ASHA stops any trial (the last rung); 0 = no cap, every "
                        "trial that is not stopped runs its whole schedule.")
    seed: int = opt(0, "Seed of the sampling: the same seed and space give the same trial values.")

    def validate(self, section: str) -> None:
        if not self.metric:
            raise ConfigError(f"{section}.metric", "must name an eval metric, e.g. eval_loss")
        for key in ("num_samples", "max_concurrent", "grace_period"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{section}.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.reduction_factor <= 1:
            raise ConfigError(f"{section}.reduction_factor", f"must be > 1, got {self.reduction_factor}")
        if self.max_t < 0 or (self.max_t and self.max_t < self.grace_period):
            raise ConfigError(f"{section}.max_t", f"must be 0 (no cap) or >= grace_period ({self.grace_period}), "
                                                  f"got {self.max_t}")
        self.distributions(section)

    def distributions(self, section: str = "tune") -> list[Distribution]:
        """The space as checked Distributions, nested keys flattened, values coerced to
        the key's type. Raises ConfigError naming `tune.space.<key>`."""
        return [_parse(key, spec, f"{section}.space.{key}") for key, spec in _flatten(self.space).items()]


def _flatten(space: dict, prefix: str = "") -> dict:
    """{'train': {'lr': {...}}, 'peft.r': {...}} -> {'train.lr': {...}, 'peft.r': {...}}; a
    later entry replaces an earlier one for the same key (an override replaces the file's)."""
    flat: dict = {}
    for key, spec in space.items():
        full = f"{prefix}{key}"
        if isinstance(spec, dict) and spec and not set(spec) & set(DISTRIBUTIONS) and _kind(full) != "leaf":
            for sub_key, sub_spec in _flatten(spec, f"{full}.").items():
                flat.pop(sub_key, None)
                flat[sub_key] = sub_spec
        else:
            flat.pop(full, None)
            flat[full] = spec
    return flat


def _kind(key: str) -> str | None:
    """'section' or 'leaf' for a dotted JobConfig key; None when it is neither."""
    cls = _job_config()
    for part in key.split("."):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return None
        cls = hints[part]
    return "section" if dataclasses.is_dataclass(cls) else "leaf"


def _parse(key: str, spec: Any, where: str) -> Distribution:
    hint = _leaf_hint(key, where)
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(where, "expected one distribution, e.g. {choice: [a, b]}, {uniform: [lo, hi]}, "
                                 f"{{loguniform: [lo, hi]}} or {{randint: [lo, hi]}}; got {spec!r}")
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(where, f"unknown distribution '{kind}' (use {', '.join(DISTRIBUTIONS)})")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(where, "choice needs a non-empty list of values")
        return Distribution(key, kind, tuple(coerce(hint, v, f"{where}[{i}]") for i, v in enumerate(args)))
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(where, f"{kind} needs [lo, hi], got {args!r}")
    base = _numeric(hint)
    if base is None:
        raise ConfigError(where, f"{kind} samples numbers, but {key} is not a number; use choice")
    if kind in ("uniform", "loguniform") and base is int:
        raise ConfigError(where, f"{kind} samples fractions, but {key} is an integer; use randint or choice")
    lo, hi = (_number(v, f"{where}[{i}]", int if kind == "randint" else float) for i, v in enumerate(args))
    if kind == "randint" and lo > hi or kind != "randint" and lo >= hi:
        raise ConfigError(where, f"{kind} needs lo < hi, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(where, f"loguniform needs lo > 0, got {lo}")
    return Distribution(key, kind, (lo, hi))


def _leaf_hint(key: str, where: str):
    """The type of config key `key` (a dotted path to a leaf of JobConfig)."""
    parts = key.split(".")
    if parts[0] in NOT_SEARCHABLE:
        raise ConfigError(where, f"'{parts[0]}' cannot be searched (name and output_dir place each trial's "
                                 "run directory; tune is the search itself)")
    cls = root = _job_config()
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            leaves = [k for k, _, _ in field_help(root)]
            close = difflib.get_close_matches(key, leaves, n=1)
            hint = f"; did you mean {close[0]}?" if close else " (see `rayft train --help-config`)"
            raise ConfigError(where, f"'{key}' is not a config key{hint}")
        cls = hints[part]
        if dataclasses.is_dataclass(cls) and i == len(parts) - 1:
            raise ConfigError(where, f"'{key}' is a section; search one of its keys (e.g. "
                                     f"{key}.{dataclasses.fields(cls)[0].name})")
        if not dataclasses.is_dataclass(cls) and i < len(parts) - 1:
            raise ConfigError(where, f"'{'.'.join(parts[:i + 1])}' is not a section")
    return cls


def _numeric(hint):
    """int or float when the key holds a number (Optional allowed), else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = inner[0] if len(inner) == 1 else None
    return hint if hint in (int, float) else None


def _number(value, where: str, kind):
    if isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(where, f"expected a number, got {value!r}")
    if kind is int:
        if value != int(value):
            raise ConfigError(where, f"expected an integer, got {value!r}")
        return int(value)
    return float(value)


def trial_config(base: dict, values: dict, name: str, output_dir: str):
    """The JobConfig of one trial: `base` (a job config as plain data) with each searched
    key set to its sampled value, as `key=value` overrides would set it, the tune section
    dropped, and its own run directory `output_dir/name`. Raises ConfigError for a value
    that makes the config invalid."""
    data = copy.deepcopy(base)
    data.pop("tune", None)
    for key, value in values.items():
        set_key(data, key, plain(value))
    data["name"], data["output_dir"] = name, output_dir
    config = from_dict(_job_config(), data)
    config.validate()
    return config


def _job_config() -> type:
    if TuneConfig.job_config is None:
        # A trial process may not have imported it yet; importing it registers the job
        # config (here, not at the top, which would be an import cycle).
        import cluster.config  # noqa: F401
    return TuneConfig.job_config


def plain(value):
    """A sampled value as plain Python (Tune hands out numpy scalars), for configs and YAML."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    return value
