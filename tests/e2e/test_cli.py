"""The CLI as a user runs it: real subprocesses, exit codes and one-line errors."""

import json

import pytest

from tests.e2e.cli import ROOT, rayft


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    rayft("init-model", "--preset", "tiny", "--out", ws / "models/tiny")
    rayft("data", "synth", "--task", "addition", "--n", "400", "--out", ws / "data/addition.jsonl")
    write_dataset_info(ws / "data")
    return ws


def write_dataset_info(root):
    """A LLaMA-Factory style dataset_info.json: an alpaca and a sharegpt entry, own column names."""
    qa = [{"question": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(40)]
    talks = [{"dialog": [{"speaker": "customer", "text": f"Say {i}."}, {"speaker": "agent", "text": str(i)}]}
             for i in range(40)]
    (root / "qa.json").write_text(json.dumps(qa))
    (root / "talks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in talks))
    (root / "dataset_info.json").write_text(json.dumps({
        "qa": {"file_name": "qa.json", "columns": {"prompt": "question", "response": "answer"}},
        "talks": {"file_name": "talks.jsonl", "formatting": "sharegpt", "columns": {"messages": "dialog"},
                  "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "customer",
                           "assistant_tag": "agent"}}}))


def test_help_on_every_command():
    for args in (["--help"], ["train", "--help"], ["data", "check", "--help"], ["data", "synth", "--help"],
                 ["init-model", "--help"], ["reward", "test", "--help"]):
        proc = rayft(*args)
        assert "usage:" in proc.stdout and len(proc.stdout) > 200


def test_data_check_human_and_json(workspace):
    proc = rayft("data", "check", workspace / "data/addition.jsonl", "--tokenizer", workspace / "models/tiny",
                 "--show", "1")
    assert "chat" in proc.stdout and "400" in proc.stdout and "«" in proc.stdout
    report = json.loads(rayft("data", "check", workspace / "data/addition.jsonl", "--json").stdout)
    assert report["rows"] == 400 and report["format"] == "chat"


def test_bad_data_row_exits_2_naming_file_line_field(workspace):
    bad = workspace / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n'
                   '{"instruction": "e"}\n')
    proc = rayft("data", "check", bad, check=False)
    assert proc.returncode == 2
    assert "bad.jsonl:3" in proc.stderr and "output" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    ok = rayft("data", "check", bad, "--skip-bad-rows")
    assert "1" in ok.stdout and "skipped" in ok.stdout


def test_bad_config_exits_2_naming_key(workspace):
    proc = rayft("train", ROOT / "examples/sft_lora.yaml", "train.lr=fast", cwd=workspace, check=False)
    assert proc.returncode == 2 and "train.lr" in proc.stderr and "Traceback" not in proc.stderr
    proc = rayft("train", ROOT / "examples/sft_lora.yaml", "train.learning_rate=1", cwd=workspace, check=False)
    assert proc.returncode == 2 and "train.learning_rate" in proc.stderr


def test_train_from_cli_writes_run_dir(workspace):
    proc = rayft("train", ROOT / "examples/sft_lora.yaml", "name=cli", "train.max_steps=6",
                 "train.eval_every=3", "train.save_every=3", "data.train=[data/addition.jsonl, qa, talks]",
                 "data.dataset_info=data/dataset_info.json", cwd=workspace)
    run = workspace / "runs/cli"
    assert "run directory: runs/cli" in proc.stdout
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "report.html", "final/adapter_config.json"):
        assert (run / name).exists(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6
    assert summary["train_samples"] > 400  # 90% of each source: the file's 400 rows alone give 360
