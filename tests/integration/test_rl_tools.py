"""GRPO with the calculator environment on the real engines (examples/grpo_tools.yaml,
shortened): a start model that greedily answers at once, and so wrongly, learns to call
the tool; held-out episode success, judged by the environment against the reference,
rises by at least 20 points, and the held-out episodes become two-turn."""

from tests.integration.runs import metric_rows, train, write_rows
from trainers.data.synth import synth_rows


def test_grpo_learns_to_call_the_calculator(ray_cluster, tiny_base_dir, tmp_path):
    transcripts = write_rows(tmp_path / "calculator_sft.jsonl", synth_rows("calculator_sft", 3000, seed=1))
    sft, _ = train(tmp_path, "sft-tools", tiny_base_dir, f"data.train=[{transcripts}]", "data.max_length=128",
                   "train.max_steps=900", "train.batch_size=16", "train.lr=2e-3", "train.scheduler=constant",
                   "train.eval_every=0", "train.save_every=0")
    prompts = write_rows(tmp_path / "calculator.jsonl", synth_rows("calculator", 800, seed=2))
    held_out = write_rows(tmp_path / "calculator_eval.jsonl", synth_rows("calculator", 64, seed=3))
    steps = 10
    config, summary = train(tmp_path, "grpo-tools", sft.run_dir / "final", "method=grpo", f"data.train=[{prompts}]",
                            f"data.eval=[{held_out}]", "algo.prompts_per_step=8", "algo.samples_per_prompt=8",
                            "algo.max_new_tokens=80", "algo.eval_prompts=64", "rollout.environment=rayft:calculator",
                            "rollout.env_params={describe_tools: false}", "rollout.max_turns=3", "train.lr=5e-4",
                            "train.scheduler=constant", "train.warmup_ratio=0", f"train.max_steps={steps}",
                            f"train.eval_every={steps}")
    rows = metric_rows(config.run_dir)
    evals = [r for r in rows if "eval_success" in r]
    assert [r["step"] for r in evals] == [0, steps]
    assert evals[0]["eval_turns"] == 1.0 and evals[0]["eval_success"] < 0.1, evals  # answers at once, wrongly
    assert evals[-1]["eval_success"] >= evals[0]["eval_success"] + 0.2, evals
    assert evals[-1]["eval_turns"] > 1.5, evals                                     # now through the tool
    trained = [r for r in rows if "turns" in r and "event" not in r]
    assert len(trained) == steps and trained[-1]["turns"] > trained[0]["turns"]
    assert max(r["logprob_diff_max"] for r in trained) < 1e-4, [r["logprob_diff_max"] for r in trained]
    assert summary["steps"] == steps
