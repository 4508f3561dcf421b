"""Distributed strategies: how a worker wraps its model, accumulates gradients, steps the
optimizer and exposes state for checkpoints. DDP (gloo on CPU, NCCL on GPU) lives here;
every method's loop talks to a strategy only through this interface."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


class DDPStrategy:
    """Plain data parallelism: a full replica per worker, gradients all-reduced."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, max_grad_norm: float):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.max_grad_norm = max_grad_norm
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        if self.world_size > 1:
            device_ids = [model.device.index] if model.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        else:
            self.model = model

    def accumulating(self, more_to_come: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if more_to_come and self.world_size > 1:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, step optimizer and schedule, clear grads; returns the pre-clip grad norm."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only the trained tensors: the frozen base is reloaded from the model directory."""
        names = {n for n, p in self.module.named_parameters() if p.requires_grad}
        return {n: t.detach().cpu().contiguous() for n, t in self.module.state_dict().items() if n in names}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n, p in self.module.named_parameters() if p.requires_grad and n not in state]
        if missing:
            raise RuntimeError(f"checkpoint lacks trained tensors, e.g. {missing[:3]}")
        self.module.load_state_dict(state, strict=False)

    def optimizer_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum numbers across workers (identity on one worker)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
