"""The generation-engine interface every rollout engine implements, and the typed values
that cross actor boundaries: sampling settings in, `Generation`s out.

Engines: `rollout.vllm_engine.VLLMEngine` (default where vLLM is installed; the CPU build
here) and `rollout.hf_engine.HFEngine` (transformers `generate`: the fallback, and the
reference in tests). `rollout.pool.RolloutPool` puts N of them behind one handle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Union

GIB = 1 << 30

# The ranks vLLM accepts for max_lora_rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of `rank`."""
    return min((r for r in VLLM_LORA_RANKS if r >= rank), default=rank)

Messages = list[dict]            # [{"role": ..., "content": ...}, ...]
PromptInput = Union[list[int], Messages]  # token ids, or chat messages rendered by the chat template


@dataclass
class Sampling:
    """How to sample; the same fields for every engine."""
    n: int = 1                       # samples per prompt
    temperature: float = 1.0         # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                   # 0 = off
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: Optional[int] = None       # per-request seed: the same seed gives the same samples


@dataclass
class Generation:
    """One sampled response to one prompt."""
    prompt_index: int                # position of the prompt in the request
    sample_index: int                # 0..n-1
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    logprobs: list[float]            # log-prob of each response token under the sampling model
    finish_reason: str               # "stop" (eos or a stop string/id) or "length"
    policy_version: int = 0          # the weight sync the engine served it at (0: the start model)
    # Multi-turn episodes (rollout.episodes): which response tokens the policy sampled (1)
    # and which the environment inserted (0); None: all sampled.
    loss_mask: Optional[list[int]] = None
    episode_reward: Optional[float] = None   # the sum of the environment's turn rewards
    success: Optional[bool] = None           # whether the episode reached its goal, if the environment says
    turns: int = 1                           # assistant turns


class Engine(Protocol):
    def generate(self, prompts: list[PromptInput], sampling: Sampling) -> list[list[Generation]]:
        """`n` generations per prompt, in input order."""

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Log-prob of each response token given its prompt (for verifying weight sync)."""

    def update_weights(self, payload: bytes) -> dict[str, int]:
        """Load full or partial weights given as safetensors bytes (names as in the HF model);
        returns the fingerprint (`rollout.weight_sync.fingerprint`) of what was loaded."""

    def load_adapter(self, adapter_dir: str) -> int:
        """Serve a peft LoRA adapter (a new version replaces the last); returns its version."""

    def unload_adapter(self) -> None:
        """Serve the base model alone again."""


def vllm_device_kwargs(on_gpu: bool, dtype: str, kv_cache_gb: float, tensor_parallel_size: int,
                       gpu_memory_utilization: float) -> dict:
    """The vLLM engine arguments that depend on the device, shared by the rollout engines
    and the served ones. On CPU, what the CPU build runs: float32 (no bf16 kernels for
    every op) and eager mode (torch.compile start-up costs minutes for no gain on small
    models), with the KV cache sized in bytes (VLLM_CPU_KVCACHE_SPACE is whole GiB only,
    and when set in the environment it still takes precedence, as vLLM's legacy knob),
    and whole-prompt prefills."""
    if on_gpu:
        return dict(dtype="bfloat16" if dtype == "auto" else dtype, tensor_parallel_size=tensor_parallel_size,
                    gpu_memory_utilization=gpu_memory_utilization)
    # No chunked prefill on CPU: when a step's token budget splits a prompt, vLLM rewinds
    # that request's generator (`set_offset`), which CPU generators do not have, and a
    # seeded request then kills the engine (vLLM 0.32, `_bookkeeping_sync`).
    return dict(dtype="float32" if dtype == "auto" else dtype, enforce_eager=True,
                kv_cache_memory_bytes=int(kv_cache_gb * GIB), enable_chunked_prefill=False)
