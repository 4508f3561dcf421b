"""Resolving a user's `"module:name"` or `"path/to/file.py:name"` reference to the Python
object it names (a reward function, an environment class). Errors are `RefError` with a
message that completes "<what> '<ref>': ...", for the caller to prefix."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path


class RefError(ValueError):
    """The reference is malformed, or what it names cannot be imported or found."""


def import_object(ref: str, kind: str = "function"):
    """The object `ref` names; `kind` words the errors ("function", "class")."""
    where, sep, attr = ref.rpartition(":")
    if not sep or not where or not attr:
        raise RefError(f"expected 'module:{kind}' or 'path/to/file.py:{kind}'")
    module = _load_file(Path(where)) if where.endswith(".py") or "/" in where else _load_module(where)
    obj = getattr(module, attr, None)
    if obj is None:
        raise RefError(f"'{where}' has no {kind} '{attr}'")
    return obj


def is_file_ref(ref: str) -> bool:
    where, sep, _ = ref.rpartition(":")
    return bool(sep) and (where.endswith(".py") or "/" in where)


def absolute(ref: str) -> str:
    """A file reference with its path made absolute (Ray actors do not share the driver's
    working directory); any other reference unchanged."""
    if not is_file_ref(ref):
        return ref
    where, _, attr = ref.rpartition(":")
    return f"{Path(where).expanduser().resolve()}:{attr}"


def _load_module(name: str):
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 (an import runs arbitrary user code)
        raise RefError(f"cannot import module '{name}': {type(exc).__name__}: {exc}") from None


def _load_file(path: Path):
    if not path.is_file():
        raise RefError(f"file {path} not found")
    resolved = path.resolve()
    # One module per file, under a name no real package uses, so two files both called
    # rewards.py do not collide and a reload of the same file reuses it.
    name = f"_rayft_user_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001
        raise RefError(f"cannot import file {path}: {type(exc).__name__}: {exc}") from None
    sys.modules[name] = module
    return module
