"""What a serve config points at, resolved to directories the engine can load: a run
directory stands for its final/, a LoRA adapter brings its base model, and every
adapter served over one base must share it. Everything is checked here, before a
replica starts: a causal LM in safetensors, LoRA adapters (not DoRA or prompt
learning) trained on the served base, and a rank the engine accepts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rollout.engine import vllm_lora_rank
from rollout.inputs import check_safetensors
from services.config import ServeConfig, ServeConfigError



@dataclass
class ServedModel:
    model_id: str                                  # what clients pass as `model` for the base
    base_dir: str                                  # the full model the engine loads
    adapters: dict[str, str] = field(default_factory=dict)   # name -> adapter directory
    max_lora_rank: int = 0

    def model_ids(self) -> list[str]:
        return [self.model_id] + [f"{self.model_id}:{name}" for name in self.adapters]


def resolve_served(cfg: ServeConfig) -> ServedModel:
    """Check the config's model and adapters and lay them out as base + adapters."""
    model_dir = _model_dir(cfg.model, "model")
    adapters = {name: _model_dir(path, f"adapters.{name}") for name, path in cfg.adapters.items()}
    if (model_dir / "adapter_config.json").is_file():
        # A LoRA run: its base is what the engine loads; the run's adapter is served by its name.
        name = _run_name(Path(cfg.model))
        if name in adapters:
            raise ServeConfigError(f"adapters.{name}", f"clashes with the served adapter's own name '{name}'")
        adapters = {name: model_dir, **adapters}
        base_dir = _adapter_base(model_dir, "model")
    else:
        base_dir = model_dir
        _check_causal_lm(base_dir, "model")
    ranks = [_check_adapter(path, base_dir, f"adapters.{name}") for name, path in adapters.items()]
    rank = cfg.max_lora_rank or max(ranks, default=0)
    if ranks and rank < max(ranks):
        raise ServeConfigError("max_lora_rank", f"{rank} is below the largest adapter rank {max(ranks)}")
    return ServedModel(model_id=cfg.model_id or _run_name(base_dir), base_dir=str(base_dir),
                       adapters={name: str(path) for name, path in adapters.items()},
                       max_lora_rank=vllm_lora_rank(rank) if ranks else 0)


def _model_dir(path: str, key: str) -> Path:
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise ServeConfigError(key, f"{path}: not found (give a run directory or a model directory)")
    if not _holds_model(p) and _holds_model(p / "final"):
        return p / "final"
    if not _holds_model(p):
        raise ServeConfigError(key, f"{path}: no config.json or adapter_config.json (and no final/ with one)")
    return p


def _holds_model(p: Path) -> bool:
    return (p / "config.json").is_file() or (p / "adapter_config.json").is_file()


def _run_name(model_dir: Path) -> str:
    """A run's name for its final/, else the directory's own name."""
    return model_dir.parent.name if model_dir.name == "final" else model_dir.name


def _check_causal_lm(model_dir: Path, key: str) -> None:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    archs = config.get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in archs):
        raise ServeConfigError(key, f"{model_dir}: a {archs[0] if archs else 'non-generative'} model; "
                                    "serving needs a causal LM (reward models and classifiers are scored with "
                                    "`rayft eval`)")
    try:
        check_safetensors(model_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise ServeConfigError(key, str(exc)) from None


def _adapter_base(adapter_dir: Path, key: str) -> Path:
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path") or ""
    base_dir = (adapter_dir / base).resolve() if base else None
    if base_dir is None or not base_dir.is_dir():
        raise ServeConfigError(key, f"{adapter_dir}: its base model '{base}' is not a local directory")
    _check_causal_lm(base_dir, key)
    return base_dir


def _check_adapter(adapter_dir: Path, base_dir: Path, key: str) -> int:
    """An adapter vLLM can apply over `base_dir`; returns its rank."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ServeConfigError(key, f"{adapter_dir}: not a LoRA adapter (no adapter_config.json)")
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    kind = "DoRA" if config.get("use_dora") else config.get("peft_type")
    task = config.get("task_type") or "CAUSAL_LM"
    if kind != "LORA" or task != "CAUSAL_LM":
        raise ServeConfigError(key, f"{adapter_dir}: a {kind} {task} adapter; the engine serves "
                                    "causal-LM LoRA adapters (merge others with `rayft export --merge-lora` "
                                    "and serve the merged model)")
    if _adapter_base(adapter_dir, key) != base_dir:
        raise ServeConfigError(key, f"{adapter_dir}: trained on {config.get('base_model_name_or_path')}, "
                                    f"not on the served base {base_dir}")
    if not any(adapter_dir.glob("*.safetensors")):
        raise ServeConfigError(key, f"{adapter_dir}: no *.safetensors weights (pickle checkpoints are not loaded)")
    return int(config.get("r") or 0)

