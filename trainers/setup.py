"""Model setup shared by every method: load the base model (4-bit for QLoRA), wrap it
with the configured PEFT method, apply partial freezing, and report what is trainable.

Every PEFT method goes through peft's own config classes and `get_peft_model`, so
`final/` is a standard peft adapter directory whatever the method.
"""

from __future__ import annotations

import torch

from trainers.errors import ConfigError
from trainers.models import count_parameters, load_causal_lm, resolve_dtype

# Non-reentrant checkpointing needs no input that requires grad, so a frozen embedding
# (any PEFT method, or freezing) still gets gradients through checkpointed blocks.
CHECKPOINTING = {"use_reentrant": False}


def load_base_model(model_cfg, peft_cfg, use_gpu: bool) -> torch.nn.Module:
    """The causal LM from `model_cfg.path`, 4-bit for qlora, ready for training."""
    if peft_cfg.method == "qlora":
        model = _load_4bit(model_cfg)
    else:
        model = load_causal_lm(model_cfg.path, resolve_dtype(model_cfg.dtype, use_gpu),
                               model_cfg.trust_remote_code, model_cfg.attn_implementation)
        if model_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
    model.config.use_cache = False
    return model


def apply_peft_and_freezing(model, job, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """`job.peft` then `job.freeze` applied to a loaded model (any head: CAUSAL_LM, SEQ_CLS).
    Gradual unfreezing then needs `trainers.freezing.unfreeze_due` as a per-step hook."""
    from trainers.freezing import apply_freezing

    model = apply_peft(model, job.peft, task_type)
    apply_freezing(model, job.freeze, job.peft.method)
    return model


def peft_config(peft_cfg, task_type: str = "CAUSAL_LM"):
    """The peft config object for `peft_cfg.method` (not `none`)."""
    import peft

    common = dict(task_type=task_type, modules_to_save=peft_cfg.modules_to_save or None)
    if peft_cfg.method in ("lora", "dora", "qlora"):
        return peft.LoraConfig(r=peft_cfg.r, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout,
                               target_modules=_targets(peft_cfg.target_modules),
                               use_dora=peft_cfg.method == "dora", **common)
    if peft_cfg.method == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=peft_cfg.num_virtual_tokens, **common)
    if peft_cfg.method == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=peft_cfg.num_virtual_tokens,
                                       prompt_tuning_init=peft.PromptTuningInit.RANDOM, **common)
    if peft_cfg.method == "ia3":
        if peft_cfg.target_modules == ["all-linear"]:
            # None lets peft pick its per-architecture IA3 defaults (Llama: k_proj, v_proj,
            # down_proj, with down_proj feed-forward); 'all-linear' would scale every linear
            # layer's output, including the MLP ones that IA3 scales on the input.
            return peft.IA3Config(target_modules=None, feedforward_modules=None, **common)
        return peft.IA3Config(target_modules=peft_cfg.target_modules,
                              feedforward_modules=peft_cfg.feedforward_modules, **common)
    raise ValueError(f"unknown peft method {peft_cfg.method!r}")


def apply_peft(model, peft_cfg, task_type: str = "CAUSAL_LM"):
    """`model` wrapped by peft as `peft_cfg` says; unchanged for method none."""
    from peft import get_peft_model

    if peft_cfg.method == "none":
        return model
    if peft_cfg.method == "qlora" and not getattr(model, "is_loaded_in_4bit", False):
        raise ConfigError("peft.method", "qlora needs the base loaded in 4-bit (trainers.setup.load_base_model); "
                                         "this method loads its model another way: use lora")
    try:
        return get_peft_model(model, peft_config(peft_cfg, task_type))
    except ValueError as exc:  # peft's message names the modules it could not find
        key = "peft.modules_to_save" if "modules_to_save" in str(exc) else "peft.target_modules"
        raise ConfigError(key, str(exc)) from None


def _targets(names: list[str]):
    return "all-linear" if names == ["all-linear"] else names


def _load_4bit(model_cfg):
    """The base model quantised to 4-bit NF4 on this worker's GPU, prepared for QLoRA. Only
    reached with CUDA and bitsandbytes present: `PeftConfig.validate` refuses qlora elsewhere.
    Not exercised on the CPU machines this was written on."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = load_causal_lm(model_cfg.path, "bfloat16", model_cfg.trust_remote_code, model_cfg.attn_implementation,
                           quantization_config=quant, device_map={"": torch.cuda.current_device()})
    # Freezes the 4-bit base, casts norms and embeddings to float32 for stable training,
    # and turns on gradient checkpointing when configured.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=model_cfg.gradient_checkpointing,
                                           gradient_checkpointing_kwargs=CHECKPOINTING)


def describe_trainable(model) -> dict:
    """Parameter counts for the start event. Parameters that gradual unfreezing trains only
    later (`unfreeze_step` > 0, see trainers.freezing) are counted apart: they require
    grad from the start only so that the optimizer holds them."""
    trainable, total = count_parameters(model)
    later = sum(p.numel() for p in model.parameters() if p.requires_grad and getattr(p, "unfreeze_step", 0) > 0)
    out = {"trainable_params": trainable - later, "total_params": total,
           "trainable_pct": round(100.0 * (trainable - later) / max(total, 1), 4)}
    if later:
        out["unfrozen_later_params"] = later
    return out
