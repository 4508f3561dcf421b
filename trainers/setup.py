"""Model setup shared by every method: load the base model, apply PEFT, report what
is trainable."""

from __future__ import annotations

import torch

from trainers.errors import ConfigError
from trainers.models import count_parameters, load_causal_lm, resolve_dtype


def build_policy(model_cfg, peft_cfg, use_gpu: bool) -> torch.nn.Module:
    """The causal LM to train: the base model, wrapped by peft when a PEFT method is set."""
    model = load_causal_lm(model_cfg.path, resolve_dtype(model_cfg.dtype, use_gpu),
                           model_cfg.trust_remote_code, model_cfg.attn_implementation)
    model.config.use_cache = False
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if peft_cfg.method != "none":
        model = apply_peft(model, peft_cfg)
    return model


def apply_peft(model, peft_cfg):
    from peft import LoraConfig, get_peft_model

    targets = peft_cfg.target_modules
    target = "all-linear" if targets == ["all-linear"] else targets
    config = LoraConfig(r=peft_cfg.r, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout,
                        target_modules=target, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # peft's message names the modules it could not find
        raise ConfigError("peft.target_modules", str(exc)) from None


def describe_trainable(model) -> dict:
    trainable, total = count_parameters(model)
    return {"trainable_params": trainable, "total_params": total,
            "trainable_pct": round(100.0 * trainable / max(total, 1), 4)}
