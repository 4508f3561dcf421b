"""Typed config of the training side: model, data, PEFT and optimisation settings.

Each dataclass field carries its help text in `metadata["help"]`; `cluster.config`
turns YAML into these classes, checks types and calls `validate()`, which raises
`ConfigError` naming the offending key (relative to its section).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from rollout.config import opt  # rollout is the lowest layer: the shared field helper lives there
from trainers.chat_templates import resolve as resolve_template
from trainers.errors import ConfigError


@dataclass
class ModelConfig:
    path: str = opt("", "A transformers model directory (safetensors, tokenizer), or a run directory (its final/).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Weights dtype while training: auto = bfloat16 on GPU, float32 on CPU.")
    trust_remote_code: bool = opt(False, "Allow the model directory's own Python code to run. Off unless you trust it.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = opt(
        "sdpa", "Attention kernel passed to transformers.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    reference: Literal["auto", "frozen_copy", "adapter_disabled"] = opt(
        "auto", "Reference model of DPO and of the RL methods' KL: frozen_copy = a frozen copy of the start "
                "model (sharded across the workers under cluster.strategy zero3); adapter_disabled = the "
                "trained model's base with the PEFT adapter switched off (no second copy; needs peft.method); "
                "auto = adapter_disabled with a PEFT method, else frozen_copy.")

    def validate(self, section: str) -> None:
        if not self.path:
            raise ConfigError(f"{section}.path", "is required (a local model directory)")


@dataclass
class DataSource:
    path: str = opt("", "A .jsonl/.json/.csv/.parquet file or a saved `datasets` directory.")
    format: str = opt("auto", "Row format (auto-detected by default); see `rayft data check --help`.")
    weight: float = opt(1.0, "Relative sampling weight when several sources are mixed.")
    domain: Optional[str] = opt(None, "Domain tag for these rows (overrides a `domain` field).")

    def validate(self, section: str) -> None:
        if not self.path:
            raise ConfigError(f"{section}.path", "is required")
        if self.weight <= 0:
            raise ConfigError(f"{section}.weight", f"must be > 0, got {self.weight}")


@dataclass
class DataConfig:
    train: list[DataSource] = opt([], "Training sources: a list of {path, format, weight, domain} (a bare path is allowed).")
    eval: list[DataSource] = opt([], "Explicit eval sources; when empty, `eval_fraction` of train is held out.")
    replay: list[DataSource] = opt([], "Earlier-task data replayed during training (continual learning).")
    replay_ratio: float = opt(0.0, "Share of each training epoch drawn from `replay` sources (0 <= r < 1).")
    eval_fraction: float = opt(0.1, "Share of training rows held out for eval when `eval` is empty.")
    max_length: int = opt(512, "Maximum tokens per sample (or per packed sequence).")
    truncation_side: Literal["right", "left"] = opt("right", "Which end of an over-long sample is cut.")
    packing: bool = opt(False, "Pack several samples into each sequence without cross-sample attention.")
    chat_template: Optional[str] = opt(None, "Chat template overriding the tokenizer's own: a name (chatml, qwen, "
                                             "llama3, gemma, mistral, phi3) or the Jinja text.")
    skip_bad_rows: bool = opt(False, "Skip malformed rows (their count is reported) instead of stopping.")
    seed: int = opt(0, "Seed of the train/eval split and of mixing.")
    streaming: bool = opt(False, "Read, validate and tokenise with Ray Data across the cluster into memory-mapped "
                                 "files under the run directory (data larger than memory; sft, cpt, offline distill).")
    dataset_info: Optional[str] = opt(None, "A LLaMA-Factory dataset_info.json: sources may then name its datasets "
                                            "(their file, alpaca/sharegpt formatting, columns and tags are used).")

    def validate(self, section: str) -> None:
        if not self.train:
            raise ConfigError(f"{section}.train", "needs at least one source")
        resolve_template(self.chat_template, key=f"{section}.chat_template")
        for name in ("train", "eval"):
            for i, src in enumerate(getattr(self, name)):
                src.validate(f"{section}.{name}[{i}]")
        for i, src in enumerate(self.replay):
            src.validate(f"{section}.replay[{i}]")
        if self.dataset_info:
            self._check_dataset_names(section)
        if not 0.0 <= self.replay_ratio < 1.0:
            raise ConfigError(f"{section}.replay_ratio", f"must be in [0, 1), got {self.replay_ratio}")
        if bool(self.replay) != (self.replay_ratio > 0):
            raise ConfigError(f"{section}.replay_ratio", "set both `replay` sources and a ratio > 0, or neither")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"{section}.eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        if self.max_length < 8:
            raise ConfigError(f"{section}.max_length", f"must be >= 8, got {self.max_length}")


    def _check_dataset_names(self, section: str) -> None:
        """Every source is a file or a dataset of `dataset_info` (read here, so a bad entry
        fails at load time naming it)."""
        from pathlib import Path

        from trainers.data.dataset_info import read_dataset_info

        datasets = read_dataset_info(self.dataset_info, key=f"{section}.dataset_info")
        for name in ("train", "eval", "replay"):
            for i, src in enumerate(getattr(self, name)):
                if src.path in datasets:
                    if src.format != "auto":
                        raise ConfigError(f"{section}.{name}[{i}].format", "a dataset_info dataset has its own "
                                                                           "formatting; leave format out")
                elif not Path(src.path).exists():
                    raise ConfigError(f"{section}.{name}[{i}].path", f"'{src.path}' is neither a file nor a "
                                      f"dataset of {self.dataset_info} (it has: {', '.join(datasets)})")


LORA_METHODS = ("lora", "dora", "qlora")
PROMPT_METHODS = ("prefix", "prompt")


@dataclass
class PeftConfig:
    method: Literal["none", "lora", "dora", "qlora", "prefix", "prompt", "ia3"] = opt(
        "none", "Parameter-efficient method. none = full fine-tuning (see `freeze` for partial); lora; "
                "dora = weight-decomposed LoRA; qlora = LoRA on a 4-bit NF4 base (CUDA + bitsandbytes); "
                "prefix = trained key/value prefixes in every layer; prompt = trained virtual input "
                "tokens; ia3 = learned scaling vectors.")
    r: int = opt(8, "LoRA / DoRA / QLoRA rank.")
    alpha: float = opt(16.0, "LoRA scaling numerator (scale = alpha / r).")
    dropout: float = opt(0.0, "Dropout on the LoRA input.")
    target_modules: list[str] = opt(
        ["all-linear"], "Module names to adapt, or ['all-linear'] (every linear layer but the output "
                        "head). For ia3, ['all-linear'] means peft's per-architecture IA3 defaults "
                        "(Llama: k_proj, v_proj, down_proj). Unused by prefix and prompt.")
    feedforward_modules: list[str] = opt(
        [], "ia3 only: which of target_modules are feed-forward layers (scaled on their input, not "
            "output). Needs explicit target_modules; empty with ['all-linear'] = peft's defaults.")
    num_virtual_tokens: int = opt(16, "prefix / prompt: number of virtual tokens trained.")
    modules_to_save: list[str] = opt(
        [], "Extra modules trained in full and saved with the adapter, e.g. [lm_head] or [embed_tokens].")

    def validate(self, section: str) -> None:
        if self.method in LORA_METHODS and self.r < 1:
            raise ConfigError(f"{section}.r", f"must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{section}.dropout", f"must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError(f"{section}.target_modules", "must name at least one module or 'all-linear'")
        if self.method in PROMPT_METHODS and self.num_virtual_tokens < 1:
            raise ConfigError(f"{section}.num_virtual_tokens", f"must be >= 1, got {self.num_virtual_tokens}")
        if self.feedforward_modules:
            if self.method != "ia3":
                raise ConfigError(f"{section}.feedforward_modules", "applies to method ia3 only")
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ConfigError(f"{section}.feedforward_modules",
                                  f"{extra} must also be listed in target_modules (explicit names, not all-linear)")
        if self.method == "qlora":
            _require_qlora_runtime(f"{section}.method")

    @property
    def prompt_learning(self) -> bool:
        """Methods that add virtual tokens: no packing, no position ids from the batch."""
        return self.method in PROMPT_METHODS


def _require_qlora_runtime(key: str) -> None:
    """Refuse qlora at config load where it cannot run, rather than deep inside a worker."""
    import importlib.util

    import torch

    lacking = [what for what, ok in (("a CUDA GPU", torch.cuda.is_available()),
                                     ("bitsandbytes", importlib.util.find_spec("bitsandbytes") is not None)) if not ok]
    if lacking:
        raise ConfigError(key, f"qlora needs a CUDA GPU and bitsandbytes (pip install bitsandbytes); "
                               f"this machine lacks {' and '.join(lacking)}. Use lora or dora instead")


@dataclass
class FreezeConfig:
    mode: Literal["none", "last_layers", "first_layers", "modules", "gradual"] = opt(
        "none", "Partial fine-tuning, among the parameters the peft setting trains: none = all of them; "
                "last_layers = the top `layers` transformer blocks plus the final norm and output head; "
                "first_layers = the bottom `layers` blocks only; modules = only `modules`; gradual = "
                "start as last_layers, unfreeze the next block down every `unfreeze_every` steps.")
    layers: int = opt(1, "N transformer blocks for last_layers, first_layers and the start of gradual.")
    modules: list[str] = opt([], "Module names matched as whole dotted components of parameter names "
                                 "(lm_head, model.norm, self_attn.q_proj, embed_tokens) that train: for "
                                 "mode modules the only ones, otherwise in addition to the blocks.")
    unfreeze_every: int = opt(0, "Gradual unfreezing: steps between unfreezing the next block down.")

    def validate(self, section: str) -> None:
        if self.mode in ("last_layers", "first_layers", "gradual") and self.layers < 0:
            raise ConfigError(f"{section}.layers", f"must be >= 0, got {self.layers}")
        if self.mode == "modules" and not self.modules:
            raise ConfigError(f"{section}.modules", "must name at least one module for mode modules")
        if any(not name.strip(". ") for name in self.modules):
            raise ConfigError(f"{section}.modules", "has an empty name")
        if self.modules and self.mode == "none":
            raise ConfigError(f"{section}.modules", "needs a freeze.mode; with none everything trains already")
        if self.mode == "gradual" and self.unfreeze_every < 1:
            raise ConfigError(f"{section}.unfreeze_every", "must be >= 1 for mode gradual")


@dataclass
class TrainConfig:
    epochs: float = opt(1.0, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = opt(0, "Optimizer steps to run; 0 = derive from epochs.")
    batch_size: int = opt(8, "Micro-batch size per worker.")
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.")
    group_by_length: bool = opt(
        True, "Within each optimizer step, put samples of similar length in the same micro-batch (less "
              "padding). The step's samples, and so its update, stay the same.")
    optimizer: Literal["adamw", "sgd"] = opt("adamw", "adamw, or plain sgd (no momentum; mostly for checks).")
    lr: float = opt(2e-4, "Peak learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    betas: list[float] = opt([0.9, 0.999], "AdamW betas.")
    scheduler: Literal["cosine", "linear", "constant"] = opt("cosine", "Learning-rate schedule after warmup.")
    warmup_ratio: float = opt(0.03, "Share of steps spent warming the lr up linearly from 0.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this; 0 disables clipping.")
    seed: int = opt(0, "Seed for model init of new heads, dropout and data order.")
    log_every: int = opt(1, "Log metrics every N optimizer steps.")
    eval_every: int = opt(0, "Evaluate every N steps; 0 = only at the end.")
    save_every: int = opt(0, "Checkpoint every N steps; 0 = only at the end.")
    keep_checkpoints: int = opt(2, "Resumable checkpoints to keep (the newest).")
    eval_batches: int = opt(0, "Cap on eval micro-batches per evaluation; 0 = the whole eval split.")
    early_stopping_patience: int = opt(
        0, "Stop after this many evaluations without improvement of the method's eval metric "
           "(eval_loss; eval_accuracy for classification); final/ is then the best model. 0 = off.")
    resume: Literal["auto", "never"] = opt(
        "auto", "auto: re-running on an existing run directory resumes from its last complete "
                "checkpoint; never: refuse to reuse a run directory that has checkpoints.")
    resume_changed: bool = opt(
        False, "Resume even though the config differs from the run's config.yaml in a key that changes the "
               "data, the model or the step plan (resuming refuses that otherwise, naming the keys).")

    def validate(self, section: str) -> None:
        for key in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{section}.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError(f"{section}.epochs", "must be > 0 when max_steps is 0")
        if self.lr <= 0:
            raise ConfigError(f"{section}.lr", f"must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ConfigError(f"{section}.betas", "must be two numbers")
        if self.early_stopping_patience and not self.eval_every:
            raise ConfigError(f"{section}.eval_every", "must be > 0 when early_stopping_patience is set")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"{section}.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class RewardConfig:
    objective: Literal["pairwise", "regression"] = opt(
        "pairwise", "pairwise: preference rows, loss -log sigmoid(r_chosen - r_rejected - margin); "
                    "regression: scored rows (reward_score), mean squared error.")
    use_margin: bool = opt(True, "Subtract the row's `margin` (when the data has one) inside the pairwise loss.")
    center_coef: float = opt(0.0, "Weight of (r_chosen + r_rejected)^2, keeping rewards centred on 0 (e.g. 0.01).")

    def validate(self, section: str) -> None:
        if self.center_coef < 0:
            raise ConfigError(f"{section}.center_coef", f"must be >= 0, got {self.center_coef}")


@dataclass
class DPOConfig:
    loss: Literal["sigmoid", "ipo", "hinge"] = opt(
        "sigmoid", "sigmoid: DPO (with label_smoothing > 0: conservative DPO); ipo: IPO on "
                   "length-normalised log-probs; hinge: SLiC-style hinge.")
    beta: float = opt(0.1, "Strength of the pull towards the reference: higher keeps the policy closer.")
    label_smoothing: float = opt(0.0, "sigmoid only: assumed probability that a preference label is flipped.")
    precompute_ref: bool = opt(True, "Compute each pair's reference log-probs once and reuse them every epoch.")

    def validate(self, section: str) -> None:
        if self.beta <= 0:
            raise ConfigError(f"{section}.beta", f"must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{section}.label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(f"{section}.label_smoothing", "applies to loss sigmoid only")

