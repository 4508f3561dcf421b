"""Resumable checkpoints and the final model directory.

A checkpoint holds the trained tensors (safetensors), optimizer and scheduler state, each
worker's RNG state and the step. It is written into a fresh local directory and handed to
`ray.train.report`, which copies it to the run's storage and registers it only once the
copy is complete; a `COMPLETE` marker, written last, is checked again on load. `final/` is
written beside as `final.tmp` and renamed into place, so it is never seen half-written.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"


def save_checkpoint(directory: Path, strategy, step: int, rank: int, extra: dict | None = None) -> None:
    """Every rank writes its RNG and its part of the strategy state; rank 0 writes the
    step and, last, the COMPLETE marker."""
    directory.mkdir(parents=True, exist_ok=True)
    strategy.save_state(directory, rank)
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps({"step": step, **(extra or {})}))
        (directory / MARKER).write_text("ok")


def load_checkpoint(directory: Path, strategy, rank: int) -> dict:
    """Restore the strategy state and this rank's RNG; returns the saved trainer state."""
    directory = Path(directory)
    if not (directory / MARKER).exists():
        raise RuntimeError(f"{directory}: checkpoint is incomplete (no {MARKER} marker)")
    strategy.load_state(directory, rank)
    rng_file = directory / f"rng_rank{rank}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((directory / STATE_FILE).read_text())


def save_final(run_dir: Path, model, tokenizer, state_dict: dict | None = None) -> Path:
    """Write the loadable model (full weights, or the peft adapter) atomically to final/.
    `state_dict` overrides the module's own tensors (consolidated ZeRO-3 shards)."""
    final, tmp = run_dir / "final", run_dir / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
    if getattr(getattr(model, "active_peft_config", None), "task_type", None) == "SEQ_CLS":
        # peft saves a classification adapter without the label names; keep them beside it.
        model.config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
