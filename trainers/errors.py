"""User-facing errors: bad input that the CLI reports in one line with exit status 2.

Anything raised as a `UserError` is the user's to fix (a bad config key, a malformed
data row, a missing path); every other exception is a bug and exits 1 (a training
worker's as a `WorkerError`, which names the original type and message).
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """An error caused by the user's input; its message is shown as-is."""


class ConfigError(UserError):
    """A config key is unknown, has the wrong type, or an invalid value."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class DataError(UserError):
    """A data row is malformed. The message reads `FILE:LINE: field 'F': problem`."""

    def __init__(self, path: str, line: int | None, message: str, field: str | None = None):
        self.path, self.line, self.field, self.problem = str(path), line, field, message
        where = f"{path}:{line}" if line is not None else str(path)
        what = f"field '{field}': {message}" if field else message
        super().__init__(f"{where}: {what}")


class WorkerError(Exception):
    """A training worker failed with an error that is not the user's to fix: carries the
    original exception's type name and full message, and the file holding the full
    traceback of every failed worker."""

    def __init__(self, rank: int, type_name: str, message: str, traceback_file: Path):
        self.rank, self.type_name, self.message, self.traceback_file = rank, type_name, message, traceback_file
        super().__init__(f"worker {rank} raised {type_name}: {message}")
