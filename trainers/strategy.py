"""Distributed strategies: how a worker wraps its model, accumulates gradients, steps the
optimizer and saves or restores its state. Every method's loop talks to a strategy only
through this interface; `build_strategy` picks DDP or DeepSpeed ZeRO from the config."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file


# Parameter dtypes torch's fused AdamW steps (4-bit QLoRA bases are frozen, so never asked).
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def build_strategy(name: str, model, train_cfg, total_steps: int, world_size: int, *,
                   offload_optimizer: bool = False, offload_params: bool = False):
    from trainers.optim import build_optimizer, build_scheduler

    fused = name == "ddp" and all(p.dtype in FUSED_DTYPES for p in model.parameters() if p.requires_grad)
    optimizer = build_optimizer(model, train_cfg, fused=fused)
    scheduler = build_scheduler(optimizer, train_cfg, total_steps)
    if name == "ddp":
        return DDPStrategy(model, optimizer, scheduler, train_cfg.max_grad_norm)
    from trainers.zero import ZeroStrategy  # DeepSpeed is imported only when asked for

    return ZeroStrategy(model, optimizer, scheduler, train_cfg, world_size, stage=int(name[-1]),
                        offload_optimizer=offload_optimizer, offload_params=offload_params)


class DDPStrategy:
    """Plain data parallelism: a full replica per worker, gradients all-reduced."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, max_grad_norm: float):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.max_grad_norm = max_grad_norm
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.model = self._wrap()

    def _wrap(self):
        if self.world_size == 1:
            return self.module
        device_ids = [self.module.device.index] if self.module.device.type == "cuda" else None
        # Gradients live in DDP's all-reduce buckets instead of being copied in and out of
        # them: one gradient-sized buffer less per worker, and no copy per step.
        return torch.nn.parallel.DistributedDataParallel(self.module, device_ids=device_ids,
                                                         gradient_as_bucket_view=True)

    def refresh_trainable(self) -> None:
        """Re-wrap after parameters changed `requires_grad` (DDP fixes its set at wrap time)."""
        self.model = self._wrap()

    def accumulating(self, more_to_come: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if more_to_come and self.world_size > 1:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, step optimizer and schedule, clear grads; returns the pre-clip grad norm."""
        params = [p for p in self.module.parameters() if p.requires_grad and p.grad is not None]
        limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit) if params else torch.tensor(0.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_state(self, directory: Path, rank: int) -> None:
        """Rank 0 writes the trained tensors (the frozen base is reloaded from the model
        directory) and the optimizer and scheduler state."""
        if rank != 0:
            return
        names = {n for n, p in self.module.named_parameters() if p.requires_grad}
        state = {n: t.detach().cpu().contiguous() for n, t in self.module.state_dict().items() if n in names}
        save_file(state, str(directory / "trainable.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   directory / "optimizer.pt")

    def load_state(self, directory: Path, rank: int) -> None:
        state = load_file(str(directory / "trainable.safetensors"))
        # Blocks that gradual unfreezing has not reached yet were rightly not saved.
        missing = [n for n, p in self.module.named_parameters()
                   if p.requires_grad and n not in state and not getattr(p, "unfreeze_step", 0)]
        if missing:
            raise RuntimeError(f"{directory}: checkpoint lacks trained tensors, e.g. {missing[:3]}")
        self.module.load_state_dict(state, strict=False)
        opt = torch.load(directory / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])

    def full_state_dict(self) -> dict | None:
        """The whole model's weights for final/ (a collective for sharded strategies)."""
        return None  # the module itself holds them


def unwrap(model) -> torch.nn.Module:
    """The module under a DDP or DeepSpeed wrapper."""
    return getattr(model, "module", model)


def all_gather_float(value: float, device) -> list[float]:
    """Every worker's `value`, in rank order ([value] on one worker)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    gathered = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.tensor([value], dtype=torch.float64, device=device))
    return [float(t) for t in gathered]


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum numbers across workers (identity on one worker)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], device) -> list[float]:
    """The largest of each number across workers (identity on one worker)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
