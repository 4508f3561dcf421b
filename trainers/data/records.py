"""The normalised record types every input format becomes, and the tokenised example.

Readers and format parsers produce records; the renderer turns records into
`Example`s (token ids plus labels, -100 where no loss is taken).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

IGNORE_INDEX = -100

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass
class Conversation:
    """SFT / CoT / domain instruction data: loss on assistant turns only."""
    messages: list[Message]
    system: Optional[str] = None
    domain: Optional[str] = None
    origin: str = ""  # "FILE:LINE", for error messages


@dataclass
class RawText:
    """Continued pre-training: loss on every token."""
    text: str
    domain: Optional[str] = None
    origin: str = ""


@dataclass
class Preference:
    prompt_messages: list[Message]
    chosen: str
    rejected: str
    margin: Optional[float] = None
    origin: str = ""


@dataclass
class Scored:
    prompt_messages: list[Message]
    response: str
    score: float
    origin: str = ""


@dataclass
class Labelled:
    text: str
    label: str
    origin: str = ""


@dataclass
class Prompt:
    prompt_messages: list[Message]
    reference: Optional[str] = None
    origin: str = ""


Record = Conversation | RawText | Preference | Scored | Labelled | Prompt


@dataclass
class Example:
    """One tokenised training sample (or one packed sequence of several)."""
    input_ids: list[int]
    labels: list[int]
    # Lengths of the samples packed into this sequence; [len(input_ids)] when unpacked.
    seq_lens: list[int] = field(default_factory=list)
    domain: Optional[str] = None
    truncated: bool = False

    def __post_init__(self):
        if not self.seq_lens:
            self.seq_lens = [len(self.input_ids)]
