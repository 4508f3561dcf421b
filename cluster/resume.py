"""Whether `rayft train` may continue an existing run directory.

A run directory with a complete checkpoint is resumed (`train.resume=auto`) only with the
config it was started with, as far as what is learned goes: a resumed run that read other
data, trained another model or planned other steps would silently be a different run
stitched onto the first. The settings that only say where and how fast it runs, or what
is logged and kept, may change (`HARMLESS`); any other difference is refused with every
differing key named, unless `train.resume_changed=true` says the change is meant.
"""

from __future__ import annotations

from pathlib import Path

from trainers.checkpoint import checkpoint_complete
from trainers.errors import UserError

# Keys whose change cannot change the data, the model or the step plan.
HARMLESS = {
    "output_dir", "tune",
    "train.log_every", "train.eval_every", "train.save_every", "train.keep_checkpoints", "train.eval_batches",
    "train.resume", "train.resume_changed",
    "cluster.address", "cluster.max_failures", "cluster.cpus_per_worker", "cluster.placement", "cluster.device",
    "cluster.offload_optimizer", "cluster.offload_params",
    "algo.eval_prompts",
    "rollout.num_engines", "rollout.tensor_parallel_size", "rollout.cpus_per_engine", "rollout.placement",
    "rollout.kv_cache_gb", "rollout.gpu_memory_utilization", "rollout.max_retries", "rollout.sync_bucket_mb",
    "rollout.verify_sync", "rollout.lora_sync",
}


def latest_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint directory of the run that every rank finished writing."""
    found = [p for p in sorted((Path(run_dir) / "checkpoints").glob("step_*")) if p.is_dir()]
    return next((p for p in reversed(found) if checkpoint_complete(p) is None), None)


def check_resume(config, run_dir: Path, echo) -> None:
    """Refuse (UserError) to reuse `run_dir` when it must not be resumed with `config`;
    say which checkpoint the run resumes from when it may."""
    from cluster.config import read_config_file, to_dict

    checkpoint = latest_complete_checkpoint(run_dir)
    if checkpoint is None:
        return
    if config.train.resume == "never":
        raise UserError(f"{run_dir} already has checkpoints; choose another name, remove it, "
                        "or set train.resume=auto to continue it")
    saved = Path(run_dir) / "config.yaml"
    if saved.is_file():
        changed = changed_keys(with_current_defaults(read_config_file(saved)), to_dict(config))
        if changed and not config.train.resume_changed:
            listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed)
            raise UserError(f"{saved}: resuming {run_dir.name} with a changed config would continue another run "
                            f"({listed}); use the run's own settings, another name, or train.resume_changed=true "
                            "to resume anyway")
        if changed:
            echo(f"resuming with changed settings (train.resume_changed): {', '.join(k for k, _, _ in changed)}")
    echo(f"resuming from {checkpoint.name} in {run_dir}")


def with_current_defaults(saved: dict) -> dict:
    """A saved run config with the keys added since it was written at their defaults (a run
    made before a setting existed ran as its default says); as saved when it no longer
    parses (a key removed since), so every difference is still named."""
    from cluster.config import JobConfig, from_dict, to_dict

    try:
        return to_dict(from_dict(JobConfig, saved))
    except UserError:
        return saved


def changed_keys(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for each leaf key that differs, `HARMLESS` keys left out;
    a key one side lacks reads as None there."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    changed = []
    for key in sorted(flat_old.keys() | flat_new.keys()):
        if key in HARMLESS or key.split(".", 1)[0] in HARMLESS:
            continue
        before, after = flat_old.get(key), flat_new.get(key)
        if before != after:
            changed.append((key, before, after))
    return changed


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= _flatten(value, name + ".")
        else:
            flat[name] = value
    return flat
