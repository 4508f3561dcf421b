"""The private DeepSpeed names rayft uses, in one place, for the DeepSpeed versions in
`rollout.stack.SUPPORTED["deepspeed"]` (checked when this module is imported).
Importing it does not import DeepSpeed."""

from __future__ import annotations

from rollout.stack import require

require("deepspeed")


def zero3_consolidated_state_dict(engine) -> dict | None:
    """A ZeRO-3 engine's whole 16-bit state dict on rank 0 (None elsewhere); every rank
    must call it (the shards are gathered layer by layer). What the engine's own
    `save_16bit_model` writes, kept in memory: DeepSpeed has no public call for that."""
    return engine._zero3_consolidated_16bit_state_dict()
