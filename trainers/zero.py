"""DeepSpeed ZeRO stages 1-3 (optionally offloading optimizer state or parameters to CPU)
behind the strategy interface of `trainers.strategy`. On CPU DeepSpeed runs with
DS_ACCELERATOR=cpu over the gloo process group that Ray Train set up."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

TAG = "zero"


def zero_config(train_cfg, world_size: int, stage: int, offload_optimizer: bool, offload_params: bool,
                bf16: bool) -> dict:
    zero = {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": train_cfg.batch_size,
        "gradient_accumulation_steps": train_cfg.grad_accum,
        "train_batch_size": train_cfg.batch_size * train_cfg.grad_accum * world_size,
        "gradient_clipping": train_cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # Our AdamW (torch's) is the optimizer on every stage, offloaded or not.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class ZeroStrategy:
    def __init__(self, model, optimizer, scheduler, train_cfg, world_size: int, stage: int,
                 offload_optimizer: bool, offload_params: bool):
        import deepspeed

        self.stage = stage
        bf16 = next(model.parameters()).dtype == torch.bfloat16
        config = zero_config(train_cfg, world_size, stage, offload_optimizer, offload_params, bf16)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False)
        self.model, self.module = self.engine, self.engine.module

    def refresh_trainable(self) -> None:
        raise RuntimeError("changing trainable parameters mid-run needs cluster.strategy ddp")

    def accumulating(self, more_to_come: bool):
        return contextlib.nullcontext()  # the engine reduces gradients at its own boundary

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already normalised the loss over the whole step; DeepSpeed must not
        # divide by the accumulation steps again. engine.step() after every micro-batch
        # is DeepSpeed's contract: it only updates at the accumulation boundary.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_state(self, directory: Path, rank: int) -> None:
        """Every rank writes its own shard files; Ray merges the ranks' directories."""
        self.engine.save_checkpoint(str(directory), tag=TAG)

    def load_state(self, directory: Path, rank: int) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"{directory}: no DeepSpeed checkpoint '{TAG}' found")

    def full_state_dict(self) -> dict | None:
        """Consolidated weights on rank 0 (ZeRO-3 gathers the shards; call on every rank)."""
        if self.stage == 3:
            from trainers.deepspeed_compat import zero3_consolidated_state_dict

            return zero3_consolidated_state_dict(self.engine)
        return None


def zero3_inference(model: torch.nn.Module, offload_params: bool) -> torch.nn.Module:
    """`model` (frozen, forward only) partitioned across the workers like a ZeRO-3 policy:
    each worker keeps only its shard of every parameter and a forward pass gathers each
    layer's weights as it runs, so every worker must call it the same number of times.
    A DeepSpeed engine with no optimizer, as TRL's `prepare_deepspeed` and OpenRLHF's eval
    config build their reference models. Returns the engine (call it like the model)."""
    import deepspeed

    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    zero: dict = {"stage": 3}
    if hidden:
        # TRL's sizes: parameters below 10 x hidden (norms, biases) stay whole on every
        # worker; everything larger is sharded.
        zero |= {"stage3_param_persistence_threshold": 10 * hidden,
                 "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden)}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
              "bf16": {"enabled": next(model.parameters()).dtype == torch.bfloat16},
              "steps_per_print": 10**9, "wall_clock_breakdown": False}
    engine, *_ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
    engine.eval()
    return engine
