"""Tokenised preference pairs and scored responses for reward models and DPO.

Each side of a pair is the prompt followed by one response as an assistant turn, encoded
like SFT data (labels only on the response and its end-of-turn token), so the same chat
template and truncation rules apply. A pair whose response was cut away entirely is
dropped and counted: it carries no preference signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainers.data.records import IGNORE_INDEX, Conversation, Example, Preference, Scored
from trainers.data.render import encode


@dataclass
class PairExample:
    chosen: Example
    rejected: Example
    margin: Optional[float]
    index: int  # position in its split: a stable key for cached reference log-probs


@dataclass
class ScoredExample:
    example: Example
    score: float
    index: int


def _response_example(prompt_messages, response: str, tokenizer, max_length: int, truncation_side: str,
                      chat_template: Optional[str]) -> Example:
    conversation = Conversation(messages=[*prompt_messages, {"role": "assistant", "content": response}])
    return encode(conversation, tokenizer, max_length, truncation_side, chat_template=chat_template)


def _has_labels(example: Example) -> bool:
    return any(label != IGNORE_INDEX for label in example.labels)


def encode_pairs(records: list[Preference], tokenizer, max_length: int, truncation_side: str = "left",
                 chat_template: Optional[str] = None) -> tuple[list[PairExample], int]:
    """(encoded pairs, number dropped because a response lost every token to truncation)."""
    pairs, dropped = [], 0
    for record in records:
        sides = [_response_example(record.prompt_messages, response, tokenizer, max_length, truncation_side,
                                   chat_template) for response in (record.chosen, record.rejected)]
        if not all(_has_labels(side) for side in sides):
            dropped += 1
            continue
        pairs.append(PairExample(sides[0], sides[1], record.margin, len(pairs)))
    return pairs, dropped


def encode_scored(records: list[Scored], tokenizer, max_length: int, truncation_side: str = "left",
                  chat_template: Optional[str] = None) -> tuple[list[ScoredExample], int]:
    out, dropped = [], 0
    for record in records:
        example = _response_example(record.prompt_messages, record.response, tokenizer, max_length,
                                    truncation_side, chat_template)
        if not _has_labels(example):
            dropped += 1
            continue
        out.append(ScoredExample(example, float(record.score), len(out)))
    return out, dropped
