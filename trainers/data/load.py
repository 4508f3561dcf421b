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
from typing import Optional

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


def load_records(path: str | Path, fmt: str = "auto", purpose: str = "sft",
                 skip_bad_rows: bool = False, domain: Optional[str] = None,
                 mapped: Optional[InfoDataset] = None) -> LoadResult:
    """Read and normalise every row of `path` for `purpose` ("auto": the detected format's
    own); `domain` overrides the rows' own. With `mapped` (a dataset_info.json entry) its
    rows are mapped onto rayft's format first, and errors name the entry's own fields."""
    if mapped is not None:
        path, fmt = mapped.path, mapped.row_format
    if fmt != "auto":
        fmt = get_format(fmt).name
        purpose = purpose_of(fmt) if purpose == "auto" else purpose
        check_purpose(fmt, purpose)
    result = LoadResult(str(path), fmt, [], purpose=purpose)
    rows = 0
    for line, row in iter_rows(path):
        rows += 1
        try:
            record = _parse(result, _mapped_row(mapped, row, path, line), line)
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
        result.records.append(record)
    if rows == 0:
        raise UserError(f"{path}: no rows (the file is empty)")
    if not result.records:
        raise UserError(f"{path}: all {rows} rows are malformed; the first: {result.errors[0]}")
    return result


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
