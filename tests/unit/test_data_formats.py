"""Every row format: detection, normalisation, conversion per purpose, and the error for
each kind of malformed row (file, line and field named)."""

from __future__ import annotations

import json

import pytest

from trainers.data import load_records
from trainers.data.fields import RowError
from trainers.data.formats import FORMATS, detect_format, parse_row
from trainers.data.records import Conversation, Labelled, Preference, Prompt, RawText, Scored
from trainers.errors import DataError, UserError


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# (row, detected format, purpose, expected record without origin)
CASES = [
    ({"instruction": "Add the numbers.", "input": "23 + 45", "output": "68", "system": "Be brief.",
      "history": [["Hi", "Hello!"]]},
     "alpaca", "sft",
     Conversation([user("Hi"), assistant("Hello!"), user("Add the numbers.\n\n23 + 45"), assistant("68")],
                  system="Be brief.")),
    ({"instruction": "Name a prime.", "input": "", "output": "7", "domain": "math"},
     "domain", "sft", Conversation([user("Name a prime."), assistant("7")], domain="math")),
    ({"instruction": "What is 2 + 3 * 4?", "input": "", "chain_of_thought": ["3 * 4 = 12", "2 + 12 = 14"],
      "output": "14"},
     "cot", "sft",
     Conversation([user("What is 2 + 3 * 4?"), assistant("Step 1: 3 * 4 = 12\nStep 2: 2 + 12 = 14\nAnswer: 14")])),
    ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                        {"from": "gpt", "value": "Hello!"}, {"from": "user", "value": "Bye"},
                        {"from": "bot", "value": "Bye!"}]},
     "sharegpt", "sft",
     Conversation([user("Hi"), assistant("Hello!"), user("Bye"), assistant("Bye!")], system="Be brief.")),
    ({"messages": [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!")]},
     "chat", "sft", Conversation([user("Hi"), assistant("Hello!")], system="Be brief.")),
    ({"conversations": [user("Hi"), assistant("Hello!")]},
     "chat", "sft", Conversation([user("Hi"), assistant("Hello!")])),
    ({"dialogue": [user("Hi"), assistant("Hello!")]}, "chat", "sft", Conversation([user("Hi"), assistant("Hello!")])),
    ({"prompt": "The capital of France is", "completion": "Paris."},
     "completion", "sft", Conversation([user("The capital of France is"), assistant("Paris.")])),
    ({"text": "Once upon a time."}, "text", "sft", RawText("Once upon a time.")),
    ({"text": "great movie", "label": 1}, "classification", "classification", Labelled("great movie", "1")),
    ({"prompt": "Say hi", "chosen": "Hello!", "rejected": "Go away.", "margin": 1.5},
     "preference", "preference", Preference([user("Say hi")], "Hello!", "Go away.", margin=1.5)),
    ({"chosen": [user("Say hi"), assistant("Hello!")], "rejected": [user("Say hi"), assistant("No.")]},
     "preference", "preference", Preference([user("Say hi")], "Hello!", "No.")),
    ({"input": "Say hi", "output": "Hello!", "reward_score": 0.9},
     "scored", "scored", Scored([user("Say hi")], "Hello!", 0.9)),
    ({"prompt": [user("Say hi")], "response": "Hello!", "score": "2"},
     "scored", "scored", Scored([user("Say hi")], "Hello!", 2.0)),
    ({"prompt": "What is 2 + 2?", "answer": 4}, "prompt", "prompt", Prompt([user("What is 2 + 2?")], reference="4")),
    ({"messages": [user("What is 2 + 2?"), assistant("4")]},
     "chat", "prompt", Prompt([user("What is 2 + 2?")], reference="4")),
    ({"messages": [user("What is 2 + 2?"), assistant("four")], "reference": "4"},
     "chat", "prompt", Prompt([user("What is 2 + 2?")], reference="4")),
    ({"instruction": "What is 2 + 2?", "system": "Be brief."},
     "alpaca", "prompt", Prompt([{"role": "system", "content": "Be brief."}, user("What is 2 + 2?")])),
    ({"instruction": "2 + 2?", "chain_of_thought": ["add"], "output": "4"},
     "cot", "prompt", Prompt([user("2 + 2?")], reference="4")),
]


@pytest.mark.parametrize("row,fmt,purpose,expected", CASES, ids=[f"{c[1]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_row_is_detected_and_normalised(row, fmt, purpose, expected):
    assert detect_format(row) == fmt
    record = parse_row(fmt, row, "data.jsonl", 7, purpose)
    assert record.origin == "data.jsonl:7"
    record.origin = ""
    assert record == expected


def test_every_format_has_a_case():
    assert {c[1] for c in CASES} == set(FORMATS)


@pytest.mark.parametrize("row,fmt,purpose", [(c[0], c[1], c[2]) for c in CASES if c[1] not in {"alpaca", "chat", "cot"}
                                              or c[2] != "prompt"])
def test_a_file_of_any_format_is_checked_without_naming_its_purpose(tmp_path, row, fmt, purpose):
    """`rayft data check FILE` with no --purpose: the detected format says what the rows are
    for (a conversation read as RL prompts still needs --purpose prompt)."""
    from trainers.data import check_file

    report = check_file(write_jsonl(tmp_path / "rows.jsonl", [row, row]))
    assert (report["format"], report["purpose"], report["rows"]) == (fmt, purpose, 2)
    assert load_records(tmp_path / "rows.jsonl", purpose="auto").purpose == purpose


def test_unrecognised_row():
    with pytest.raises(RowError, match="no known format"):
        detect_format({"question": "?"})


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD_ALPACA = {"instruction": "Say hi", "output": "Hello!"}
GOOD_CHAT = {"messages": [user("Hi"), assistant("Hello!")]}
GOOD_SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
GOOD_PREF = {"prompt": "Say hi", "chosen": "Hello!", "rejected": "No."}

# (good row for lines 1-2, bad row on line 3, purpose, field named, words in the message)
BAD_ROWS = [
    (GOOD_ALPACA, {"instruction": "Say hi"}, "sft", "output", "is missing"),
    (GOOD_ALPACA, {"instruction": "Say hi", "output": 68}, "sft", "output", "must be a string, got a number"),
    (GOOD_ALPACA, {"instruction": "Say hi", "output": ["a"]}, "sft", "output", "must be a string, got a list"),
    (GOOD_ALPACA, {"instruction": " ", "output": "x"}, "sft", "instruction", "is empty"),
    (GOOD_ALPACA, {"instruction": "Hi", "output": "x", "history": [["only one"]]}, "sft", "history[0]", "pair"),
    (GOOD_CHAT, {"messages": []}, "sft", "messages", "empty conversation"),
    (GOOD_CHAT, {"messages": "Hi"}, "sft", "messages", "must be a list"),
    (GOOD_CHAT, {"messages": [user("Hi"), {"role": "narrator", "content": "x"}]}, "sft", "messages[1].role",
     "unknown role 'narrator'"),
    (GOOD_CHAT, {"messages": [user("Hi"), {"content": "x"}]}, "sft", "messages[1].role", "is missing"),
    (GOOD_CHAT, {"messages": [user("Hi"), assistant("")]}, "sft", "messages[1].content", "is empty"),
    (GOOD_CHAT, {"messages": [user("Hi"), assistant("Hello!"), user("And?")]}, "sft", "messages",
     "must end with an assistant turn"),
    (GOOD_CHAT, {"messages": [user("Hi"), {"role": "system", "content": "late"}, assistant("x")]}, "sft",
     "messages[1].role", "only allowed first"),
    (GOOD_CHAT, {"messages": [{"role": "system", "content": "Only me."}]}, "sft", "messages", "no user or assistant"),
    (GOOD_CHAT, {"messages": [assistant("x")]}, "prompt", "messages", "no turns before"),
    (GOOD_SHAREGPT, {"conversations": [{"from": "alien", "value": "x"}]}, "sft", "conversations[0].from",
     "unknown role"),
    (GOOD_SHAREGPT, {"conversations": [{"from": "human", "value": None}]}, "sft", "conversations[0].value",
     "is missing"),
    ({"instruction": "a", "chain_of_thought": ["s"], "output": "b"},
     {"instruction": "a", "chain_of_thought": "one step", "output": "b"}, "sft", "chain_of_thought", "must be a list"),
    ({"instruction": "a", "output": "b", "domain": "math"}, {"instruction": "a", "output": "b", "domain": 3},
     "sft", "domain", "must be a string"),
    (GOOD_PREF, {"prompt": "Say hi", "chosen": "Hello!"}, "preference", "rejected", "is missing"),
    (GOOD_PREF, {"prompt": "Say hi", "chosen": [user("Hi")], "rejected": "No."}, "preference", "chosen",
     "no assistant turn"),
    (GOOD_PREF, {"prompt": "Say hi", "chosen": "a", "rejected": "b", "margin": "big"}, "preference", "margin",
     "must be a number"),
    ({"input": "a", "output": "b", "score": 1}, {"input": "a", "output": "b", "score": "high"}, "scored", "score",
     "must be a number"),
    ({"input": "a", "output": "b", "score": 1}, {"output": "b", "score": 1}, "scored", "prompt/input/messages",
     "is missing"),
    ({"text": "a", "label": "pos"}, {"text": "a", "label": ["pos"]}, "classification", "label",
     "must be a string or an integer"),
    ({"text": "a"}, {"text": None}, "sft", "text", "is missing"),
    ({"prompt": "a"}, {"prompt": {"x": 1}}, "prompt", "prompt", "must be a string"),
]


@pytest.mark.parametrize("good,bad,purpose,field,words", BAD_ROWS, ids=[c[3] + "-" + c[4] for c in BAD_ROWS])
def test_bad_row_names_file_line_and_field(tmp_path, good, bad, purpose, field, words):
    path = write_jsonl(tmp_path / "rows.jsonl", [good, good, bad])
    with pytest.raises(DataError) as err:
        load_records(path, purpose=purpose)
    message = str(err.value)
    assert message.startswith(f"{path}:3: field '{field}': ")
    assert words in message
    assert (err.value.line, err.value.field) == (3, field)


def test_invalid_json_line(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD_CHAT, "", '{"messages": [}'])
    with pytest.raises(DataError, match=r"rows\.jsonl:3: invalid JSON"):
        load_records(path)


def test_row_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD_CHAT, GOOD_CHAT, "[1, 2]"])
    with pytest.raises(DataError, match=r"rows\.jsonl:3: row must be a JSON object, got list"):
        load_records(path)


def test_first_row_matching_no_format(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"question": "?"}])
    with pytest.raises(DataError, match=r"rows\.jsonl:1: no known format .*fields: question"):
        load_records(path)


def test_skip_bad_rows_counts_and_keeps_messages(tmp_path):
    rows = [{"question": "?"}, GOOD_CHAT, "{broken", {"messages": []}, GOOD_CHAT, {"messages": [user("x")]}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    result = load_records(path, skip_bad_rows=True)
    assert result.format == "chat"
    assert len(result.records) == 2 and result.skipped == 4
    assert [r.origin for r in result.records] == [f"{path}:2", f"{path}:5"]
    assert len(result.errors) == 4 and result.errors[1].startswith(f"{path}:3: invalid JSON")


def test_format_is_fixed_by_first_valid_row(tmp_path):
    # Row 2 alone would look like plain text; as part of a chat file it is a bad chat row.
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD_CHAT, {"text": "stray"}])
    with pytest.raises(DataError, match="field 'messages/conversations/dialogue': is missing"):
        load_records(path)


def test_explicit_format_and_domain_override(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "a", "output": "b", "domain": "x"}])
    result = load_records(path, fmt="instruction", domain="law")
    assert result.format == "alpaca" and result.records[0].domain == "law"


@pytest.mark.parametrize("kwargs,words", [
    (dict(fmt="tsv"), "unknown data format 'tsv'"),
    (dict(purpose="preference"), "cannot be used for preference data"),
    (dict(purpose="pretraining"), "unknown data purpose"),
])
def test_file_level_user_errors(tmp_path, kwargs, words):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a"}])
    with pytest.raises(UserError, match=words):
        load_records(path, **kwargs)


def test_empty_file_and_all_rows_bad(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="no rows"):
        load_records(empty)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": []}])
    with pytest.raises(UserError, match="all 1 rows are malformed"):
        load_records(bad, skip_bad_rows=True)
