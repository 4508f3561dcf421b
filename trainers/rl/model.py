"""The trained model of an RL run and what surrounds it: `RLModel` (the policy, plus a
value head on its last hidden state for PPO's critic), `engine_weights`, the policy's
weights as the rollout engines load them (LoRA merged into the base), and
`engine_adapter`, a LoRA policy's adapter alone (`rollout.lora_sync: adapter`)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from trainers.transformers_compat import checkpoint_state


POLICY_PREFIX = "policy."


class RLModel(nn.Module):
    """The policy and, for PPO, a value head: one module, so one strategy (DDP or ZeRO)
    wraps, syncs and checkpoints both. forward -> (logits, values or None)."""

    def __init__(self, policy: nn.Module, with_value_head: bool):
        super().__init__()
        self.policy = policy
        self.value_head = None
        if with_value_head:
            hidden = policy.config.hidden_size
            dtype = next(policy.parameters()).dtype
            self.value_head = nn.Linear(hidden, 1, dtype=dtype)
            nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1) ** 0.5)
            nn.init.zeros_(self.value_head.bias)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids, attention_mask, position_ids):
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False, output_hidden_states=self.value_head is not None)
        values = None
        if self.value_head is not None:
            values = self.value_head(out.hidden_states[-1]).squeeze(-1).float()
        return out.logits, values


def build_rl_model(job, use_gpu: bool, with_value_head: bool) -> RLModel:
    """The start model with the PEFT method and freezing applied, wrapped as an RLModel."""
    from trainers.setup import apply_peft_and_freezing, load_base_model

    policy = apply_peft_and_freezing(load_base_model(job.model, job.peft, use_gpu), job)
    return RLModel(policy, with_value_head)


def policy_state(state: dict) -> dict:
    """The policy's tensors of an RLModel state dict, without the `policy.` prefix."""
    return {k[len(POLICY_PREFIX):]: v for k, v in state.items() if k.startswith(POLICY_PREFIX)}


def merge_lora(state: dict, scaling: float) -> dict:
    """A peft LoRA model's state dict -> the base model's, each adapted weight replaced by
    W + scaling * B @ A, names as in the base model (what the engines load)."""
    merged = {}
    for name, tensor in state.items():
        if ".lora_" in name:
            continue
        base_name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if ".base_layer." in name:
            stem = name[: name.index(".base_layer.")]
            a, b = state[f"{stem}.lora_A.default.weight"], state[f"{stem}.lora_B.default.weight"]
            tensor = tensor + scaling * (b.float() @ a.float()).to(tensor.dtype)
        merged[base_name] = tensor
    return merged


def lora_scaling(policy) -> float:
    cfg = policy.peft_config["default"]
    return cfg.lora_alpha / (cfg.r ** 0.5 if cfg.use_rslora else cfg.r)


def engine_weights(strategy, is_main: bool, peft_method: str) -> dict | None:
    """The policy's full weights as the engines load them (the checkpoint layout, see
    `trainers.transformers_compat`), on rank 0 (None elsewhere). A collective under
    ZeRO-3: every rank must call it."""
    full = strategy.full_state_dict()
    if not is_main:
        return None
    module = strategy.module
    state = policy_state(full if full is not None else module.state_dict())
    state = {k: v.detach().cpu() for k, v in state.items()}
    if peft_method == "lora":
        state = merge_lora(state, lora_scaling(module.policy))
    base = module.policy.get_base_model() if hasattr(module.policy, "get_base_model") else module.policy
    return checkpoint_state(base, state)


def engine_adapter(strategy, is_main: bool) -> tuple[dict, dict] | None:
    """A LoRA policy's adapter as peft saves it, on rank 0 (None elsewhere): its tensors
    named as in adapter_model.safetensors and its adapter_config.json. A collective under
    ZeRO-3: every rank must call it. Refused when anything else of the policy trains (the
    engines would never see it)."""
    from trainers.errors import ConfigError

    full = strategy.full_state_dict()
    if not is_main:
        return None
    module = strategy.module
    others = [n for n, p in module.policy.named_parameters() if p.requires_grad and ".lora_" not in n]
    if others:
        raise ConfigError("rollout.lora_sync", f"adapter sync sends only the LoRA tensors, but {others[0]} trains "
                                               "too; use rollout.lora_sync: merged")
    state = policy_state(full if full is not None else module.state_dict())
    tensors = {name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): t.detach().cpu()
               for name, t in state.items() if ".lora_" in name}
    with tempfile.TemporaryDirectory(prefix="rayft-adapter-config-") as tmp:
        module.policy.peft_config["default"].save_pretrained(tmp)  # adapter_config.json, as peft writes it
        config = json.loads((Path(tmp) / "adapter_config.json").read_text())
    return tensors, config
