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
from safetensors.torch import load_file, save_file

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"


def save_checkpoint(directory: Path, strategy, step: int, rank: int, extra: dict | None = None) -> None:
    """Each rank writes its RNG; rank 0 also writes weights, optimizer and step."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    if rank != 0:
        return
    save_file(strategy.trainable_state(), str(directory / "trainable.safetensors"))
    torch.save(strategy.optimizer_state(), directory / "optimizer.pt")
    (directory / STATE_FILE).write_text(json.dumps({"step": step, **(extra or {})}))
    (directory / MARKER).write_text("ok")


def load_checkpoint(directory: Path, strategy, rank: int) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns the saved state."""
    directory = Path(directory)
    if not (directory / MARKER).exists():
        raise RuntimeError(f"{directory}: checkpoint is incomplete (no {MARKER} marker)")
    strategy.load_trainable_state(load_file(str(directory / "trainable.safetensors")))
    strategy.load_optimizer_state(torch.load(directory / "optimizer.pt", weights_only=True))
    rng_file = directory / f"rng_rank{rank}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((directory / STATE_FILE).read_text())


def save_final(run_dir: Path, model, tokenizer) -> Path:
    """Write the loadable model (full weights, or the peft adapter) atomically to final/."""
    final, tmp = run_dir / "final", run_dir / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
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
