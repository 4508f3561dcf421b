"""Loading one data file into normalised records.

`load_records` owns the file-level policy: the format is detected from the first valid
row and then every row is parsed as that format (with purpose "auto", the format also
decides what the rows are for: `formats.purpose_of`); a malformed row stops the load with a
`DataError` naming file, line and field, unless the user asked to skip bad rows (then
they are counted, and the first few messages kept for the report).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from trainers.data.dataset_info import InfoDataset
from trainers.data.fields import RowError
from trainers.data.formats import check_purpose, detect_format, get_format, parse_row, purpose_of
from trainers.data.readers import iter_rows
from trainers.data.records import Record
from trainers.errors import DataError, UserError

MAX_ERRORS = 5  # skipped-row messages kept for the report; the count covers the rest


@dataclass
class LoadResult:
    path: str
    format: str
    records: list[Record]
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first few skipped rows' messages
    purpose: str = "sft"  # what the records are for (the one asked, or the format's with "auto")
    rows: int = 0  # rows read, good and bad


def load_records(path: str | Path, fmt: str = "auto", purpose: str = "sft",
                 skip_bad_rows: bool = False, domain: Optional[str] = None,
                 mapped: Optional[InfoDataset] = None) -> LoadResult:
    """Read and normalise every row of `path` for `purpose` ("auto": the detected format's
    own); `domain` overrides the rows' own. With `mapped` (a dataset_info.json entry) its
    rows are mapped onto rayft's format first, and errors name the entry's own fields."""
    result = new_result(path, fmt, purpose, mapped)
    result.records = list(parse_rows(result, iter_rows(result.path), skip_bad_rows, domain, mapped))
    check_loaded(result.path, result.rows, len(result.records), result.errors)
    return result


def new_result(path: str | Path, fmt: str, purpose: str, mapped: Optional[InfoDataset] = None) -> LoadResult:
    """An empty result for `path` (the mapped dataset's file) with its format resolved and
    checked against `purpose` when it is given."""
    if mapped is not None:
        path, fmt = mapped.path, mapped.row_format
    if fmt != "auto":
        fmt = get_format(fmt).name
        purpose = purpose_of(fmt) if purpose == "auto" else purpose
        check_purpose(fmt, purpose)
    return LoadResult(str(path), fmt, [], purpose=purpose)


def parse_rows(result: LoadResult, rows, skip_bad_rows: bool = False, domain: Optional[str] = None,
               mapped: Optional[InfoDataset] = None) -> Iterator[Record]:
    """The records of `rows` ((line, row) pairs of `result.path`), counting rows and skipped
    ones into `result` and fixing its format on the first row that parses."""
    for line, row in rows:
        result.rows += 1
        try:
            record = _parse(result, _mapped_row(mapped, row, result.path, line), line)
        except DataError as e:
            if mapped is not None and e.field:
                e = DataError(e.path, e.line, e.problem, mapped.source_field(e.field))
            if not skip_bad_rows:
                raise e from None
            result.skipped += 1
            if len(result.errors) < MAX_ERRORS:
                result.errors.append(str(e))
            continue
        if domain is not None and hasattr(record, "domain"):
            record.domain = domain
        yield record


def check_loaded(path: str, rows: int, kept: int, errors: list[str]) -> None:
    """A file must hold rows, and at least one of them well-formed."""
    if rows == 0:
        raise UserError(f"{path}: no rows (the file is empty)")
    if not kept:
        raise UserError(f"{path}: all {rows} rows are malformed; the first: {errors[0]}")


def _mapped_row(mapped: Optional[InfoDataset], row, path, line: int):
    if mapped is None or isinstance(row, DataError):
        return row
    try:
        return mapped.to_row(row)
    except RowError as e:
        return DataError(path, line, e.message, e.field)


def _parse(result: LoadResult, row, line: int) -> Record:
    """Parse one row, fixing `result.format` (and an "auto" purpose) on the first row that parses."""
    if isinstance(row, DataError):
        raise row
    fmt = result.format
    if fmt == "auto":
        try:
            fmt = detect_format(row)
        except RowError as e:
            raise DataError(result.path, line, e.message, e.field) from None
        purpose = purpose_of(fmt) if result.purpose == "auto" else result.purpose
        check_purpose(fmt, purpose)
    else:
        purpose = result.purpose
    record = parse_row(fmt, row, result.path, line, purpose)
    result.format, result.purpose = fmt, purpose
    return record
