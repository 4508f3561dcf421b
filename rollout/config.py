"""Typed config of the rollout side: the engine pool and its sampling defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def opt(default, help: str):
    """A dataclass field with help text, used by every part's config. A list default is
    copied per instance; a class default (a nested section) is instantiated per instance."""
    if isinstance(default, type):
        return field(default_factory=default, metadata={"help": help})
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RolloutConfig:
    engine: Literal["auto", "vllm", "hf"] = opt("auto", "Generation engine: vllm where installed, else hf (transformers).")
    num_engines: int = opt(1, "Engine actors in the pool; a batch is split across them.")
    tensor_parallel_size: int = opt(1, "GPUs per engine (vLLM tensor parallelism; GPU only).")
    cpus_per_engine: float = opt(1.0, "CPUs reserved per engine actor.")
    placement: Literal["pack", "spread"] = opt(
        "pack", "Where the engines go on a multi-node cluster: pack = fill a node before using the next; "
                "spread = one engine per node where possible (the pool's placement group strategy).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "Engine weights dtype: auto = bfloat16 on GPU, float32 on CPU.")
    max_model_len: int = opt(0, "Longest prompt + response an engine handles; 0 = the model's own context length.")
    kv_cache_gb: float = opt(1.0, "KV-cache memory per engine on CPU, GiB (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = opt(0.5, "Share of GPU memory an engine may take (GPU only).")
    enable_lora: bool = opt(False, "Serve LoRA adapters (needed to sync a LoRA policy without merging).")
    max_lora_rank: int = opt(16, "Largest LoRA rank the engines accept.")
    max_retries: int = opt(2, "Times a lost engine's (or reward / teacher actor's) share of a batch is re-issued on "
                              "a replacement, and times a replacement is started, before the call fails.")
    timeout_s: float = opt(600.0, "Longest wait for one engine or teacher call (a batch share, a weight load, a "
                                  "start); a hung engine is replaced like a dead one.")
    sync_bucket_mb: int = opt(32, "Size bound of each weight-sync message, MiB (whole decoder layers stay together).")
    verify_sync: bool = opt(False, "After each sync, the engines score a few of the step's responses and the max |log-prob| "
                                        "gap to the trainer's updated weights is logged (sync_gap_max).")
    seed: int = opt(0, "Engine seed.")
    lora_sync: Literal["auto", "adapter", "merged"] = opt(
        "auto", "How a LoRA policy reaches the engines: adapter = only the adapter's tensors travel and the "
                "engines serve them as a new adapter version on the unchanged base (vLLM LoRA); merged = the base "
                "with the adapter merged in, every weight; auto = adapter for peft.method lora.")
    max_staleness: int = opt(
        0, "Pipelined rollouts: the engines generate the samples of up to this many steps ahead while the trainer "
           "trains, so a step trains on samples from a policy at most this many updates old (0: each step's "
           "samples come from the weights it updates, generate and train in turn).")

    # multi-turn episodes (rollout.episodes)
    environment: str = opt(
        "", "Multi-turn episodes with tools or feedback: an environment class (rayft:calculator, rayft:guess_number, "
            "module:Class or path/to/file.py:Class; see docs/environments.md). Empty: one response per prompt.")
    env_params: Any = opt(None, "Keyword arguments for the environment class (a mapping).")
    max_turns: int = opt(4, "Most assistant turns in an episode (each up to algo.max_new_tokens tokens).")
    max_episode_tokens: int = opt(
        0, "Most tokens after the prompt in an episode, the assistant's and the inserted messages' together "
           "(0: no bound but max_turns and the model's context).")

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for each setting out of range; empty when all are valid."""
        out = [(key, f"must be >= {low}, got {getattr(self, key)}") for key, low in
               (("num_engines", 1), ("tensor_parallel_size", 1), ("max_retries", 0), ("sync_bucket_mb", 1),
                ("max_staleness", 0), ("max_lora_rank", 1), ("max_model_len", 0))
               if getattr(self, key) < low]
        out += [(key, f"must be > 0, got {getattr(self, key)}") for key in ("cpus_per_engine", "timeout_s", "kv_cache_gb")
                if getattr(self, key) <= 0]
        out += [(key, f"must be >= {low}, got {getattr(self, key)}") for key, low in
                (("max_turns", 1), ("max_episode_tokens", 0)) if getattr(self, key) < low]
        if self.env_params is not None and not isinstance(self.env_params, dict):
            out.append(("env_params", f"must be a mapping, got {type(self.env_params).__name__}"))
        elif self.environment:
            from rollout.environment import EnvError, load_environment

            try:
                load_environment(self.environment, self.env_params or {})
            except EnvError as exc:
                out.append(("environment", str(exc)))
        if not 0 < self.gpu_memory_utilization <= 1:
            out.append(("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}"))
        return out
