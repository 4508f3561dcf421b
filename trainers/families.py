"""Model families `rayft init-model --arch` builds at small size: each family's transformers
config with the features where families differ (biases on q/k/v, q/k norms, tied
embeddings, Gemma's norm offset, logit soft-capping and alternating sliding windows,
Phi-3's fused projections, routed experts) switched on as the published models have them,
and the family's chat template.

Sizes come from the preset (`trainers.models.PRESETS`); every family keeps head_dim 64,
which vLLM's CPU attention needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainers.chat_templates import CHATML, GEMMA, LLAMA3, MISTRAL, PHI3, QWEN, ChatTemplate


@dataclass(frozen=True)
class Family:
    config_class: str               # transformers config class
    template: ChatTemplate
    extra: dict = field(default_factory=dict)  # family settings over the preset's sizes

    def config(self, spec: dict, **ids):
        import transformers

        sizes = dict(spec)
        if "num_experts" in self.extra:  # an MoE layer's experts share the dense layer's width
            sizes["moe_intermediate_size"] = sizes["intermediate_size"] // 2
        return getattr(transformers, self.config_class)(**sizes, **self.extra, **ids)


FAMILIES = {
    "llama": Family("LlamaConfig", CHATML, dict(rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "llama3": Family("LlamaConfig", LLAMA3, dict(rms_norm_eps=1e-5, tie_word_embeddings=False,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "qwen2": Family("Qwen2Config", QWEN, dict(rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "qwen3": Family("Qwen3Config", QWEN, dict(rms_norm_eps=1e-6, tie_word_embeddings=True, head_dim=64)),
    "mistral": Family("MistralConfig", MISTRAL, dict(rms_norm_eps=1e-5, tie_word_embeddings=False, head_dim=64,
                                                     sliding_window=None)),
    "gemma2": Family("Gemma2Config", GEMMA, dict(
        rms_norm_eps=1e-6, tie_word_embeddings=True, head_dim=64, query_pre_attn_scalar=64,
        hidden_activation="gelu_pytorch_tanh", sliding_window=64, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0)),
    "phi3": Family("Phi3Config", PHI3, dict(rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "qwen3_moe": Family("Qwen3MoeConfig", QWEN, dict(
        rms_norm_eps=1e-6, tie_word_embeddings=False, head_dim=64, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=1, norm_topk_prob=True)),
}
