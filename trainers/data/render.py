"""Turning records into token ids and labels with the tokenizer's chat template.

Labels carry the token id wherever the model should learn to produce the token and -100
elsewhere: on a Conversation, only the assistant turns (content plus the end-of-turn
token the template writes after it); on RawText, every token. Assistant spans are found
for any prefix-stable template, without template-specific markers: the text of the
conversation up to an assistant turn, rendered with the generation prompt, is where the
turn starts; the text rendered through that turn is where it ends.
"""

from __future__ import annotations

from typing import Optional

from trainers.chat_templates import resolve as resolve_template
from trainers.data.records import IGNORE_INDEX, Conversation, Example, Message, RawText
from trainers.errors import UserError


def encode(record: Conversation | RawText, tokenizer, max_length: int, truncation_side: str = "right",
           chat_template: Optional[str] = None) -> Example:
    """Token ids and labels of one record, cut to `max_length` tokens from `truncation_side`."""
    if isinstance(record, Conversation):
        example = _encode_conversation(record, tokenizer, chat_template)
    elif isinstance(record, RawText):
        example = _encode_text(record, tokenizer)
    else:
        raise TypeError(f"encode takes Conversation or RawText records, got {type(record).__name__}")
    return truncate(example, max_length, truncation_side)


def encode_records(records, tokenizer, cfg, counts: dict) -> list[Example]:
    """`records` encoded as `cfg` (a DataConfig) says; ones left with no trained token (cut
    away by truncation) are dropped and counted in `counts` ("truncated",
    "dropped_no_labels"), since a batch of them has no loss to take."""
    examples = []
    for record in records:
        example = encode(record, tokenizer, cfg.max_length, cfg.truncation_side, chat_template=cfg.chat_template)
        counts["truncated"] += example.truncated
        if all(label == IGNORE_INDEX for label in example.labels):
            counts["dropped_no_labels"] += 1
            continue
        examples.append(example)
    return examples


def truncate(example: Example, max_length: int, side: str = "right") -> Example:
    """Keep `max_length` tokens: the start (side "right" cuts the end) or the end ("left")."""
    if side not in ("right", "left"):
        raise ValueError(f"truncation side must be 'right' or 'left', got {side!r}")
    n = len(example.input_ids)
    if n <= max_length:
        return example
    keep = slice(0, max_length) if side == "right" else slice(n - max_length, n)
    return Example(example.input_ids[keep], example.labels[keep], domain=example.domain, truncated=True)


def encode_prompt(messages: list[Message], tokenizer, chat_template: Optional[str] = None) -> list[int]:
    """Token ids of `messages` followed by the template's generation prompt (for rollouts)."""
    text = _render(messages, tokenizer, chat_template, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_messages(record: Conversation) -> list[Message]:
    """The record's turns with its system prompt as a leading system message."""
    head = [{"role": "system", "content": record.system}] if record.system else []
    return head + list(record.messages)


def assistant_spans(messages: list[Message], tokenizer,
                    chat_template: Optional[str] = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn."""
    full = _render(messages, tokenizer, chat_template, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_text = _render(messages[:i], tokenizer, chat_template, add_generation_prompt=True)
        through = _render(messages[: i + 1], tokenizer, chat_template, add_generation_prompt=False)
        if not (through.startswith(start_text) and full.startswith(through)):
            raise UserError("the chat template is not prefix-stable (rendering a conversation changes how its "
                            "earlier turns look), so assistant turns cannot be located; set data.chat_template")
        start = len(start_text)
        turn = through[start:]
        # Train on the content and the end-of-turn marker, not on the whitespace the
        # template puts between turns: nothing is generated after end-of-turn.
        at = turn.find(message["content"])
        content_end = at + len(message["content"]) if at >= 0 else 0
        spans.append((start, start + max(content_end, len(turn.rstrip()))))
    return full, spans


def _encode_conversation(record: Conversation, tokenizer, chat_template: Optional[str]) -> Example:
    text, spans = assistant_spans(chat_messages(record), tokenizer, chat_template)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    # A token is trained when it starts inside an assistant span.
    labels = [tok if any(s <= begin < e for s, e in spans) else IGNORE_INDEX
              for tok, (begin, _) in zip(ids, encoded["offset_mapping"])]
    return Example(ids, labels, domain=record.domain)


def _encode_text(record: RawText, tokenizer) -> Example:
    ids = tokenizer(record.text)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    return Example(ids, list(ids), domain=record.domain)


def _render(messages: list[Message], tokenizer, chat_template: Optional[str], add_generation_prompt: bool) -> str:
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; set data.chat_template")
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=resolve_template(chat_template),
                                         add_generation_prompt=add_generation_prompt)


def render_marked(example: Example, tokenizer) -> str:
    """The example's text with every trained stretch (label != -100) wrapped in « and »."""
    pieces, run, trained = [], [], None
    for tok, label in zip(example.input_ids, example.labels):
        is_trained = label != IGNORE_INDEX
        if run and is_trained != trained:
            pieces.append(_decode_run(run, trained, tokenizer))
            run = []
        run.append(tok)
        trained = is_trained
    if run:
        pieces.append(_decode_run(run, trained, tokenizer))
    return "".join(pieces)


def _decode_run(ids: list[int], trained: bool, tokenizer) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return f"«{text}»" if trained else text
