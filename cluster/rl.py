"""The driver side of the RL methods: how many CPUs the run's actors need, and starting
and stopping what the workers sample from (the rollout pool, reward actors, teacher).
They live on the driver so a restarted worker group finds them still running."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from trainers.rl.collect import Services


def actor_cpus(config) -> float:
    """CPUs the run's actors reserve besides the training workers."""
    cpus = config.rollout.num_engines * config.rollout.cpus_per_engine
    if config.uses_reward_actors:
        cpus += config.rewards.num_actors * config.rewards.cpus_per_actor
    if config.spec.teacher:
        cpus += config.distill.cpus_per_teacher
    return cpus


# Settings only the RL loop reads: a pool started with other values still serves a run.
LOOP_ONLY_ROLLOUT_KEYS = {"verify_sync", "max_staleness", "lora_sync",
                          "environment", "env_params", "max_turns", "max_episode_tokens"}


def check_pool(pool, config) -> None:
    """A pool given to a run must serve the run's start model with the run's engine settings
    (LoRA slots where the run needs none, or larger ones, are fine)."""
    from dataclasses import asdict

    from trainers.errors import ConfigError

    if Path(pool.model_dir).resolve() != Path(config.model.path).resolve():
        raise ConfigError("model.path", f"the given rollout pool serves {pool.model_dir}, not {config.model.path}")
    ours, its = asdict(config.engine_settings()), asdict(pool.cfg)
    enough = {"enable_lora": its["enable_lora"] >= ours["enable_lora"],
              "max_lora_rank": its["max_lora_rank"] >= ours["max_lora_rank"] or not ours["enable_lora"]}
    differ = sorted(k for k in ours if not enough.get(k, ours[k] == its[k]) and k not in LOOP_ONLY_ROLLOUT_KEYS)
    if differ:
        raise ConfigError(f"rollout.{differ[0]}", "differs from the given rollout pool's setting ("
                          + ", ".join(f"rollout.{k}: {ours[k]!r} here, {its[k]!r} in the pool" for k in differ) + ")")


@contextmanager
def rollout_services(config, use_gpu: bool, echo=print, pool=None):
    """The pool (serving the start model), reward actors and teacher of `config`, stopped
    on exit whatever happens. Each is one owner actor started here: the workers get handles
    to it (a restarted worker group the same ones), never a copy of its state. A `pool`
    given (started from the run's model with its rollout settings) is reset to the start
    model and used instead of a new one, and left running."""
    from rollout.pool import RolloutPool
    from rollout.reward_actor import RewardService

    started = []
    try:
        if pool is None:
            echo(f"starting {config.rollout.num_engines} rollout engine(s)")
            pool = RolloutPool(config.model.path, config.engine_settings(), use_gpu=use_gpu)
            started.append(pool.shutdown)
        else:
            check_pool(pool, config)
            pool.reset()
        services = Services(pool)
        if config.uses_reward_actors:
            services.rewards = RewardService(config.rewards, max_retries=config.rollout.max_retries,
                                             start_timeout_s=config.rollout.timeout_s)
            started.append(services.rewards.stop)
        if config.spec.teacher:
            from rollout.teacher import TeacherService

            d = config.distill
            services.teacher = TeacherService(d.teacher, d.cpus_per_teacher, dtype=d.teacher_dtype,
                                              trust_remote_code=d.teacher_trust_remote_code, use_gpu=use_gpu,
                                              timeout_s=config.rollout.timeout_s,
                                              max_retries=config.rollout.max_retries)
            started.append(services.teacher.stop)
        yield services
    finally:
        for stop in reversed(started):
            try:
                stop()
            except Exception:  # noqa: BLE001 (best effort: an actor may be gone already)
                pass


TIMINGS = ("generate_s", "score_s", "teacher_s", "train_s", "sync_s", "step_s")


def summarise_rl(rows: list[dict]) -> dict:
    """The RL part of summary.json: where a step's time goes (mean seconds per step of
    generate / score / teacher / train / sync) and how reward and the eval metric moved."""
    steps = [r for r in rows if "event" not in r and "step_s" in r]
    evals = [r for r in rows if "event" not in r and any(k in r for k in ("eval_reward", "eval_divergence"))]
    out: dict = {"timing_s_per_step": {k.removesuffix("_s"): round(sum(r.get(k, 0.0) for r in steps) / len(steps), 3)
                                       for k in TIMINGS} if steps else {}}
    if steps:
        out.update(first_reward_mean=steps[0].get("reward_mean"), final_reward_mean=steps[-1].get("reward_mean"),
                   final_kl=steps[-1].get("kl"), final_response_length=steps[-1].get("response_length"))
    for key in ("eval_reward", "eval_divergence"):
        values = [r[key] for r in evals if key in r]
        if values:
            out[f"first_{key}"], out[f"final_{key}"] = values[0], values[-1]
    return out
