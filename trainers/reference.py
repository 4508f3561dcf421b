"""The reference model of DPO and of the RL methods' KL (`model.reference`): the start
model's logits, from a frozen copy of it, or (with a PEFT method) from the trained
model's own base with the adapter switched off, which needs no second copy in memory.
Under `cluster.strategy: zero3` the frozen copy is sharded across the workers like the
policy (`trainers.zero.zero3_inference`), so no worker holds it whole; its forward pass
is then a collective that every worker runs the same number of times."""

from __future__ import annotations

import torch


def adapter_reference(job) -> bool:
    """Whether the reference is the policy with its adapter disabled (else a frozen copy)."""
    choice = job.model.reference
    return choice == "adapter_disabled" or (choice == "auto" and job.peft.method != "none")


class Reference:
    def __init__(self, job, use_gpu: bool, device: torch.device | None = None):
        self.copy = None
        self.sharded = False  # forward is a collective (ZeRO-3)
        if adapter_reference(job):
            return
        from trainers.setup import load_base_model

        copy = load_base_model(job.model, job.peft, use_gpu).requires_grad_(False).eval()
        if job.cluster.strategy == "zero3":
            from trainers.zero import zero3_inference

            self.copy, self.sharded = zero3_inference(copy, job.cluster.offload_params), True
        else:
            self.copy = copy.to(device) if device is not None else copy

    @torch.no_grad()
    def logits(self, policy: torch.nn.Module, **inputs) -> torch.Tensor:
        """The reference's logits for `inputs`; `policy` is the trained (unwrapped) peft
        model, used only when the reference is its base with the adapter disabled."""
        inputs["use_cache"] = False
        if self.copy is not None:
            if not self.sharded:
                self.copy.to(inputs["input_ids"].device)  # a no-op once it is there
            return self.copy(**inputs).logits
        was_training = policy.training
        policy.eval()  # the reference sees no dropout, like the frozen copy
        with policy.disable_adapter():
            logits = policy(**inputs).logits
        policy.train(was_training)
        return logits
