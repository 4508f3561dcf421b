"""`rayft generate` as a user runs it: every prompt answered, best-of-n by a reward. The runs
join the session's Ray cluster (as `rayft generate` on a cluster's head node would)
instead of starting one each."""

import json

from tests.e2e.cli import rayft


def test_generate_best_of_n_with_a_rule_reward(tmp_path, ray_address):
    rayft("init-model", "--preset", "tiny", "--out", tmp_path / "model")
    rayft("data", "synth", "--task", "addition", "--n", "6", "--out", tmp_path / "prompts.jsonl")
    proc = rayft("generate", tmp_path / "model", "--prompts", tmp_path / "prompts.jsonl", "--out",
                 tmp_path / "out.jsonl", "--engine", "hf", "--n", "3", "--max-new-tokens", "6",
                 "--reward", "length_penalty", "--reward", "exact_match=2", env={"RAY_ADDRESS": ray_address})
    assert "tokens/s" in proc.stdout
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["responses"]) == 3 for r in rows)
    assert rows[0]["reference"] and rows[0]["prompt"][0]["role"] == "user"
    for row in rows:
        assert row["best_reward"] == max(row["rewards"])
        assert row["best"] == row["responses"][row["rewards"].index(row["best_reward"])]


def test_generate_refuses_a_classifier_and_a_bad_reward(tmp_path):
    rayft("init-model", "--preset", "tiny", "--out", tmp_path / "model")
    rayft("data", "synth", "--task", "addition", "--n", "2", "--out", tmp_path / "p.jsonl")
    proc = rayft("generate", tmp_path / "model", "--prompts", tmp_path / "p.jsonl", "--out", tmp_path / "o.jsonl",
                 "--engine", "hf", "--reward", "no_such_module:fn", check=False)
    assert proc.returncode == 2 and "no_such_module" in proc.stderr and "Traceback" not in proc.stderr
