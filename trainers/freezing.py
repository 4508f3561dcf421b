"""Partial fine-tuning: which parameters train, from `FreezeConfig`, applied after PEFT setup.

Freezing only ever narrows what the PEFT setting trains (everything for `peft.method:
none`, the adapters otherwise): it never unfreezes a base weight under an adapter, whose
`final/` would not hold it (that is what `peft.modules_to_save` is for).

- last_layers: the top `layers` transformer blocks and the output side: every module
  registered after the block stack (the final norm, then the head: lm_head or score).
- first_layers: the bottom `layers` blocks only.
- modules: only parameters whose dotted name contains one of `modules` as whole components.
- gradual: last_layers at step 0, then the next block down every `unfreeze_every` steps.
`modules` adds to the blocks in every mode.

Which parameters train is a pure function of the step, so a resumed run trains exactly
what an uninterrupted one would. The optimizer is built once, from the parameters that
require grad, so `apply_freezing` leaves every parameter that will ever train requiring
grad and marks those that start later with `param.unfreeze_step`; the loop's first
`unfreeze_due` call freezes them until their step. A parameter whose grad stays None is
skipped by AdamW (no update, no weight decay), so it is untouched until then.
"""

from __future__ import annotations

import torch

from trainers.errors import ConfigError

NEVER = None  # start step of a parameter that never trains


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The transformer block stack (e.g. `model.layers` of Llama, also under a peft wrapper):
    the ModuleList of same-class modules that holds the most parameters."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise ConfigError("freeze.mode", f"found no stack of transformer blocks in {type(model).__name__}")
    return best


def name_matches(param_name: str, module_name: str) -> bool:
    """`module_name` appears in `param_name` as whole dotted components: `lm_head`,
    `model.norm` and `self_attn.q_proj` match, `norm` does not match `input_layernorm`."""
    return f".{module_name.strip('.')}." in f".{param_name}."


def unfreeze_due(step: int, model: torch.nn.Module) -> bool:
    """`trainers.loop.Hooks.before_step` callback for gradual unfreezing: a parameter marked
    `unfreeze_step` trains from that step on. True when this changed anything."""
    changed = False
    for param in model.parameters():
        start = getattr(param, "unfreeze_step", NEVER)
        if start is not NEVER and param.requires_grad != (step >= start):
            param.requires_grad_(step >= start)
            param.grad = None
            changed = True
    return changed


def apply_freezing(model: torch.nn.Module, cfg, peft_method: str = "none") -> "FreezePlan | None":
    """Freeze `model` (already PEFT-wrapped) as `cfg` says; None when freezing is off."""
    if cfg.mode == "none":
        return None
    plan = FreezePlan(model, cfg, peft_method)
    for param, start in plan.start.items():
        param.requires_grad_(start is not NEVER)
        if start:
            param.unfreeze_step = start
    return plan


class FreezePlan:
    """For every parameter, the step from which it trains (`start[param]`, or NEVER)."""

    def __init__(self, model: torch.nn.Module, cfg, peft_method: str = "none"):
        self.cfg, self.peft_method = cfg, peft_method
        # Tied weights (lm_head = embed_tokens) are one parameter under several names.
        self.names: dict[torch.nn.Parameter, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(param, []).append(name)
        allowed = {p for p in self.names if p.requires_grad}  # what the PEFT setting trains
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.num_blocks, block_of, output_side = self._structure(base)
        if cfg.mode in ("last_layers", "first_layers", "gradual") and cfg.layers > self.num_blocks:
            raise ConfigError("freeze.layers", f"is {cfg.layers} but the model has {self.num_blocks} blocks")
        extra = self._named(allowed)
        self.start = {}
        for p in self.names:
            if p not in allowed:
                self.start[p] = NEVER
            else:
                self.start[p] = 0 if p in extra else self._block_start(block_of.get(p), p in output_side)
        if all(s is NEVER for s in self.start.values()):
            raise ConfigError("freeze.mode", f"{cfg.mode} leaves nothing to train with peft.method "
                                             f"{peft_method}; add the trained modules to freeze.modules")

    @staticmethod
    def _structure(base) -> tuple[int, dict, set]:
        """Block count, each block parameter's block index, and the output side: the
        modules registered after the block stack, and after each of its ancestors, in the
        transformers model (Llama: model.norm, lm_head; a classifier: model.norm, score)."""
        prefix, blocks = find_blocks(base)
        block_of = {p: i for i, block in enumerate(blocks) for p in block.parameters()}
        output_side, node = set(), base
        for part in prefix.split("."):
            children = list(node.named_children())
            at = [name for name, _ in children].index(part)
            output_side.update(p for _, m in children[at + 1:] for p in m.parameters())
            node = children[at][1]
        return len(blocks), block_of, output_side

    def _named(self, allowed: set) -> set:
        """Parameters matched by `cfg.modules`; a name that matches nothing is an error."""
        chosen = set()
        for module_name in self.cfg.modules:
            hits = {p for p, names in self.names.items() if any(name_matches(n, module_name) for n in names)}
            if not hits:
                leaves = sorted({n.split(".")[-2] for ns in self.names.values() for n in ns if "." in n})
                raise ConfigError("freeze.modules", f"'{module_name}' matches no parameter; module names "
                                                    f"in this model include {', '.join(leaves[:16])}")
            if not hits & allowed:
                raise ConfigError("freeze.modules", f"'{module_name}' names only weights that peft.method "
                                                    f"{self.peft_method} keeps frozen; to train them, list "
                                                    "it in peft.modules_to_save instead")
            chosen |= hits
        return chosen

    def _block_start(self, block: int | None, output_side: bool):
        mode, n, every = self.cfg.mode, self.cfg.layers, self.cfg.unfreeze_every
        if block is None:
            return 0 if output_side and mode in ("last_layers", "gradual") else NEVER
        from_top = self.num_blocks - 1 - block
        if mode == "last_layers":
            return 0 if from_top < n else NEVER
        if mode == "first_layers":
            return 0 if block < n else NEVER
        if mode == "gradual":
            return 0 if from_top < n else (from_top - n + 1) * every
        return NEVER  # mode modules: blocks only through `modules`
