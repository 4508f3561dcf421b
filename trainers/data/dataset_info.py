"""LLaMA-Factory's `dataset_info.json`: with `data.dataset_info: PATH`, a source of
`data.train` / `data.eval` / `data.replay` may name a dataset of that file instead of a path.

An entry's `file_name` (relative to the file's directory), `formatting` (`alpaca`, the
default, or `sharegpt`), `columns` (its field names for ours) and, for sharegpt, `tags`
(the role and content keys of a turn and the role names) are honoured: each row is mapped
onto rayft's own alpaca or chat row before it is parsed, so a malformed row still names
file, line and the user's own field. Entries of a hub, script or cloud source are refused
(rayft reads local files only). A `ranking: true` entry is preference data (for dpo and
rm): alpaca's `chosen` / `rejected` columns hold the two answers as text, sharegpt's the two
answer turns after the prompt's `conversations`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from trainers.data.fields import RowError
from trainers.errors import ConfigError

# LLaMA-Factory column -> rayft alpaca field
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                  "history": "history"}
SHAREGPT_DEFAULTS = {"messages": "conversations", "system": None, "tools": None}
RANKING_COLUMNS = {"chosen": "chosen", "rejected": "rejected"}
TAG_DEFAULTS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
ROLE_OF_TAG = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "tool",
               "function_tag": "function_call", "system_tag": "system"}
REMOTE_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


@dataclass
class InfoDataset:
    name: str
    path: str
    formatting: str                          # alpaca | sharegpt
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    ranking: bool = False  # preference pairs

    @property
    def row_format(self) -> str:
        """The rayft format its mapped rows have."""
        if self.ranking:
            return "preference"
        return "alpaca" if self.formatting == "alpaca" else "chat"

    def to_row(self, row: dict) -> dict:
        """One of its rows as a rayft alpaca, chat or preference row; a RowError names the
        user's field."""
        if self.ranking:
            return self._preference_row(row)
        if self.formatting == "alpaca":
            out = {ours: row[theirs] for theirs, ours in
                   ((self.columns.get(col, ours), ours) for col, ours in ALPACA_COLUMNS.items()) if theirs in row}
            return out
        return self._chat_row(row)

    def source_field(self, ours: Optional[str]) -> Optional[str]:
        """The user's name for a field of the mapped row (for error messages)."""
        if not ours:
            return ours
        if self.ranking and ours.split("[")[0] in RANKING_COLUMNS:
            head, dot, rest = ours.partition("[")
            return self.columns.get(head, head) + dot + rest
        if self.ranking and ours.startswith("prompt"):
            ours = "messages" + ours[len("prompt"):]
        if self.formatting == "alpaca":
            theirs = {v: self.columns.get(k, v) for k, v in ALPACA_COLUMNS.items()}
            head, dot, rest = ours.partition("[")
            return theirs.get(head, head) + dot + rest
        columns, tags = {**SHAREGPT_DEFAULTS, **self.columns}, {**TAG_DEFAULTS, **self.tags}
        if ours == "system" and columns["system"]:
            return columns["system"]
        if ours.startswith("messages"):
            ours = columns["messages"] + ours[len("messages"):]
        return ours.replace(".role", "." + tags["role_tag"]).replace(".content", "." + tags["content_tag"])

    def _preference_row(self, row: dict) -> dict:
        """Prompt turns (alpaca: system, history and instruction + input; sharegpt: the
        mapped conversation) and the two answers as text."""
        answers = {}
        for ours in RANKING_COLUMNS:
            theirs = self.columns.get(ours, ours)
            value = row.get(theirs)
            if self.formatting == "sharegpt" and isinstance(value, dict):
                value = value.get({**TAG_DEFAULTS, **self.tags}["content_tag"])
            if value is None:
                raise RowError("is missing", theirs)
            answers[ours] = value
        if self.formatting == "sharegpt":
            prompt = self._chat_row(row)
            messages = ([{"role": "system", "content": prompt["system"]}] if "system" in prompt else []) + prompt["messages"]
        else:
            messages = self._alpaca_prompt(row)
        return {"prompt": messages, **answers}

    def _alpaca_prompt(self, row: dict) -> list[dict]:
        columns = {col: self.columns.get(col, ours) for col, ours in ALPACA_COLUMNS.items()}
        instruction = row.get(columns["prompt"])
        if not isinstance(instruction, str):
            raise RowError("is missing" if instruction is None else "must be a string", columns["prompt"])
        query = row.get(columns["query"])
        messages = [{"role": "system", "content": row[columns["system"]]}] if row.get(columns["system"]) else []
        for i, pair in enumerate(row.get(columns["history"]) or []):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise RowError("must be a [question, answer] pair", f"{columns['history']}[{i}]")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        return messages + [{"role": "user", "content": instruction + (f"\n{query}" if query else "")}]

    def _chat_row(self, row: dict) -> dict:
        columns, tags = {**SHAREGPT_DEFAULTS, **self.columns}, {**TAG_DEFAULTS, **self.tags}
        key = columns["messages"]
        turns = row.get(key)
        if not isinstance(turns, list):
            raise RowError("is missing" if turns is None else "must be a list of turns", key)
        roles = {tags[tag]: role for tag, role in ROLE_OF_TAG.items()}
        messages = []
        for i, turn in enumerate(turns):
            where = f"{key}[{i}]"
            if not isinstance(turn, dict):
                raise RowError("must be an object", where)
            tag = turn.get(tags["role_tag"])
            if tag not in roles:
                raise RowError(f"unknown role '{tag}' (the dataset's tags name {', '.join(map(str, roles))})",
                               f"{where}.{tags['role_tag']}")
            messages.append({"role": roles[tag], "content": turn.get(tags["content_tag"])})
        out = {"messages": messages}
        if columns["system"] and row.get(columns["system"]):
            out["system"] = row[columns["system"]]
        return out


def read_dataset_info(path: str | Path, key: str = "data.dataset_info") -> dict[str, InfoDataset]:
    """The datasets of a dataset_info.json; a ConfigError names `key` (and the entry) otherwise."""
    file = Path(path)
    try:
        entries = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(key, f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(key, f"{path}: not JSON ({e})") from None
    if not isinstance(entries, dict):
        raise ConfigError(key, f"{path}: must map dataset names to entries")
    return {name: _entry(name, entry, file.parent, f"{key}[{name}]") for name, entry in entries.items()}


def _entry(name: str, entry, root: Path, key: str) -> InfoDataset:
    if not isinstance(entry, dict):
        raise ConfigError(key, "must be an object")
    remote = [k for k in REMOTE_KEYS if entry.get(k)]
    if remote:
        raise ConfigError(f"{key}.{remote[0]}", "remote datasets are not read; download it and give file_name")
    if not entry.get("file_name"):
        raise ConfigError(f"{key}.file_name", "is required")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise ConfigError(f"{key}.formatting", f"must be alpaca or sharegpt, got {formatting!r}")
    for part in ("columns", "tags"):
        if not isinstance(entry.get(part, {}), dict):
            raise ConfigError(f"{key}.{part}", "must be an object")
    unknown = sorted(set(entry.get("tags", {})) - set(TAG_DEFAULTS))
    if unknown:
        raise ConfigError(f"{key}.tags.{unknown[0]}", f"unknown tag; known: {', '.join(TAG_DEFAULTS)}")
    known = {**(ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_DEFAULTS),
             **(RANKING_COLUMNS if entry.get("ranking") else {})}
    unknown = sorted(set(entry.get("columns", {})) - set(known))
    if unknown:
        raise ConfigError(f"{key}.columns.{unknown[0]}", f"not a {formatting} column; known: {', '.join(known)}")
    return InfoDataset(name, str(root / entry["file_name"]), formatting, dict(entry.get("columns", {})),
                       dict(entry.get("tags", {})), ranking=bool(entry.get("ranking")))

