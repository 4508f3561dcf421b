"""What a RUN_OR_CHECKPOINT path holds, and loading it; shared by `rayft eval` and
`rayft export`.

`inspect_model(path)` resolves a run directory to its `final/` and tells a full model
from a peft adapter, and a causal LM from a sequence classifier from a reward model (a
sequence classifier with one output), from the JSON configs and the safetensors header
alone, so a wrong path fails in one line before any weights (or torch) are loaded.
`load_model` then loads it: weights from safetensors only, never the model's own code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from trainers.errors import UserError
from trainers.kept_dir import recover_dir

CAUSAL_LM, CLASSIFIER, REWARD_MODEL = "causal_lm", "classifier", "reward_model"
# peft methods that add virtual tokens instead of changing weights: nothing to merge.
PROMPT_LEARNING = {"PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT"}
PEFT_TASKS = {None: CAUSAL_LM, "CAUSAL_LM": CAUSAL_LM, "SEQ_CLS": CLASSIFIER}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelDir:
    path: Path                     # the directory holding the weights (a run's final/)
    task: str                      # CAUSAL_LM, CLASSIFIER or REWARD_MODEL (one label: the reward)
    peft_type: Optional[str]       # "LORA", "DORA", "IA3", ... for an adapter; None for a full model
    base: Optional[Path] = None    # an adapter's base model directory

    @property
    def tokenizer_dir(self) -> Path:
        """The adapter's own tokenizer when saved with it (training does), else the base's."""
        if self.base is None or any((self.path / name).is_file() for name in TOKENIZER_FILES):
            return self.path
        return self.base

    @property
    def mergeable(self) -> bool:
        return self.peft_type is not None and self.peft_type not in PROMPT_LEARNING


def inspect_model(path: str | Path) -> ModelDir:
    """What `path` holds (a run directory stands for its final/), from its JSON configs."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: not found (give a run directory or a model directory)")
    if not p.is_dir():
        raise UserError(f"{p}: not a directory (give a run directory or a model directory)")
    if not _is_model_dir(p):
        recover_dir(p / "final")  # a save cut short between its renames: the old final/ goes back
    if not _is_model_dir(p) and (p / "final").is_dir():
        p = p / "final"
    if (p / "adapter_config.json").is_file():
        return _reward_or_classifier(_adapter_dir(p))
    if (p / "config.json").is_file():
        config = read_json(p / "config.json")
        archs = config.get("architectures") or []
        task = CLASSIFIER if archs and archs[-1].endswith("ForSequenceClassification") else CAUSAL_LM
        return _reward_or_classifier(ModelDir(p, task, None))
    if (p / "trainable.safetensors").is_file():
        raise UserError(f"{p}: a resumable training checkpoint (trained tensors and optimizer state), "
                        "not a model directory; give the run directory or its final/")
    if (p / "config.yaml").is_file():
        raise UserError(f"{p}: a run directory without final/ (the run has not finished)")
    raise UserError(f"{p}: not a model directory (no config.json or adapter_config.json, and no final/)")


def _reward_or_classifier(md: ModelDir) -> ModelDir:
    """A sequence classifier with exactly one output is a reward model (the reward trainer
    saves its head as id2label {0: "reward"}; any single label counts)."""
    if md.task == CLASSIFIER and len(class_labels(md)) == 1:
        md.task = REWARD_MODEL
    return md


def _is_model_dir(p: Path) -> bool:
    return (p / "config.json").is_file() or (p / "adapter_config.json").is_file()


def _adapter_dir(p: Path) -> ModelDir:
    config = read_json(p / "adapter_config.json")
    task_type = config.get("task_type")
    if task_type not in PEFT_TASKS:
        raise UserError(f"{p}: peft task_type {task_type} is not supported (CAUSAL_LM or SEQ_CLS)")
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{p}/adapter_config.json: no base_model_name_or_path")
    if not Path(base).is_dir():
        raise UserError(f"{p}: the adapter's base model {base} is not a directory "
                        "(base_model_name_or_path in adapter_config.json)")
    if not (p / "adapter_model.safetensors").is_file():
        raise UserError(f"{p}: no adapter_model.safetensors (pickle checkpoints are not loaded)")
    peft_type = str(config.get("peft_type", "UNKNOWN"))
    if peft_type == "LORA" and config.get("use_dora"):
        peft_type = "DORA"  # saved as LoRA with a flag; name it as the user chose it
    return ModelDir(p, PEFT_TASKS[task_type], peft_type, Path(base))


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def class_labels(md: ModelDir) -> dict[int, str]:
    """A classifier's (or reward model's) id -> label name. peft does not save the label
    names with a SEQ_CLS adapter, so they come from a config.json beside it (the trainer
    saves one) or, failing that, from the size of the saved head, as LABEL_0, LABEL_1, ...
    A full model's config.json leaves id2label out when it is transformers' default (two
    classes, LABEL_0 and LABEL_1)."""
    config_file = md.path / "config.json"
    config = read_json(config_file) if config_file.is_file() else {}
    if config.get("id2label"):
        return {int(k): str(v) for k, v in config["id2label"].items()}
    if md.peft_type is None and config_file.is_file():
        count = config.get("num_labels")
        return {i: f"LABEL_{i}" for i in range(count if isinstance(count, int) and count > 0 else 2)}
    if md.peft_type is not None:
        heads = [shape[0] for name, shape in safetensors_shapes(md.path / "adapter_model.safetensors").items()
                 if name.endswith(("score.weight", "classifier.weight"))]
        if heads:
            return {i: f"LABEL_{i}" for i in range(heads[0])}
    raise UserError(f"{md.path}: cannot tell the classifier's labels (no id2label in config.json, no saved head)")


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the file's JSON header (8-byte little-endian length, then
    JSON): no tensor is read and torch is not imported."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size < 100_000_000 else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a readable safetensors file")
    return {name: list(info["shape"]) for name, info in header.items()
            if isinstance(info, dict) and "shape" in info}


def saved_dtype(directory: Path) -> str:
    """The dtype the weights were saved in (float32 when the config does not say)."""
    config_file = directory / "config.json"
    config = read_json(config_file) if config_file.is_file() else {}
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in DTYPES else "float32"


def load_model(md: ModelDir, dtype: str, device: str = "cpu"):
    """(model, tokenizer) in eval mode on `device`: the full model, or base + adapter."""
    from trainers.models import load_tokenizer

    tokenizer = load_tokenizer(md.tokenizer_dir)
    labels = class_labels(md) if md.task != CAUSAL_LM else None
    model = _load_weights(md.base or md.path, md.task, dtype, labels, under_adapter=md.peft_type is not None)
    if md.peft_type is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(md.path))
    if md.task != CAUSAL_LM and model.config.pad_token_id is None:
        # The classifier pools the last non-pad token, so it must know the pad id to batch.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def _load_weights(path: Path, task: str, dtype: str, labels: Optional[dict[int, str]], under_adapter: bool):
    from trainers.models import load_causal_lm

    if task == CAUSAL_LM:
        return load_causal_lm(path, dtype)
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    if not any(path.glob("*.safetensors")):
        raise UserError(f"{path}: no *.safetensors weights (pickle checkpoints are not loaded)")
    # Under a SEQ_CLS adapter the base is a causal LM: its lm_head is unused and the adapter
    # brings the head, so transformers' missing/unexpected weights report is only noise.
    verbosity = logging.get_verbosity()
    if under_adapter:
        logging.set_verbosity_error()
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            str(path), dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=False,
            num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()})
    finally:
        logging.set_verbosity(verbosity)
