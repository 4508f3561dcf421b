"""Rendering records with the chat template: which tokens carry labels, truncation, the
marked display, prompts for generation, and templates other than ChatML."""

from __future__ import annotations

import pytest

from trainers.data import encode, encode_prompt, render_marked
from trainers.data.formats import detect_format, parse_row
from trainers.data.records import IGNORE_INDEX, Conversation, RawText
from trainers.errors import UserError
from test_data_formats import CASES

EOT = "<|im_end|>"


def label_runs(example, tokenizer) -> list[str]:
    """The decoded text of each contiguous stretch of label-bearing tokens."""
    runs, current = [], []
    for tok, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == tok
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def untrained_text(example, tokenizer) -> str:
    ids = [t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX]
    return tokenizer.decode(ids, skip_special_tokens=False)


SFT_CONVERSATIONS = [(row, fmt) for row, fmt, purpose, expected in CASES
                     if purpose == "sft" and isinstance(expected, Conversation)]


@pytest.mark.parametrize("row,fmt", SFT_CONVERSATIONS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(SFT_CONVERSATIONS)])
def test_only_assistant_turns_are_trained(tiny_tokenizer, row, fmt):
    record = parse_row(detect_format(row), row, "d.jsonl", 1, "sft")
    example = encode(record, tiny_tokenizer, 512)
    assert not example.truncated and len(example.labels) == len(example.input_ids)
    answers = [m["content"] for m in record.messages if m["role"] == "assistant"]
    assert label_runs(example, tiny_tokenizer) == [a + EOT for a in answers]
    rest = untrained_text(example, tiny_tokenizer)
    for m in record.messages:
        if m["role"] == "user":
            assert m["content"] in rest
    if record.system:
        assert f"<|im_start|>system\n{record.system}{EOT}" in rest


def test_full_ids_match_the_template(tiny_tokenizer):
    messages = [{"role": "user", "content": "What is 23 + 45?"}, {"role": "assistant", "content": "68"}]
    example = encode(Conversation(messages), tiny_tokenizer, 512)
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_raw_text_trains_every_token(tiny_tokenizer):
    example = encode(RawText("Once upon a time."), tiny_tokenizer, 512)
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tiny_tokenizer.eos_token_id


def test_render_marked(tiny_tokenizer):
    record = Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                          system="Be brief.")
    shown = render_marked(encode(record, tiny_tokenizer, 512), tiny_tokenizer)
    assert shown == (f"<|im_start|>system\nBe brief.{EOT}\n<|im_start|>user\nHi{EOT}\n"
                     f"<|im_start|>assistant\n«Hello!{EOT}»\n")


def test_prompt_ids_are_a_prefix_of_the_training_ids(tiny_tokenizer):
    messages = [{"role": "user", "content": "Reverse: abcd"}, {"role": "assistant", "content": "dcba"}]
    prompt = encode_prompt(messages[:1], tiny_tokenizer)
    full = encode(Conversation(messages), tiny_tokenizer, 512)
    assert full.input_ids[: len(prompt)] == prompt
    first_trained = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    assert first_trained == len(prompt)


LONG = Conversation([{"role": "user", "content": "Repeat the word many times please."},
                     {"role": "assistant", "content": " ".join(["word"] * 40)}])


def test_truncation_right_keeps_the_start(tiny_tokenizer):
    full = encode(LONG, tiny_tokenizer, 10_000)
    cut = encode(LONG, tiny_tokenizer, 20, truncation_side="right")
    assert cut.truncated and not full.truncated and cut.seq_lens == [20]
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]


def test_truncation_left_keeps_the_end(tiny_tokenizer):
    full = encode(LONG, tiny_tokenizer, 10_000)
    cut = encode(LONG, tiny_tokenizer, 20, truncation_side="left")
    assert cut.truncated and len(cut.input_ids) == 20
    assert cut.input_ids == full.input_ids[-20:] and cut.labels == full.labels[-20:]
    assert tiny_tokenizer.decode(cut.input_ids).endswith("word word" + EOT + "\n")


def test_other_prefix_stable_template(tiny_tokenizer):
    # No trailing newline after end-of-turn, a different end marker, text-only headers.
    template = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}"
                "{% if m['role'] == 'assistant' %}<|endoftext|>{% endif %}\n\n{% endfor %}"
                "{% if add_generation_prompt %}### assistant:\n{% endif %}")
    record = Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}])
    example = encode(record, tiny_tokenizer, 512, chat_template=template)
    assert label_runs(example, tiny_tokenizer) == ["Hello!<|endoftext|>", "Bye!<|endoftext|>"]
    assert "### user:\nHi" in untrained_text(example, tiny_tokenizer)


def test_template_that_rewrites_history_is_refused(tiny_tokenizer):
    template = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    record = Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    with pytest.raises(UserError, match="not prefix-stable"):
        encode(record, tiny_tokenizer, 512, chat_template=template)
