"""RL on the rollout pool, end to end on CPU with real vLLM engines and reward actors.

The start model is the tiny base after a short SFT on single-digit sums whose answers
come in two styles, half "7" and half "The answer is 7.". Greedy decoding picks the
verbose style, so the exact-match reward on held-out prompts starts at 0: an RL method
that works learns the rewarded style (and keeps the sums it knows) and the held-out
reward rises; a wrong sign, misaligned rewards or stale engine weights leave it at 0.
"""

import json

import pytest

from tests.integration.faults import kill_a_worker_after_checkpoint, kill_after_step
from tests.integration.runs import metric_rows, step_rows, train, write_rows
from trainers.batching import StepBatches, plan_steps
from trainers.data import synth_rows
from trainers.rl.collect import digest


@pytest.fixture(scope="module")
def rl_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl-data")
    pairs = [{"prompt": r["messages"][0]["content"], "chosen": r["reference"],
              "rejected": f"The answer is {r['reference']}." if i % 2 else str((int(r["reference"]) + 3) % 19)}
             for i, r in enumerate(synth_rows("small_addition", 1200, seed=4))]
    return {"mixed": write_rows(root / "mixed.jsonl", synth_rows("small_addition_mixed", 2000, seed=1)),
            "plain": write_rows(root / "plain.jsonl", synth_rows("small_addition", 2000, seed=6)),
            "prompts": write_rows(root / "prompts.jsonl", synth_rows("small_addition", 600, seed=2)),
            "eval": write_rows(root / "eval.jsonl", synth_rows("small_addition", 64, seed=3)),
            "pairs": write_rows(root / "pairs.jsonl", pairs)}


@pytest.fixture(scope="module")
def sft_mixed(ray_cluster, tiny_base_dir, rl_data, tmp_path_factory):
    """The start model: greedy answers in the unrewarded style."""
    config, _ = train(tmp_path_factory.mktemp("sft"), "sft-mixed", tiny_base_dir, f"data.train=[{rl_data['mixed']}]",
                      "data.max_length=48", "train.max_steps=150", "train.batch_size=16", "train.lr=1e-3")
    return config.run_dir / "final"


@pytest.fixture(scope="module")
def rollout_pool(sft_mixed):
    """One engine serving the start model, shared by the runs below in turn (each run resets
    it to the start model; one kills it, and its owner replaces it)."""
    from rollout.config import RolloutConfig
    from rollout.pool import RolloutPool

    pool = RolloutPool(str(sft_mixed), RolloutConfig(enable_lora=True))  # LoRA slots for the LoRA run
    yield pool
    pool.shutdown()


def _rl(tmp_path, name, model, rl_data, method, *overrides, pool=None):
    return train(tmp_path, name, model, f"method={method}", f"data.train=[{rl_data['prompts']}]",
                 f"data.eval=[{rl_data['eval']}]", "algo.prompts_per_step=16", "algo.samples_per_prompt=8",
                 "algo.max_new_tokens=8", "train.lr=1e-4", "train.scheduler=constant", "train.warmup_ratio=0",
                 *overrides, pool=pool)


def _evals(run_dir, key="eval_reward"):
    return [r[key] for r in metric_rows(run_dir) if key in r]


def _check_timings(timing):
    """The parts of a step are measured inside it: each is at most the step's time, and
    together they are most of it."""
    parts = sum(timing[k] for k in ("generate", "score", "teacher", "train", "sync"))
    assert timing["generate"] > 0.01 and timing["train"] > 0.01, timing
    assert 0.5 * timing["step"] <= parts <= timing["step"] * 1.01, timing


def _full_reverse_kl(student_dir, teacher_dir, eval_path, answer_tokens: int = 8) -> float:
    """Mean over answer tokens of KL(student || teacher) over the whole vocabulary, with
    transformers alone, on the student's greedy answers to the held-out prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    student, teacher = (AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
                        for d in (student_dir, teacher_dir))
    total, tokens = 0.0, 0
    with torch.no_grad():
        for line in eval_path.read_text().splitlines()[:32]:
            prompt = tokenizer.apply_chat_template(json.loads(line)["messages"][:1], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)["input_ids"]
            ids = student.generate(prompt, max_new_tokens=answer_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
            start = prompt.shape[1] - 1
            s_logp, t_logp = (torch.log_softmax(m(ids).logits[0, start:ids.shape[1] - 1], -1)
                              for m in (student, teacher))
            total += float((s_logp.exp() * (s_logp - t_logp)).sum())
            tokens += ids.shape[1] - 1 - start
    return total / tokens


@pytest.mark.parametrize("staleness", [0, 1])
def test_an_engine_and_a_reward_actor_killed_mid_run_do_not_end_it(sft_mixed, rl_data, tmp_path, rollout_pool,
                                                                   staleness):
    """2 workers share the engine and a reward actor through their owners. The engine,
    SIGKILLed after a weight sync while both workers use it, is replaced once and brought
    to the synced weights before it serves (a stale one would show in the engine/trainer
    log-prob gap, a max over both workers); a killed reward actor is restarted and its
    share re-scored. Pipelined (staleness 1), the engine dies with the next step's request
    in flight: the request is re-issued on the replacement, whose samples are no older."""
    steps = 6
    run_dir = tmp_path / "faults"
    with kill_after_step(run_dir, "ray::EngineActor", 1) as engine, \
            kill_after_step(run_dir, "ray::RewardActor", 3) as reward:
        config, summary = _rl(tmp_path, "faults", sft_mixed, rl_data, "grpo", "rewards.rewards=[{fn: exact_match}]",
                              f"train.max_steps={steps}", "cluster.num_workers=2", "algo.prompts_per_step=4",
                              "algo.eval_prompts=8", "train.lr=1e-3", f"rollout.max_staleness={staleness}",
                              pool=rollout_pool)
    assert engine.get("replaced_by") and reward.get("replaced_by"), (engine, reward)
    rows = step_rows(config.run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert summary["steps"] == steps
    assert not [r for r in metric_rows(config.run_dir) if r.get("event") == "resume"]  # no worker restart was needed
    later = [r for r in rows if r["step"] > engine["at"]]
    assert later
    if staleness == 0:
        assert max(r["logprob_diff_max"] for r in later) < 1e-4, [r["logprob_diff_max"] for r in rows]
    assert all(0 <= r["staleness_max"] <= staleness for r in rows), [r["staleness_max"] for r in rows]


# rloo trains a LoRA policy with a KL loss to its adapter-disabled base: the engines get
# the adapter alone each step (rollout.lora_sync auto), and the reference costs no second model.
LORA_WITH_KL = ["peft.method=lora", "train.lr=1e-3", "algo.kl_coef=0.05", "algo.kl_in=loss"]


# reinforce_pp samples one step ahead: each step trains on samples of the weights before the
# last update, corrected by truncated importance weights.
PIPELINED = ["rollout.max_staleness=1", "algo.rollout_correction=tis"]


@pytest.fixture(scope="module")
def group_rl(sft_mixed, rl_data, tmp_path_factory, rollout_pool):
    """`group_rl(estimator, steps, extra)` -> (config, summary) of that `grpo`-method run,
    each run once for the module (the side-by-side test reuses the runs of the test above it)."""
    runs = {}

    def run(estimator: str, steps: int, extra: list[str]):
        key = (estimator, steps, tuple(extra))
        if key not in runs:
            runs[key] = _rl(tmp_path_factory.mktemp(estimator), estimator, sft_mixed, rl_data, "grpo",
                            f"algo.estimator={estimator}", "rewards.rewards=[{fn: exact_match}]",
                            f"train.max_steps={steps}", "train.eval_every=10", *extra, pool=rollout_pool)
        return runs[key]

    return run


@pytest.mark.parametrize("estimator, steps, margin, extra", [("grpo", 30, 0.15, []), ("rloo", 30, 0.1, LORA_WITH_KL),
                                                             ("reinforce_pp", 30, 0.1, PIPELINED)])
def test_group_rl_raises_held_out_exact_match_reward(sft_mixed, group_rl, estimator, steps, margin, extra):
    config, summary = group_rl(estimator, steps, extra)
    evals = _evals(config.run_dir)
    assert evals[0] == 0.0, evals  # the start model answers in the unrewarded style
    assert evals[-1] >= evals[0] + margin, evals
    steps_rows = [r for r in metric_rows(config.run_dir) if "reward_mean" in r]
    assert [r["step"] for r in steps_rows] == list(range(1, steps + 1))
    assert steps_rows[-1]["response_length"] < steps_rows[0]["response_length"]  # "The answer is" is dropped
    if extra is PIPELINED:
        # Step t trained on samples of version t - 1 (the first on the start model), and the
        # correction weights moved off 1 as the policy moved.
        assert [r["staleness_max"] for r in steps_rows] == [0.0] + [1.0] * (steps - 1)
        assert steps_rows[0]["logprob_diff_max"] < 1e-3 < max(r["logprob_diff_max"] for r in steps_rows)
        assert max(r["correction_weight_max"] for r in steps_rows) > 1.01
    else:
        # The engines sample from the trainer's current weights (the full model, or the base
        # with the adapter alone synced): the same float32 log-probs after every sync.
        assert max(r["logprob_diff_max"] for r in steps_rows) < 1e-4, [r["logprob_diff_max"] for r in steps_rows]
        assert all(r["staleness_max"] == 0 for r in steps_rows)
        _check_timings(summary["timing_s_per_step"])
    assert summary["final_eval_reward"] == evals[-1]
    final = config.run_dir / "final"
    lora = extra is LORA_WITH_KL
    assert (final / ("adapter_model.safetensors" if lora else "model.safetensors")).exists()
    if lora:
        # Only the adapter travelled, and the engines served it: the log-prob gap above
        # stayed small while the adapter moved the policy away from the base.
        model_mb = (sft_mixed / "model.safetensors").stat().st_size / 2**20
        assert all(0 < r["sync_mb"] < 0.2 * model_mb for r in steps_rows), [r["sync_mb"] for r in steps_rows]
    else:
        assert all(r["sync_mb"] > 0.9 * (sft_mixed / "model.safetensors").stat().st_size / 2**20 for r in steps_rows)
    if lora:  # the step-1 policy is its reference (LoRA B = 0); the KL then grows from 0
        assert abs(steps_rows[0]["kl"]) < 1e-6 and steps_rows[-1]["kl"] > 1e-4, [r["kl"] for r in steps_rows]
    if estimator == "grpo":
        html = (config.run_dir / "report.html").read_text()
        for panel in ("Reward", "Response length (tokens)", "Step time (s)"):
            assert f"<h2>{panel}</h2>" in html


# The GRPO family's objectives (docs/rl.md maps them to TRL's and verl's names). Two
# mini-batches per step, so the second one's ratio has moved off 1 and the sequence-level
# ratio (GSPO) and the capped stop-gradient weight (CISPO) act, not only their gradient at 1.
OBJECTIVES = {"dr_grpo": ["algo.scale_rewards=false", "algo.aggregation=fixed"],
              "gspo": ["algo.ratio_level=sequence", "algo.mini_batches=2"],
              "cispo": ["algo.policy_loss=cispo", "algo.mini_batches=2"],
              "dapo": ["algo.dynamic_sampling=true", "algo.clip_eps_high=0.28", "algo.mini_batches=2"]}


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_grpo_family_objectives_raise_held_out_exact_match_reward(group_rl, objective):
    steps = 20
    config, _ = group_rl("grpo", steps, OBJECTIVES[objective])
    evals = _evals(config.run_dir)
    assert evals[0] == 0.0 and evals[-1] >= 0.15, evals
    rows = step_rows(config.run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert rows[-1]["response_length"] < rows[0]["response_length"]  # "The answer is" is dropped
    if objective == "dapo":  # groups with one reward for all were dropped and replaced
        assert min(r["informative_groups"] for r in rows) < 1.0, [r["informative_groups"] for r in rows]
        assert max(r["sampling_rounds"] for r in rows) > 1
        assert sum(r["informative_kept"] for r in rows) > sum(r["informative_groups"] for r in rows)


@pytest.mark.parametrize("staleness", [0, 1])
def test_multi_turn_episodes_on_the_engines_train_on_their_own_log_probs(sft_mixed, rl_data, tmp_path, rollout_pool,
                                                                         staleness):
    """The guessing game on the vLLM engine: episodes of several turns, whose sampled tokens'
    engine log-probs are the trainer's to 1e-4 on every step of the synchronous run (so the
    inserted feedback tokens sit where the engine saw them), run pipelined as well."""
    prompts = write_rows(tmp_path / "guess.jsonl", synth_rows("guess_number", 200, seed=5))
    steps = 3
    config, summary = train(tmp_path, f"guess-{staleness}", sft_mixed, "method=grpo", f"data.train=[{prompts}]",
                            "data.eval_fraction=0.1", "algo.prompts_per_step=4", "algo.samples_per_prompt=4",
                            "algo.max_new_tokens=8", "algo.eval_prompts=8", "rollout.environment=rayft:guess_number",
                            "rollout.env_params={high: 20}", "rollout.max_turns=4", f"train.max_steps={steps}",
                            f"rollout.max_staleness={staleness}", pool=rollout_pool)
    rows = step_rows(config.run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(r["turns"] > 1.5 for r in rows), [r["turns"] for r in rows]
    assert all("success" in r and "reward_environment" in r for r in rows)
    if staleness == 0:
        assert max(r["logprob_diff_max"] for r in rows) < 1e-4, [r["logprob_diff_max"] for r in rows]
    else:
        assert [r["staleness_max"] for r in rows] == [0.0] + [1.0] * (steps - 1)
    assert _evals(config.run_dir, "eval_success") and _evals(config.run_dir, "eval_turns")[-1] > 1.5
    assert summary["steps"] == steps


def test_pipelined_grpo_with_correction_learns_as_much_as_the_synchronous_run(group_rl):
    """Same prompts, same seed, same number of steps: sampling one step ahead with truncated
    importance weights ends within noise of the synchronous run's held-out reward (64
    prompts: one standard error is at most 0.0625), on samples exactly one version old."""
    steps = 30
    sync, _ = group_rl("grpo", steps, [])
    pipelined, _ = group_rl("grpo", steps, PIPELINED)
    sync_evals, pipelined_evals = _evals(sync.run_dir), _evals(pipelined.run_dir)
    assert pipelined_evals[0] == sync_evals[0] == 0.0
    assert pipelined_evals[-1] >= sync_evals[-1] - 0.125, (sync_evals, pipelined_evals)
    rows = step_rows(pipelined.run_dir)
    assert [r["staleness_max"] for r in rows] == [0.0] + [1.0] * (steps - 1)
    # Each step's prompts are the synchronous run's: the pipeline took them in order.
    assert [r["prompt_digest"] for r in rows] == [r["prompt_digest"] for r in step_rows(sync.run_dir)]
    assert max(r["correction_weight_max"] for r in rows) > 1.01


def test_ppo_with_a_reward_model_raises_reward(sft_mixed, rl_data, tmp_path, tiny_base_dir, rollout_pool):
    rm, _ = train(tmp_path, "rm", tiny_base_dir, "method=rm", f"data.train=[{rl_data['pairs']}]",
                  "data.max_length=48", "train.max_steps=120", "train.batch_size=16", "train.lr=1e-3")
    config, summary = _rl(tmp_path, "ppo", sft_mixed, rl_data, "ppo", f"rewards.rewards=[{{fn: 'model:{rm.run_dir}'}}]",
                          "algo.samples_per_prompt=2", "algo.ppo_epochs=2", "algo.mini_batches=2",
                          "algo.kl_coef=0.05", "algo.kl_estimator=k3", "train.max_steps=30", "train.eval_every=15",
                          pool=rollout_pool)
    rows = [r for r in metric_rows(config.run_dir) if "reward_mean" in r]
    first, last = rows[:10], rows[-10:]
    mean = lambda part: sum(r["reward_mean"] for r in part) / len(part)  # noqa: E731
    assert mean(last) > mean(first) + 0.2, [round(r["reward_mean"], 2) for r in rows]
    assert all(k in rows[-1] for k in ("value_loss", "kl", "clip_fraction", "entropy", "return_mean"))
    # k3 is >= 0 whatever happens: judge it by value. The step-1 policy is the reference
    # (KL 0 up to float noise); training moves it away and the KL says so.
    assert rows[0]["kl"] < 1e-6 and rows[-1]["kl"] > 1e-3, [r["kl"] for r in rows]
    assert _evals(config.run_dir)[-1] > _evals(config.run_dir)[0]
    assert summary["final_kl"] == rows[-1]["kl"]


def test_on_policy_distillation_lowers_divergence_to_the_teacher(sft_mixed, rl_data, tmp_path, tiny_base_dir,
                                                                rollout_pool):
    teacher, _ = train(tmp_path, "teacher", tiny_base_dir, f"data.train=[{rl_data['plain']}]", "data.max_length=48",
                       "train.max_steps=150", "train.batch_size=16", "train.lr=1e-3")
    config, summary = _rl(tmp_path, "distill", sft_mixed, rl_data, "distill", "distill.mode=on_policy",
                          f"distill.teacher={teacher.run_dir / 'final'}", "distill.loss=reverse_kl",
                          "distill.teacher_top_k=8", "algo.samples_per_prompt=2", "train.lr=3e-4",
                          "train.max_steps=20", "train.eval_every=10", pool=rollout_pool)
    divergences = _evals(config.run_dir, "eval_divergence")  # on the teacher's top 8 and the rest
    assert len(divergences) == 3
    assert divergences[-1] < 0.6 * divergences[0], divergences
    # Judged apart from the run: the full-vocabulary KL(student || teacher), on the
    # student's own greedy answers to held-out prompts, fell too.
    teacher_dir = teacher.run_dir / "final"
    before = _full_reverse_kl(sft_mixed, teacher_dir, rl_data["eval"])
    after = _full_reverse_kl(config.run_dir / "final", teacher_dir, rl_data["eval"])
    assert after < 0.7 * before, (before, after)
    # The student samples from its current weights: without a sync after each update the
    # engines would serve the start model and the gap would grow step after step.
    rows = step_rows(config.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert max(r["logprob_diff_max"] for r in rows) < 1e-4, [r["logprob_diff_max"] for r in rows]
    timing = summary["timing_s_per_step"]
    _check_timings(timing)
    assert timing["teacher"] > 0.001 and timing["score"] < 0.01, timing  # no rewards: nothing scored
    assert "final_eval_reward" not in summary  # no rewards in this run, so none is reported


@pytest.mark.parametrize("staleness", [0, 1])
def test_killed_worker_resumes_with_the_same_remaining_prompts(sft_mixed, rl_data, tmp_path, rollout_pool, staleness):
    steps, save_every = 12, 4
    args = ["rewards.rewards=[{fn: exact_match}]", f"train.max_steps={steps}", f"train.save_every={save_every}",
            "cluster.max_failures=2", "cluster.num_workers=2", "algo.prompts_per_step=4", "algo.eval_prompts=8",
            f"rollout.max_staleness={staleness}"]
    with kill_a_worker_after_checkpoint(tmp_path / "crash", save_every) as killed:
        config, summary = _rl(tmp_path, "crash", sft_mixed, rl_data, "grpo", *args, pool=rollout_pool)
    assert killed, "no worker was killed"

    rows = metric_rows(config.run_dir)
    resumes = [r for r in rows if r.get("event") == "resume"]
    assert resumes and resumes[0]["step"] % save_every == 0 and resumes[0]["step"] > 0, resumes
    assert resumes[0]["prompts_seen"] == resumes[0]["step"] * 4 * 2
    logged = {r["step"]: r["prompt_digest"] for r in rows if "prompt_digest" in r}
    assert sorted(logged) == list(range(1, steps + 1))
    # Every step, before and after the restart, drew the prompts of an uninterrupted run.
    plan = plan_steps(600, 4, 1, 2, 1.0, steps)
    batches = [StepBatches(plan, rank, config.data.seed + config.train.seed) for rank in range(2)]
    expected = {s + 1: sum(digest([i for m in b.micro_batches(s) for i in m]) for b in batches)
                for s in range(steps)}
    assert logged == expected
    assert summary["steps"] == steps
    after = [r for r in step_rows(config.run_dir) if r["step"] > resumes[0]["step"]]
    assert len(after) == steps - resumes[0]["step"]
    if staleness == 0:
        # The restarted workers re-sync the engines, which served weights newer than the
        # checkpoint: every step after the resume samples from the trainer's weights.
        assert max(r["logprob_diff_max"] for r in after) < 1e-4, [r["logprob_diff_max"] for r in after]
    # Each step trained on samples of the weight version an uninterrupted run would use:
    # after the resume, the samples in flight at the checkpoint (not new ones from the
    # checkpoint's weights), then requests at the re-synced checkpoint weights.
    by_step = {r["step"]: r["staleness_max"] for r in step_rows(config.run_dir)}
    assert by_step == {s: float(min(s - 1, staleness)) for s in range(1, steps + 1)}, by_step
