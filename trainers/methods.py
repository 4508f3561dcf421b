"""The training methods and what each needs: one `MethodSpec` per `method:` value, read
by the config (its choices, help and checks), the driver (data purpose, loop, the
driver-side preparation), the RL driver (which actors to start), job submission (which
paths a run reads) and the RL objectives.

Adding a method is one entry in `METHODS` plus its files. Classes are named as
"module:Class" so that reading the table imports no trainer code (the driver and the
config load it before any worker starts).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

from trainers.errors import UserError


class UnknownMethodError(LookupError):
    """A method name that `METHODS` does not hold (a bug: the config only accepts its names)."""

    def __init__(self, name: str):
        super().__init__(f"method '{name}' is not in trainers.methods.METHODS "
                         f"(known: {', '.join(METHODS)})")


def _fixed(value):
    return lambda job: value


@dataclass(frozen=True)
class MethodSpec:
    name: str
    help: str
    # The record type the run's data is read as (trainers.data purposes), given the job.
    data: Callable[[object], str]
    # Supervised loop: the trainers.method.Method subclass the workers run ("module:Class").
    method_class: str = ""
    # RL loop: the trainers.rl.objectives.Objective subclass ("module:Class").
    objective: str = ""
    # Whether a run of this job samples from the rollout engines (and so runs the RL loop).
    on_policy: Callable[[object], bool] = _fixed(False)
    rewards: bool = False       # sampled responses are scored by reward actors (`rewards:`)
    teacher: bool = False       # needs a teacher model (`distill.teacher`)
    qlora: bool = True          # works with peft.method qlora
    # Checks and encoding that must fail on the driver: (job, datasets, tokenizer) ->
    # extra keyword arguments of the Method's constructor.
    prepare: Optional[Callable[[object, object, object], dict]] = None


def _check_raw_text(job, datasets, tokenizer) -> dict:
    not_raw = [s["path"] for s in datasets.stats["sources"] if s["format"] != "text"]
    if not_raw:
        raise UserError(f"method cpt trains on raw text ('text' rows); {not_raw[0]} is not raw text "
                        "(use method sft for instruction or chat data)")
    return {}


def _prepare_classification(job, datasets, tokenizer) -> dict:
    from trainers.classify import prepare_classification

    return {"labels": prepare_classification(datasets, tokenizer, job.data)}


def _prepare_preferences(job, datasets, tokenizer) -> dict:
    from trainers.reward import encode_preference_sets

    objective = job.rm.objective if job.method == "rm" else "pairwise"
    encode_preference_sets(datasets, tokenizer, job.data, objective)
    return {}


def _check_teacher(job, datasets, tokenizer) -> dict:
    from trainers.distill import check_teacher

    check_teacher(job, tokenizer)
    return {}


def _distill_on_policy(job) -> bool:
    return job.distill.mode == "on_policy"


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("sft", "loss on assistant turns (or every token of raw text)", _fixed("sft"),
               method_class="trainers.method:Method"),
    MethodSpec("cpt", "continued pre-training on raw text", _fixed("sft"),
               method_class="trainers.method:Method", prepare=_check_raw_text),
    MethodSpec("classification", "a sequence-classification head on text/label data", _fixed("classification"),
               method_class="trainers.classify:ClassificationMethod", qlora=False, prepare=_prepare_classification),
    MethodSpec("rm", "a reward model from preference pairs or scores",
               lambda job: "scored" if job.rm.objective == "regression" else "preference",
               method_class="trainers.reward:RewardMethod", qlora=False, prepare=_prepare_preferences),
    MethodSpec("dpo", "direct preference optimisation", _fixed("preference"),
               method_class="trainers.dpo:DPOMethod", prepare=_prepare_preferences),
    MethodSpec("ppo", "PPO with a value head against rewards", _fixed("prompt"),
               objective="trainers.rl.objectives:PPO", on_policy=_fixed(True), rewards=True),
    MethodSpec("grpo", "critic-free RL (GRPO, RLOO, REINFORCE++)", _fixed("prompt"),
               objective="trainers.rl.objectives:GroupRL", on_policy=_fixed(True), rewards=True),
    MethodSpec("distill", "knowledge distillation from a teacher (offline or on-policy)",
               lambda job: "prompt" if _distill_on_policy(job) else "sft",
               method_class="trainers.distill:DistillMethod", objective="trainers.rl.objectives:OnPolicyDistill",
               on_policy=_distill_on_policy, teacher=True, prepare=_check_teacher),
)}

METHOD_NAMES = tuple(METHODS)


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(name) from None


def methods_help() -> str:
    """The `method` key's help: every method with its one-line description."""
    return "; ".join(f"{spec.name}: {spec.help}" for spec in METHODS.values()) + "."


def resolve(target: str):
    """The object a "module:Name" string names."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
