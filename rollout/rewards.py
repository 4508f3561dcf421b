"""Rewards for RL: the typed items that are scored and the results that come back, the
reward config (`RewardSpec`: a weighted list of rule functions and reward models), and
`Rewards`, which scores a batch with all of them. `rollout.reward_actor.RewardActor`
runs one `Rewards` in a Ray actor.

    rewards = Rewards(RewardSpec([RewardTerm("exact_match"),
                                  RewardTerm("length_penalty", weight=1.0, params={"target": 40})]))
    rewards.score([RewardItem([{"role": "user", "content": "What is 2 + 3?"}], "5", reference="5")])
    # -> [RewardResult(reward=1.0, terms={"exact_match": 1.0, "length_penalty": 0.0})]

Rule functions and the built-ins live in `rollout.reward_rules`. A reward model
(`model:DIR`) is any sequence-classification checkpoint with one output, full or a peft
SEQ_CLS adapter (what `method: rm` writes to final/); it scores the prompt messages plus
the response as an assistant turn, rendered with the chat template and tokenised as the
reward trainer encodes them, and reads `logits[:, 0]` at the last token.
"""

from __future__ import annotations

import json
import math
import numbers
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from rollout.engine import Generation, Messages
from rollout.inputs import load_tokenizer
from rollout.refs import absolute as absolute_ref
from rollout.reward_rules import RewardError, builtin_name, resolve_rule

__all__ = ["RewardError", "RewardItem", "RewardResult", "RewardTerm", "RewardSpec", "Rewards",
           "RuleReward", "ModelReward", "load_reward_model"]

MODEL_PREFIX = "model:"
Scored = tuple[float, Optional[str]]   # one sample's value from one reward, and its reason if it gave one


@dataclass
class RewardItem:
    """One response to score. `prompt` is the prompt's chat messages (a plain string is
    taken as one user turn); `metadata` is handed to rule functions as-is, plus
    `messages` (the prompt messages)."""
    prompt: Messages
    response: str
    reference: Optional[str] = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.prompt, str):
            self.prompt = [{"role": "user", "content": self.prompt}]

    @property
    def prompt_text(self) -> str:
        """The last user turn's text: what a rule function receives as `prompt`."""
        users = [m.get("content", "") for m in self.prompt if m.get("role") == "user"]
        return str(users[-1]) if users else ""

    @classmethod
    def from_generation(cls, prompt: Messages, generation: Generation, reference: Optional[str] = None,
                        metadata: Optional[dict] = None) -> "RewardItem":
        """An engine generation, with its token ids and finish reason in the metadata
        (`response_ids`, `finish_reason`) for length rewards."""
        meta = {"response_ids": list(generation.response_ids), "finish_reason": generation.finish_reason,
                **(metadata or {})}
        return cls(prompt, generation.text, reference, meta)


@dataclass
class RewardResult:
    reward: float               # the combined reward: sum of weight * value over the spec's rewards
    terms: dict[str, float]     # each reward's own value (before weighting), by name, for logging
    reasons: dict[str, str] = field(default_factory=dict)  # why, for the rewards that say (code_tests...)

    def explain(self) -> str:
        """One line: every reward's value, with its reason where it gave one."""
        return "; ".join(f"{name} {value:g}" + (f" ({self.reasons[name]})" if name in self.reasons else "")
                         for name, value in self.terms.items())


@dataclass
class RewardTerm:
    fn: str = field(default="", metadata={"help": (
        "What computes this reward: a built-in (exact_match, format, length_penalty, overlong_penalty, "
        "code_tests; also written "
        "rayft:NAME), 'module:function', 'path/to/file.py:function', or 'model:DIR' for a reward model "
        "(an rm run directory, its final/, or any sequence-classification model with one output).")})
    weight: float = field(default=1.0, metadata={"help": (
        "Multiplier in the combined reward (the sum of weight * value); 0 logs the value without counting it.")})
    params: Any = field(default_factory=dict, metadata={"help": (
        "A mapping. Rule functions get it as keyword arguments (format: pattern; length_penalty: target, "
        "coef, unit; overlong_penalty: max_tokens, buffer; code_tests: timeout_s, memory_mb, partial). "
        "Reward models: batch_size (16), max_length (the model's context), truncation_side "
        "(left keeps the response's end, where the reward is read), dtype (auto), chat_template.")})
    name: str = field(default="", metadata={"help": (
        "Name of this reward's value in results and logs; default: the function's name, or 'reward_model'.")})

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.fn.startswith(MODEL_PREFIX):
            return "reward_model"
        return builtin_name(self.fn) or self.fn.rpartition(":")[2]


@dataclass
class RewardSpec:
    rewards: list[RewardTerm] = field(default_factory=list, metadata={"help": (
        "The rewards, each {fn, weight, params, name}; the combined reward is their weighted sum.")})
    num_actors: int = field(default=1, metadata={"help": (
        "Reward actors; a batch is split evenly across them (each loads every reward model).")})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs reserved per reward actor."})
    gpus_per_actor: float = field(default=0.0, metadata={"help": (
        "GPUs per reward actor; > 0 runs reward models on cuda (fractions share a GPU).")})
    timeout_s: float = field(default=600.0, metadata={"help": (
        "Longest wait for one batch's scores before a RewardError (a rule function that hangs).")})

    def validate(self, section: str = "rewards") -> None:
        def bad(key: str, message: str):
            raise RewardError(f"config key '{section}.{key}': {message}")

        if not self.rewards:
            bad("rewards", "needs at least one reward")
        seen = {}
        for i, term in enumerate(self.rewards):
            key = f"rewards[{i}]"
            if not isinstance(term.fn, str) or not term.fn.strip():
                bad(f"{key}.fn", "is required: a built-in, 'module:function', 'file.py:function' or 'model:DIR'")
            weight = term.weight
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
                bad(f"{key}.weight", f"must be a finite number, got {term.weight!r}")
            if not isinstance(term.params, dict):
                bad(f"{key}.params", f"must be a mapping, got {type(term.params).__name__}")
            if term.label in seen:
                bad(f"{key}.name", f"'{term.label}' is also the name of rewards[{seen[term.label]}]; "
                                   "give each reward a distinct `name`")
            seen[term.label] = i
        if self.num_actors < 1:
            bad("num_actors", f"must be >= 1, got {self.num_actors}")
        if self.cpus_per_actor <= 0:
            bad("cpus_per_actor", f"must be > 0, got {self.cpus_per_actor}")
        if self.gpus_per_actor < 0:
            bad("gpus_per_actor", f"must be >= 0, got {self.gpus_per_actor}")
        if self.timeout_s <= 0:
            bad("timeout_s", f"must be > 0, got {self.timeout_s}")

    def with_absolute_paths(self) -> "RewardSpec":
        """A copy whose file and model paths are absolute: Ray actors do not share the
        driver's working directory."""
        terms = []
        for t in self.rewards:
            fn = t.fn
            if fn.startswith(MODEL_PREFIX):
                fn = MODEL_PREFIX + str(Path(fn[len(MODEL_PREFIX):]).expanduser().resolve())
            else:
                fn = absolute_ref(fn)
            terms.append(RewardTerm(fn, t.weight, dict(t.params) if isinstance(t.params, dict) else t.params, t.name))
        return RewardSpec(terms, self.num_actors, self.cpus_per_actor, self.gpus_per_actor, self.timeout_s)


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _where(index: int, item: RewardItem) -> str:
    return f"sample {index} (prompt {_short(item.prompt_text)})"


def _number(value, ref: str, index: int, item: RewardItem) -> float:
    """`value` as a finite float, or a RewardError naming the reward and the sample."""
    ok = isinstance(value, numbers.Real) or (hasattr(value, "__float__") and not isinstance(value, (str, bytes)))
    try:
        number = float(value) if ok else None
    except (TypeError, ValueError):
        number = None
    if number is None:
        raise RewardError(f"reward '{ref}' returned {value!r} ({type(value).__name__}) on {_where(index, item)}; "
                          "a reward must be a finite number", reward=ref, index=index)
    if not math.isfinite(number):
        raise RewardError(f"reward '{ref}' returned {number} on {_where(index, item)}; "
                          "a reward must be a finite number", reward=ref, index=index)
    return number


class RuleReward:
    """A Python rule function, called once per sample (`fn.workers` samples at once, from
    threads, for a function that says it may be)."""

    def __init__(self, ref: str, params: dict):
        self.ref, self.params = ref, dict(params)
        self.fn = resolve_rule(ref, self.params)
        self.workers = getattr(self.fn, "workers", 1)

    def __call__(self, items: Sequence[RewardItem], start: int = 0) -> list[Scored]:
        indexed = list(enumerate(items, start))
        if self.workers > 1 and len(items) > 1:
            with ThreadPoolExecutor(min(self.workers, len(items))) as threads:
                return list(threads.map(lambda pair: self._one(*pair), indexed))
        return [self._one(index, item) for index, item in indexed]

    def _one(self, index: int, item: RewardItem) -> Scored:
        metadata = {**item.metadata, "messages": [dict(m) for m in item.prompt]}  # a copy per call
        try:
            value = self.fn(item.prompt_text, item.response, item.reference, metadata, **self.params)
        except Exception as exc:  # noqa: BLE001 (user code: report which reward and sample)
            raise RewardError(f"reward '{self.ref}' raised on {_where(index, item)}: "
                              f"{type(exc).__name__}: {exc}", reward=self.ref, index=index) from exc
        reason = None
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
            value, reason = value
        return _number(value, self.ref, index, item), reason


def _resolve_model_dir(ref: str, path: Path) -> Path:
    if not path.is_dir():
        raise RewardError(f"reward '{ref}': {path} is not a directory (give an rm run directory, its final/, "
                          "or a sequence-classification model directory)", reward=ref)
    has_model = (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
    if not has_model and (path / "final").is_dir():
        path = path / "final"
    if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        raise RewardError(f"reward '{ref}': {path} holds no model (no config.json or adapter_config.json, "
                          "no final/)", reward=ref)
    return path


def _read_json(ref: str, path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RewardError(f"reward '{ref}': {path} is not readable JSON ({exc})", reward=ref) from None


def load_reward_model(ref: str, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) in eval mode for `model:DIR`: a full one-output
    sequence-classification model, or a peft SEQ_CLS adapter over its base. Weights from
    safetensors only; no model code is run."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    path = _resolve_model_dir(ref, Path(ref[len(MODEL_PREFIX):]).expanduser())
    adapter = (path / "adapter_config.json").is_file()
    weights_dir = path
    if adapter:
        config = _read_json(ref, path / "adapter_config.json")
        if config.get("task_type") != "SEQ_CLS":
            raise RewardError(f"reward '{ref}': the adapter's task_type is {config.get('task_type')}, "
                              "a reward model adapter is SEQ_CLS", reward=ref)
        weights_dir = Path(config.get("base_model_name_or_path") or "")
        if not weights_dir.is_dir():
            raise RewardError(f"reward '{ref}': the adapter's base model {str(weights_dir)!r} is not a directory "
                              "(base_model_name_or_path in adapter_config.json)", reward=ref)
    else:
        config = _read_json(ref, path / "config.json")
        archs = config.get("architectures") or []
        if not (archs and archs[-1].endswith("ForSequenceClassification")):
            raise RewardError(f"reward '{ref}': {path} is not a sequence-classification model "
                              f"(architectures {archs}); train one with `method: rm`", reward=ref)
        outputs = len(config.get("id2label") or {}) or config.get("num_labels") or 2
        if outputs != 1:
            raise RewardError(f"reward '{ref}': the model has {outputs} outputs; a reward model has one", reward=ref)
    if not any(weights_dir.glob("*.safetensors")):
        raise RewardError(f"reward '{ref}': no *.safetensors weights in {weights_dir} "
                          "(pickle checkpoints are not loaded)", reward=ref)
    has_tokenizer = any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer_dir = path if has_tokenizer else weights_dir  # training saves it beside the adapter
    verbosity = logging.get_verbosity()
    if adapter:  # the base's lm_head is unused and the adapter brings the head: the load report is noise
        logging.set_verbosity_error()
    try:
        tokenizer = load_tokenizer(tokenizer_dir)  # the engines' loader: pad falls back to eos
        model = AutoModelForSequenceClassification.from_pretrained(
            str(weights_dir), num_labels=1, dtype=getattr(torch, dtype), use_safetensors=True,
            trust_remote_code=False)
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(path))
    except Exception as exc:  # noqa: BLE001
        raise RewardError(f"reward '{ref}': cannot load the reward model: {type(exc).__name__}: {exc}",
                          reward=ref) from exc
    finally:
        logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        # The head reads the last non-pad token, so it must know the pad id to batch.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


class ModelReward:
    """A reward model (`model:DIR`), scored in padded batches of `batch_size`."""

    def __init__(self, ref: str, params: dict, device: str = "cpu"):
        unknown = sorted(set(params) - {"batch_size", "max_length", "truncation_side", "dtype", "chat_template"})
        if unknown:
            raise RewardError(f"reward '{ref}': unknown params {unknown} (a reward model takes batch_size, "
                              "max_length, truncation_side, dtype, chat_template)", reward=ref)
        self.ref, self.device = ref, device
        self.batch_size, self.side = params.get("batch_size", 16), params.get("truncation_side", "left")
        max_length, dtype = params.get("max_length"), params.get("dtype", "auto")
        for key, ok in (("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1),
                        ("max_length", max_length is None or isinstance(max_length, int) and max_length >= 1),
                        ("truncation_side", self.side in ("left", "right")),
                        ("dtype", dtype in ("auto", "float32", "bfloat16", "float16"))):
            if not ok:
                raise RewardError(f"reward '{ref}': params.{key} = {params[key]!r} is not valid (batch_size and "
                                  "max_length: integers >= 1; truncation_side: left or right; dtype: auto, "
                                  "float32, bfloat16 or float16)", reward=ref)
        dtype = ("bfloat16" if device.startswith("cuda") else "float32") if dtype == "auto" else dtype
        self.model, self.tokenizer = load_reward_model(ref, dtype, device)
        self.chat_template = params.get("chat_template")
        if self.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise RewardError(f"reward '{ref}': the tokenizer has no chat template; set params.chat_template",
                              reward=ref)
        self.max_length = max_length or getattr(self.model.config, "max_position_embeddings", None) or 1_000_000

    def encode(self, item: RewardItem) -> list[int]:
        """Token ids of the prompt plus the response as an assistant turn, rendered and
        tokenised as the reward trainer encodes its pairs (no added special tokens)."""
        messages = [*item.prompt, {"role": "assistant", "content": item.response}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                                  chat_template=self.chat_template)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_length:
            ids = ids[-self.max_length:] if self.side == "left" else ids[: self.max_length]
        return ids

    def __call__(self, items: Sequence[RewardItem], start: int = 0) -> list[Scored]:
        import torch

        values = []
        for at in range(0, len(items), self.batch_size):
            chunk = items[at: at + self.batch_size]
            try:
                encoded = [self.encode(item) for item in chunk]
                width = max(len(ids) for ids in encoded)
                input_ids = torch.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(encoded), width), dtype=torch.long)
                for row, ids in enumerate(encoded):  # right padding, as training collates
                    input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    mask[row, : len(ids)] = 1
                with torch.inference_mode():
                    logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            except Exception as exc:  # noqa: BLE001
                raise RewardError(f"reward '{self.ref}' failed on samples {start + at}..{start + at + len(chunk) - 1}: "
                                  f"{type(exc).__name__}: {exc}", reward=self.ref, index=start + at) from exc
            for k, value in enumerate(logits[:, 0].float().tolist()):
                values.append((_number(value, self.ref, start + at + k, chunk[k]), None))
        return values


def _as_item(x, index: int) -> RewardItem:
    try:
        item = x if isinstance(x, RewardItem) else RewardItem(*x) if isinstance(x, (tuple, list)) else None
    except TypeError:  # a tuple of the wrong length
        item = None
    if item is None or not isinstance(item.response, str) or not isinstance(item.prompt, list) \
            or not all(isinstance(m, dict) for m in item.prompt) or not isinstance(item.metadata, dict):
        raise RewardError(f"batch item {index} is not a RewardItem or (prompt messages, response text, "
                          f"reference, metadata): {_short(repr(x))}", index=index)
    return item


class Rewards:
    """Every reward of a spec, loaded once; `score` computes all of them for a batch."""

    def __init__(self, spec: RewardSpec, device: str = "cpu"):
        spec.validate()
        self.spec = spec
        self.terms = []
        for term in spec.rewards:
            if term.fn.startswith(MODEL_PREFIX):
                scorer = ModelReward(term.fn, term.params, device)
            else:
                scorer = RuleReward(term.fn, term.params)
            self.terms.append((term.label, float(term.weight), scorer))

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.terms]

    def score(self, batch: Sequence, start: int = 0) -> list[RewardResult]:
        """One RewardResult per item, in order. `start` is the index of the batch's first
        item in a larger batch, so errors name the sample as the caller numbers it."""
        items = [_as_item(x, start + i) for i, x in enumerate(batch)]
        scored = {name: scorer(items, start) for name, _, scorer in self.terms}
        return [RewardResult(reward=sum(weight * scored[name][i][0] for name, weight, _ in self.terms),
                             terms={name: scored[name][i][0] for name in scored},
                             reasons={name: scored[name][i][1] for name in scored if scored[name][i][1] is not None})
                for i in range(len(items))]

