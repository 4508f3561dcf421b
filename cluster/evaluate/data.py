"""The eval data file, read into what each eval pass needs.

The format is detected once from the first row; `choose_passes` decides the passes from
the model's task, the format and whether rows carry an explicit `reference`/`answer`;
then the file is loaded with `load_records` for each pass's purpose (sft records for the
loss, prompt records for generation, labelled text for classification, preference or
scored records for a reward model), so every row is validated exactly as training would,
with the same file/line/field errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Optional

from cluster.evaluate.metrics import CLASSIFICATION, EXACT_MATCH, LOSS, PAIRS, REWARDS, choose_passes
from trainers.data import load_records, read_rows
from trainers.data.fields import RowError, get_reference
from trainers.data.formats import detect_format, get_format
from trainers.data.records import Conversation, Labelled, Preference, Prompt, Scored
from trainers.data.render import chat_messages
from trainers.errors import DataError, UserError


@dataclass
class EvalData:
    path: str
    format: str
    passes: tuple[str, ...]
    origins: list[str] = field(default_factory=list)     # "FILE:LINE" of every evaluated row
    scored: Optional[list] = None                        # Conversation / RawText per row (loss)
    prompts: dict[int, Prompt] = field(default_factory=dict)  # row index -> prompt with a reference
    labelled: Optional[list[Labelled]] = None            # classification rows
    pairs: Optional[list[Preference]] = None             # preference rows (reward model)
    responses: Optional[list[Scored]] = None             # (prompt, response) rows to score (reward model)
    has_scores: bool = False                             # the responses carry their own score

    @property
    def rows(self) -> int:
        return len(self.origins)


def load_eval_data(path: str | Path, task: str, limit: Optional[int] = None) -> EvalData:
    """The first `limit` rows of `path` (all when None), loaded for the passes that apply."""
    fmt = detect_file_format(path)
    prompts: list[Prompt] = []
    explicit: list[bool] = []
    if task == "causal_lm" and get_format(fmt).gives in (Conversation, Prompt):
        prompts = _load(path, fmt, "prompt", limit)  # validates every reference field first
        explicit = [get_reference(row) is not None for _, row in islice(read_rows(path), limit)]
    data = EvalData(str(path), fmt, choose_passes(task, fmt, any(explicit)))
    if LOSS in data.passes:
        data.scored = _load(path, fmt, "sft", limit)
    if EXACT_MATCH in data.passes:
        # A conversation's last answer is a reference only when the row says so: exact
        # match on free-form chat answers would cost generation and mean little.
        data.prompts = {i: p for i, (p, has) in enumerate(zip(prompts, explicit, strict=True)) if has}
    if CLASSIFICATION in data.passes:
        data.labelled = _load(path, fmt, "classification", limit)
    if PAIRS in data.passes:
        data.pairs = _load(path, fmt, "preference", limit)
    if REWARDS in data.passes:
        data.has_scores = get_format(fmt).gives is Scored
        data.responses = (_load(path, fmt, "scored", limit) if data.has_scores
                          else [as_response(c) for c in _load(path, fmt, "sft", limit)])
    data.origins = [r.origin for r in (data.scored or data.labelled or data.pairs or data.responses or prompts)]
    return data


def as_response(record: Conversation) -> Scored:
    """A conversation as the (prompt, response) a reward model scores: its final assistant
    turn (every sft conversation ends in one) after all the turns before it. The score is
    NaN: the row has none."""
    messages = chat_messages(record)
    return Scored(messages[:-1], messages[-1]["content"], float("nan"), record.origin)


def detect_file_format(path: str | Path) -> str:
    """The format of the file's first row, as `load_records` detects it."""
    for line, row in read_rows(path):
        try:
            return detect_format(row)
        except RowError as e:
            raise DataError(path, line, e.message, e.field) from None
    raise UserError(f"{path}: no rows (the file is empty)")


def _load(path, fmt: str, purpose: str, limit: Optional[int]) -> list:
    return load_records(path, fmt=fmt, purpose=purpose).records[:limit]


def split_origin(origin: str) -> tuple[str, Optional[int]]:
    """("FILE", LINE) from a record's "FILE:LINE" origin."""
    path, _, line = origin.rpartition(":")
    return (path, int(line)) if line.isdigit() else (origin, None)


def label_ids(records: list[Labelled], id2label: dict[int, str]) -> list[int]:
    """Each row's class id under the model's `id2label`. A label is matched by name, or,
    when no label has that name, as the integer class id itself (datasets often store 0/1
    while the model's labels read LABEL_0/LABEL_1). Anything else is a DataError."""
    by_name = {name: i for i, name in id2label.items()}
    ids = []
    for record in records:
        label = record.label
        if label in by_name:
            ids.append(by_name[label])
        elif label.lstrip("-").isdigit() and int(label) in id2label:
            ids.append(int(label))
        else:
            path, line = split_origin(record.origin)
            known = ", ".join(repr(name) for name in id2label.values())
            if all(name == f"LABEL_{i}" for i, name in id2label.items()):
                known += (" (the model saved no label names: use class ids 0..N-1, or put a config.json "
                          "with id2label beside adapter_config.json)")
            raise DataError(path, line, f"unknown label {label!r}; the model's labels are {known}", field="label")
    return ids
