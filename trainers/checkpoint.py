"""Resumable checkpoints and the final model directory.

A checkpoint holds the trained tensors (safetensors), optimizer and scheduler state, each
worker's RNG state and the step. Every rank writes its part into its own fresh local
directory and hands it to `ray.train.report`, which copies the ranks' directories into
one directory of the run's storage and registers it once every rank has reported. Each
rank writes, last, a marker `COMPLETE.rank<r>` listing its files and their sizes, and
rank 0 records the world size in the state file: `checkpoint_complete` trusts a checkpoint
directory only when every rank's marker is there and every file it lists has arrived
whole, whatever order the copy went in. Loading and the driver's resume check both ask it.

`final/` is swapped in by `trainers.kept_dir.replace_dir`, so a crash leaves the old
model or the new one, never neither.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from trainers.kept_dir import replace_dir

MARKER_PREFIX = "COMPLETE.rank"
STATE_FILE = "trainer_state.json"


def save_checkpoint(directory: Path, strategy, step: int, rank: int, extra: dict | None = None) -> None:
    """Every rank writes its RNG and its part of the strategy state; rank 0 also the step
    and the world size; each rank, last, its marker."""
    import torch.distributed as dist

    directory.mkdir(parents=True, exist_ok=True)
    strategy.save_state(directory, rank)
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    if rank == 0:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        (directory / STATE_FILE).write_text(json.dumps({"step": step, "world_size": world_size, **(extra or {})}))
    write_rank_marker(directory, rank)


def write_rank_marker(directory: Path, rank: int) -> None:
    """This rank's part is on disk: its marker lists every file in `directory` (only this
    rank's own, as each rank writes a separate directory) with its size."""
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
             if p.is_file() and not p.name.startswith(MARKER_PREFIX)}
    (directory / f"{MARKER_PREFIX}{rank}").write_text(json.dumps({"files": files}))


def checkpoint_complete(directory: Path) -> str | None:
    """None when every rank's part of the checkpoint in `directory` is there; otherwise
    what is missing (one phrase)."""
    directory = Path(directory)
    try:
        world_size = int(json.loads((directory / STATE_FILE).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {STATE_FILE} with the world size"
    listed: dict[str, tuple[int, set[int]]] = {}  # file -> (first rank listing it, the sizes listed)
    for rank in range(world_size):
        try:
            files = json.loads((directory / f"{MARKER_PREFIX}{rank}").read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"rank {rank} of {world_size} has not finished writing (no {MARKER_PREFIX}{rank})"
        for name, size in files.items():
            listed.setdefault(name, (rank, set()))[1].add(size)
    for name, (rank, sizes) in listed.items():
        # A file several ranks write (DeepSpeed's ZeRO-3 model states) is whichever copy came last.
        path = directory / name
        if not path.is_file() or path.stat().st_size not in sizes:
            return f"{name} of rank {rank} is missing or incomplete"
    return None


def load_checkpoint(directory: Path, strategy, rank: int) -> dict:
    """Restore the strategy state and this rank's RNG; returns the saved trainer state."""
    directory = Path(directory)
    missing = checkpoint_complete(directory)
    if missing:
        raise RuntimeError(f"{directory}: checkpoint is incomplete ({missing})")
    strategy.load_state(directory, rank)
    rng_file = directory / f"rng_rank{rank}.pt"
    if rng_file.exists():
        # python's random state is a tuple of ints and torch's a ByteTensor: plain data.
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((directory / STATE_FILE).read_text())


def save_final(run_dir: Path, model, tokenizer, state_dict: dict | None = None) -> Path:
    """Write the loadable model (full weights, or the peft adapter) to final/, swapped in
    whole. `state_dict` overrides the module's own tensors (consolidated ZeRO-3 shards)."""

    def write(directory: Path) -> None:
        model.save_pretrained(str(directory), safe_serialization=True, state_dict=state_dict)
        if getattr(getattr(model, "active_peft_config", None), "task_type", None) == "SEQ_CLS":
            # peft saves a classification adapter without the label names; keep them beside it.
            model.config.save_pretrained(str(directory))
        tokenizer.save_pretrained(str(directory))

    return replace_dir(run_dir / "final", write)


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
