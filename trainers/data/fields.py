"""Typed access to the fields of one raw row, with errors that name the field.

Format parsers read rows only through these helpers, so every problem (missing, wrong
type, empty, unknown role) is reported the same way: a `RowError(message, field)` that
the loader turns into `DataError(path, line, message, field)`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from trainers.data.records import Message

# Speaker names seen in the wild, mapped to the roles chat templates understand.
ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "function_call": "assistant",
    "tool": "tool", "observation": "tool", "function": "tool",   # a tool's result, answering a call
}


class RowError(ValueError):
    """A problem with one row; the loader adds the file and line."""

    def __init__(self, message: str, field: Optional[str] = None):
        self.message, self.field = message, field
        super().__init__(f"field '{field}': {message}" if field else message)


def is_missing(value: Any) -> bool:
    # Parquet and pandas write absent values as None or NaN.
    return value is None or (isinstance(value, float) and math.isnan(value))


def has(row: dict, name: str) -> bool:
    return name in row and not is_missing(row[name])


def first_present(row: dict, names: tuple[str, ...]) -> Optional[str]:
    """The first of `names` the row has a value for, else None."""
    return next((name for name in names if has(row, name)), None)


def type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", str: "a string"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def need(row: dict, names: tuple[str, ...]) -> tuple[str, Any]:
    """(name, value) of the first present of `names`; an error naming them all if none is."""
    name = first_present(row, names)
    if name is None:
        raise RowError("is missing", "/".join(names))
    return name, row[name]


def get_str(row: dict, name: str, required: bool = True, allow_empty: bool = False) -> Optional[str]:
    """A string field; absent optional fields (and empty ones, when allowed) read as None."""
    if not has(row, name):
        if required:
            raise RowError("is missing", name)
        return None
    return check_str(row[name], name, allow_empty)


def check_str(value: Any, field: str, allow_empty: bool = False) -> Optional[str]:
    if not isinstance(value, str):
        raise RowError(f"must be a string, got {type_name(value)}", field)
    if not value.strip():
        if allow_empty:
            return None
        raise RowError("is empty", field)
    return value


def get_number(row: dict, name: str, required: bool = True) -> Optional[float]:
    """A numeric field; numeric strings are accepted because CSV cells are always strings."""
    if not has(row, name):
        if required:
            raise RowError("is missing", name)
        return None
    value = row[name]
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise RowError(f"must be a number, got '{value}'", name) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise RowError(f"must be a number, got {type_name(value)}", name)
    return float(value)


def get_label(row: dict, name: str) -> str:
    """A class label: a string or an integer, kept as a string."""
    _, value = need(row, (name,))
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # pandas turns integer columns with gaps into floats
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RowError(f"must be a string or an integer, got {type_name(value)}", name)
    return check_str(str(value), name)


def get_str_list(row: dict, name: str) -> list[str]:
    _, value = need(row, (name,))
    if not isinstance(value, list):
        raise RowError(f"must be a list of strings, got {type_name(value)}", name)
    if not value:
        raise RowError("is empty", name)
    return [check_str(item, f"{name}[{i}]") for i, item in enumerate(value)]


def read_messages(value: Any, field: str, role_key: str = "role", content_key: str = "content") -> list[Message]:
    """A list of {role, content} turns with roles normalised; an empty system turn is dropped
    (it says nothing), an empty user or assistant turn is an error."""
    if not isinstance(value, list):
        raise RowError(f"must be a list of messages, got {type_name(value)}", field)
    if not value:
        raise RowError("is an empty conversation", field)
    messages = []
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise RowError(f"must be an object with '{role_key}' and '{content_key}', got {type_name(item)}", where)
        if is_missing(item.get(role_key)):
            raise RowError("is missing", f"{where}.{role_key}")
        role = check_str(item[role_key], f"{where}.{role_key}")
        if role.strip().lower() not in ROLE_ALIASES:
            raise RowError(f"unknown role '{role}' (expected one of {', '.join(ROLE_ALIASES)})",
                           f"{where}.{role_key}")
        role = ROLE_ALIASES[role.strip().lower()]
        content = _content_text(item.get(content_key), f"{where}.{content_key}", allow_empty=role == "system")
        if role == "system" and i > 0:
            raise RowError("a system turn is only allowed first", f"{where}.{role_key}")
        if content is not None:
            messages.append({"role": role, "content": content})
    return messages


def _content_text(value: Any, field: str, allow_empty: bool) -> Optional[str]:
    if is_missing(value):
        raise RowError("is missing", field)
    if isinstance(value, list):
        # OpenAI-style content parts: keep the text parts, in order.
        parts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(value) or not all(isinstance(p, str) for p in parts):
            raise RowError("content parts must all be {type: text, text: ...}", field)
        value = "".join(parts)
    return check_str(value, field, allow_empty)


def get_history(row: dict, name: str) -> list[Message]:
    """Alpaca `history`: [[user, assistant], ...] earlier turns, as messages."""
    if not has(row, name):
        return []
    value = row[name]
    if not isinstance(value, list):
        raise RowError(f"must be a list of [user, assistant] pairs, got {type_name(value)}", name)
    messages = []
    for i, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RowError("must be a [user, assistant] pair", f"{name}[{i}]")
        messages.append({"role": "user", "content": check_str(pair[0], f"{name}[{i}][0]")})
        messages.append({"role": "assistant", "content": check_str(pair[1], f"{name}[{i}][1]")})
    return messages


def read_answer(value: Any, field: str) -> str:
    """A response given as a string, or as messages whose last assistant turn is the response."""
    if isinstance(value, list):
        turns = [m for m in read_messages(value, field) if m["role"] == "assistant"]
        if not turns:
            raise RowError("has no assistant turn", field)
        return turns[-1]["content"]
    return check_str(value, field)


def read_prompt(row: dict, names: tuple[str, ...] = ("prompt", "messages")) -> list[Message]:
    """Prompt turns from the first present of `names`: a string (one user turn) or messages."""
    name, value = need(row, names)
    if isinstance(value, list):
        return read_messages(value, name)
    return [{"role": "user", "content": check_str(value, name)}]


def get_reference(row: dict) -> Optional[str]:
    """An optional expected answer (`reference` or `answer`); numbers are kept as text."""
    name = first_present(row, ("reference", "answer"))
    if name is None:
        return None
    value = row[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(int(value)) if float(value).is_integer() else str(value)
    return check_str(value, name)
