"""The named row formats: how each is recognised, and how one row becomes a record.

`detect_format(row)` returns the first format in `FORMATS` order whose signature fields
the row has (the order settles overlaps: preference before prompt, cot and domain
before alpaca, classification before text). `parse_row(fmt, row, path, line, purpose)`
normalises one row into the record type that `purpose` trains on, and raises a
`DataError` naming file, line and field for anything malformed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from trainers.data.fields import (RowError, check_str, first_present, get_history, get_label, get_number,
                                  get_reference, get_str, get_str_list, has, need, read_answer,
                                  read_messages, read_prompt)
from trainers.data.records import Conversation, Labelled, Message, Preference, Prompt, RawText, Record, Scored
from trainers.errors import DataError, UserError

# Which record types each purpose can use; "prompt" also takes conversations, whose final
# assistant turn is dropped (and kept as the reference answer).
PURPOSES = {
    "sft": (Conversation, RawText),
    "preference": (Preference,),
    "scored": (Scored,),
    "classification": (Labelled,),
    "prompt": (Prompt, Conversation),
}

CHAT_KEYS = ("messages", "conversations", "dialogue")


@dataclass(frozen=True)
class Format:
    name: str
    fields: str  # what a row looks like, for help and error text
    gives: type
    matches: Callable[[dict], bool]
    parse: Callable[[dict, str], Record]


def conversation(messages: list[Message], field: str, row: dict, purpose: str,
                 system: Optional[str] = None, answer: Optional[str] = None) -> Conversation | Prompt:
    """The record a list of turns becomes for `purpose`. `answer` is the reference for
    "prompt" when it differs from the final assistant text (a CoT row's bare output)."""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if not messages:
        raise RowError("has no user or assistant turns", field)
    if purpose == "prompt":
        dropped = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
        prompt = messages[:-1] if dropped is not None else messages
        if not prompt:
            raise RowError("has no turns before the final assistant turn", field)
        reference = get_reference(row) or answer or dropped
        head = [{"role": "system", "content": system}] if system else []
        return Prompt(head + prompt, reference=reference)
    if messages[-1]["role"] != "assistant":
        raise RowError("must end with an assistant turn", field)
    return Conversation(messages, system=system, domain=get_str(row, "domain", required=False, allow_empty=True))


def instruction_conversation(row: dict, purpose: str, answer: Optional[str],
                             reference: Optional[str] = None) -> Conversation | Prompt:
    """Alpaca-style rows: history turns, then instruction (+ input) as the user turn."""
    user = get_str(row, "instruction")
    extra = get_str(row, "input", required=False, allow_empty=True)
    if extra:
        user = f"{user}\n\n{extra}"
    messages = get_history(row, "history") + [{"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    system = get_str(row, "system", required=False, allow_empty=True)
    field = "output" if answer is not None else "instruction"
    return conversation(messages, field, row, purpose, system=system, answer=reference)


def parse_alpaca(row: dict, purpose: str) -> Conversation | Prompt:
    # A prompt-only dataset may leave the answer out.
    return instruction_conversation(row, purpose, get_str(row, "output", required=purpose != "prompt"))


def parse_domain(row: dict, purpose: str) -> Conversation | Prompt:
    get_str(row, "domain")  # required here: the tag is what makes a row of this format
    return parse_alpaca(row, purpose)


def render_steps(steps: list[str], output: str) -> str:
    return "\n".join([f"Step {i}: {step.strip()}" for i, step in enumerate(steps, 1)] + [f"Answer: {output}"])


def parse_cot(row: dict, purpose: str) -> Conversation | Prompt:
    output = get_str(row, "output", required=purpose != "prompt")
    answer = render_steps(get_str_list(row, "chain_of_thought"), output) if output is not None else None
    # For RL the reference is the bare output, which a reward can compare against.
    return instruction_conversation(row, purpose, answer, reference=output)


def parse_chat(row: dict, purpose: str) -> Conversation | Prompt:
    name, value = need(row, CHAT_KEYS)
    system = get_str(row, "system", required=False, allow_empty=True)
    return conversation(read_messages(value, name), name, row, purpose, system=system)


def parse_sharegpt(row: dict, purpose: str) -> Conversation | Prompt:
    messages = read_messages(row.get("conversations"), "conversations", role_key="from", content_key="value")
    system = get_str(row, "system", required=False, allow_empty=True)
    return conversation(messages, "conversations", row, purpose, system=system)


def parse_completion(row: dict, purpose: str) -> Conversation | Prompt:
    messages = [{"role": "user", "content": get_str(row, "prompt")},
                {"role": "assistant", "content": get_str(row, "completion")}]
    return conversation(messages, "completion", row, purpose)


def parse_text(row: dict, purpose: str) -> RawText:
    return RawText(get_str(row, "text"), domain=get_str(row, "domain", required=False, allow_empty=True))


def parse_classification(row: dict, purpose: str) -> Labelled:
    return Labelled(get_str(row, "text"), get_label(row, "label"))


def parse_preference(row: dict, purpose: str) -> Preference:
    if first_present(row, ("prompt", "messages")) is None and isinstance(row.get("chosen"), list):
        # Implicit prompt: `chosen` holds the whole conversation, the prompt is all but its answer.
        prompt = read_messages(row["chosen"], "chosen")[:-1]
        if not prompt:
            raise RowError("has no prompt turns before the answer", "chosen")
    else:
        prompt = read_prompt(row)
    chosen = read_answer(need(row, ("chosen",))[1], "chosen")
    rejected = read_answer(need(row, ("rejected",))[1], "rejected")
    return Preference(prompt, chosen, rejected, margin=get_number(row, "margin", required=False))


def parse_scored(row: dict, purpose: str) -> Scored:
    prompt = read_prompt(row, ("prompt", "input", "messages"))
    response_key, response = need(row, ("output", "response"))
    score_key, _ = need(row, ("reward_score", "score"))
    return Scored(prompt, check_str(response, response_key), get_number(row, score_key))


def parse_prompt(row: dict, purpose: str) -> Prompt:
    return Prompt(read_prompt(row), reference=get_reference(row))


def _has_all(*names: str) -> Callable[[dict], bool]:
    return lambda row: all(has(row, n) for n in names)


def _is_sharegpt(row: dict) -> bool:
    turns = row.get("conversations")
    return isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "from" in turns[0]


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("preference", "prompt (or messages), chosen, rejected, margin?", Preference,
           _has_all("chosen", "rejected"), parse_preference),
    Format("scored", "input/prompt, output/response, reward_score/score", Scored,
           lambda r: first_present(r, ("reward_score", "score")) is not None
           and first_present(r, ("output", "response")) is not None, parse_scored),
    Format("cot", "instruction, input?, chain_of_thought: [step, ...], output", Conversation,
           _has_all("instruction", "chain_of_thought"), parse_cot),
    Format("domain", "instruction, input?, output, domain", Conversation,
           _has_all("instruction", "domain"), parse_domain),
    Format("alpaca", "instruction, input?, output, system?, history?: [[user, assistant], ...]", Conversation,
           _has_all("instruction"), parse_alpaca),
    Format("sharegpt", "conversations: [{from: human/gpt/system, value}, ...]", Conversation,
           _is_sharegpt, parse_sharegpt),
    Format("chat", "messages (or conversations, dialogue): [{role, content}, ...]", Conversation,
           lambda r: first_present(r, CHAT_KEYS) is not None, parse_chat),
    Format("completion", "prompt, completion", Conversation, _has_all("prompt", "completion"), parse_completion),
    Format("prompt", "prompt (or messages), answer/reference?", Prompt, _has_all("prompt"), parse_prompt),
    Format("classification", "text, label", Labelled, _has_all("text", "label"), parse_classification),
    Format("text", "text", RawText, _has_all("text"), parse_text),
]}

ALIASES = {"instruction": "alpaca", "openai": "chat", "raw": "text", "chain_of_thought": "cot"}


def get_format(name: str) -> Format:
    """The format called `name` (or one of its aliases); a UserError listing them otherwise."""
    spec = FORMATS.get(ALIASES.get(name, name))
    if spec is None:
        raise UserError(f"unknown data format '{name}'; choose auto or one of {', '.join(FORMATS)}")
    return spec


def detect_format(row: dict) -> str:
    """The name of the first format the row matches; a RowError (no path/line) if none does."""
    for spec in FORMATS.values():
        if spec.matches(row):
            return spec.name
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise RowError(f"no known format matches this row (fields: {keys}); "
                   f"expected e.g. instruction/output, messages, conversations, prompt/completion or text")


def purpose_of(fmt: str) -> str:
    """What rows of `fmt` are for when nobody says: the first purpose taking its record type
    (conversations and text: sft; a bare prompt row: prompt)."""
    gives = get_format(fmt).gives
    return next(purpose for purpose, types in PURPOSES.items() if gives in types)


def check_purpose(fmt: str, purpose: str) -> None:
    """A UserError when rows of `fmt` cannot feed `purpose` (e.g. plain text for DPO)."""
    if purpose not in PURPOSES:
        raise UserError(f"unknown data purpose '{purpose}'; choose one of {', '.join(PURPOSES)}")
    spec = get_format(fmt)
    if spec.gives not in PURPOSES[purpose]:
        usable = [f.name for f in FORMATS.values() if f.gives in PURPOSES[purpose]]
        raise UserError(f"rows of format '{spec.name}' cannot be used for {purpose} data; "
                        f"use one of: {', '.join(usable)}")


def parse_row(fmt: str, row: dict, path, line: int | None, purpose: str = "sft") -> Record:
    """Normalise one row of format `fmt` into the record `purpose` trains on."""
    check_purpose(fmt, purpose)
    try:
        record = get_format(fmt).parse(row, purpose)
    except RowError as e:
        raise DataError(path, line, e.message, e.field) from None
    record.origin = f"{path}:{line}"
    return record
