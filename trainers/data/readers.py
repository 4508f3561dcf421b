"""Reading raw rows out of data files: `read_rows(path)` yields (line, row dict).

Supported: .jsonl, .json (an array, or an object with a list under "data" or "rows"),
.csv, .parquet, and a directory written by `datasets.Dataset.save_to_disk` (for a
DatasetDict, its "train" split). The line number is what a user looks up to fix a row:
the physical line for jsonl and csv, the 1-based row index for json, parquet and
datasets.

`iter_rows(path)` is the same walk but hands a malformed row (invalid JSON, not an
object, too many CSV cells) back as a `DataError` value instead of raising it, so the
loader can skip it and go on when the user asked to skip bad rows.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable, Iterator

from trainers.errors import DataError, UserError

Rows = Iterator[tuple[int, dict]]
RowsOrErrors = Iterator[tuple[int, "dict | DataError"]]


def read_rows(path: str | Path) -> Rows:
    """Every row of the file at `path` as (line, dict), lazily; a malformed row raises DataError."""
    return _raising(iter_rows(path))  # iter_rows checks the path now, not at the first row


def _raising(rows: RowsOrErrors) -> Rows:
    for line, row in rows:
        if isinstance(row, DataError):
            raise row
        yield line, row


def iter_rows(path: str | Path) -> RowsOrErrors:
    """Like `read_rows`, but a malformed row comes back as a DataError in place of its dict."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: data file not found")
    if path.is_dir():
        return _read_dataset_dir(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"{path}: unknown data file type '{path.suffix}'; "
                        f"use {', '.join(READERS)} or a saved `datasets` directory")
    return _utf8_only(path, reader(path))


def _utf8_only(path: Path, rows: RowsOrErrors) -> RowsOrErrors:
    try:
        yield from rows
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None


def _as_object(path: Path, line: int, row: object) -> "dict | DataError":
    if isinstance(row, dict) or isinstance(row, DataError):
        return row
    return DataError(path, line, f"row must be a JSON object, got {type(row).__name__}")


def _read_jsonl(path: Path) -> RowsOrErrors:
    with open(path, encoding="utf-8-sig") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                row = DataError(path, line, f"invalid JSON: {e.msg} (column {e.colno})")
            yield line, _as_object(path, line, row)


def _read_json(path: Path) -> RowsOrErrors:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(data, dict):
        data = next((data[k] for k in ("data", "rows") if isinstance(data.get(k), list)), None)
    if not isinstance(data, list):
        raise DataError(path, None, "expected a JSON array of rows, or an object with a 'data' or 'rows' list")
    return ((line, _as_object(path, line, row)) for line, row in enumerate(data, 1))


def _read_csv(path: Path) -> RowsOrErrors:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        end = reader.line_num
        for values in reader:
            # A quoted cell can span lines; the row starts on the line after the previous one ended.
            start, end = end + 1, reader.line_num
            if not values:
                continue
            if len(values) > len(header):
                problem = f"has {len(values)} values but the header has {len(header)} columns"
                yield start, DataError(path, start, problem)
            else:
                # CSV cannot tell an absent value from an empty one; read empty cells as
                # absent so optional columns (input, system, history) may be left blank.
                yield start, {k: v for k, v in zip(header, values) if v != ""}


def _read_parquet(path: Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    line = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            line += 1
            yield line, row


def _read_dataset_dir(path: Path) -> Rows:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: a directory, but not one saved by `datasets` (save_to_disk)") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise UserError(f"{path}: dataset has no 'train' split (splits: {', '.join(data)})")
        data = data["train"]
    return enumerate(data, 1)


READERS: dict[str, Callable[[Path], RowsOrErrors]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}
