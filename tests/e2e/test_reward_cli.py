"""`rayft reward test` as a user runs it: rewards from flags, a rewards file and a run
config, per-row rewards with their reasons (human and --json), token counts from a
tokenizer, and malformed rows named by file, line and field."""

import json

import yaml

from tests.e2e.cli import assert_one_line_error, rayft

ADD_TESTS = "assert add(1, 2) == 3\nassert add(2, 2) == 4"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_code_rows_are_scored_with_reasons(tmp_path):
    samples = write_jsonl(tmp_path / "samples.jsonl", [
        {"prompt": "Write add(a, b).", "response": "```python\ndef add(a, b):\n    return a + b\n```",
         "reference": ADD_TESTS},
        {"messages": [{"role": "user", "content": "Write add."}], "response": "while True:\n    pass",
         "reference": ADD_TESTS},
        {"prompt": "Write add(a, b).", "response": "import os\nos.fork()\ndef add(a, b): return a + b",
         "reference": ADD_TESTS},
        {"prompt": "Write add(a, b).", "response": "def add(a, b): return a * b", "reference": ADD_TESTS},
    ])
    spec = tmp_path / "rewards.yaml"
    spec.write_text(yaml.safe_dump({"rewards": [{"fn": "code_tests", "params": {"timeout_s": 1, "partial": True}},
                                                {"fn": "format", "weight": 0.5, "name": "one_line"}]}))
    rows = [json.loads(line) for line in rayft("reward", "test", "--reward", spec, "--samples", samples,
                                              "--json").stdout.splitlines()]
    assert [row["line"] for row in rows] == [1, 2, 3, 4]
    assert [row["terms"]["code_tests"] for row in rows] == [1.0, 0.0, 0.0, 0.5]
    assert [row["terms"]["one_line"] for row in rows] == [0.0, 0.0, 0.0, 1.0]
    assert [row["reward"] for row in rows] == [1.0, 0.0, 0.0, 1.0]   # code_tests + 0.5 * one_line
    assert rows[0]["reasons"]["code_tests"] == "passed 2/2 tests"
    assert rows[1]["reasons"]["code_tests"] == "timeout: ran past 1 s"
    assert rows[2]["reasons"]["code_tests"].startswith("refused action in the solution (line 2)")
    assert rows[3]["reasons"]["code_tests"] == "passed 1/2 tests; failed test 1/2 (line 1)"
    assert rows[3]["reason"] == "code_tests 0.5 (passed 1/2 tests; failed test 1/2 (line 1)); one_line 1"
    human = rayft("reward", "test", "--reward", spec, "--samples", samples).stdout
    assert "line 2: reward 0\n  code_tests 0  (timeout: ran past 1 s)\n  one_line 0" in human
    assert human.strip().endswith("4 rows, mean reward 0.5")


def test_flags_and_a_run_config_with_its_tokenizer(tmp_path, tiny_model_dir, tiny_tokenizer):
    long = "the answer is " * 8
    samples = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "1 + 1?", "response": "2", "reference": "2"},
                                                 {"prompt": "1 + 2?", "response": long, "answer": 3}])
    rows = [json.loads(line) for line in rayft("reward", "test", "--reward", "exact_match", "--reward",
                                              "length_penalty=2", "--samples", samples, "--json").stdout.splitlines()]
    assert [row["reward"] for row in rows] == [1.0, 0.0]   # 112 characters: within length_penalty's 256
    config = {"method": "grpo", "name": "t", "model": {"path": str(tiny_model_dir)},
              "data": {"train": [str(samples)]},
              "rewards": {"rewards": [{"fn": "overlong_penalty", "params": {"max_tokens": 16, "buffer": 8}}]}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    rows = [json.loads(line) for line in rayft("reward", "test", "--reward", tmp_path / "run.yaml", "--samples",
                                              samples, "--json", cwd=tmp_path).stdout.splitlines()]
    tokens = len(tiny_tokenizer(long, add_special_tokens=False)["input_ids"])
    expected = 0.0 if tokens <= 8 else -1.0 if tokens >= 16 else (8 - tokens) / 8
    assert tokens > 8 and rows[0]["reward"] == 0.0 and rows[1]["reward"] == expected


def test_errors_name_the_row_or_the_key(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "response": "a"}, {"prompt": "q", "reply": "a"}])
    assert_one_line_error(rayft("reward", "test", "--reward", "exact_match", "--samples", bad, check=False),
                          f"{bad}:2: field 'response': is missing")
    spec = tmp_path / "r.yaml"
    spec.write_text(yaml.safe_dump({"rewards": [{"fn": "code_tests", "params": {"timeout_s": -1}}]}))
    assert_one_line_error(rayft("reward", "test", "--reward", spec, "--samples", bad, check=False),
                          "reward 'code_tests': timeout_s must be")
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "q", "response": "a", "reference": "a"},
                                                 {"prompt": "q", "response": "a"}])
    proc = rayft("reward", "test", "--reward", "exact_match", "--samples", good, check=False)
    assert proc.returncode == 2
    assert "line 1: reward 1" in proc.stdout
    assert "line 2: error: reward 'exact_match' raised on this row" in proc.stdout
    assert "a reward raised on 1 (a run would stop at the first)" in proc.stdout
