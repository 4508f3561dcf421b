"""The job config: composes each part's typed config, loads YAML, applies `key.sub=value`
overrides and validates. An unknown key, a wrong type or a bad value raises
`ConfigError` naming the full key and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from trainers.config import (DataConfig, DPOConfig, FreezeConfig, ModelConfig, PeftConfig, RewardConfig, TrainConfig,
                              opt)
from rollout.config import RolloutConfig
from rollout.rewards import RewardSpec
from cluster.tune_config import TuneConfig
from trainers.errors import ConfigError, UserError
from trainers.rl.config import AlgoConfig, DistillConfig

# Methods whose sampled responses are scored by rewards.
REWARD_METHODS = ("ppo", "grpo")


@dataclass
class ClusterConfig:
    address: Optional[str] = opt(None, "Ray cluster to join ('auto' or ray://host:port); empty = start an embedded local cluster.")
    num_workers: int = opt(2, "Ray Train workers (one process each; one GPU each on GPU machines).")
    cpus_per_worker: float = opt(1.0, "CPUs reserved per training worker.")
    placement: Literal["pack", "spread"] = opt(
        "pack", "Where the workers go on a multi-node cluster: pack = fill a node before using the next "
                "(Ray Train's default PACK); spread = one worker per node where possible (SPREAD).")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "Where workers train: auto = cuda when the cluster has GPUs.")
    strategy: Literal["ddp", "zero1", "zero2", "zero3"] = opt(
        "ddp", "ddp: full replica per worker (gloo on CPU, NCCL on GPU); zero1/2/3: DeepSpeed ZeRO "
               "sharding optimizer state / + gradients / + parameters.")
    offload_optimizer: bool = opt(False, "ZeRO: keep optimizer state in CPU memory.")
    offload_params: bool = opt(False, "ZeRO-3: keep parameters in CPU memory.")
    max_failures: int = opt(2, "Worker-group restarts allowed (a lost worker, a killed process); each resumes "
                                  "from the last complete checkpoint. 0 = fail at the first error.")

    def validate(self, section: str) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"{section}.num_workers", f"must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"{section}.cpus_per_worker", "must be > 0")
        if self.offload_optimizer and self.strategy == "ddp":
            raise ConfigError(f"{section}.offload_optimizer", "needs a ZeRO strategy (zero1, zero2 or zero3)")
        if self.offload_params and self.strategy != "zero3":
            raise ConfigError(f"{section}.offload_params", "needs strategy zero3")


@dataclass
class JobConfig:
    method: Literal["sft", "cpt", "classification", "rm", "dpo", "ppo", "grpo", "distill"] = opt(
        "sft", "sft: loss on assistant turns (or every token of raw text); cpt: continued pre-training "
               "on raw text; classification: a sequence-classification head on text/label data; rm: a "
               "reward model from preference pairs or scores; dpo: direct preference optimisation; ppo: "
               "PPO with a value head against rewards; grpo: critic-free RL (GRPO, RLOO, REINFORCE++); "
               "distill: knowledge distillation from a teacher (offline or on-policy).")
    name: str = opt("", "Run name; the run directory is output_dir/name (default: the config file's stem).")
    output_dir: str = opt("runs", "Parent directory of run directories.")
    model: ModelConfig = opt(ModelConfig, "The model to start from.")
    data: DataConfig = opt(DataConfig, "Training and eval data.")
    peft: PeftConfig = opt(PeftConfig, "Parameter-efficient fine-tuning.")
    freeze: FreezeConfig = opt(FreezeConfig, "Partial fine-tuning: which layers or modules train.")
    train: TrainConfig = opt(TrainConfig, "Optimisation and schedule.")
    rm: RewardConfig = opt(RewardConfig, "Reward-model objective (method rm).")
    dpo: DPOConfig = opt(DPOConfig, "DPO loss and reference model (method dpo).")
    algo: AlgoConfig = opt(AlgoConfig, "RL rollout batch and objective (methods ppo, grpo; distill on_policy).")
    distill: DistillConfig = opt(DistillConfig, "Teacher and divergence (method distill).")
    rollout: RolloutConfig = opt(RolloutConfig, "Rollout engine pool (methods ppo, grpo; distill on_policy).")
    rewards: RewardSpec = opt(RewardSpec, "Rewards of the sampled responses (methods ppo, grpo).")
    cluster: ClusterConfig = opt(ClusterConfig, "Ray cluster and distributed strategy.")
    tune: TuneConfig = opt(TuneConfig, "Hyper-parameter search over the keys above (rayft tune; rayft train ignores it).")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def validate(self, section: str = "") -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "rewards" and self.method not in REWARD_METHODS:
                continue  # no rewards needed, so none required
            if dataclasses.is_dataclass(value) and hasattr(value, "validate"):
                value.validate(f.name)
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError("name", f"must be a plain directory name, got '{self.name}'")
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Settings that are valid alone but not together."""
        peft, strategy = self.peft.method, self.cluster.strategy
        if peft in ("prefix", "prompt") and self.data.packing:
            raise ConfigError("data.packing", f"cannot be used with peft.method {peft} "
                                              "(virtual tokens need the 2D padding mask)")
        if self.freeze.mode == "gradual" and strategy != "ddp":
            raise ConfigError("freeze.mode", "gradual unfreezing changes trainable parameters mid-run "
                                             "and needs cluster.strategy ddp")
        if peft == "qlora" and strategy == "zero3":
            raise ConfigError("cluster.strategy", "zero3 cannot shard QLoRA's 4-bit base weights; use ddp, zero1 or zero2")
        if peft == "qlora" and self.cluster.device == "cpu":
            raise ConfigError("cluster.device", "peft.method qlora needs cuda")
        if self.dpo.reference == "adapter_disabled" and peft == "none":
            raise ConfigError("dpo.reference", "adapter_disabled needs a PEFT method (peft.method)")
        if peft == "qlora" and self.method in ("classification", "rm"):
            raise ConfigError("peft.method", "qlora is not supported for method classification")
        if self.method == "distill" and not self.distill.teacher:
            raise ConfigError("distill.teacher", "method distill needs a teacher model directory")
        if self.uses_rollouts:
            if peft not in ("none", "lora"):
                raise ConfigError("peft.method", f"method {self.method} syncs weights to the rollout engines, "
                                                  f"which serve full weights or LoRA; got {peft}")
            if self.data.packing:
                raise ConfigError("data.packing", f"does not apply to method {self.method} (prompts are not packed)")
            if self.method == "grpo" and self.algo.estimator != "reinforce_pp" and self.algo.samples_per_prompt < 2:
                raise ConfigError("algo.samples_per_prompt", f"estimator {self.algo.estimator} compares the samples "
                                                             "of a prompt and needs at least 2")
            if self.algo.reference == "adapter_disabled" and peft == "none":
                raise ConfigError("algo.reference", "adapter_disabled needs a PEFT method (peft.method)")

    @property
    def uses_rollouts(self) -> bool:
        """True when the run samples from the rollout pool."""
        return self.method in REWARD_METHODS or (self.method == "distill" and self.distill.mode == "on_policy")


def load_config(path: str | Path | None, overrides: list[str] = (), default_name: str = "") -> JobConfig:
    """YAML file (optional) + `key.sub=value` overrides -> a validated JobConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_config_file(path)
        default_name = default_name or Path(path).stem
    for item in overrides:
        apply_override(data, item)
    data.setdefault("name", default_name)
    config = from_dict(JobConfig, data)
    config.validate()
    return config


def read_config_file(path: str | Path) -> dict:
    """A YAML file whose top level is a mapping of config keys."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of config keys")
    return data


def apply_override(data: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (2 -> int, [a, b] -> list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"override '{item}' must look like key.sub=value")
    set_key(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")


def set_key(data: dict, key: str, value) -> None:
    """Set the dotted `key` (a.b.c) in nested config data, creating sections on the way."""
    node, parts = data, key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(key, f"'{part}' is not a section")
    node[parts[-1]] = value


def from_dict(cls, data: Any, prefix: str = ""):
    """Build dataclass `cls` from plain data, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(prefix or cls.__name__, f"expected a mapping, got {_kind(data)}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(_join(prefix, unknown[0]), f"unknown key (valid keys: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(hints[name], value, _join(prefix, name)) for name, value in data.items()}
    return cls(**kwargs)


def with_absolute_paths(config: JobConfig) -> JobConfig:
    """A copy whose paths are absolute: Ray workers do not share the driver's cwd."""
    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve()) if path else path

    config = from_dict(JobConfig, to_dict(config))
    config.output_dir = absolute(config.output_dir)
    config.model.path = trained_model(absolute(config.model.path))
    for source in (*config.data.train, *config.data.eval):
        source.path = absolute(source.path)
    config.distill.teacher = trained_model(absolute(config.distill.teacher))
    config.rewards = config.rewards.with_absolute_paths()
    return config


def trained_model(path: str) -> str:
    """A run directory stands for the model it trained (its final/); any other path is kept."""
    run = Path(path) if path else None
    if run and not (run / "config.json").is_file() and (run / "final" / "config.json").is_file():
        return str(run / "final")
    return path


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def dump_yaml(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")


def config_help(cls, prefix: str = "") -> str:
    """One line per leaf key: the key, its help and its default (the --help-config text)."""
    rows = field_help(cls)
    width = max(len(prefix + key) for key, _, _ in rows) + 2
    return "\n".join(f"{prefix + key:{width}}{help_text} [default: {default!r}]" for key, help_text, default in rows)


def field_help(cls) -> list[tuple[str, str, Any]]:
    """(key, help, default) for every leaf key, for `rayft train --help-config`."""
    rows = []
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            rows += [(f"{f.name}.{k}", h, d) for k, h, d in field_help(hint)]
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((f.name, f.metadata.get("help", ""), default))
    return rows


def _coerce(hint, value, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        (item,) = args
        if dataclasses.is_dataclass(item) and not isinstance(value, list):
            value = [value]  # a single source may be written without the list
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {_kind(value)}")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {_kind(value)}")
        key_type, value_type = args
        return {_coerce(key_type, k, f"{key}.{k}"): _coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if isinstance(value, str) and "path" in {f.name for f in dataclasses.fields(hint)}:
            value = {"path": value}  # a bare path stands for {path: ...}
        return from_dict(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            value = _yaml_number(value)  # YAML 1.1 reads `2e-4` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    if hint is Any:
        return value
    raise ConfigError(key, f"unsupported config type {hint}")


def _yaml_number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _kind(value) -> str:
    return type(value).__name__ if value is not None else "nothing"
