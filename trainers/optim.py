"""Optimizer and learning-rate schedule: AdamW over trainable parameters, linear warmup,
then cosine, linear or constant."""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, train_cfg, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (or SGD) over the trainable parameters. `fused` picks torch's one-kernel AdamW
    (CPU and CUDA): measured 2-3% of an SFT step on CPU; DeepSpeed's flat partitions keep the
    per-tensor path."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Biases and norm weights are not decayed (the usual transformer recipe).
        (no_decay if param.ndim < 2 else decay).append(param)
    groups = [g for g in ({"params": decay, "weight_decay": train_cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train_cfg.lr)
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=tuple(train_cfg.betas), fused=fused or None)


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak lr at `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, train_cfg, total_steps: int):
    warmup = int(round(train_cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, train_cfg.scheduler))
