"""The method table: every entry resolves, the config's `method` choices are the table's,
each place that knows about methods reads it, and a name the table lacks is a named error."""

import typing

import pytest

from cluster.config import JobConfig, field_help, load_config
from cluster.jobs_parts import config_paths
from cluster.rl import actor_cpus
from trainers.data.formats import PURPOSES
from trainers.errors import ConfigError
from trainers.method import Method
from trainers.methods import METHODS, UnknownMethodError, method_spec, resolve
from trainers.rl.objectives import AdaptiveKL, Objective, build_objective

BASE = ["model.path=/m", "data.train=d.jsonl", "distill.teacher=/t", "rewards.rewards=[{fn: exact_match}]"]


def _job(method: str, *extra: str) -> JobConfig:
    return load_config(None, BASE + [f"method={method}", *extra], default_name="x")


@pytest.mark.parametrize("name", METHODS)
def test_every_entry_resolves_its_classes_and_data_purpose(name):
    spec, job = METHODS[name], _job(name)
    assert spec.name == name
    assert spec.method_class or spec.objective, "a method runs some loop"
    if spec.method_class:
        assert issubclass(resolve(spec.method_class), Method)
    if spec.objective:
        assert issubclass(resolve(spec.objective), Objective)
    assert spec.data(job) in PURPOSES
    assert spec.prepare is None or callable(spec.prepare)


def test_the_config_choices_and_help_are_the_table():
    assert typing.get_args(typing.get_type_hints(JobConfig)["method"]) == tuple(METHODS)
    (help_text,) = [h for key, h, _ in field_help(JobConfig) if key == "method"]
    for spec in METHODS.values():
        assert f"{spec.name}: {spec.help}" in help_text
    with pytest.raises(ConfigError, match="must be one of sft, cpt, classification"):
        _job("sftt")


def test_what_a_run_needs_follows_the_job():
    assert METHODS["rm"].data(_job("rm", "rm.objective=regression")) == "scored"
    offline, on_policy = _job("distill"), _job("distill", "distill.mode=on_policy")
    assert (METHODS["distill"].data(offline), offline.uses_rollouts) == ("sft", False)
    assert (METHODS["distill"].data(on_policy), on_policy.uses_rollouts) == ("prompt", True)
    assert _job("grpo").uses_rollouts and not _job("dpo").uses_rollouts
    # The RL driver reserves CPUs for the reward actors or the teacher the table names.
    grpo, distill = _job("grpo"), on_policy
    engines = grpo.rollout.num_engines * grpo.rollout.cpus_per_engine
    assert actor_cpus(grpo) == engines + grpo.rewards.num_actors * grpo.rewards.cpus_per_actor
    assert actor_cpus(distill) == engines + distill.distill.cpus_per_teacher
    # Job submission checks the teacher path only for a method that reads one.
    assert ("distill.teacher", "/t") in config_paths(offline)
    assert ("distill.teacher", "/t") not in config_paths(grpo)


def test_rl_objectives_come_from_the_table():
    kl = AdaptiveKL(0.0, 0.0, 1)
    for name in ("ppo", "grpo"):
        assert type(build_objective(_job(name), kl)).__name__ == METHODS[name].objective.rpartition(":")[2]
    assert type(build_objective(_job("distill", "distill.mode=on_policy"), kl)).__name__ == "OnPolicyDistill"
    with pytest.raises(ValueError, match="method 'sft' has no RL objective"):
        build_objective(_job("sft"), kl)  # no fall-through to another objective


def test_a_method_missing_from_the_table_is_a_named_error():
    with pytest.raises(UnknownMethodError, match="method 'orpo' is not in trainers.methods.METHODS"):
        method_spec("orpo")
    job = _job("grpo")
    job.method = "orpo"  # e.g. a config built without validation
    with pytest.raises(UnknownMethodError, match="orpo"):
        build_objective(job, AdaptiveKL(0.0, 0.0, 1))
