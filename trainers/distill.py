"""Knowledge distillation from a frozen teacher (`method: distill`). Offline mode is a
supervised method on SFT data: on the trained (assistant) tokens the student learns a mix
of the hard labels and the teacher's softened distribution,

    loss = ce_weight * CE + (1 - ce_weight) * T^2 * D(teacher_T, student_T)

summed over tokens, where D is `distill.loss` (forward KL, reverse KL or the generalised
JSD; `trainers.rl_losses.token_divergence`, which on-policy distillation uses too) and
x_T = softmax(logits / T). This module owns that method and the driver-side check of the
teacher directory (`check_teacher`), which reads configs only and loads no weights."""

from __future__ import annotations

from pathlib import Path

import torch

from trainers.data.records import IGNORE_INDEX
from trainers.errors import ConfigError
from trainers.losses import token_nll_sum
from trainers.method import Method
from trainers.rl_losses import token_divergence

class DistillMethod(Method):
    """Offline distillation on SFT batches; the teacher is a frozen, eval-mode causal LM."""

    name = "distill"
    metric, higher_is_better = "eval_divergence", False

    def __init__(self, job, tokenizer, use_gpu: bool):
        super().__init__(job, tokenizer, use_gpu)
        self.cfg = job.distill
        self.teacher = None

    def build_model(self) -> torch.nn.Module:
        from trainers.models import load_causal_lm, resolve_dtype

        student = super().build_model()
        self.teacher = load_causal_lm(self.cfg.teacher, resolve_dtype(self.cfg.teacher_dtype, self.use_gpu),
                                      self.cfg.teacher_trust_remote_code, self.job.model.attn_implementation)
        self.teacher.requires_grad_(False).eval()
        return student

    @torch.no_grad()
    def teacher_logits(self, batch: dict) -> torch.Tensor:
        """The teacher's logits on the batch's tokens, (B, T, V), as the student sees them."""
        device = batch["input_ids"].device
        self.teacher.to(device)  # the loop moves the student only; a no-op after the first call
        mask, dtype = batch["attention_mask"], self.teacher.dtype
        if mask.dim() == 4 and mask.dtype != dtype:
            # A packed batch's additive mask is in the student's dtype, which attention refuses
            # for a teacher of another precision (a float32 one under a bfloat16 student).
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(mask < 0, torch.finfo(dtype).min)
        return self.teacher(input_ids=batch["input_ids"], attention_mask=mask,
                            position_ids=batch["position_ids"], use_cache=False).logits

    def _student_logits(self, model, batch: dict) -> torch.Tensor:
        out = model(**self.model_inputs(batch), use_cache=False)
        return out.logits[:, -batch["labels"].shape[1]:]  # prompt tuning's virtual tokens come first

    def _divergence_sum(self, student_logits, teacher_logits, labels, temperature: float) -> torch.Tensor:
        """The divergence summed over the trained positions; only those are normalised over
        the vocabulary (a long prompt costs no softmax memory)."""
        trained = labels[:, 1:] != IGNORE_INDEX
        student, teacher = student_logits[:, :-1][trained], teacher_logits[:, :-1][trained]
        every = torch.ones(student.shape[:-1], device=student.device)
        return token_divergence(student, teacher, every, self.cfg.loss, self.cfg.beta, temperature).sum()

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._student_logits(model, batch)
        ce, count = token_nll_sum(logits, batch["labels"])
        weight = self.cfg.ce_weight
        if weight == 1.0:  # plain SFT: the teacher's forward pass would be wasted
            return ce, count
        t = self.cfg.temperature
        divergence = self._divergence_sum(logits, self.teacher_logits(batch), batch["labels"], t)
        return weight * ce + (1 - weight) * t * t * divergence, count

    @torch.no_grad()
    def eval_sums(self, model, batch: dict) -> dict[str, float]:
        """CE and the divergence at temperature 1, each summed over the trained tokens."""
        logits = self._student_logits(model, batch)
        ce, count = token_nll_sum(logits, batch["labels"])
        divergence = self._divergence_sum(logits, self.teacher_logits(batch), batch["labels"], 1.0)
        return {"loss": float(ce), "divergence": float(divergence), "items": float(count)}

    def finish_eval(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["items"], 1.0)
        return {"eval_loss": sums["loss"] / n, "eval_divergence": sums["divergence"] / n}


def check_teacher(job, tokenizer) -> None:
    """Fail on the driver, naming `distill.teacher`, unless the teacher directory holds a
    causal LM in safetensors with the student's vocabulary (and, when the directory has a
    tokenizer, the student's tokenizer: the divergence compares the two distributions
    token id by token id)."""
    from transformers import AutoConfig

    key, path = "distill.teacher", Path(job.distill.teacher)
    remote_code = job.distill.teacher_trust_remote_code
    if not path.is_dir():
        raise ConfigError(key, f"{path}: model directory not found")
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise ConfigError(key, f"{path} is a PEFT adapter, not a full model; merge it into its base first "
                               f"(rayft export {path} --out DIR --merge-lora) and point distill.teacher at DIR")
    if (path / "final").is_dir() and not (path / "config.json").is_file():
        raise ConfigError(key, f"{path} is a run directory; the trained model is {path / 'final'}")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(key, f"{path}: no *.safetensors weights (pickle checkpoints are not loaded)")
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(key, f"{path}: not a transformers model directory ({exc})") from None
    if not _is_causal_lm(config):
        raise ConfigError(key, f"{path} is not a causal LM (architectures: {config.architectures}); "
                               "the teacher must predict next tokens like the student")
    student = AutoConfig.from_pretrained(str(job.model.path), trust_remote_code=job.model.trust_remote_code)
    teacher_vocab, student_vocab = _vocab_size(config), _vocab_size(student)
    if teacher_vocab != student_vocab:
        raise ConfigError(key, f"{path} has a vocabulary of {teacher_vocab} tokens, the student "
                               f"({job.model.path}) {student_vocab}; teacher and student need the same tokenizer")
    if _has_tokenizer(path):
        from trainers.models import load_tokenizer

        if load_tokenizer(path, remote_code).get_vocab() != tokenizer.get_vocab():
            raise ConfigError(key, f"{path} has a different tokenizer from the student's ({job.model.path}): "
                                   "the same token ids must mean the same tokens")


def _is_causal_lm(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return True
    if config.architectures:  # a run directory of another head says so here, model_type alone does not
        causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        return any(a in causal or a.endswith("ForCausalLM") for a in config.architectures)
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _vocab_size(config) -> int | None:
    return getattr(config.get_text_config(), "vocab_size", None)


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
