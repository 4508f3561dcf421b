"""Reading raw rows out of data files: `read_rows(path)` yields (line, row dict).

Supported: .jsonl, .json (an array, or an object with a list under "data" or "rows"),
.csv, .parquet, and a directory written by `datasets.Dataset.save_to_disk` (for a
DatasetDict, its "train" split). The line number is what a user looks up to fix a row:
the physical line for jsonl and csv, the 1-based row index for json, parquet and
datasets.

`iter_rows(path)` is the same walk but hands a malformed row (invalid JSON, not an
object, too many CSV cells) back as a `DataError` value instead of raising it, so the
loader can skip it and go on when the user asked to skip bad rows.

`plan_pieces(path)` cuts a file into `Piece`s that separate processes can read alone
(`iter_rows(path, piece)`), each knowing the line its rows start at, so a row's line
is the same whichever process reads it: byte ranges ending on a newline for .jsonl, runs
of row groups for .parquet; other files are one piece.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from trainers.errors import DataError, UserError

Rows = Iterator[tuple[int, dict]]
RowsOrErrors = Iterator[tuple[int, "dict | DataError"]]

PIECE_BYTES = 16 << 20  # about this much of the file per piece


@dataclass(frozen=True)
class Piece:
    """Part of a file: bytes [start, end) of a .jsonl, row groups [start, end) of a
    .parquet; `first_line` is the line (row) number its first row has in the file."""
    start: int
    end: int
    first_line: int


def read_rows(path: str | Path) -> Rows:
    """Every row of the file at `path` as (line, dict), lazily; a malformed row raises DataError."""
    return _raising(iter_rows(path))  # iter_rows checks the path now, not at the first row


def _raising(rows: RowsOrErrors) -> Rows:
    for line, row in rows:
        if isinstance(row, DataError):
            raise row
        yield line, row


def iter_rows(path: str | Path, piece: Optional[Piece] = None) -> RowsOrErrors:
    """Like `read_rows`, but a malformed row comes back as a DataError in place of its dict.
    With `piece` (from `plan_pieces`), only that part of the file."""
    path = _checked(path)
    if path.is_dir():
        return _read_dataset_dir(path)
    if piece is not None:
        return _utf8_only(path, PIECE_READERS[path.suffix.lower()](path, piece))
    return _utf8_only(path, READERS[path.suffix.lower()](path))


def plan_pieces(path: str | Path, piece_bytes: Optional[int] = None) -> list[Optional[Piece]]:
    """`path` cut into pieces of about `piece_bytes`; [None] (the whole file) for a file
    that cannot be cut (json, csv, a datasets directory)."""
    path, piece_bytes = _checked(path), piece_bytes or PIECE_BYTES
    if path.is_dir() or path.suffix.lower() not in PIECE_READERS:
        return [None]
    if path.suffix.lower() == ".parquet":
        return _parquet_pieces(path, piece_bytes)
    return _jsonl_pieces(path, piece_bytes)


def _checked(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: data file not found")
    if not path.is_dir() and path.suffix.lower() not in READERS:
        raise UserError(f"{path}: unknown data file type '{path.suffix}'; "
                        f"use {', '.join(READERS)} or a saved `datasets` directory")
    return path


def _jsonl_pieces(path: Path, piece_bytes: int) -> list[Piece]:
    """Byte ranges each ending just after a newline, found by reading the file once in
    blocks (memory stays one block whatever the file's size)."""
    pieces, start, first_line, offset, newlines = [], 0, 1, 0, 0
    with open(path, "rb") as f:
        while block := f.read(piece_bytes):
            offset += len(block)
            newlines += block.count(b"\n")
            last = block.rfind(b"\n")
            if last >= 0 and offset - len(block) + last + 1 > start:
                cut = offset - len(block) + last + 1
                pieces.append(Piece(start, cut, first_line))
                start, first_line = cut, newlines + 1
    if start < offset or not pieces:
        pieces.append(Piece(start, offset, first_line))
    return pieces


def _parquet_pieces(path: Path, piece_bytes: int) -> list[Piece]:
    meta = _parquet_file(path).metadata
    pieces, start, first_line, size, rows = [], 0, 1, 0, 0
    for group in range(meta.num_row_groups):
        size += meta.row_group(group).total_byte_size
        rows += meta.row_group(group).num_rows
        if size >= piece_bytes or group == meta.num_row_groups - 1:
            pieces.append(Piece(start, group + 1, first_line))
            start, first_line, size = group + 1, rows + 1, 0
    return pieces or [Piece(0, 0, 1)]


def _utf8_only(path: Path, rows: RowsOrErrors) -> RowsOrErrors:
    try:
        yield from rows
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None


def _as_object(path: Path, line: int, row: object) -> "dict | DataError":
    if isinstance(row, dict) or isinstance(row, DataError):
        return row
    return DataError(path, line, f"row must be a JSON object, got {type(row).__name__}")


def _read_jsonl(path: Path, piece: Optional[Piece] = None) -> RowsOrErrors:
    start, end, line = (0, None, 1) if piece is None else (piece.start, piece.end, piece.first_line)
    with open(path, "rb") as f:
        f.seek(start)
        position = start
        for raw in f:
            if end is not None and position >= end:
                return
            text = raw.decode("utf-8-sig" if position == 0 else "utf-8")
            position += len(raw)
            if text.strip():
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    row = DataError(path, line, f"invalid JSON: {e.msg} (column {e.colno})")
                yield line, _as_object(path, line, row)
            line += 1


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


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise UserError(f"{path}: not a readable parquet file ({e})") from None


def _read_parquet(path: Path, piece: Optional[Piece] = None) -> Rows:
    table = _parquet_file(path)
    groups = None if piece is None else range(piece.start, piece.end)
    line = 0 if piece is None else piece.first_line - 1
    for batch in table.iter_batches(batch_size=1024, row_groups=groups):
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
PIECE_READERS = {".jsonl": _read_jsonl, ".parquet": _read_parquet}
