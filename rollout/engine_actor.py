"""The engine actor: one generation engine (vLLM or transformers) in its own Ray actor
process, remembering the weights and adapter it serves so a replacement can be brought
to the same state."""

from __future__ import annotations

import os
import time

import ray

from rollout.config import RolloutConfig
from rollout.engine import Generation, PromptInput, Sampling


def resolve_engine_kind(kind: str) -> str:
    """`auto` is vLLM where it is installed, transformers otherwise."""
    if kind != "auto":
        return kind
    try:
        import vllm  # noqa: F401
        return "vllm"
    except ImportError:
        return "hf"


def build_engine(kind: str, model_dir: str, cfg: RolloutConfig, adapter_dir: str | None = None):
    if resolve_engine_kind(kind) == "vllm":
        from rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(model_dir, cfg)
        if adapter_dir:
            engine.load_adapter(adapter_dir)
        return engine
    from rollout.hf_engine import HFEngine

    return HFEngine(model_dir, adapter_dir=adapter_dir, dtype="float32" if cfg.dtype == "auto" else cfg.dtype,
                    seed=cfg.seed)


class EngineActor:
    """Ray actor body; the pool's owner (`rollout.pool_owner`) creates these with `ray.remote(...)`."""

    def __init__(self, kind: str, model_dir: str, cfg: RolloutConfig, adapter_dir: str | None = None):
        self.engine = build_engine(kind, model_dir, cfg, adapter_dir)

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        """This actor's process id (fault-injection tests kill exactly this process)."""
        return os.getpid()

    def generate(self, prompts: list[PromptInput], sampling: Sampling) -> list[list[Generation]]:
        return self.engine.generate(prompts, sampling)

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        return self.engine.score(prompt_ids, response_ids)

    def update_weights(self, bucket_refs: list) -> float:
        """Load every bucket (ObjectRefs of safetensors bytes); returns seconds taken."""
        start = time.perf_counter()
        for ref in bucket_refs:
            self.engine.update_weights(ray.get(ref))
        return time.perf_counter() - start

    def load_checkpoint(self, model_dir: str, bucket_mb: float) -> float:
        """Load a saved model's weights (every tensor, bucket by bucket, as a sync would);
        returns seconds taken."""
        from rollout.weight_sync import checkpoint_buckets

        start = time.perf_counter()
        for payload in checkpoint_buckets(model_dir, bucket_mb):
            self.engine.update_weights(payload)
        return time.perf_counter() - start

    def load_adapter(self, adapter_dir: str) -> int:
        return self.engine.load_adapter(adapter_dir)
