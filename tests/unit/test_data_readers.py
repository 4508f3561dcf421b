"""Each input file type yields the same rows, with the line numbers a user looks up."""

from __future__ import annotations

import json

import pytest

from trainers.data import load_records, read_rows
from trainers.data.readers import iter_rows
from trainers.errors import DataError, UserError

ROWS = [{"instruction": "Say hi", "output": "Hello!"},
        {"instruction": "Say bye", "output": "Bye,\nfriend."}]


def test_jsonl_counts_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n")
    assert list(read_rows(path)) == [(1, ROWS[0]), (4, ROWS[1])]


@pytest.mark.parametrize("wrap", [lambda r: r, lambda r: {"data": r}, lambda r: {"rows": r, "version": 1}])
def test_json_array_or_object(tmp_path, wrap):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(wrap(ROWS), indent=2))
    assert list(read_rows(path)) == [(1, ROWS[0]), (2, ROWS[1])]


def test_json_without_rows(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"items": ROWS}))
    with pytest.raises(DataError, match="'data' or 'rows' list"):
        list(read_rows(path))


def test_csv_reports_physical_lines(tmp_path):
    path = tmp_path / "d.csv"
    # Row 1 holds a quoted newline, so the next row starts on line 4; line 5 is blank.
    path.write_text('instruction,output\n"Say bye","Bye,\nfriend."\nSay hi,Hello!\n\nToo,many,cells\n')
    rows = list(iter_rows(path))
    assert [line for line, _ in rows] == [2, 4, 6]
    assert rows[0][1] == ROWS[1] and rows[1][1] == ROWS[0]
    assert isinstance(rows[2][1], DataError) and str(rows[2][1]).startswith(f"{path}:6: has 3 values")
    with pytest.raises(DataError, match=r"d\.csv:6: has 3 values"):
        list(read_rows(path))


def test_csv_blank_optional_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,input,output,history\nSay hi,,Hello!,\n")
    (record,) = load_records(path).records
    assert record.messages == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello!"}]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert list(read_rows(path)) == [(1, ROWS[0]), (2, ROWS[1])]


def test_datasets_dir_and_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert list(read_rows(tmp_path / "single")) == [(1, ROWS[0]), (2, ROWS[1])]
    assert list(read_rows(tmp_path / "dict")) == [(1, ROWS[0]), (2, ROWS[1])]
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(UserError, match="no 'train' split"):
        read_rows(tmp_path / "no_train")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_type_loads_the_same_records(tmp_path, suffix):
    import pandas as pd

    path = tmp_path / f"d{suffix}"
    frame = pd.DataFrame(ROWS)
    {".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     ".json": lambda: frame.to_json(path, orient="records"),
     ".csv": lambda: frame.to_csv(path, index=False),
     ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    result = load_records(path)
    assert result.format == "alpaca"
    assert [r.messages[-1]["content"] for r in result.records] == ["Hello!", "Bye,\nfriend."]


def test_missing_path_unknown_type_and_plain_dir(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("hi")
    with pytest.raises(UserError, match=r"unknown data file type '\.txt'"):
        read_rows(tmp_path / "d.txt")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not one saved by `datasets`"):
        read_rows(tmp_path / "plain")


def test_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        list(read_rows(path))
