"""From config to datasets, the synthetic tasks, and the `data check` report."""

from __future__ import annotations

import json
import re

import pytest

from trainers.config import DataConfig, DataSource
from trainers.data import TASKS, build_datasets, check_file, format_check, load_records, synth_rows, write_synth
from trainers.data.records import IGNORE_INDEX, Conversation, Example, Prompt
from trainers.data.synth import exact_match
from trainers.errors import UserError


@pytest.fixture(scope="module")
def synth_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return {task: write_synth(task, 60, root / "nested" / f"{task}.jsonl", seed=1) for task in TASKS}


def test_synth_is_deterministic_and_correct():
    assert synth_rows("addition", 20, seed=4) == synth_rows("addition", 20, seed=4)
    assert synth_rows("addition", 20, seed=4) != synth_rows("addition", 20, seed=5)
    for row in synth_rows("addition", 50):
        a, b = map(int, re.fullmatch(r"What is (\d\d) \+ (\d\d)\?", row["messages"][0]["content"]).groups())
        assert row["messages"][1]["content"] == row["reference"] == str(a + b)
    for row in synth_rows("reverse", 50):
        word = re.fullmatch(r"Reverse: ([a-z]{3,6})", row["messages"][0]["content"]).group(1)
        assert row["messages"][1]["content"] == row["reference"] == word[::-1]


def test_synth_file_parses_for_sft_and_rl(synth_files):
    path = synth_files["addition"]
    assert path.parent.name == "nested"
    assert json.loads(path.read_text().splitlines()[0])["reference"]
    sft = load_records(path)
    assert sft.format == "chat" and len(sft.records) == 60 and isinstance(sft.records[0], Conversation)
    prompts = load_records(path, purpose="prompt").records
    assert isinstance(prompts[0], Prompt) and len(prompts[0].prompt_messages) == 1
    assert prompts[0].reference == sft.records[0].messages[-1]["content"]


def test_synth_unknown_task_and_exact_match():
    with pytest.raises(UserError, match="addition, small_addition, small_addition_mixed, reverse"):
        synth_rows("multiplication", 3)
    assert exact_match(" 68\n", "68") and not exact_match("6 8", "68")


def config(files, **kw) -> DataConfig:
    return DataConfig(train=[DataSource(path=str(files["addition"]), weight=3.0),
                             DataSource(path=str(files["reverse"]), weight=1.0)], **kw)


def test_build_splits_mixes_and_counts(synth_files, tiny_tokenizer):
    data = build_datasets(config(synth_files, eval_fraction=0.1, max_length=64), tiny_tokenizer)
    stats = data.stats
    assert [(s["format"], s["rows"], s["skipped"]) for s in stats["sources"]] == [("chat", 60, 0)] * 2
    assert stats["eval_samples"] == len(data.eval) == 12  # 6 held out of each source
    assert stats["train_samples"] == len(data.train) == 108
    assert all(isinstance(e, Example) for e in data.train + data.eval)
    additions = sum("+" in tiny_tokenizer.decode(e.input_ids) for e in data.train)
    assert additions == 81  # 3:1 by weight out of 108
    assert stats["truncated"] == 0
    assert stats["train_tokens"] == sum(len(e.input_ids) for e in data.train)
    assert stats["trained_tokens"] == sum(sum(x != IGNORE_INDEX for x in e.labels) for e in data.train) > 0
    again = build_datasets(config(synth_files, eval_fraction=0.1, max_length=64), tiny_tokenizer)
    assert [e.input_ids for e in again.train] == [e.input_ids for e in data.train]


def test_build_packs_and_uses_explicit_eval(synth_files, tiny_tokenizer):
    cfg = config(synth_files, eval=[DataSource(path=str(synth_files["reverse"]))], packing=True, max_length=128)
    data = build_datasets(cfg, tiny_tokenizer)
    assert data.stats["eval_samples"] == 60 and data.stats["train_samples"] == 120
    assert len(data.train) < 120 and data.stats["train_sequences"] == len(data.train)
    assert all(len(e.input_ids) <= 128 and sum(e.seq_lens) == len(e.input_ids) for e in data.train + data.eval)
    assert any(len(e.seq_lens) > 1 for e in data.eval)


def test_build_truncation_and_template_override(synth_files, tiny_tokenizer):
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                "{% if m['role'] == 'assistant' %}<|im_end|>{% endif %}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    cfg = config(synth_files, max_length=12, truncation_side="left", chat_template=template, eval_fraction=0.0)
    data = build_datasets(cfg, tiny_tokenizer)
    assert data.stats["truncated"] > 0 and data.eval == []
    assert all(len(e.input_ids) <= 12 for e in data.train)
    assert "[assistant]" in tiny_tokenizer.decode(data.train[0].input_ids)


def test_build_drops_samples_left_without_answer(tmp_path, tiny_tokenizer):
    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "word " * 40, "completion": "yes"}, {"prompt": "Hi", "completion": "Hello!"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = build_datasets(DataConfig(train=[DataSource(path=str(path))], eval_fraction=0.0, max_length=16),
                          tiny_tokenizer)
    assert data.stats["dropped_no_labels"] == 1 and len(data.train) == 1


def test_build_other_purposes_keep_records(synth_files, tiny_tokenizer):
    data = build_datasets(config(synth_files), tiny_tokenizer, purpose="prompt")
    assert all(isinstance(r, Prompt) and r.reference for r in data.train + data.eval)
    assert data.stats["train_samples"] == len(data.train)


def test_build_skip_bad_rows(tmp_path, tiny_tokenizer):
    path = tmp_path / "mixed.jsonl"
    good = {"prompt": "Hi", "completion": "Hello!"}
    path.write_text("".join(json.dumps(r) + "\n" for r in [good, {"prompt": "Hi", "completion": 3}, good]))
    cfg = DataConfig(train=[DataSource(path=str(path))], eval_fraction=0.0, skip_bad_rows=True)
    source = build_datasets(cfg, tiny_tokenizer).stats["sources"][0]
    assert (source["rows"], source["skipped"]) == (2, 1)
    assert source["errors"][0].startswith(f"{path}:2: field 'completion'")


def test_check_file_report(synth_files, tiny_tokenizer):
    report = check_file(synth_files["reverse"], tokenizer=tiny_tokenizer, max_length=16, show=2)
    assert (report["format"], report["rows"], report["skipped"]) == ("chat", 60, 0)
    stats = report["token_stats"]
    assert set(stats) == {"min", "mean", "p50", "p95", "max"}
    assert stats["min"] <= stats["p50"] <= stats["p95"] <= stats["max"]
    assert len(report["samples"]) == 2 and "«" in report["samples"][0] and "»" in report["samples"][0]
    json.dumps(report)
    text = format_check(report)
    assert re.search(r"^format +chat$", text, re.M) and re.search(r"^rows +60$", text, re.M)
    assert "p95" in text and "--- sample 2" in text


def test_check_file_truncated_count_and_no_tokenizer(synth_files, tiny_tokenizer):
    full = check_file(synth_files["addition"], tokenizer=tiny_tokenizer, max_length=10_000)
    limit = full["token_stats"]["p50"]
    report = check_file(synth_files["addition"], tokenizer=tiny_tokenizer, max_length=limit)
    assert full["truncated"] == 0 and 0 < report["truncated"] < 60
    bare = check_file(synth_files["addition"], show=1)
    assert bare["token_stats"] is None and bare["truncated"] is None
    assert json.loads(bare["samples"][0])["messages"][0]["role"] == "user"
    assert "tokens" not in format_check(bare)
