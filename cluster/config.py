"""The job config: composes each part's typed config, loads YAML, applies `key.sub=value`
overrides and validates. An unknown key, a wrong type or a bad value raises
`ConfigError` naming the full key and what was expected (the machinery is
`cluster.config_core`; its public names are importable from here too).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from trainers.config import (DataConfig, DPOConfig, FreezeConfig, ModelConfig, PeftConfig, RewardConfig, TrainConfig,
                              opt)
from rollout.config import RolloutConfig
from rollout.refs import absolute as absolute_ref
from trainers.data.dataset_info import read_dataset_info
from trainers.models import routed_experts
from rollout.rewards import RewardSpec
from cluster.config_core import (apply_override, config_help, dump_yaml, field_help, from_dict,  # noqa: F401
                                 read_config_file, set_key, to_dict)
from cluster.tune_config import TuneConfig
from trainers.errors import ConfigError
from trainers.methods import METHOD_NAMES, method_spec, methods_help
from trainers.rl.config import AlgoConfig, DistillConfig

MethodName = Literal[METHOD_NAMES]
# Keys that moved: the old spelling is refused with the new one named.
MOVED_KEYS = {"dpo.reference": "model.reference (one reference model for DPO and RL; copy is now frozen_copy)",
              "algo.reference": "model.reference (one reference model for DPO and RL; copy is now frozen_copy)"}


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
    method: MethodName = opt("sft", methods_help())
    name: str = opt("", "Run name; the run directory is output_dir/name (default: the config file's stem).")
    output_dir: str = opt("runs", "Parent directory of run directories.")
    model: ModelConfig = opt(ModelConfig, "The model to start from.")
    data: DataConfig = opt(DataConfig, "Training and eval data.")
    peft: PeftConfig = opt(PeftConfig, "Parameter-efficient fine-tuning.")
    freeze: FreezeConfig = opt(FreezeConfig, "Partial fine-tuning: which layers or modules train.")
    train: TrainConfig = opt(TrainConfig, "Optimisation and schedule.")
    rm: RewardConfig = opt(RewardConfig, "Reward-model objective (method rm).")
    dpo: DPOConfig = opt(DPOConfig, "DPO loss (method dpo; its reference model is model.reference).")
    algo: AlgoConfig = opt(AlgoConfig, "RL rollout batch and objective (methods ppo, grpo; distill on_policy).")
    distill: DistillConfig = opt(DistillConfig, "Teacher and divergence (method distill).")
    rollout: RolloutConfig = opt(RolloutConfig, "Rollout engine pool (methods ppo, grpo; distill on_policy).")
    rewards: RewardSpec = opt(RewardSpec, "Rewards of the sampled responses (methods ppo, grpo).")
    cluster: ClusterConfig = opt(ClusterConfig, "Ray cluster and distributed strategy.")
    tune: TuneConfig = opt(TuneConfig, "Hyper-parameter search over the keys above (rayft tune; rayft train ignores it).")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def uses_reward_actors(self) -> bool:
        """The method scores with the `rewards` section, which an environment's own rewards
        make optional."""
        return self.spec.rewards and bool(self.rewards.rewards or not self.rollout.environment)

    def validate(self, section: str = "") -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "rewards" and not self.uses_reward_actors:
                continue  # no rewards needed (or an environment gives them), so none required
            if dataclasses.is_dataclass(value) and hasattr(value, "validate"):
                value.validate(f.name)
        for key, message in self.rollout.problems():
            raise ConfigError(f"rollout.{key}", message)
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError("name", f"must be a plain directory name, got '{self.name}'")
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Settings that are valid alone but not together."""
        peft, strategy = self.peft.method, self.cluster.strategy
        if peft in ("prefix", "prompt") and self.data.packing:
            raise ConfigError("data.packing", f"cannot be used with peft.method {peft} "
                                              "(virtual tokens need the 2D padding mask)")
        if self.data.streaming and self.spec.data(self) != "sft":
            raise ConfigError("data.streaming", f"streams SFT-style data (methods sft, cpt, offline distill); "
                                                f"method {self.method} reads its {self.spec.data(self)} data in memory")
        if self.freeze.mode == "gradual" and strategy != "ddp":
            raise ConfigError("freeze.mode", "gradual unfreezing changes trainable parameters mid-run "
                                             "and needs cluster.strategy ddp")
        if peft == "qlora" and strategy == "zero3":
            raise ConfigError("cluster.strategy", "zero3 cannot shard QLoRA's 4-bit base weights; use ddp, zero1 or zero2")
        if peft == "qlora" and self.cluster.device == "cpu":
            raise ConfigError("cluster.device", "peft.method qlora needs cuda")
        if self.model.reference == "adapter_disabled" and peft == "none":
            raise ConfigError("model.reference", "adapter_disabled needs a PEFT method (peft.method)")
        if peft == "qlora" and not self.spec.qlora:
            raise ConfigError("peft.method", f"qlora is not supported for method {self.method}")
        if self.spec.teacher and not self.distill.teacher:
            raise ConfigError("distill.teacher", f"method {self.method} needs a teacher model directory")
        if self.uses_rollouts:
            if peft not in ("none", "lora"):
                raise ConfigError("peft.method", f"method {self.method} syncs weights to the rollout engines, "
                                                  f"which serve full weights or LoRA; got {peft}")
            if self.rollout.engine == "hf" and not self.adapter_sync and routed_experts(self.model.path):
                raise ConfigError("rollout.engine", "the transformers engine cannot load weight syncs of an MoE "
                                                    "model (its experts are fused in memory, syncs travel per "
                                                    "expert); use rollout.engine: vllm")
            if self.rollout.lora_sync == "adapter" and peft != "lora":
                raise ConfigError("rollout.lora_sync", f"adapter syncs a LoRA adapter; peft.method is {peft}")
            if self.data.packing:
                raise ConfigError("data.packing", f"does not apply to method {self.method} (prompts are not packed)")
            if self.method == "grpo" and self.algo.estimator != "reinforce_pp" and self.algo.samples_per_prompt < 2:
                raise ConfigError("algo.samples_per_prompt", f"estimator {self.algo.estimator} compares the samples "
                                                             "of a prompt and needs at least 2")

    @property
    def spec(self):
        """This method's entry in `trainers.methods.METHODS`."""
        return method_spec(self.method)

    @property
    def uses_rollouts(self) -> bool:
        """True when the run samples from the rollout pool (and so runs the RL loop)."""
        return self.spec.on_policy(self)

    @property
    def adapter_sync(self) -> bool:
        """True when the engines get the LoRA adapter alone, not merged weights (rollout.lora_sync)."""
        return self.uses_rollouts and self.peft.method == "lora" and self.rollout.lora_sync != "merged"

    def engine_settings(self) -> RolloutConfig:
        """The rollout settings the engines start with: LoRA slots of the adapter's rank
        where the adapter alone is synced."""
        if not self.adapter_sync:
            return self.rollout
        from rollout.engine import vllm_lora_rank

        return dataclasses.replace(self.rollout, enable_lora=True,
                                   max_lora_rank=max(self.rollout.max_lora_rank, vllm_lora_rank(self.peft.r)))


TuneConfig.job_config = JobConfig


def load_config(path: str | Path | None, overrides: list[str] = (), default_name: str = "") -> JobConfig:
    """YAML file (optional) + `key.sub=value` overrides -> a validated JobConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_config_file(path)
        default_name = default_name or Path(path).stem
    for item in overrides:
        apply_override(data, item)
    data.setdefault("name", default_name)
    _refuse_moved_keys(data)
    config = from_dict(JobConfig, data)
    config.validate()
    return config


def _refuse_moved_keys(data: dict) -> None:
    for old, new in MOVED_KEYS.items():
        section, _, leaf = old.partition(".")
        if isinstance(data.get(section), dict) and leaf in data[section]:
            raise ConfigError(old, f"has moved to {new}")


def with_absolute_paths(config: JobConfig) -> JobConfig:
    """A copy whose paths are absolute: Ray workers do not share the driver's cwd."""
    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve()) if path else path

    config = from_dict(JobConfig, to_dict(config))
    config.output_dir = absolute(config.output_dir)
    config.model.path = trained_model(absolute(config.model.path))
    datasets = set(read_dataset_info(config.data.dataset_info)) if config.data.dataset_info else set()
    for source in (*config.data.train, *config.data.eval, *config.data.replay):
        source.path = source.path if source.path in datasets else absolute(source.path)
    config.data.dataset_info = config.data.dataset_info and absolute(config.data.dataset_info)
    config.distill.teacher = trained_model(absolute(config.distill.teacher))
    config.rewards = config.rewards.with_absolute_paths()
    config.rollout.environment = absolute_ref(config.rollout.environment)
    return config


def trained_model(path: str) -> str:
    """A run directory stands for the model it trained (its final/); any other path is kept."""
    run = Path(path) if path else None
    if run and not (run / "config.json").is_file() and (run / "final" / "config.json").is_file():
        return str(run / "final")
    return path
