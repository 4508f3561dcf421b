"""The transformers names rayft uses beyond its documented API, in one place, for the
versions in `rollout.stack.SUPPORTED["transformers"]` (checked when this module is imported):

- `core_model_loading.revert_weight_conversion`: a model's tensors in memory -> the layout
  `save_pretrained` writes. Since transformers 5 some families hold weights differently in
  memory than on disk (an MoE layer's experts as one fused 3D tensor per projection, split
  per expert in the checkpoint); vLLM loads the checkpoint layout;
- `PreTrainedModel.all_tied_weights_keys`: `{tied name: the name it shares storage with}`.
"""

from __future__ import annotations

from rollout.stack import require

require("transformers")


def checkpoint_state(model, state: dict) -> dict:
    """`state` (tensors named as `model` holds them) as `save_pretrained` would write it:
    tied copies dropped (an engine ties them itself; some refuse the copy), and weight
    conversions reverted. `model` is the plain transformers model (not a peft wrapper)."""
    from transformers.core_model_loading import revert_weight_conversion

    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return revert_weight_conversion(model, {name: t for name, t in state.items() if name not in tied})

